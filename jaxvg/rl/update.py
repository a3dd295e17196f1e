"""The jitted update stages: policy-gradient and supervised steps over a `TrainState`.

A step takes a tuple of micro-batches, sums their gradients (each micro-batch loss already carries its share of
the mini-batch's normalizer, see `micro_weights`), and applies one guarded optax update. The model travels as a
parameter pytree; `nnx.merge` rebuilds it inside the jit.
"""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxvg.rl import losses, optim, scoring


@flax.struct.dataclass
class TrainState:
  graphdef: Any = flax.struct.field(pytree_node=False)
  params: Any
  opt_state: Any
  step: jax.Array
  skipped: jax.Array  # updates skipped by the non-finite guard

  def model(self):
    return nnx.merge(self.graphdef, self.params)


def init_state(model, tx: optax.GradientTransformation) -> TrainState:
  graphdef, params = nnx.split(model, nnx.Param)
  return TrainState(graphdef, params, tx.init(params), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PolicyBatch:
  """One micro-batch of rollouts for the policy loss: N = B * G completions of B prompts."""

  prompt: scoring.PromptInputs
  tokens_NT: jax.Array       # int32 completion tokens
  mask_NT: jax.Array         # response mask (stop token included)
  logp_old_NT: jax.Array     # rollout-policy log-probs
  adv_NT: jax.Array          # token advantages
  logp_ref_NT: jax.Array     # reference log-probs (zeros when no KL term)
  weight: jax.Array          # this micro-batch's share of the mini-batch normalizer


def micro_weights(masks, aggregation: str) -> list[float]:
  """Shares that make a sum of per-micro-batch means equal the mean over the whole mini-batch.

  token-mean normalizes by tokens, the sequence-mean modes by sequences with at least one response token (rows
  masked out entirely, e.g. groups dropped by dynamic sampling, count in neither, as in `losses.aggregate`).
  """
  if aggregation == "token-mean":
    counts = [float(jnp.sum(m)) for m in masks]
  else:
    counts = [float(jnp.sum(jnp.any(m > 0, axis=1))) for m in masks]
  total = max(sum(counts), 1.0)
  return [c / total for c in counts]


def policy_loss_fn(params, graphdef, batch: PolicyBatch, group_size: int, loss_cfg: losses.PolicyLossConfig):
  model = nnx.merge(graphdef, params)
  logp_NT, ent_NT = scoring.completion_logps(model, batch.prompt, batch.tokens_NT, batch.mask_NT, group_size,
                                            with_entropy=True)
  loss, metrics = losses.policy_loss(logp_NT, batch.logp_old_NT, batch.adv_NT, batch.mask_NT, loss_cfg,
                                     logp_ref_BT=batch.logp_ref_NT if loss_cfg.kl_coef > 0 else None,
                                     entropy_BT=ent_NT)
  return loss * batch.weight, metrics


def apply_update(state: TrainState, tx, grads, metrics_list, *, loss=None, max_update_ratio: float | None = None):
  """The guarded optax update (`optim.guarded_update`) and the step's metrics: the micro-batch metrics averaged,
  grad_norm, update_norm, update_skipped (0 / 1) and update_skip_reason (a key of optim.SKIP_REASONS, 0 if applied)."""
  params, opt_state, reason = optim.guarded_update(tx, grads, state.opt_state, state.params, loss=loss,
                                                   max_update_ratio=max_update_ratio)
  skipped = reason > 0
  metrics = {k: jnp.mean(jnp.stack([m[k] for m in metrics_list])) for k in metrics_list[0]}
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["update_skipped"] = skipped.astype(jnp.float32)
  metrics["update_skip_reason"] = reason.astype(jnp.float32)
  new = state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                      skipped=state.skipped + skipped.astype(jnp.int32))
  return new, metrics


def policy_step(state: TrainState, micro: tuple[PolicyBatch, ...], *, tx, group_size: int,
                loss_cfg: losses.PolicyLossConfig, max_update_ratio: float | None = None):
  """One optimizer update from the summed gradients (and losses) of the micro-batches."""
  grads, loss, metrics_list = None, 0.0, []
  for batch in micro:
    (share, metrics), g = jax.value_and_grad(policy_loss_fn, has_aux=True)(state.params, state.graphdef, batch,
                                                                            group_size, loss_cfg)
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    loss = loss + share
    metrics_list.append(metrics)
  return apply_update(state, tx, grads, metrics_list, loss=loss, max_update_ratio=max_update_ratio)


def score_fn(params, graphdef, prompt: scoring.PromptInputs, tokens_NT, mask_NT, group_size: int):
  """Log-probs and entropies of the completions under `params`, no gradient (old-policy / reference scoring)."""
  model = nnx.merge(graphdef, params)
  return scoring.completion_logps(model, prompt, tokens_NT, mask_NT, group_size, with_entropy=True)


# ---------------------------------------------------------------------------------------------------------- SFT


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SFTBatch:
  prompt: scoring.PromptInputs
  tokens_NT: jax.Array   # reference solution tokens (one per prompt)
  mask_NT: jax.Array
  weight_NT: jax.Array | None = None  # float per-token loss weights (None: the mask)


def sft_loss_fn(params, graphdef, batch: SFTBatch):
  """Weighted mean negative log-likelihood of the reference tokens: sum_t w_t (-log p_t) / sum_t w_t over the batch.

  `sft_loss` is the weighted loss that is optimized, `sft_nll` the plain token mean (comparable across weightings).
  """
  model = nnx.merge(graphdef, params)
  logp_NT = scoring.completion_logps(model, batch.prompt, batch.tokens_NT, batch.mask_NT, 1)
  mask_NT = batch.mask_NT.astype(jnp.float32)
  weight_NT = mask_NT if batch.weight_NT is None else batch.weight_NT * mask_NT
  count = jnp.maximum(jnp.sum(mask_NT), 1.0)
  loss = -jnp.sum(weight_NT * logp_NT) / jnp.maximum(jnp.sum(weight_NT), 1e-6)
  return loss, {"sft_loss": loss, "sft_nll": -jnp.sum(logp_NT * mask_NT) / count, "sft_tokens": count}


def sft_step(state: TrainState, batch: SFTBatch, *, tx, max_update_ratio: float | None = None):
  (loss, metrics), grads = jax.value_and_grad(sft_loss_fn, has_aux=True)(state.params, state.graphdef, batch)
  return apply_update(state, tx, grads, [metrics], loss=loss, max_update_ratio=max_update_ratio)
