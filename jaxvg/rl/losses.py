"""One clipped policy-gradient loss over token-level inputs; GRPO, DAPO, Dr.GRPO and GSPO are configs of it.

Every input is [B, T] over response tokens. Per token, with rho = pi_theta / pi_old and advantage A:

  pg = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high))     (PPO clip)
  pg = min(pg, -c * A)                       where A < 0               (dual clip, c = dual_clip, EasyR1's form)
  loss_tok = pg + kl_coef * k3(pi_ref / pi_theta) - entropy_coef * entropy

then `aggregate` reduces loss_tok to a scalar in one of three ways (token-mean, seq-mean-token-mean,
seq-mean-token-sum-norm). With `ratio_level='sequence'` (GSPO) rho is replaced by the GSPO-token ratio
s_i * exp(logp - sg(logp)) where s_i = exp(mean_t(logp - logp_old)) over the tokens of sequence i.

`seq_ids_BT` lets several sequences share one packed row; every per-sequence quantity (the seq-mean aggregations and
the GSPO ratio) is then computed per (row, id), so a packed batch gives the same loss as the unpacked one.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

RATIO_LEVELS = ("token", "sequence")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# Log-ratios are clamped before exp (as EasyR1/verl do) so a stale sample cannot overflow float32.
LOG_RATIO_CLAMP = 20.0


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """Clipped surrogate settings; the defaults are GRPO's (methods.md section 1).

  Attributes:
    clip_low: eps_low, the ratio is clipped below at 1 - clip_low.
    clip_high: eps_high, the ratio is clipped above at 1 + clip_high (DAPO's clip-higher: 0.28).
    dual_clip: c > 1, or None. For A < 0 the token loss is capped at -c * A.
    ratio_level: 'token' (PPO/GRPO) or 'sequence' (GSPO, length-normalized sequence ratio).
    aggregation: 'token-mean' (DAPO), 'seq-mean-token-mean' (GRPO) or 'seq-mean-token-sum-norm' (Dr.GRPO).
    max_len: the constant divisor of 'seq-mean-token-sum-norm' (the max generation length); unused otherwise.
    kl_coef: weight of the k3 KL to the reference policy, per token (needs logp_ref_BT when > 0).
    entropy_coef: weight of the entropy bonus, subtracted per token (needs entropy_BT when != 0).
  """

  clip_low: float = 0.2
  clip_high: float = 0.2
  dual_clip: float | None = None
  ratio_level: str = "token"
  aggregation: str = "seq-mean-token-mean"
  max_len: int | None = None
  kl_coef: float = 0.0
  entropy_coef: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.clip_low < 1.0:
      raise ValueError(f"clip_low must lie in [0, 1), got {self.clip_low}")
    if self.clip_high < 0.0:
      raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
    if self.dual_clip is not None and self.dual_clip <= 1.0:
      raise ValueError(f"dual_clip must be None or > 1, got {self.dual_clip}")
    if self.ratio_level not in RATIO_LEVELS:
      raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {self.ratio_level!r}")
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
    if self.aggregation == "seq-mean-token-sum-norm" and (self.max_len is None or self.max_len <= 0):
      raise ValueError(f"aggregation 'seq-mean-token-sum-norm' needs a positive max_len, got {self.max_len!r}")
    if self.kl_coef < 0.0:
      raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")


_PRESETS = {
    "grpo": dict(clip_low=0.2, clip_high=0.2, dual_clip=None, ratio_level="token",
                 aggregation="seq-mean-token-mean"),
    "dapo": dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, ratio_level="token", aggregation="token-mean"),
    "drgrpo": dict(clip_low=0.2, clip_high=0.2, dual_clip=None, ratio_level="token",
                   aggregation="seq-mean-token-sum-norm"),
    # GSPO paper: sequence-level ratios sit very close to 1, hence the tiny clip range.
    "gspo": dict(clip_low=3e-4, clip_high=4e-4, dual_clip=None, ratio_level="sequence",
                 aggregation="seq-mean-token-mean"),
}


def preset(name: str, **overrides) -> PolicyLossConfig:
  """The loss config of a named method (methods.md sections 1 and 8), with optional field overrides.

  'grpo': clip 0.2/0.2, seq-mean-token-mean.      'dapo': clip 0.2/0.28, dual clip 3.0, token-mean.
  'drgrpo': clip 0.2/0.2, seq-mean-token-sum-norm; needs max_len=<max generation length>.
  'gspo': sequence ratio, clip 3e-4/4e-4, seq-mean-token-mean.
  """
  if name not in _PRESETS:
    raise ValueError(f"unknown loss preset {name!r}; choose one of {tuple(_PRESETS)}")
  fields = {f.name for f in dataclasses.fields(PolicyLossConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown PolicyLossConfig field(s) {unknown}")
  if name == "drgrpo" and overrides.get("max_len") is None:
    raise ValueError("preset 'drgrpo' divides by the max generation length: pass max_len=<int>")
  return PolicyLossConfig(**{**_PRESETS[name], **overrides})


def _segments(mask_BT: jnp.ndarray, seq_ids_BT: jnp.ndarray | None) -> tuple[jnp.ndarray, jnp.ndarray, int]:
  """Per token: a flat sequence index, a {0,1} validity weight; and the number of sequence slots.

  Without ids each row is one sequence (index b). With ids, sequence (b, id) gets index b*T + id, so ids must lie in
  [0, T) per row, -1 marking padding; an id may repeat across rows without clashing.
  """
  B, T = mask_BT.shape
  valid_BT = mask_BT != 0
  if seq_ids_BT is None:
    return jnp.broadcast_to(jnp.arange(B)[:, None], (B, T)), valid_BT.astype(jnp.float32), B
  valid_BT = valid_BT & (seq_ids_BT >= 0)
  seg_BT = jnp.where(valid_BT, jnp.arange(B)[:, None] * T + seq_ids_BT, 0)
  return seg_BT, valid_BT.astype(jnp.float32), B * T


def _segment_sum(x_BT: jnp.ndarray, seg_BT: jnp.ndarray, num_segments: int) -> jnp.ndarray:
  return jax.ops.segment_sum(x_BT.reshape(-1), seg_BT.reshape(-1), num_segments=num_segments)


def _check_ids(seq_ids_BT: ArrayLike | None, shape: tuple[int, ...]) -> jnp.ndarray | None:
  if seq_ids_BT is None:
    return None
  seq_ids_BT = jnp.asarray(seq_ids_BT)
  if seq_ids_BT.shape != shape or not jnp.issubdtype(seq_ids_BT.dtype, jnp.integer):
    raise ValueError(f"seq_ids_BT must be an int array of shape {shape}, got {seq_ids_BT.dtype}{seq_ids_BT.shape}")
  return seq_ids_BT


def sequence_mean(
    x_BT: Float[ArrayLike, "B T"], mask_BT: ArrayLike, *, seq_ids_BT: ArrayLike | None = None
) -> Float[Array, "B T"]:
  """The mean of x over the valid tokens of each sequence, written back to every token of that sequence.

  out[b, t] = sum_{t' in seq(b, t)} x[b, t'] / max(|seq(b, t)|, 1); 0 on invalid tokens.
  Example: x = [[1, 3, 5, 7]], mask = [[1, 1, 1, 0]], seq_ids = [[0, 0, 1, -1]] -> [[2, 2, 5, 0]].
  Invalid tokens are selected out, not multiplied by 0: a -inf or NaN there (a padded log-prob) stays out of the mean.
  """
  x_BT = jnp.asarray(x_BT, dtype=jnp.float32)
  seg_BT, valid_BT, num = _segments(jnp.asarray(mask_BT), _check_ids(seq_ids_BT, x_BT.shape))
  count_S = _segment_sum(valid_BT, seg_BT, num)
  mean_S = _segment_sum(jnp.where(valid_BT > 0, x_BT, 0.0), seg_BT, num) / jnp.maximum(count_S, 1.0)
  return jnp.where(valid_BT > 0, mean_S[seg_BT], 0.0)


def aggregate(
    loss_BT: Float[ArrayLike, "B T"],
    mask_BT: ArrayLike,
    *,
    aggregation: str,
    max_len: int | None = None,
    seq_ids_BT: ArrayLike | None = None,
) -> Float[Array, ""]:
  """Reduce per-token losses to a scalar. n_i = valid tokens of sequence i, N = number of non-empty sequences.

    'token-mean':              sum_i sum_t l_it / max(sum_i n_i, 1)                     (DAPO)
    'seq-mean-token-mean':     (1/N) sum_i (1/n_i) sum_t l_it                          (GRPO, GSPO)
    'seq-mean-token-sum-norm': (1/N) sum_i (1/max_len) sum_t l_it                      (Dr.GRPO)

  Sequences with no valid token (all-masked rows, padding) count in no denominator; N is floored at 1.
  Example: l = [[1, 2], [3, 6]], mask = [[1, 1], [1, 0]] -> token-mean (1+2+3)/3 = 2,
  seq-mean-token-mean ((1+2)/2 + 3/1)/2 = 2.25, seq-mean-token-sum-norm with max_len 4: (3/4 + 3/4)/2 = 0.75.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
  loss_BT = jnp.asarray(loss_BT, dtype=jnp.float32)
  mask_BT = jnp.asarray(mask_BT)
  if loss_BT.ndim != 2 or mask_BT.shape != loss_BT.shape:
    raise ValueError(f"loss_BT and mask_BT must share one [B, T] shape, got {loss_BT.shape} and {mask_BT.shape}")
  seg_BT, valid_BT, num = _segments(mask_BT, _check_ids(seq_ids_BT, loss_BT.shape))
  # where, not multiply: a non-finite loss on a padded token must not leak into the sum.
  masked_BT = jnp.where(valid_BT > 0, loss_BT, 0.0)
  if aggregation == "token-mean":
    return jnp.sum(masked_BT) / jnp.maximum(jnp.sum(valid_BT), 1.0)
  count_S = _segment_sum(valid_BT, seg_BT, num)
  sum_S = _segment_sum(masked_BT, seg_BT, num)
  if aggregation == "seq-mean-token-mean":
    per_seq_S = sum_S / jnp.maximum(count_S, 1.0)
  else:
    if max_len is None or max_len <= 0:
      raise ValueError(f"aggregation 'seq-mean-token-sum-norm' needs a positive max_len, got {max_len!r}")
    per_seq_S = sum_S / max_len
  num_seqs = jnp.sum(count_S > 0)
  return jnp.sum(jnp.where(count_S > 0, per_seq_S, 0.0)) / jnp.maximum(num_seqs, 1)


def _masked_mean(x_BT: jnp.ndarray, valid_BT: jnp.ndarray) -> jnp.ndarray:
  return jnp.sum(jnp.where(valid_BT > 0, x_BT, 0.0)) / jnp.maximum(jnp.sum(valid_BT), 1.0)


def k3(log_r_BT: jnp.ndarray) -> jnp.ndarray:
  """Schulman's k3 estimator r - 1 - log r from log r (clamped to +-20): >= 0, unbiased for KL(q || p), r = p/q."""
  log_r_BT = jnp.clip(log_r_BT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  return jnp.exp(log_r_BT) - 1.0 - log_r_BT


def policy_loss(
    logp_BT: Float[ArrayLike, "B T"],
    logp_old_BT: Float[ArrayLike, "B T"],
    adv_BT: Float[ArrayLike, "B T"],
    mask_BT: ArrayLike,
    cfg: PolicyLossConfig,
    *,
    logp_ref_BT: Float[ArrayLike, "B T"] | None = None,
    entropy_BT: Float[ArrayLike, "B T"] | None = None,
    seq_ids_BT: ArrayLike | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
  """Clipped policy-gradient loss (to minimize) and its metrics.

  rho_t = exp(clamp(logp_t - logp_old_t, +-20))                                      ratio_level='token'
  rho_t = sg(s_i) * exp(logp_t - sg(logp_t)),  s_i = exp(mean_{t in i}(logp - logp_old))  ratio_level='sequence'
  (GSPO-token: the value is s_i at every token of sequence i, the gradient wrt logp_t is s_i, so with A_t = A_i and
  seq-mean-token-mean it reproduces GSPO's grad = -(1/N) sum_i s_i A_i (1/|y_i|) sum_t grad logp_t when unclipped.)

  pg_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_low, 1 + clip_high)); if dual_clip and A_t < 0: min(pg_t, -c A_t)
  loss_t = pg_t + kl_coef * (r_t - 1 - log r_t) - entropy_coef * entropy_t,  r_t = pi_ref / pi_theta (k3)
  loss = aggregate(loss_t, cfg.aggregation)

  logp_old, adv and logp_ref are treated as constants (stop-gradient); gradients flow through logp and entropy.

  Args:
    logp_BT: [B, T] log-probs of the sampled tokens under the policy being trained.
    logp_old_BT: [B, T] log-probs under the rollout (old) policy.
    adv_BT: [B, T] token advantages (see advantages.broadcast_to_tokens).
    mask_BT: [B, T] bool or {0, 1} response mask.
    cfg: the loss settings (see `preset`).
    logp_ref_BT: [B, T] reference-policy log-probs; required when cfg.kl_coef > 0, else only logged.
    entropy_BT: [B, T] per-token policy entropy; required when cfg.entropy_coef != 0, else only logged.
    seq_ids_BT: [B, T] int sequence ids for packed rows, in [0, T) per row and -1 on padding.

  Returns:
    (loss, metrics): a scalar, and scalars 'loss', 'pg_loss', 'clip_frac_low', 'clip_frac_high',
    'dual_clip_frac', 'ratio_mean' (of rho as used in the loss), 'approx_kl' (k3 of the token ratio, an estimate of
    KL(old || new)), plus 'kl_ref' and 'entropy' when given.
    Metrics are token means over the valid tokens, whatever the aggregation.
  """
  logp_BT = jnp.asarray(logp_BT).astype(jnp.float32)
  shape = logp_BT.shape
  if logp_BT.ndim != 2:
    raise ValueError(f"logp_BT must be [B, T], got shape {shape}")
  named = dict(logp_old_BT=logp_old_BT, adv_BT=adv_BT, mask_BT=mask_BT, logp_ref_BT=logp_ref_BT, entropy_BT=entropy_BT)
  for name, value in named.items():
    if value is not None and jnp.shape(value) != shape:
      raise ValueError(f"{name} must have shape {shape} like logp_BT, got {jnp.shape(value)}")
  if cfg.kl_coef > 0 and logp_ref_BT is None:
    raise ValueError(f"kl_coef={cfg.kl_coef} needs logp_ref_BT")
  if cfg.entropy_coef != 0 and entropy_BT is None:
    raise ValueError(f"entropy_coef={cfg.entropy_coef} needs entropy_BT")
  seq_ids_BT = _check_ids(seq_ids_BT, shape)
  logp_old_BT = jax.lax.stop_gradient(jnp.asarray(logp_old_BT).astype(jnp.float32))
  adv_BT = jax.lax.stop_gradient(jnp.asarray(adv_BT).astype(jnp.float32))
  mask_BT = jnp.asarray(mask_BT)
  _, valid_BT, _ = _segments(mask_BT, seq_ids_BT)
  # Padding is selected out, not multiplied by 0: a -inf or NaN there (a padded log-prob) must not reach the loss.
  keep = lambda x: None if x is None else jnp.where(valid_BT > 0, jnp.asarray(x).astype(jnp.float32), 0.0)
  logp_BT, logp_old_BT, adv_BT, logp_ref_BT, entropy_BT = map(keep, (logp_BT, logp_old_BT, adv_BT, logp_ref_BT,
                                                                     entropy_BT))

  log_ratio_BT = jnp.clip(logp_BT - logp_old_BT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  if cfg.ratio_level == "token":
    ratio_BT = jnp.exp(log_ratio_BT)
  else:
    seq_log_ratio_BT = sequence_mean(jax.lax.stop_gradient(logp_BT - logp_old_BT), mask_BT, seq_ids_BT=seq_ids_BT)
    seq_log_ratio_BT = jnp.clip(seq_log_ratio_BT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio_BT = jnp.exp(seq_log_ratio_BT + logp_BT - jax.lax.stop_gradient(logp_BT))

  pg_unclipped_BT = -adv_BT * ratio_BT
  pg_clipped_BT = -adv_BT * jnp.clip(ratio_BT, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
  pg_BT = jnp.maximum(pg_unclipped_BT, pg_clipped_BT)
  dual_active_BT = jnp.zeros(shape, dtype=bool)
  if cfg.dual_clip is not None:
    dual_active_BT = (adv_BT < 0) & (pg_BT > -cfg.dual_clip * adv_BT)
    pg_BT = jnp.where(adv_BT < 0, jnp.minimum(pg_BT, -cfg.dual_clip * adv_BT), pg_BT)

  loss_BT = pg_BT
  metrics = {}
  if logp_ref_BT is not None:
    logp_ref_BT = jax.lax.stop_gradient(jnp.asarray(logp_ref_BT).astype(jnp.float32))
    kl_ref_BT = k3(logp_ref_BT - logp_BT)
    metrics["kl_ref"] = _masked_mean(kl_ref_BT, valid_BT)
    if cfg.kl_coef > 0:
      loss_BT = loss_BT + cfg.kl_coef * kl_ref_BT
  if entropy_BT is not None:
    entropy_BT = jnp.asarray(entropy_BT).astype(jnp.float32)
    metrics["entropy"] = _masked_mean(entropy_BT, valid_BT)
    if cfg.entropy_coef != 0:
      loss_BT = loss_BT - cfg.entropy_coef * entropy_BT

  agg = dict(aggregation=cfg.aggregation, max_len=cfg.max_len, seq_ids_BT=seq_ids_BT)
  loss = aggregate(loss_BT, mask_BT, **agg)
  metrics["loss"] = loss
  metrics["pg_loss"] = aggregate(pg_BT, mask_BT, **agg)
  metrics["clip_frac_low"] = _masked_mean(((adv_BT < 0) & (ratio_BT < 1.0 - cfg.clip_low)).astype(jnp.float32),
                                          valid_BT)
  metrics["clip_frac_high"] = _masked_mean(((adv_BT > 0) & (ratio_BT > 1.0 + cfg.clip_high)).astype(jnp.float32),
                                           valid_BT)
  metrics["dual_clip_frac"] = _masked_mean(dual_active_BT.astype(jnp.float32), valid_BT)
  metrics["ratio_mean"] = _masked_mean(ratio_BT, valid_BT)
  metrics["approx_kl"] = _masked_mean(k3(log_ratio_BT), valid_BT)
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
