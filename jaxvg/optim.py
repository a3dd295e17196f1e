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


def guarded_update(tx: optax.GradientTransformation, grads, opt_state, params):
  """Applies one update unless a gradient is non-finite; then parameters and state stay as they were.

  Returns (params, opt_state, skipped) with `skipped` a bool scalar the caller counts.
  """
  finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  updates, new_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return keep(new_params, params), keep(new_state, opt_state), ~finite


def trainable_params(model) -> nnx.State:
  return nnx.state(model, nnx.Param)
