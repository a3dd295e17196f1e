"""Full-vocabulary divergences between next-token distributions, computed in chunks along the sequence.

Every divergence is named by its arguments: `kl(logp_p, logp_q)` is KL(p || q) = sum_v p_v (log p_v - log q_v). The
callers (OPD / OPSD here, `vigos.py`, `vgs.py`) decide which side is the teacher.

Alignment convention for every [B, T] input: position t holds the distribution that predicts token t of the
completion, so masks, token ids and all sides (student, teachers) share one [B, T] grid.

Memory: a Qwen vocabulary has V ~ 151k entries, so [B, T, V] float32 logits do not fit for long completions.
`map_token_chunks` computes the logits T-chunk by T-chunk inside `lax.map`, and `jax.checkpoint` on the chunk body makes
the backward pass recompute them chunk by chunk too: peak memory grows with B * chunk_size * V, never with T * V.
"""

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

AGGREGATIONS = ("token_mean", "sequence_mean")
DIVERGENCE_KINDS = ("kl_teacher_student", "kl_student_teacher", "jsd")


# ----------------------------------------------------------------------------------------------------------------------
# Per-token divergences over the vocabulary axis.


def log_probs(logits_V: jax.Array) -> jax.Array:
  """Log-softmax over the last axis, in float32 (bf16 log-probs lose the tail of a 151k vocabulary)."""
  return jax.nn.log_softmax(logits_V.astype(jnp.float32), axis=-1)


def _kl_terms(logp_p_V: jax.Array, logp_q_V: jax.Array) -> jax.Array:
  """Summands p_v (log p_v - log q_v); an entry with p_v = 0 contributes 0 (and no NaN gradient)."""
  support = logp_p_V > -jnp.inf
  diff_V = jnp.where(support, logp_p_V - logp_q_V, 0.0)
  return jnp.exp(logp_p_V) * diff_V


def _sum_entries(terms_V: jax.Array, entry_clip: float | None) -> jax.Array:
  if entry_clip is not None:
    terms_V = jnp.minimum(terms_V, entry_clip)
  return jnp.sum(terms_V, axis=-1)


def kl(logp_p_V: jax.Array, logp_q_V: jax.Array, *, entry_clip: float | None = None) -> jax.Array:
  """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last axis.

  Args:
    logp_p_V, logp_q_V: log-probabilities [..., V] (float32).
    entry_clip: OPSD's pointwise clip: sum_v min(p_v (log p_v - log q_v), entry_clip). None: no clip.

  Returns:
    [...] per-token values.
  """
  return _sum_entries(_kl_terms(logp_p_V, logp_q_V), entry_clip)


def _log_mixture(logp_p_V: jax.Array, logp_q_V: jax.Array, beta: float) -> jax.Array:
  """log(beta p + (1 - beta) q), written around the larger side so that p == q gives exactly log p."""
  hi_V = jnp.maximum(logp_p_V, logp_q_V)
  both_zero = hi_V == -jnp.inf
  lo_V = jnp.where(both_zero, 0.0, jnp.minimum(logp_p_V, logp_q_V))
  weight_lo_V = jnp.where(logp_p_V >= logp_q_V, 1.0 - beta, beta)
  # (weight of the smaller side) * (q/p - 1) lies in [-weight, 0], so log1p never sees -1 for 0 < beta < 1.
  rel_V = jnp.log1p(weight_lo_V * jnp.expm1(lo_V - jnp.where(both_zero, 0.0, hi_V)))
  return jnp.where(both_zero, -jnp.inf, hi_V + rel_V)


def generalized_jsd(
    logp_p_V: jax.Array, logp_q_V: jax.Array, *, beta: float, entry_clip: float | None = None
) -> jax.Array:
  """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), over the last axis.

    m = beta p + (1 - beta) q
    JSD_beta(p, q) = beta KL(p || m) + (1 - beta) KL(q || m)

  For beta -> 0, JSD_beta / beta -> KL(p || q); for beta -> 1, JSD_beta / (1 - beta) -> KL(q || p). As in GKD, the
  end points return those limits: beta = 0 gives KL(p || q) and beta = 1 gives KL(q || p). With p = teacher and
  q = student, beta = 0 is the forward KL.

  Args:
    logp_p_V, logp_q_V: log-probabilities [..., V] (float32).
    beta: mixture weight of p, in [0, 1].
    entry_clip: clip of each vocabulary entry's summand before the sum (OPSD option); None: no clip.
  """
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta must lie in [0, 1], got beta={beta}")
  if beta == 0.0:
    return kl(logp_p_V, logp_q_V, entry_clip=entry_clip)
  if beta == 1.0:
    return kl(logp_q_V, logp_p_V, entry_clip=entry_clip)
  logm_V = _log_mixture(logp_p_V, logp_q_V, beta)
  terms_V = beta * _kl_terms(logp_p_V, logm_V) + (1.0 - beta) * _kl_terms(logp_q_V, logm_V)
  return _sum_entries(terms_V, entry_clip)


@dataclasses.dataclass(frozen=True)
class DivergenceConfig:
  """Which teacher/student divergence an on-policy distillation loss uses (OPSD: forward KL by default).

  kind: "kl_teacher_student" = KL(p_T || p_S) (forward KL, GKD / OPSD paper); "kl_student_teacher" = KL(p_S || p_T)
    (reverse KL); "jsd" = generalized_jsd(p_T, p_S, beta) (OPSD released scripts use beta = 0.5).
  entry_clip: OPSD's clip of each vocabulary entry before the sum (tau, not given by the paper); None: off.
  max_token_value: clamp of the per-token value after the vocabulary sum (ViGOS: 0.05); tokens above it get zero
    gradient, like torch.clamp. None: off.
  """
  kind: str = "kl_teacher_student"
  beta: float = 0.5
  entry_clip: float | None = None
  max_token_value: float | None = None

  def __post_init__(self):
    if self.kind not in DIVERGENCE_KINDS:
      raise ValueError(f"kind must be one of {DIVERGENCE_KINDS}, got kind={self.kind!r}")
    if not 0.0 <= self.beta <= 1.0:
      raise ValueError(f"beta must lie in [0, 1], got beta={self.beta}")
    if self.max_token_value is not None and self.max_token_value <= 0:
      raise ValueError(f"max_token_value must be positive or None, got max_token_value={self.max_token_value}")


def clamp_tokens(values: jax.Array, max_token_value: float | None) -> jax.Array:
  """min(value, max_token_value) per token (after the vocabulary sum); the gradient is 0 above the clamp."""
  return values if max_token_value is None else jnp.minimum(values, max_token_value)


def token_divergence(logp_teacher_V: jax.Array, logp_student_V: jax.Array, *, config: DivergenceConfig) -> jax.Array:
  """The per-token divergence `config` names, clamped after the vocabulary sum."""
  if config.kind == "kl_teacher_student":
    values = kl(logp_teacher_V, logp_student_V, entry_clip=config.entry_clip)
  elif config.kind == "kl_student_teacher":
    values = kl(logp_student_V, logp_teacher_V, entry_clip=config.entry_clip)
  else:
    values = generalized_jsd(logp_teacher_V, logp_student_V, beta=config.beta, entry_clip=config.entry_clip)
  return clamp_tokens(values, config.max_token_value)


# ----------------------------------------------------------------------------------------------------------------------
# Chunked evaluation along T.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Logits:
  """Where one side's next-token logits come from.

  Either hidden states x_BTX = h_BTD with a head w_DV (logits = scale * h @ w, computed per chunk), or precomputed
  logits x_BTX = logits_BTV with w_DV = None (tests, small vocabularies). `stop_gradient=True` (teachers) cuts the
  gradient to both x and w.
  """
  x_BTX: jax.Array
  w_DV: jax.Array | None = None
  scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  stop_gradient: bool = dataclasses.field(default=False, metadata=dict(static=True))

  def frozen(self) -> "Logits":
    """The same source with its gradient cut (a teacher)."""
    return dataclasses.replace(self, stop_gradient=True)


def _logits_fn(source: Logits) -> Callable[[jax.Array], jax.Array]:
  w_DV = source.w_DV
  if source.stop_gradient and w_DV is not None:
    w_DV = jax.lax.stop_gradient(w_DV)

  def fn(x_BtX):
    if source.stop_gradient:
      x_BtX = jax.lax.stop_gradient(x_BtX)
    if w_DV is None:
      logits_BtV = x_BtX.astype(jnp.float32)
    else:
      logits_BtV = jnp.einsum("BTD,DV->BTV", x_BtX, w_DV, preferred_element_type=jnp.float32)
    return logits_BtV if source.scale == 1.0 else logits_BtV * source.scale

  return fn


def _to_chunks(a: jax.Array, n_chunks: int, chunk: int) -> jax.Array:
  """[B, T, ...] -> [n_chunks, B, chunk, ...], zero-padding T up to n_chunks * chunk."""
  pad = n_chunks * chunk - a.shape[1]
  a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
  a = a.reshape(a.shape[0], n_chunks, chunk, *a.shape[2:])
  return jnp.moveaxis(a, 1, 0)


def map_token_chunks(
    token_fn: Callable[..., Any],
    *,
    xs: tuple[jax.Array, ...],
    logits_fns: tuple[Callable[[jax.Array], jax.Array], ...],
    chunk_size: int,
    extras: Any = None,
) -> Any:
  """Per-token values from several sides' logits, T-chunk by T-chunk (the callable variant).

  For each chunk of positions [t0, t0 + c): logits_i = logits_fns[i](xs[i][:, t0:t0+c]) (float32 [B, c, V]) and
  out = token_fn(logits_tuple, extras_chunk), a pytree of [B, c] arrays. Gradients flow through whatever the callables
  and token_fn let through (closed-over head matrices included); the chunk body is rematerialized in the backward pass.

  Args:
    token_fn: (tuple of float32 logits [B, c, V], extras chunk) -> pytree of [B, c].
    xs: per side, [B, T, ...] inputs to its logits function (hidden states or logits).
    logits_fns: per side, [B, c, ...] -> logits [B, c, V].
    chunk_size: positions per chunk; T need not be a multiple (the tail chunk is zero-padded and cut off).
    extras: optional pytree of [B, T, ...] arrays handed to token_fn chunk by chunk (e.g. token ids).

  Returns:
    token_fn's pytree with each leaf [B, T, ...].
  """
  if len(xs) != len(logits_fns) or not xs:
    raise ValueError(f"xs and logits_fns must be non-empty and of equal length, got {len(xs)} and {len(logits_fns)}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got chunk_size={chunk_size}")
  B, T = xs[0].shape[:2]
  for i, x in enumerate(xs):
    if x.shape[:2] != (B, T):
      raise ValueError(f"xs[{i}] has leading shape {x.shape[:2]}, expected (B, T) = {(B, T)}")
  chunk = min(chunk_size, T)
  n_chunks = math.ceil(T / chunk)
  xs_chunks = tuple(_to_chunks(x, n_chunks, chunk) for x in xs)
  extras_chunks = jax.tree.map(lambda a: _to_chunks(a, n_chunks, chunk), extras)

  @jax.checkpoint
  def body(args):
    x_chunks, extra = args
    logits = tuple(fn(x) for fn, x in zip(logits_fns, x_chunks))
    return token_fn(logits, extra)

  out = jax.lax.map(body, (xs_chunks, extras_chunks))

  def unchunk(o):
    o = jnp.moveaxis(o, 0, 1)
    return o.reshape(B, n_chunks * chunk, *o.shape[3:])[:, :T]

  return jax.tree.map(unchunk, out)


def chunked_logits_map(
    token_fn: Callable[..., Any], *, sources: tuple[Logits, ...], chunk_size: int, extras: Any = None
) -> Any:
  """`map_token_chunks` for `Logits` sources (hidden states + head, or precomputed logits)."""
  return map_token_chunks(
      token_fn,
      xs=tuple(s.x_BTX for s in sources),
      logits_fns=tuple(_logits_fn(s) for s in sources),
      chunk_size=chunk_size,
      extras=extras,
  )


def chunked_kl(
    p: Logits,
    q: Logits,
    *,
    chunk_size: int,
    entry_clip: float | None = None,
    max_token_value: float | None = None,
) -> Float[Array, "B T"]:
  """Per-token KL(p || q) [B, T] from two logit sources; gradients follow each source's `stop_gradient`."""

  def token_fn(logits, _):
    return clamp_tokens(kl(log_probs(logits[0]), log_probs(logits[1]), entry_clip=entry_clip), max_token_value)

  return chunked_logits_map(token_fn, sources=(p, q), chunk_size=chunk_size)


def chunked_divergence(
    *, student: Logits, teacher: Logits, config: DivergenceConfig, chunk_size: int
) -> Float[Array, "B T"]:
  """Per-token teacher/student divergence [B, T]; the teacher is always stop-gradient."""

  def token_fn(logits, _):
    return token_divergence(log_probs(logits[1]), log_probs(logits[0]), config=config)

  return chunked_logits_map(token_fn, sources=(student, teacher.frozen()), chunk_size=chunk_size)


def chunked_token_logp(source: Logits, ids_BT: Int[Array, "B T"], *, chunk_size: int) -> Float[Array, "B T"]:
  """log p(ids_BT[b, t]) under the source's distribution at (b, t), gathered chunk by chunk."""

  def token_fn(logits, ids_Bt):
    return jnp.take_along_axis(log_probs(logits[0]), ids_Bt[..., None], axis=-1)[..., 0]

  return chunked_logits_map(token_fn, sources=(source,), chunk_size=chunk_size, extras=ids_BT)


# ----------------------------------------------------------------------------------------------------------------------
# Aggregation and the two OPD losses.


def aggregate_count(mask_BT: Bool[Array, "B T"], *, aggregation: str) -> jax.Array:
  """This batch's share of the normalizer: active tokens (token_mean) or sequences with >= 1 token (sequence_mean).

  Sum it over the micro-batches (and devices) of a step to get the `count` the losses divide by.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got aggregation={aggregation!r}")
  if aggregation == "token_mean":
    return jnp.sum(mask_BT, dtype=jnp.float32)
  return jnp.sum(jnp.any(mask_BT, axis=-1), dtype=jnp.float32)


def masked_aggregate(
    values_BT: Float[Array, "B T"], mask_BT: Bool[Array, "B T"], *, aggregation: str, count: jax.Array | None = None
) -> jax.Array:
  """Masked mean of per-token values.

    token_mean:    sum_{b,t} m v / max(count, 1)                 count defaults to sum m
    sequence_mean: sum_b [sum_t m v / max(|o_b|, 1)] / max(count, 1)   count defaults to #rows with a token

  Pass the whole step's `count` (from `aggregate_count`, summed) so that micro-batch losses add up to the step's mean.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got aggregation={aggregation!r}")
  if values_BT.shape != mask_BT.shape:
    raise ValueError(f"values_BT {values_BT.shape} and mask_BT {mask_BT.shape} must have the same shape")
  if count is None:
    count = aggregate_count(mask_BT, aggregation=aggregation)
  masked_BT = jnp.where(mask_BT, values_BT, 0.0)
  if aggregation == "token_mean":
    total = jnp.sum(masked_BT)
  else:
    lengths_B = jnp.sum(mask_BT, axis=-1, dtype=jnp.float32)
    total = jnp.sum(jnp.sum(masked_BT, axis=-1) / jnp.maximum(lengths_B, 1.0))
  return total / jnp.maximum(count, 1.0)


def opd_loss(
    *,
    student: Logits,
    teacher: Logits,
    mask_BT: Bool[Array, "B T"],
    config: DivergenceConfig,
    aggregation: str,
    count: jax.Array | None,
    chunk_size: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Full-vocabulary on-policy distillation (GKD / OPSD): L = aggregate_t D(p_T(.|y_<t) || p_S(.|y_<t)).

  The rollout y was sampled from the student; only the student gets gradient. `count` is the step's normalizer
  (see `aggregate_count`); None uses this batch's.

  Returns:
    (loss, metrics) with metrics["opd/divergence"] the same aggregate (a copy for logging).
  """
  values_BT = chunked_divergence(student=student, teacher=teacher, config=config, chunk_size=chunk_size)
  loss = masked_aggregate(values_BT, mask_BT, aggregation=aggregation, count=count)
  return loss, {"opd/divergence": jax.lax.stop_gradient(loss)}


def sampled_token_opd_loss(
    *,
    logp_student_BT: Float[Array, "B T"],
    logp_teacher_BT: Float[Array, "B T"],
    mask_BT: Bool[Array, "B T"],
    aggregation: str,
    count: jax.Array | None,
) -> jax.Array:
  """Sampled-token OPD (OPSD Eq. 9) on the log-probs of the sampled tokens y_n.

    A_n = sg(log p_T(y_n) - log p_S(y_n))
    loss = -aggregate_n A_n log p_S(y_n)     (OPSD: per-sequence 1/|y|, i.e. aggregation="sequence_mean")

  The gradient is -A_n grad log p_S(y_n): a policy gradient with the per-token reward log p_T - log p_S.
  """
  if logp_student_BT.shape != logp_teacher_BT.shape:
    raise ValueError(f"logp_student_BT {logp_student_BT.shape} and logp_teacher_BT {logp_teacher_BT.shape} differ")
  adv_BT = jax.lax.stop_gradient(logp_teacher_BT - logp_student_BT)
  return -masked_aggregate(adv_BT * logp_student_BT, mask_BT, aggregation=aggregation, count=count)
