"""The Qwen2.5-VL vision tower: patch embedding, window/full attention blocks with 2-D rope, the 2x2 patch merger.

All images of a batch travel as one flat sequence of P patches (`pixel_values_PX`, X = 3 * 2 * 14 * 14), the way the
processor emits them; `VisionInputs` carries the host-computed index arrays that say which patches share a window
or an image. Any number of images of any sizes fit in one call.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvg.models import layers
from jaxvg.models.config import VisionConfig
from jaxvg.models.positions import VisionLayout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionInputs:
  pixel_values_PX: jax.Array   # float, flattened (C, temporal, row, col) patches
  rope_hw_P2: jax.Array        # int32 (row, col) of each patch, original order
  window_index_Q: jax.Array    # int32 merge-group permutation into window order
  window_seg_P: jax.Array      # int32 window id per patch, window order
  image_seg_P: jax.Array       # int32 image (frame) id per patch, window order

  @classmethod
  def from_layout(cls, pixel_values_PX, layout: VisionLayout) -> "VisionInputs":
    """Pads `pixel_values_PX` with zero patches up to the layout's (bucketed) length."""
    pixel_values_PX = jnp.asarray(pixel_values_PX)
    pad = layout.window_seg_P.shape[0] - pixel_values_PX.shape[0]
    if pad < 0:
      raise ValueError(f"pixel_values has {pixel_values_PX.shape[0]} patches, more than the layout's "
                       f"{layout.window_seg_P.shape[0]}")
    pixel_values_PX = jnp.pad(pixel_values_PX, ((0, pad), (0, 0)))
    return cls(pixel_values_PX, jnp.asarray(layout.rope_hw_P2), jnp.asarray(layout.window_index_Q),
               jnp.asarray(layout.window_seg_P), jnp.asarray(layout.image_seg_P))


def _image_attention(q_PNH, k_PNH, v_PNH, image_seg_P, window_seg_P, *, impl: str = "blocked"):
  """Attention among the patches of each image (frame): dense over P with a segment mask."""
  del window_seg_P
  mask_PP = image_seg_P[:, None] == image_seg_P[None, :]
  seg_1P = image_seg_P[None]
  return layers.attention(q_PNH[None], k_PNH[None], v_PNH[None], mask_PP[None], impl=impl,
                          segment_ids=(seg_1P, seg_1P))[0]


def _window_attention(q_PNH, k_PNH, v_PNH, image_seg_P, window_seg_P, *, window: int, impl: str = "blocked"):
  """Attention inside each window, in O(P * window) rather than O(P^2).

  In window order every window is a contiguous run of at most `window` patches, so it lies within three consecutive
  chunks of `window` patches: each chunk's queries attend to the keys of the chunk before, itself and the one after,
  masked to their own window. Padding keys at the ends carry segment -1, which no patch has. (As segment ids, the
  padding queries of the last chunk match those keys: they are padding too, and their outputs are sliced off.)
  """
  del image_seg_P
  P, N, H = q_PNH.shape
  M = window
  pad = -P % M
  C = (P + pad) // M
  chunk = lambda a, fill: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill).reshape(
      (C, M) + a.shape[1:])
  around = lambda a, fill: jnp.concatenate(  # [C, M, ...] -> [C, 3M, ...]: previous, own and next chunk
      [jnp.pad(a, [(1, 1)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)[i:i + C] for i in range(3)], axis=1)
  q_CMNH = chunk(q_PNH, 0)
  seg_CM = chunk(window_seg_P, -1)
  k_CSNH, v_CSNH, seg_CS = around(chunk(k_PNH, 0), 0), around(chunk(v_PNH, 0), 0), around(seg_CM, -1)
  mask_CMS = (seg_CM[:, :, None] == seg_CS[:, None, :]) & (seg_CM[:, :, None] >= 0)
  out_CMNH = layers.attention(q_CMNH, k_CSNH, v_CSNH, mask_CMS, impl=impl, segment_ids=(seg_CM, seg_CS))
  return out_CMNH.reshape(C * M, N, H)[:P]


class VisionTower(nnx.Module):
  """ViT with window attention (full attention in `fullatt_block_indexes`) and a 2x2 merger to the decoder width."""

  def __init__(self, cfg: VisionConfig, out_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, remat: bool = False, attention_impl: str = "blocked"):
    self.cfg, self.dtype, self.remat, self.attention_impl = cfg, dtype, remat, attention_impl
    # The longest window in patches: (window_size / patch_size)^2, e.g. 8 x 8 = 64 for 112-pixel windows.
    self.window_len = (cfg.window_size // cfg.patch_size) ** 2
    L, E, F, N, H, X = (cfg.depth, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim,
                        cfg.patch_dim)
    M = E * cfg.merge_unit
    p = lambda shape, axes, init="normal": layers.param(rngs, shape, axes, param_dtype, init)
    self.patch_XE = p((X, E), ("vision_patch", "vision_embed"))
    self.norm1_LE = p((L, E), ("layers", "vision_embed"), "ones")
    self.q_LENH = p((L, E, N, H), ("layers", "vision_embed", "vision_heads", "head_dim"))
    self.k_LENH = p((L, E, N, H), ("layers", "vision_embed", "vision_heads", "head_dim"))
    self.v_LENH = p((L, E, N, H), ("layers", "vision_embed", "vision_heads", "head_dim"))
    self.q_bias_LNH = p((L, N, H), ("layers", "vision_heads", "head_dim"), "zeros")
    self.k_bias_LNH = p((L, N, H), ("layers", "vision_heads", "head_dim"), "zeros")
    self.v_bias_LNH = p((L, N, H), ("layers", "vision_heads", "head_dim"), "zeros")
    self.o_LNHE = p((L, N, H, E), ("layers", "vision_heads", "head_dim", "vision_embed"))
    self.o_bias_LE = p((L, E), ("layers", "vision_embed"), "zeros")
    self.norm2_LE = p((L, E), ("layers", "vision_embed"), "ones")
    self.gate_LEF = p((L, E, F), ("layers", "vision_embed", "vision_mlp"))
    self.gate_bias_LF = p((L, F), ("layers", "vision_mlp"), "zeros")
    self.up_LEF = p((L, E, F), ("layers", "vision_embed", "vision_mlp"))
    self.up_bias_LF = p((L, F), ("layers", "vision_mlp"), "zeros")
    self.down_LFE = p((L, F, E), ("layers", "vision_mlp", "vision_embed"))
    self.down_bias_LE = p((L, E), ("layers", "vision_embed"), "zeros")
    self.merger_norm_E = p((E,), ("vision_embed",), "ones")
    self.merger_fc1_MM = p((M, M), ("vision_merge", "vision_merge_out"))
    self.merger_fc1_bias_M = p((M,), ("vision_merge_out",), "zeros")
    self.merger_fc2_MD = p((M, out_dim), ("vision_merge", "embed"))
    self.merger_fc2_bias_D = p((out_dim,), ("embed",), "zeros")

  def _block(self, x_PE, blk, cos_PH, sin_PH, attend, vis: VisionInputs):
    cfg, dt = self.cfg, self.dtype
    h_PE = layers.rms_norm(x_PE, blk["norm1"], cfg.rms_norm_eps)
    q_PNH = jnp.einsum("PE,ENH->PNH", h_PE, blk["q"].astype(dt)) + blk["q_bias"].astype(dt)
    k_PNH = jnp.einsum("PE,ENH->PNH", h_PE, blk["k"].astype(dt)) + blk["k_bias"].astype(dt)
    v_PNH = jnp.einsum("PE,ENH->PNH", h_PE, blk["v"].astype(dt)) + blk["v_bias"].astype(dt)
    q_PNH = layers.apply_rope(q_PNH, cos_PH, sin_PH)
    k_PNH = layers.apply_rope(k_PNH, cos_PH, sin_PH)
    o_PNH = attend(q_PNH, k_PNH, v_PNH, vis.image_seg_P, vis.window_seg_P)
    x_PE = x_PE + jnp.einsum("PNH,NHE->PE", o_PNH, blk["o"].astype(dt)) + blk["o_bias"].astype(dt)
    h_PE = layers.rms_norm(x_PE, blk["norm2"], cfg.rms_norm_eps)
    gate_PF = jnp.einsum("PE,EF->PF", h_PE, blk["gate"].astype(dt)) + blk["gate_bias"].astype(dt)
    up_PF = jnp.einsum("PE,EF->PF", h_PE, blk["up"].astype(dt)) + blk["up_bias"].astype(dt)
    mlp_PE = jnp.einsum("PF,FE->PE", jax.nn.silu(gate_PF) * up_PF, blk["down"].astype(dt))
    return x_PE + mlp_PE + blk["down_bias"].astype(dt)

  def __call__(self, vis: VisionInputs):
    """Returns the merged image features [Q, D] in the processor's order, and {'vision_hidden_PE': window order}."""
    cfg, dt = self.cfg, self.dtype
    P, unit = vis.pixel_values_PX.shape[0], cfg.merge_unit
    to_window_order = lambda a: jnp.take(a.reshape(P // unit, unit, -1), vis.window_index_Q, axis=0).reshape(P, -1)
    x_PE = jnp.einsum("PX,XE->PE", vis.pixel_values_PX.astype(dt), self.patch_XE[...].astype(dt))
    x_PE = to_window_order(x_PE)
    cos_PH, sin_PH = layers.vision_cos_sin(vis.rope_hw_P2, cfg.head_dim, cfg.rope_theta)
    cos_PH, sin_PH = to_window_order(cos_PH), to_window_order(sin_PH)
    blocks = {
        "norm1": self.norm1_LE[...], "q": self.q_LENH[...], "k": self.k_LENH[...], "v": self.v_LENH[...],
        "q_bias": self.q_bias_LNH[...], "k_bias": self.k_bias_LNH[...], "v_bias": self.v_bias_LNH[...],
        "o": self.o_LNHE[...], "o_bias": self.o_bias_LE[...], "norm2": self.norm2_LE[...],
        "gate": self.gate_LEF[...], "gate_bias": self.gate_bias_LF[...], "up": self.up_LEF[...],
        "up_bias": self.up_bias_LF[...], "down": self.down_LFE[...], "down_bias": self.down_bias_LE[...],
    }

    # Consecutive blocks of one kind run under one scan: windowed attention, or per-image attention in the
    # full-attention blocks. The kind is static, so each compiled body holds one attention (no device-side branch).
    full = set(cfg.fullatt_block_indexes)
    runs = []
    for l in range(cfg.depth):
      if runs and runs[-1][2] == (l in full):
        runs[-1][1] = l + 1
      else:
        runs.append([l, l + 1, l in full])
    for start, end, is_full in runs:
      attend = (functools.partial(_image_attention, impl=self.attention_impl) if is_full else
                functools.partial(_window_attention, window=self.window_len, impl=self.attention_impl))

      def body(x_PE, blk, attend=attend):
        return self._block(x_PE, blk, cos_PH, sin_PH, attend, vis), None

      if self.remat:
        body = jax.checkpoint(body)
      x_PE, _ = jax.lax.scan(body, x_PE, jax.tree.map(lambda a: a[start:end], blocks))
    h_PE = layers.rms_norm(x_PE, self.merger_norm_E[...], cfg.rms_norm_eps)
    h_QM = h_PE.reshape(P // unit, unit * cfg.hidden_size)
    h_QM = jnp.einsum("QM,MN->QN", h_QM, self.merger_fc1_MM[...].astype(dt)) + self.merger_fc1_bias_M[...].astype(dt)
    h_QM = jax.nn.gelu(h_QM, approximate=False)
    feats_QD = jnp.einsum("QM,MD->QD", h_QM, self.merger_fc2_MD[...].astype(dt)) + self.merger_fc2_bias_D[...].astype(dt)
    feats_QD = jnp.take(feats_QD, jnp.argsort(vis.window_index_Q), axis=0)
    return feats_QD, {"vision_hidden_PE": x_PE}
