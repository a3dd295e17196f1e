"""Two-way Otsu split and per-cluster (segment) normalization of flattened step scores (PDCR section 3.2).

Both functions take GLOBAL arrays of all steps of a batch, flattened to [M] with a validity mask, and use only
sorts, cumulative sums and `jax.ops.segment_*` reductions. Under `jax.jit` with the inputs sharded over a mesh, XLA
inserts the cross-device collectives, so the threshold and the cluster statistics are the batch-global ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

NORMALIZE_MODES = ("minmax", "zscore", "center")


def _check_1d(**arrays) -> int:
  sizes = set()
  for name, x in arrays.items():
    if jnp.ndim(x) != 1:
      raise ValueError(f"{name} must be 1-D [M], got shape {jnp.shape(x)}")
    sizes.add(jnp.shape(x)[0])
  if len(sizes) != 1:
    raise ValueError(f"arrays must have one length M, got { {k: jnp.shape(v) for k, v in arrays.items()} }")
  return sizes.pop()


def otsu_threshold(values_M: Float[Array, " M"],
                   valid_M: Bool[Array, " M"]) -> tuple[Float[Array, ""], Int[Array, " M"]]:
  """Otsu's two-cluster split of the valid values, in O(M log M) via a sort and prefix sums.

  With the n valid values sorted v_(1) <= ... <= v_(n), S1(k) = sum_{i<=k} v_(i), Q = sum v^2 and T = S1(n):
    SSE(k) = Q - S1(k)^2 / k - (T - S1(k))^2 / (n - k),  k = 1..n-1,
  minimized over the splits a threshold can realize (v_(k) < v_(k+1)); the earliest k wins exact ties in SSE.
  The threshold c* = v_(k*+1) is the smallest value of the upper cluster, so label 1 (visual / perception) is
  exactly v >= c*: equal values never straddle the split, and ties with c* go to the visual cluster.
  Values are centered on their mean before the prefix sums to limit float32 cancellation.

  Degenerate inputs: no valid value -> c* = 0 and every label -1; one valid value, or all valid values equal
  (no split exists) -> c* = that value and every valid label 1 (one visual cluster). Masked entries get label -1.

  Args:
    values_M: step scores (e.g. visual dependence V_k), any finite floats.
    valid_M: which entries take part.

  Returns:
    (threshold, labels_M): a float32 scalar and int32 labels in {1 visual, 0 textual, -1 masked}.

  Example: values [1, 2, 10, 11] -> SSE(1) = 0 + 48.67, SSE(2) = 0.5 + 0.5 = 1, SSE(3) = 48.67 -> k* = 2, c* = 10,
    labels [0, 0, 1, 1].
  """
  m = _check_1d(values_M=values_M, valid_M=valid_M)
  values_M = jnp.asarray(values_M, jnp.float32)
  valid_M = jnp.asarray(valid_M, bool)
  n = jnp.sum(valid_M)
  mean = jnp.sum(jnp.where(valid_M, values_M, 0.0)) / jnp.maximum(n, 1)
  sorted_M = jnp.sort(jnp.where(valid_M, values_M, jnp.inf))  # the n valid values come first
  i_M = jnp.arange(m)
  centered_M = jnp.where(i_M < n, sorted_M - mean, 0.0)
  s1_M = jnp.cumsum(centered_M)  # S1(k) for k = i + 1
  total, sq_total = s1_M[-1], jnp.sum(jnp.square(centered_M))
  k_M = (i_M + 1).astype(jnp.float32)
  upper_M = n.astype(jnp.float32) - k_M
  sse_M = sq_total - jnp.square(s1_M) / k_M - jnp.square(total - s1_M) / jnp.maximum(upper_M, 1.0)
  next_M = jnp.concatenate([sorted_M[1:], jnp.full((1,), jnp.inf, sorted_M.dtype)])
  can_split_M = (i_M < n - 1) & (sorted_M < next_M)
  best = jnp.argmin(jnp.where(can_split_M, sse_M, jnp.inf))
  threshold = jnp.where(jnp.any(can_split_M), next_M[best], jnp.where(n > 0, sorted_M[0], 0.0))
  labels_M = jnp.where(valid_M, (values_M >= threshold).astype(jnp.int32), -1)
  return threshold, labels_M


def segment_normalize(values_M: Float[Array, " M"], segment_ids_M: Int[Array, " M"], valid_M: Bool[Array, " M"],
                      num_segments: int, *, mode: str = "minmax", eps: float = 1e-8) -> Float[Array, " M"]:
  """Normalize each value with the statistics of its segment (cluster), over the valid entries only.

    minmax: (v - min_s) / (max_s - min_s + eps)
    zscore: (v - mean_s) / (std_s + eps)     (population std)
    center: v - mean_s

  A degenerate segment (max_s == min_s, which includes a single element) gives 0 in every mode. Masked entries,
  and entries whose id lies outside [0, num_segments), are excluded from the statistics and give 0.

  Args:
    values_M: values to normalize (e.g. step returns G_k, flattened over the batch).
    segment_ids_M: int cluster id of each entry (e.g. `otsu_threshold` labels).
    valid_M: which entries take part.
    num_segments: the static number of segments.

  Returns:
    [M] float32 normalized values.

  Example (minmax): values [1, 3, 2, 5, 7], ids [0, 0, 0, 1, 2] -> segment 0 spans [1, 3]: [0, 1, 0.5];
    segment 1 has one element -> 0; segment 2 likewise -> 0.  Result [0, 1, 0.5, 0, 0].
  """
  _check_1d(values_M=values_M, segment_ids_M=segment_ids_M, valid_M=valid_M)
  if mode not in NORMALIZE_MODES:
    raise ValueError(f"mode must be one of {NORMALIZE_MODES}, got {mode!r}")
  if isinstance(num_segments, bool) or not isinstance(num_segments, (int, np.integer)) or num_segments < 1:
    raise ValueError(f"num_segments must be a positive int, got {num_segments!r}")
  if eps <= 0.0:
    raise ValueError(f"eps must be > 0, got {eps}")
  values_M = jnp.asarray(values_M, jnp.float32)
  ids_M = jnp.asarray(segment_ids_M, jnp.int32)
  ok_M = jnp.asarray(valid_M, bool) & (ids_M >= 0) & (ids_M < num_segments)
  ids_M = jnp.where(ok_M, ids_M, num_segments)  # one spare segment collects the excluded entries
  nseg = num_segments + 1

  lo_S = jax.ops.segment_min(jnp.where(ok_M, values_M, jnp.inf), ids_M, num_segments=nseg)
  hi_S = jax.ops.segment_max(jnp.where(ok_M, values_M, -jnp.inf), ids_M, num_segments=nseg)
  lo_M, hi_M = lo_S[ids_M], hi_S[ids_M]
  spread_M = ok_M & (hi_M > lo_M)
  if mode == "minmax":
    out_M = (values_M - lo_M) / jnp.where(spread_M, hi_M - lo_M + eps, 1.0)
  else:
    count_S = jnp.maximum(jax.ops.segment_sum(ok_M.astype(jnp.float32), ids_M, num_segments=nseg), 1.0)
    mean_S = jax.ops.segment_sum(jnp.where(ok_M, values_M, 0.0), ids_M, num_segments=nseg) / count_S
    centered_M = values_M - mean_S[ids_M]
    out_M = centered_M
    if mode == "zscore":
      var_S = jax.ops.segment_sum(jnp.where(ok_M, jnp.square(centered_M), 0.0), ids_M, num_segments=nseg) / count_S
      out_M = centered_M / (jnp.sqrt(var_S)[ids_M] + eps)
  return jnp.where(spread_M, out_M, 0.0)
