"""Building blocks shared by the vision tower and the decoder: RMSNorm, rotary embeddings, masked attention."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvg.models.config import ATTENTION_IMPLS


def param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = "normal", scale: float = 0.02) -> nnx.Param:
  """A parameter carrying its logical axis names (one per dimension) for `jaxvg.core.sharding`."""
  if len(shape) != len(axes):
    raise ValueError(f"shape {shape} and logical axes {axes} differ in rank")
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


def rms_norm(x, w, eps: float):
  # Normalize in float32; the scale multiplies in the input dtype, as Qwen2 does.
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return w.astype(x.dtype) * y.astype(x.dtype)


def rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_BTNH, cos_BTH, sin_BTH):
  """x * cos + rotate_half(x) * sin, in float32, broadcast over heads."""
  x32 = x_BTNH.astype(jnp.float32)
  out = x32 * cos_BTH[..., None, :] + rotate_half(x32) * sin_BTH[..., None, :]
  return out.astype(x_BTNH.dtype)


def mrope_cos_sin(positions_3BT, head_dim: int, theta: float, mrope_section):
  """M-RoPE tables [B, T, H]: frequency band i of the half-dimension takes its angle from axis (t, h, w)[i % 3].

  The H/2 frequencies are split into `mrope_section` = (s_t, s_h, s_w) consecutive bands; band j uses the temporal,
  height or width position id. The half is then duplicated, as in standard RoPE with `rotate_half`.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_3BTf = positions_3BT.astype(jnp.float32)[..., None] * inv_freq
  axis_of_band = jnp.concatenate([jnp.full((s,), i % 3) for i, s in enumerate(mrope_section)])
  angles_BTf = jnp.take_along_axis(angles_3BTf, axis_of_band[None, None, None, :], axis=0)[0]
  angles_BTH = jnp.concatenate([angles_BTf, angles_BTf], axis=-1)
  return jnp.cos(angles_BTH), jnp.sin(angles_BTH)


def vision_cos_sin(rope_hw_P2, head_dim: int, theta: float):
  """2-D axial rope tables [P, H]: the first quarter of frequencies rotates by row, the second by column."""
  quarter = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
  angles_P2f = rope_hw_P2.astype(jnp.float32)[..., None] * inv_freq
  angles_Pf = angles_P2f.reshape(angles_P2f.shape[0], -1)  # (row freqs, col freqs)
  angles_PH = jnp.concatenate([angles_Pf, angles_Pf], axis=-1)
  return jnp.cos(angles_PH), jnp.sin(angles_PH)


# Queries per block of the blocked path: the float32 scores of one block of one sequence are QUERY_BLOCK x S x N x 4
# bytes (512 MiB at S = 8192 with the 3B's 16 heads), where dense attention holds T x S x N at once.
QUERY_BLOCK = 1024
# Query and key tile of the TPU flash kernel (its default block sizes): lengths must be multiples of it.
PALLAS_BLOCK = 128


def attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, impl: str = "blocked", causal: bool = False, segment_ids=None,
              query_block: int = QUERY_BLOCK):
  """Softmax attention with grouped kv heads: query head n reads kv head n // (N / K).

  `mask_BTS` (its leading dimension B or 1) is True where query t may attend to key s; it is the whole truth, and
  every implementation computes softmax(q k / sqrt(H) masked by it) v with float32 scores. `impl` picks the kernel
  (`config.ATTENTION_IMPLS`; `choose_impl` says which one runs):

    blocked     XLA einsums in query blocks (`_blocked_attention`): the CPU path and the fallback for every mask.
    xla         `jax.nn.dot_product_attention(implementation="xla")`: the same arguments as the cuDNN call (mask,
                is_causal), so CPU tests check what the GPU kernel is given. It holds B x N x T x S scores at once.
    cudnn       cuDNN flash attention; the mask travels as an additive bf16/fp16 bias. Raises off a CUDA GPU, for
                float32 inputs, or for head dims cuDNN rejects.
    pallas_tpu  the TPU flash kernel (jax.experimental.pallas.ops.tpu.flash_attention) on calls whose mask
                `segment_ids` describe and whose lengths are multiples of PALLAS_BLOCK; other calls run blocked.
                Raises off a TPU.
    auto        cudnn on a CUDA GPU, pallas_tpu on a TPU, where the call fits them; blocked otherwise.

  A fully masked row (padding: its output is never used) is finite on every path: blocked, xla and cudnn return a
  mean of values (their scores all tie at the mask value), pallas_tpu the attention over its own segment. Finite
  matters even though the row is unused: NaN * 0 is NaN, and a NaN there would reach the gradients.

  Args:
    causal: a promise that `mask_BTS` is False wherever s > t (queries and keys both start at slot 0). Kernels use
      it to skip the blocks above the diagonal; it never changes the result.
    segment_ids: (q_seg_BT, kv_seg_BS) int32 with mask_BTS[b, t, s] == (q_seg[b, t] == kv_seg[b, s]) (and s <= t
      when `causal`) on every query row whose output is used: the form of the mask the TPU kernel takes.
    query_block: the blocked path's query block.
  """
  impl = choose_impl(impl, q_BTNH, k_BSKH, v_BSKH, segment_ids=segment_ids)
  if impl == "blocked":
    return _blocked_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, query_block)
  if impl == "pallas_tpu":
    return _pallas_tpu_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids, causal)
  # One mask for all heads: [B, 1, T, S]. cuDNN turns it into a bias; `is_causal` lets it skip the upper blocks.
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS.astype(bool)[:, None], is_causal=causal,
                                      implementation=impl)


def choose_impl(impl: str, q_BTNH, k_BSKH, v_BSKH, *, segment_ids=None) -> str:
  """The implementation that `attention(impl=...)` runs for these shapes and dtypes, decided at trace time.

  "cudnn" raises a ValueError naming what cuDNN lacks here, "pallas_tpu" one off a TPU; on a TPU, "pallas_tpu"
  falls back to "blocked" for calls the kernel cannot take, and "auto" does wherever nothing fits.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention impl {impl!r}: choose one of {ATTENTION_IMPLS}")
  if impl == "cudnn":
    reason = _cudnn_unfit(q_BTNH, k_BSKH, v_BSKH, even_lengths=False)
    if reason:
      raise ValueError(f"attention_impl='cudnn' cannot run: {reason}. Use 'auto' to fall back to 'blocked' where "
                       "cuDNN does not fit, or 'blocked'.")
  elif impl == "pallas_tpu":
    if jax.default_backend() != "tpu":
      raise ValueError(f"attention_impl='pallas_tpu' runs a TPU kernel, and the default backend is "
                       f"{jax.default_backend()!r}. Use 'auto' or 'blocked'.")
    return "blocked" if _pallas_unfit(q_BTNH, k_BSKH, segment_ids) else impl
  elif impl == "auto":
    # Even lengths: cuDNN's backward with a bias needs them, and whether this call is differentiated is unknown here.
    if not _cudnn_unfit(q_BTNH, k_BSKH, v_BSKH, even_lengths=True):
      return "cudnn"
    if jax.default_backend() == "tpu" and not _pallas_unfit(q_BTNH, k_BSKH, segment_ids):
      return "pallas_tpu"
    return "blocked"
  return impl


@functools.cache
def _cuda_device() -> tuple[bool, float]:
  """(the default backend is a CUDA GPU with cuDNN, its compute capability)."""
  if jax.default_backend() != "gpu":
    return False, 0.0
  try:
    from jax._src.lib import cuda_versions  # None on ROCm and without the CUDA plugin
  except ImportError:
    return False, 0.0
  capability = float(getattr(jax.devices()[0], "compute_capability", "0") or 0)
  return cuda_versions is not None, capability


def _cudnn_unfit(q_BTNH, k_BSKH, v_BSKH, *, even_lengths: bool) -> str:
  """Why cuDNN flash attention cannot take this call ("" when it can); the limits of jax's cudnn checks."""
  is_cuda, capability = _cuda_device()
  if not is_cuda:
    return f"it needs a CUDA GPU with cuDNN, and the default backend is {jax.default_backend()!r}"
  dtypes = {q_BTNH.dtype, k_BSKH.dtype, v_BSKH.dtype}
  if len(dtypes) != 1 or q_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
    return (f"it needs bfloat16 or float16 queries, keys and values, got {sorted(map(str, dtypes))} (set the "
            "compute dtype to bfloat16)")
  H = q_BTNH.shape[-1]
  H_max = 256 if capability >= 9.0 else 128
  if H % 8 or H > H_max:
    return f"head dim {H} is not a multiple of 8 up to {H_max}"
  T, S = q_BTNH.shape[1], k_BSKH.shape[1]
  if even_lengths and (T % 2 or S % 2):
    return f"query length {T} or key length {S} is odd"
  return ""


def _pallas_unfit(q_BTNH, k_BSKH, segment_ids) -> str:
  """Why the TPU flash kernel cannot take this call ("" when it can)."""
  if segment_ids is None:
    return "the mask has no segment form"
  T, S = q_BTNH.shape[1], k_BSKH.shape[1]
  if T % PALLAS_BLOCK or S % PALLAS_BLOCK:
    return f"query length {T} or key length {S} is not a multiple of {PALLAS_BLOCK}"
  return ""


def _pallas_tpu_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids, causal: bool):
  """The TPU flash kernel: heads before positions, kv heads repeated to the query heads (it has no grouped form)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash  # local: TPU-only module, loaded on use
  B, T, N, H = q_BTNH.shape
  G = N // k_BSKH.shape[2]
  q_seg_BT, kv_seg_BS = (jnp.broadcast_to(s, (B, s.shape[-1])).astype(jnp.int32) for s in segment_ids)
  to_BNTH = lambda x: x.transpose(0, 2, 1, 3)
  out_BNTH = tpu_flash.flash_attention(
      to_BNTH(q_BTNH), to_BNTH(jnp.repeat(k_BSKH, G, axis=2)), to_BNTH(jnp.repeat(v_BSKH, G, axis=2)),
      segment_ids=tpu_flash.SegmentIds(q_seg_BT, kv_seg_BS), causal=causal, sm_scale=H**-0.5)
  return to_BNTH(out_BNTH)


def _blocked_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, query_block: int):
  """Longer than `query_block` queries, the queries go through in blocks, each rematerialized in the backward pass:
  every query row's softmax is its own, so the result is the dense one, and the scores held at once are one
  block's. Heads move in front of the sequence axes before the two contractions, which XLA's CPU and GPU dot
  emitters run as plain batched matmuls. A fully masked row returns the mean of the values.
  """
  B, T, N, H = q_BTNH.shape
  if T <= query_block:
    return _dense_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
  n = -(-T // query_block)
  pad = n * query_block - T  # padding queries attend nowhere and are sliced off
  mask_BTS = jnp.broadcast_to(mask_BTS, (mask_BTS.shape[0], T, k_BSKH.shape[1]))
  q_CBQNH = jnp.pad(q_BTNH, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, n, query_block, N, H).swapaxes(0, 1)
  mask_CBQS = jnp.pad(mask_BTS, ((0, 0), (0, pad), (0, 0))).reshape(mask_BTS.shape[0], n, query_block, -1)
  mask_CBQS = mask_CBQS.swapaxes(0, 1)
  block = jax.checkpoint(lambda qm: _dense_attention(qm[0], k_BSKH, v_BSKH, qm[1]))
  out_CBQNH = jax.lax.map(block, (q_CBQNH, mask_CBQS))
  return out_CBQNH.swapaxes(0, 1).reshape(B, n * query_block, N, H)[:, :T]


def _dense_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
  """`attention` in one piece: scores [B, K, N / K, T, S]."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
  k_BKSH = k_BSKH.transpose(0, 2, 1, 3)
  v_BKSH = v_BSKH.transpose(0, 2, 1, 3)
  scores_BKGTS = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH,
                            preferred_element_type=jnp.float32) * (H**-0.5)
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BKGTH = jnp.einsum("BKGTS,BKSH->BKGTH", probs_BKGTS, v_BKSH)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
