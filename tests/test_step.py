"""The RL step's stages alone (jaxvg.run.step), on stub parts: no model, the outcomes worked out by hand."""

import dataclasses
import types

import numpy as np
import pytest

from jaxvg.data import prompts
from jaxvg.rl import losses, rollout
from jaxvg.run import experiment, step

G, B, T = 2, 2, 3


class _Tokenizer:
  def decode(self, ids, skip_special_tokens=True):
    return "".join(chr(ord("a") + i) for i in ids)


def _batch(index: int, valid=(True, True)):
  prompts_ns = types.SimpleNamespace(input_ids_BT=None, attention_mask_BT=None, positions_3BT=None, deltas_B=None,
                                     vision=None, valid_B=np.asarray(valid))
  return types.SimpleNamespace(prompts=prompts_ns, answers=[f"{index}-0", f"{index}-1"],
                               ids=[f"p{index}-0", f"p{index}-1"])


def _parts(correct: dict, **algo):
  """Stub parts whose sampler writes the draw index into each row's first token, and whose reward reads it back:
  `correct[(draw, prompt)]` lists the two samples' accuracies."""
  draws = {"n": 0}

  def sample(graphdef, params, *, key, config, **_):
    n = draws["n"]
    draws["n"] += 1
    tokens = np.zeros((B * G, T), np.int32)
    tokens[:, 0] = n
    tokens[:, 1] = np.arange(B * G)
    mask = np.ones((B * G, T), bool)
    return rollout.Rollouts(tokens_BT=tokens, mask_BT=mask, logp_BT=np.zeros((B * G, T), np.float32),
                            sample_logp_BT=np.zeros((B * G, T), np.float32),
                            prompt_index_B=np.arange(B * G) // G, lengths_B=np.full(B * G, T, np.int32),
                            finished_B=np.ones(B * G, bool), steps=np.int32(T))

  def reward(text, answer, fmt):
    draw, row = ord(text[0]) - ord("a"), ord(text[1]) - ord("a")
    acc = float(correct[(draw, row // G)][row % G])
    return {"overall": acc, "accuracy": acc}

  cfg = experiment.Config(data=experiment.DataCfg(prompts_per_batch=B), rollout=experiment.RolloutCfg(group_size=G),
                          algo=experiment.AlgoCfg(**algo))
  return step.StepParts(cfg=cfg, tokenizer=_Tokenizer(), model_cfg=None, fmt=prompts.get_format("pgpo"),
                        reward_fn=reward, sampling=None, loss_cfg=losses.preset(cfg.algo.name), estimator="grpo",
                        place=lambda x: x, mesh=None, batch_axes=(), sample=sample, score=None, policy_step=None,
                        credit_fn=None)


def _state():
  return types.SimpleNamespace(graphdef=None, params=None)


def test_dynamic_sampling_draws_until_enough_informative_groups():
  import jax
  # Draw 0: both groups all correct (dropped high). Draw 1: group 0 mixed (kept), group 1 all wrong (dropped low).
  # Draw 2: group 0 mixed (kept): two groups kept = prompts_per_batch, so no fourth draw.
  correct = {(0, 0): (1, 1), (0, 1): (1, 1), (1, 0): (1, 0), (1, 1): (0, 0), (2, 0): (0, 1), (2, 1): (1, 0)}
  parts = _parts(correct, dynamic_sampling=True, ds_max_tries=5)
  times = step.new_times()
  drawn, keep, stats, _ = step.sample_groups(parts, _state(), iter(_batch(i) for i in range(9)),
                                             jax.random.key(0), times)
  assert len(drawn) == 3
  assert [k.tolist() for k in keep] == [[False] * 4, [True, True, False, False], [True, True, False, False]]
  assert (stats.tries, stats.groups_seen, stats.dropped_high, stats.dropped_low) == (3, 6, 2, 1)
  assert stats.groups_returned == 2 and stats.filled
  assert drawn[1].scores[0] == {"overall": 1.0, "accuracy": 1.0} and drawn[1].texts[0].startswith(parts.fmt.prefill)
  assert times["sample"] >= 0 and times["reward"] >= 0


def test_without_dynamic_sampling_every_group_of_the_steps_batches_is_kept():
  import jax
  correct = {(d, p): (1, 1) for d in range(4) for p in range(B)}
  parts = _parts(correct, dynamic_sampling=False, minibatches=2)
  drawn, keep, stats, _ = step.sample_groups(parts, _state(), iter(_batch(i) for i in range(9)), jax.random.key(0),
                                             step.new_times())
  assert len(drawn) == 2 and all(k.all() for k in keep)  # minibatches x micro_batches draws, all groups kept
  assert stats.dropped_high == 0


def test_a_filler_row_never_counts_as_a_kept_group():
  import jax
  correct = {(d, p): (1, 0) for d in range(4) for p in range(B)}  # every group mixed
  parts = _parts(correct, dynamic_sampling=True, ds_max_tries=2)
  batches = iter([_batch(0, valid=(True, False)), _batch(1, valid=(True, False)), _batch(2)])
  drawn, keep, stats, _ = step.sample_groups(parts, _state(), batches, jax.random.key(0), step.new_times())
  assert len(drawn) == 2  # one real group per draw: two draws fill the two groups
  assert [k.tolist() for k in keep] == [[True, True, False, False]] * 2


def test_count_skips_counts_a_run_and_resets_on_an_applied_update(caplog):
  ms = lambda *reasons: [{"update_skip_reason": r} for r in reasons]
  assert step.count_skips(0, ms(0, 1, 1), 0, 3) == (2, 1)
  assert step.count_skips(1, ms(1), 2, 3) == (3, 1)
  assert step.count_skips(2, ms(2, 0), 3, 3) == (0, 0)
  assert "update skipped" in caplog.text


def test_no_kept_group_means_no_update_and_no_credit():
  parts = _parts({})
  state = _state()
  assert step.prepare(parts, state, [], []) == []
  assert step.assign_credit(parts, state, []) == ([], {}, None)
  assert step.update_policy(parts, state, []) == (state, [])


@pytest.mark.parametrize("distill, alpha, uses_rl", [("none", 0.0, True), ("opd", 0.0, False), ("opd", 0.3, True)])
def test_pure_distillation_skips_the_rl_parts(distill, alpha, uses_rl):
  parts = _parts({})
  parts = dataclasses.replace(parts, cfg=dataclasses.replace(
      parts.cfg, distill=experiment.DistillCfg(method=distill, rl_alpha=alpha)))
  assert parts.uses_rl is uses_rl and parts.distilling is (distill != "none")
