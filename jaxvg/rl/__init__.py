"""One RL step, in the order it runs.

  rollout.py           sample G completions per prompt (KV-cached decoding, top-p / top-k)
  rewards.py           score each completion: format and answer accuracy (math-verify)
  dynamic_sampling.py  DAPO's filter: keep groups whose rewards differ, draw again until the batch fills
  scoring.py           per-token log-probabilities and entropies of the old policy
  advantages.py        group-relative advantages (GRPO, Dr.GRPO, RLOO) broadcast onto tokens
  losses.py            the clipped policy losses of GRPO, DAPO, Dr.GRPO and GSPO, with their aggregations
  update.py            the train state, gradient accumulation over micro-batches and the guarded update
  optim.py             the optimizer: schedules, parameter groups, the update guard
  config.py            this stage's config sections (RolloutCfg, AlgoCfg)

Credit assignment (jaxvg.credit) reshapes the advantages between scoring and the update.
"""
