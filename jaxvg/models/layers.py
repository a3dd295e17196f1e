"""Building blocks shared by the vision tower and the decoder: RMSNorm, rotary embeddings, masked attention."""

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = "normal", scale: float = 0.02) -> nnx.Param:
  """A parameter carrying its logical axis names (one per dimension) for `jaxvg.sharding`."""
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


# Queries per block of `attention`: the float32 scores of one block of one sequence are QUERY_BLOCK x S x N x 4 bytes
# (512 MiB at S = 8192 with the 3B's 16 heads), where dense attention holds T x S x N at once.
QUERY_BLOCK = 1024


def attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, query_block: int = QUERY_BLOCK):
  """Softmax attention with grouped kv heads: query head n reads kv head n // (N / K).

  `mask_BTS` (its leading dimension B or 1) is True where query t may attend to key s. Scores and softmax are
  float32; a fully masked row returns the mean of the values (its output is never used: such rows are padding).
  Longer than `query_block` queries, the queries go through in blocks, each rematerialized in the backward pass:
  every query row's softmax is its own, so the result is the dense one, and the scores held at once are one
  block's. Heads move in front of the sequence axes before the two contractions, which XLA's CPU and GPU dot
  emitters run as plain batched matmuls.
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
