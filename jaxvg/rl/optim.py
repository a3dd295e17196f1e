"""The optimizer: AdamW with gradient clipping, a schedule, and per-tower regex rules (freeze, lr multipliers).

Rules are a table of (regex over the parameter path, multiplier), first match wins, as big_vision writes them:
    (("vision/merger_.*", 2.0), ("vision/.*", 0.0), (".*", 1.0))
A multiplier of 0 freezes the parameters: they get no optimizer state and no update.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 1e-6
  schedule: str = "constant"        # constant | cosine | linear
  warmup_steps: int = 0
  total_steps: int = 1000           # horizon of the cosine / linear decay
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 1e-2
  clip_norm: float | None = 1.0
  # Skip an update whose global norm exceeds this multiple of the parameters' global norm (None: no bound): a step
  # that would move the weights by more than their own size is a runaway (a wild learning rate, a loss spike).
  max_update_ratio: float | None = 1.0
  freeze_vision: bool = False
  merger_lr_mult: float = 1.0
  rules: tuple[tuple[str, float], ...] = ()  # extra (regex, multiplier) rules, matched before the defaults


def schedule(cfg: OptimConfig) -> optax.Schedule:
  if cfg.schedule == "constant":
    decay = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps - cfg.warmup_steps, 1))
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.lr, 0.0, max(cfg.total_steps - cfg.warmup_steps, 1))
  else:
    raise ValueError(f"optim.schedule={cfg.schedule!r}: expected constant, cosine or linear")
  if cfg.warmup_steps:
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), decay], [cfg.warmup_steps])
  return decay


def lr_rules(cfg: OptimConfig) -> tuple[tuple[str, float], ...]:
  rules = list(cfg.rules)
  rules.append(("vision/merger_.*", 0.0 if cfg.freeze_vision else cfg.merger_lr_mult))
  if cfg.freeze_vision:
    rules.append(("vision/.*", 0.0))
  rules.append((".*", 1.0))
  return tuple(rules)


def param_labels(params, rules) -> dict:
  """A pytree of multipliers, one per parameter, from the first rule whose regex matches its path."""
  def label(path, _):
    name = "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
    for pattern, mult in rules:
      if re.fullmatch(pattern, name):
        return str(mult)
    raise ValueError(f"no optimizer rule matches parameter {name}")
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg: OptimConfig, params) -> optax.GradientTransformation:
  """AdamW + clipping, with per-parameter lr multipliers from the rule table (0 = frozen)."""
  labels = param_labels(params, lr_rules(cfg))
  sched = schedule(cfg)

  def adamw(mult: float):
    if mult == 0.0:
      return optax.set_to_zero()
    return optax.adamw(lambda step: sched(step) * mult, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay)

  mults = sorted(set(jax.tree.leaves(labels)))
  tx = optax.multi_transform({m: adamw(float(m)) for m in mults}, labels)
  if cfg.clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx


# Why `guarded_update` skipped an update (0: applied).
SKIP_REASONS = {1: "non-finite loss or gradient", 2: "non-finite parameters after the update",
                3: "update norm above optim.max_update_ratio x the parameter norm"}


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def guarded_update(tx: optax.GradientTransformation, grads, opt_state, params, *, loss=None,
                   max_update_ratio: float | None = None):
  """Applies one update unless it is non-finite or a runaway; then parameters and state stay as they were.

  Checks, in order: the loss and every gradient are finite; every updated parameter is finite; and, with
  `max_update_ratio`, |update| <= max_update_ratio * |params| (global norms).

  Returns (params, opt_state, reason) with `reason` an int32 scalar: 0 when applied, else a key of SKIP_REASONS.
  """
  finite = _all_finite(grads) if loss is None else _all_finite(grads) & jnp.all(jnp.isfinite(loss))
  updates, new_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  reason = jnp.where(finite, 0, 1)
  reason = jnp.where((reason == 0) & ~_all_finite(new_params), 2, reason)
  if max_update_ratio is not None:
    too_big = optax.tree.norm(updates) > max_update_ratio * optax.tree.norm(params)
    reason = jnp.where((reason == 0) & too_big, 3, reason)
  ok = reason == 0
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return keep(new_params, params), keep(new_state, opt_state), reason.astype(jnp.int32)


def trainable_params(model) -> nnx.State:
  return nnx.state(model, nnx.Param)
