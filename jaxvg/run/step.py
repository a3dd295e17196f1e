"""One RL step, stage by stage: what `jaxvg.train.run` calls for each step.

  sample_groups   draw prompt batches; sample G completions each and reward them, until dynamic sampling (DAPO) has
                  enough informative groups or the step's batches are drawn
  prepare         per kept batch: the old policy's and the reference's log-probs, group advantages on the tokens, and
                  the frozen teachers' pass (distillation), once for all epochs
  assign_credit   PGPO / PACR / PDCR reshape the advantages over the whole rollout batch (jaxvg.credit)
  update          epochs x minibatches of guarded optimizer updates, micro-batches accumulated into each
  step_metrics    the step's row of metrics.jsonl: rewards, lengths, advantages, credit, dynamic sampling, times

`rl_step` runs them in that order. Each stage reads the run's parts (`StepParts`: the config, the tokenizer, the jitted
device functions, the teacher) and the data of the stages before it, so each can be called alone.
"""

import dataclasses
import logging
import time
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxvg.core import hosts
from jaxvg.credit import assign
from jaxvg.data import prompts
from jaxvg.distill import teachers
from jaxvg.rl import advantages, dynamic_sampling, losses, optim, rollout, update
from jaxvg.run import builders, experiment

log = logging.getLogger("jaxvg")


@dataclasses.dataclass(frozen=True)
class StepParts:
  """What a step needs besides the train state: built once per run (`jaxvg.train.build_step_parts`)."""
  cfg: experiment.Config
  tokenizer: Any
  model_cfg: Any                    # the policy's jaxvg.models.ModelConfig
  fmt: prompts.PromptFormat
  reward_fn: Callable
  sampling: rollout.SamplingConfig
  loss_cfg: losses.PolicyLossConfig
  estimator: str                    # the advantage estimator (jaxvg.rl.config.advantage_estimator)
  place: Callable                   # a host batch -> global arrays split over the mesh's batch axes
  mesh: Any
  batch_axes: tuple[str, ...]
  sample: Callable                  # rollout.rollout, announced
  score: Callable                   # jitted update.score_fn
  policy_step: Callable | None      # jitted update.policy_step (state donated)
  credit_fn: Callable               # assign.make_batch_credit_fn
  ref_params: Any = None            # the k3 KL term's reference (algo.kl_coef > 0)
  teacher: teachers.Teacher | None = None
  teacher_pass: Callable | None = None
  distill_step: Callable | None = None
  vigos_spans: Callable | None = None
  gradient_probe: Callable | None = None  # teachers.make_gradient_probe (distill.gradient_stats_every > 0)
  distill_cfs: tuple[str, ...] = ()  # the counterfactual prompts the teachers read
  contexts: tuple[str, ...] = ()     # the privileged contexts the teachers read

  @property
  def group_size(self) -> int:
    return self.cfg.rollout.group_size

  @property
  def distilling(self) -> bool:
    return self.cfg.distill.method != "none"

  @property
  def uses_rl(self) -> bool:  # pure distillation needs no old log-probs, no advantages
    return not self.distilling or self.cfg.distill.rl_alpha > 0


class Draw(NamedTuple):
  """One drawn prompt batch with its rollouts, their decoded texts and their reward dicts (one per rollout)."""
  batch: Any
  rolls: rollout.Rollouts
  texts: list[str]
  scores: list[dict]


def new_times() -> dict[str, float]:
  return {"data_wait": 0.0, "sample": 0.0, "reward": 0.0}


# ---------------------------------------------------------------------------------------------------------- sample


def sample_and_reward(parts: StepParts, state, batch, key, times: dict) -> Draw:
  """G completions of each prompt of `batch`, decoded and rewarded."""
  ts = time.time()
  p = batch.prompts
  rolls = hosts.fetch(parts.sample(state.graphdef, state.params, input_ids_BT=p.input_ids_BT,
                                   attention_mask_BT=p.attention_mask_BT, positions_3BT=p.positions_3BT,
                                   deltas_B=p.deltas_B, vision=p.vision, key=key, config=parts.sampling,
                                   mesh=parts.mesh if parts.batch_axes else None, data_axes=parts.batch_axes))
  times["sample"] += time.time() - ts
  ts = time.time()
  texts = builders.decode_completions(parts.tokenizer, rolls.tokens_BT, rolls.mask_BT, prefill=parts.fmt.prefill)
  G = parts.group_size
  scores = [parts.reward_fn(t, batch.answers[n // G], fmt=parts.fmt) for n, t in enumerate(texts)]
  times["reward"] += time.time() - ts
  return Draw(batch, rolls, texts, scores)


def sample_groups(parts: StepParts, state, data_iter, key, times: dict):
  """(draws, keep_N per draw, dynamic-sampling stats, key): prompt batches drawn until enough informative groups.

  With `algo.dynamic_sampling`, a group is kept when its mean accuracy lies strictly inside (ds_low, ds_high), and
  batches are drawn until prompts_per_batch x minibatches x micro_batches groups are kept or ds_max_tries x
  micro_batches batches were drawn; without it, every group of the step's batches is kept.
  """
  algo, G = parts.cfg.algo, parts.group_size
  draws = algo.minibatches * algo.micro_batches  # drawn batches per step without dynamic sampling
  low, high = (algo.ds_low, algo.ds_high) if algo.dynamic_sampling else (-1.0, 2.0)
  accumulator = dynamic_sampling.DynamicBatch(
      target_groups=parts.cfg.data.prompts_per_batch * draws, group_size=G, low=low, high=high,
      max_tries=max(algo.ds_max_tries * algo.micro_batches, draws) if algo.dynamic_sampling else draws)
  drawn = []
  while not accumulator.done:
    ts = time.time()
    batch = next(data_iter)  # with data.worker_count > 0 the records were processed meanwhile
    times["data_wait"] += time.time() - ts
    key, sample_key = jax.random.split(key)
    draw = sample_and_reward(parts, state, batch, sample_key, times)
    accuracy_N = (np.asarray([s["accuracy"] for s in draw.scores]) if algo.dynamic_sampling
                  else np.full(len(draw.scores), .5))
    # Filler rows of a short batch never count as kept groups.
    accuracy_N = np.where(np.repeat(np.asarray(batch.prompts.valid_B), G), accuracy_N, 0.0)
    rows = len(draw.scores)
    accumulator.add({"try": np.full(rows, len(drawn)), "row": np.arange(rows)}, accuracy_N)
    drawn.append(draw)
  kept, ds_stats = accumulator.result()
  keep_rows = [np.zeros(len(d.scores), bool) for d in drawn]
  for t, r in zip(kept["try"], kept["row"]):
    keep_rows[t][r] = True
  return drawn, keep_rows, ds_stats, key


# ---------------------------------------------------------------------------------------------------------- prepare


def prepare_batch(parts: StepParts, state, index: int, draw: Draw, keep_N: np.ndarray) -> dict:
  """One micro-batch of the update: the kept rollouts of `draw` with their old-policy and reference log-probs and
  their group advantages on the tokens (and, distilling, the teachers' pass; `palr_skipped` counts a PALR pass the
  batch's images did not allow)."""
  batch, rolls, G = draw.batch, draw.rolls, parts.group_size
  prompt = parts.place(assign.as_prompt_inputs(batch.prompts))
  tokens_NT = parts.place(jnp.asarray(rolls.tokens_BT))
  kept_mask_NT = np.asarray(rolls.mask_BT) & keep_N[:, None]
  mask_NT = parts.place(jnp.asarray(kept_mask_NT))
  if parts.uses_rl:
    logp_old, entropy = parts.score(state.params, state.graphdef, prompt, tokens_NT, mask_NT, G)
  else:
    logp_old = entropy = jnp.zeros(mask_NT.shape, jnp.float32)
  logp_ref = (parts.score(parts.ref_params, state.graphdef, prompt, tokens_NT, mask_NT, G)[0]
              if parts.ref_params is not None else jnp.zeros_like(logp_old))
  rewards_N = jnp.asarray([s["overall"] for s in draw.scores], jnp.float32)
  adv_NT = advantages.broadcast_to_tokens(advantages.group_advantages(rewards_N, G, estimator=parts.estimator),
                                          mask_NT)
  mb = types.SimpleNamespace(prompts=batch.prompts, tokens_NT=tokens_NT, mask_NT=mask_NT, answers=batch.answers)
  micro = dict(draw=index, prompt=prompt, tokens=tokens_NT, mask=mask_NT, logp_old=logp_old, logp_ref=logp_ref,
               entropy=entropy, adv=adv_NT, mb=mb, keep=keep_N, answers=batch.answers, palr_skipped=0,
               scores=[s for s, k in zip(draw.scores, keep_N) if k], texts=draw.texts)
  if parts.distilling:
    micro.update(teacher_inputs(parts, batch, prompt, rolls.tokens_BT, kept_mask_NT, tokens_NT, mask_NT))
  return micro


def teacher_inputs(parts: StepParts, batch, prompt, tokens_host_NT, kept_mask_NT, tokens_NT, mask_NT) -> dict:
  """The frozen teachers' pass on these rollouts, once for all epochs, with the contexts the student's loss reads."""
  d = parts.cfg.distill
  contexts = {"real": prompt, **{v: parts.place(assign.counterfactual_inputs(batch.prompts, v))
                                 for v in parts.distill_cfs + parts.contexts}}
  # PALR swaps images between prompts: only where every prompt holds one image of one grid.
  patches = teachers.uniform_image_patches(batch.prompts) if d.palr else 0
  spans = parts.place(parts.vigos_spans(tokens_host_NT, kept_mask_NT)) if parts.vigos_spans else None
  out = parts.teacher_pass(parts.teacher, contexts, tokens_NT, mask_NT, spans, image_patches=patches)
  return dict(contexts=contexts, teacher=out, palr_skipped=int(d.palr and not patches))


def prepare(parts: StepParts, state, drawn: list[Draw], keep_rows: list[np.ndarray]) -> list[dict]:
  """One micro-batch per drawn batch that kept a group (`prepare_batch`)."""
  return [prepare_batch(parts, state, i, d, keep_N) for i, (d, keep_N) in enumerate(zip(drawn, keep_rows))
          if keep_N.any()]


def assign_credit(parts: StepParts, state, prepared: list[dict]) -> tuple[list[dict], dict, dict | None]:
  """(micro-batches with credited advantages, credit metrics, dependency maps) over the whole rollout batch: PACR /
  PDCR pool every micro-batch's steps (methods.md section 8)."""
  if not prepared or not parts.uses_rl:
    return prepared, {}, None
  advs, metrics, dep_map = parts.credit_fn(state, [d["mb"] for d in prepared], [d["logp_old"] for d in prepared],
                                           [d["adv"] for d in prepared])
  return [{**d, "adv": adv_NT} for d, adv_NT in zip(prepared, advs)], metrics, dep_map


# ---------------------------------------------------------------------------------------------------------- update


def update_policy(parts: StepParts, state, prepared: list[dict], *, step: int = 0,
                  probe=None) -> tuple[Any, list[dict]]:
  """(state, each update's metrics): `algo.epochs` passes over the micro-batches, split into `algo.minibatches`
  updates; `probe(state, teacher, micro)`, when given, sees each distillation update's inputs first. On every
  `distill.gradient_stats_every`-th step the first update's metrics also hold VGS's gradient statistics (vgs/grad/*),
  measured before it."""
  cfg, step_metrics = parts.cfg, []
  every = cfg.distill.gradient_stats_every
  measure = parts.gradient_probe is not None and every > 0 and step % every == 0
  if not prepared:
    return state, step_metrics
  chunks = np.array_split(np.arange(len(prepared)), min(cfg.algo.minibatches, len(prepared)))
  for _ in range(cfg.algo.epochs):
    for chunk in chunks:
      micro_parts = [prepared[i] for i in chunk]
      weights = update.micro_weights([d["mask"] for d in micro_parts], parts.loss_cfg.aggregation)
      micro = tuple(update.PolicyBatch(d["prompt"], d["tokens"], d["mask"], d["logp_old"], d["adv"], d["logp_ref"],
                                       jnp.asarray(w, jnp.float32))
                    for d, w in zip(micro_parts, weights))
      grad_stats = {}
      if parts.distilling:
        micro = distill_batches(parts, micro_parts, micro)
        if probe is not None:
          probe(state, parts.teacher, micro)
        if measure and not step_metrics:
          grad_stats = {f"vgs/grad/{k}": v for k, v in parts.gradient_probe(state, parts.teacher, micro).items()}
        state, m = parts.distill_step(state, parts.teacher, micro)
      else:
        state, m = parts.policy_step(state, micro)
      step_metrics.append({**hosts.fetch(m), **grad_stats})
  return state, step_metrics


def distill_batches(parts: StepParts, micro_parts: list[dict], policy: tuple) -> tuple:
  """The distillation micro-batches of one update, the RL part riding along when distill.rl_alpha > 0."""
  d = parts.cfg.distill
  norms = teachers.step_normalizers(d.method, d, [m["mask"] for m in micro_parts], [m["teacher"] for m in micro_parts])
  return tuple(teachers.DistillBatch(prompt=m["prompt"], prompt_text=m["contexts"].get("no_image"),
                                     tokens_NT=m["tokens"], mask_NT=m["mask"], teacher=m["teacher"],
                                     policy=pb if parts.uses_rl else None, **n)
               for m, pb, n in zip(micro_parts, policy, norms))


def count_skips(step: int, step_metrics: list[dict], in_a_row: int, limit: int) -> tuple[int, int]:
  """(updates skipped in a row, the last skip reason): the optimizer guard's verdicts, each skip named in the log."""
  reason = 0
  for m in step_metrics:
    reason = int(m["update_skip_reason"])
    in_a_row = in_a_row + 1 if reason else 0
    if reason:
      log.warning("step %d: update skipped (%s); %d in a row, the run stops at %d", step, optim.SKIP_REASONS[reason],
                  in_a_row, limit)
  return in_a_row, reason


# ---------------------------------------------------------------------------------------------------------- metrics


def step_metrics(parts: StepParts, state, drawn: list[Draw], prepared: list[dict], updates: list[dict],
                 credit_metrics: dict, ds_stats, times: dict) -> dict[str, float]:
  """The step's row of metrics.jsonl (`time/step` and the data pipeline's skip counts are added by the caller)."""
  keys = dict.fromkeys(k for m in updates for k in m)  # PALR parts are missing from skipped updates
  agg = {k: float(np.mean([m[k] for m in updates if k in m])) for k in keys}
  if parts.cfg.distill.palr:  # sum_t S_t A_t / sum_t S_t (A_t + I_t) over the step (vigos.palr, methods.md 4.2)
    agg["palr"] = agg["palr/num"] / max(agg["palr/den"], 1e-12) if "palr/num" in agg else float("nan")
    agg["palr/skipped_batches"] = float(sum(d["palr_skipped"] for d in prepared))
  all_scores = [s for d in drawn for s in d.scores]
  for name in all_scores[0]:
    agg[f"reward/{name}"] = float(np.mean([s[name] for s in all_scores]))
  lengths = np.concatenate([np.asarray(d.rolls.lengths_B) for d in drawn])
  agg["response_length"] = float(lengths.mean())
  if prepared and parts.uses_rl:
    adv_all = np.concatenate([hosts.to_numpy(d["adv"])[hosts.to_numpy(d["mask"]) > 0] for d in prepared])
    agg["adv/mean"], agg["adv/std"] = float(adv_all.mean()), float(adv_all.std())
    agg["adv/abs_max"] = float(np.abs(adv_all).max()) if adv_all.size else 0.0
    agg.update(credit_metrics)
  agg.update({f"dynamic_sampling/{k}": float(v) for k, v in dataclasses.asdict(ds_stats).items()})
  agg.update({f"time/{k}": v for k, v in times.items()})
  agg["tokens_per_s"] = float(lengths.sum()) / max(times["sample"], 1e-9)
  agg["skipped_updates"] = float(hosts.fetch(state.skipped))
  return agg


def sample_rollouts(tokenizer, drawn: list[Draw], prepared: list[dict], dep_map: dict, group_size: int,
                    count: int) -> list[dict]:
  """The first rollouts of the step for samples.jsonl; with token dependency maps (PGPO), each sample also lists its
  completion's tokens with their k3 dependency and PGPO weight (the maps' rows follow the scored micro-batches)."""
  rows = {k[len("rows/"):]: v for k, v in dep_map.items() if k.startswith("rows/")}
  draw = prepared[0]["draw"] if rows and prepared else 0
  batch, rolls, texts, scores = drawn[draw]
  tokens_NT, mask_NT = np.asarray(rolls.tokens_BT), np.asarray(rolls.mask_BT) > 0
  samples = []
  for n in range(min(count, len(texts))):
    sample = {"prompt_id": batch.ids[n // group_size], "answer": batch.answers[n // group_size],
              "completion": texts[n], **scores[n]}
    if rows:
      ids = tokens_NT[n][mask_NT[n]]
      sample["tokens"] = [tokenizer.decode([int(i)]) for i in ids]
      sample.update({name: [round(float(x), 5) for x in v[n][:len(ids)]] for name, v in rows.items()})
    samples.append(sample)
  return samples


# ---------------------------------------------------------------------------------------------------------- the step


class StepResult(NamedTuple):
  metrics: dict[str, float]         # the row of metrics.jsonl
  updates: list[dict]               # each optimizer update's own metrics (the guard's verdicts among them)
  drawn: list[Draw]
  prepared: list[dict]
  dep_map: dict                     # the credit method's dependency maps (histograms, samples)


def rl_step(parts: StepParts, state, data_iter, key, *, step: int, probe=None):
  """(state, key, StepResult): sample -> reward -> prepare (score, advantages, teachers) -> credit -> update."""
  t0, times = time.time(), new_times()
  drawn, keep_rows, ds_stats, key = sample_groups(parts, state, data_iter, key, times)
  ts = time.time()
  prepared = prepare(parts, state, drawn, keep_rows)
  prepared, credit_metrics, dep_map = assign_credit(parts, state, prepared)
  times["score"] = time.time() - ts
  ts = time.time()
  if not prepared:
    log.warning("step %d: no informative group was sampled; no update", step)
  state, updates = update_policy(parts, state, prepared, step=step, probe=probe)
  times["update"] = time.time() - ts
  agg = step_metrics(parts, state, drawn, prepared, updates, credit_metrics, ds_stats, times)
  agg["time/step"] = time.time() - t0
  return state, key, StepResult(agg, updates, drawn, prepared, dep_map or {})
