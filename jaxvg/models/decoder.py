"""The Qwen2 decoder of Qwen2.5-VL: GQA attention with M-RoPE, SwiGLU, RMSNorm, a KV cache, tied or untied head.

Layer weights are stacked along a leading L axis and the layers run under `jax.lax.scan`: one compiled layer body
whatever the depth, and `remat` wraps exactly that body.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvg.models import layers
from jaxvg.models.config import TextConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer for S cache slots. Rows are left-padded, so all rows write at one index."""

  k_LBSKH: jax.Array
  v_LBSKH: jax.Array

  @classmethod
  def zeros(cls, cfg: TextConfig, batch: int, slots: int, dtype=jnp.float32) -> "KVCache":
    shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class Decoder(nnx.Module):

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: bool = False, attention_impl: str = "blocked"):
    self.cfg, self.dtype, self.remat, self.attention_impl = cfg, dtype, remat, attention_impl
    L, V, D, F, N, K, H = (cfg.num_layers, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                           cfg.num_kv_heads, cfg.head_dim)
    p = lambda shape, axes, init="normal": layers.param(rngs, shape, axes, param_dtype, init)
    self.embed_VD = p((V, D), ("vocab", "embed"))
    self.attn_norm_LD = p((L, D), ("layers", "embed"), "ones")
    self.q_LDNH = p((L, D, N, H), ("layers", "embed", "heads", "head_dim"))
    self.k_LDKH = p((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"))
    self.v_LDKH = p((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"))
    self.q_bias_LNH = p((L, N, H), ("layers", "heads", "head_dim"), "zeros")
    self.k_bias_LKH = p((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
    self.v_bias_LKH = p((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
    self.o_LNHD = p((L, N, H, D), ("layers", "heads", "head_dim", "embed"))
    self.mlp_norm_LD = p((L, D), ("layers", "embed"), "ones")
    self.gate_LDF = p((L, D, F), ("layers", "embed", "mlp"))
    self.up_LDF = p((L, D, F), ("layers", "embed", "mlp"))
    self.down_LFD = p((L, F, D), ("layers", "mlp", "embed"))
    self.final_norm_D = p((D,), ("embed",), "ones")
    self.head_DV = None if cfg.tie_word_embeddings else p((D, V), ("embed", "vocab"))

  def embed(self, input_ids_BT):
    return jnp.take(self.embed_VD[...], input_ids_BT, axis=0).astype(self.dtype)

  def head_weight_DV(self):
    """The output projection [D, V] (the transposed embedding when tied)."""
    return self.embed_VD[...].T if self.head_DV is None else self.head_DV[...]

  def logits(self, h_BTD):
    return jnp.einsum("BTD,DV->BTV", h_BTD, self.head_weight_DV().astype(self.dtype),
                      preferred_element_type=jnp.float32)

  def _layer(self, x_BTD, lyr, cos_BTH, sin_BTH, attend, keys_values=None):
    """One block. `attend(q_BTNH, k_BSKH, v_BSKH)` is `layers.attention` with the call's mask bound.
    `keys_values(k_BTKH, v_BTKH) -> (k_BSKH, v_BSKH)` stores the new keys and values in a cache and returns every key
    and value to attend to; without it the block attends to its own T tokens."""
    cfg, dt = self.cfg, self.dtype
    h_BTD = layers.rms_norm(x_BTD, lyr["attn_norm"], cfg.rms_norm_eps)
    q_BTNH = jnp.einsum("BTD,DNH->BTNH", h_BTD, lyr["q"].astype(dt)) + lyr["q_bias"].astype(dt)
    k_BTKH = jnp.einsum("BTD,DKH->BTKH", h_BTD, lyr["k"].astype(dt)) + lyr["k_bias"].astype(dt)
    v_BTKH = jnp.einsum("BTD,DKH->BTKH", h_BTD, lyr["v"].astype(dt)) + lyr["v_bias"].astype(dt)
    q_BTNH = layers.apply_rope(q_BTNH, cos_BTH, sin_BTH)
    k_BTKH = layers.apply_rope(k_BTKH, cos_BTH, sin_BTH)
    k_BSKH, v_BSKH = (k_BTKH, v_BTKH) if keys_values is None else keys_values(k_BTKH, v_BTKH)
    o_BTNH = attend(q_BTNH, k_BSKH.astype(dt), v_BSKH.astype(dt))
    x_BTD = x_BTD + jnp.einsum("BTNH,NHD->BTD", o_BTNH, lyr["o"].astype(dt))
    h_BTD = layers.rms_norm(x_BTD, lyr["mlp_norm"], cfg.rms_norm_eps)
    gate_BTF = jnp.einsum("BTD,DF->BTF", h_BTD, lyr["gate"].astype(dt))
    up_BTF = jnp.einsum("BTD,DF->BTF", h_BTD, lyr["up"].astype(dt))
    return x_BTD + jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate_BTF) * up_BTF, lyr["down"].astype(dt))

  def __call__(self, x_BTD, positions_3BT, kv_mask_BS, *, attn_mask_BTS=None, cache: KVCache | None = None,
               cache_index=0, return_hidden: bool = False):
    """Runs the layers on embeddings `x_BTD`.

    Args:
      x_BTD: input embeddings (image features already merged in).
      positions_3BT: M-RoPE position ids.
      kv_mask_BS: True for real (non-padding) keys. Without a cache S == T; with one, S is the number of slots.
      attn_mask_BTS: optional extra mask (a tree mask, masked image keys), AND-ed with causality and `kv_mask_BS`.
      cache: a KVCache; the T new keys/values are written at slots [cache_index, cache_index + T).
      cache_index: the slot of the first query token.
      return_hidden: also return every layer's output hidden states as out['hidden_LBTD'].

    Returns:
      (h_BTD after the final norm, the updated cache or None, out dict).
    """
    cfg = self.cfg
    B, T, _ = x_BTD.shape
    S = kv_mask_BS.shape[1]
    q_slot_T = cache_index + jnp.arange(T)
    mask_BTS = (jnp.arange(S)[None, :] <= q_slot_T[:, None])[None] & kv_mask_BS[:, None, :].astype(bool)
    # From slot 0 (no cache, or a prefill), the mask lies inside causality: kernels may skip the blocks above the
    # diagonal. Without an extra mask it is also "same segment", real token or padding, which the TPU kernel takes.
    causal = isinstance(cache_index, int) and cache_index == 0
    segment_ids = None
    if attn_mask_BTS is not None:
      mask_BTS = mask_BTS & attn_mask_BTS
    elif causal:
      kv_seg_BS = kv_mask_BS.astype(bool).astype(jnp.int32)
      segment_ids = (kv_seg_BS[:, :T], kv_seg_BS)
    attend = functools.partial(layers.attention, mask_BTS=mask_BTS, impl=self.attention_impl, causal=causal,
                               segment_ids=segment_ids)
    cos_BTH, sin_BTH = layers.mrope_cos_sin(positions_3BT, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    weights = {
        "attn_norm": self.attn_norm_LD[...], "q": self.q_LDNH[...], "k": self.k_LDKH[...], "v": self.v_LDKH[...],
        "q_bias": self.q_bias_LNH[...], "k_bias": self.k_bias_LKH[...], "v_bias": self.v_bias_LKH[...],
        "o": self.o_LNHD[...], "mlp_norm": self.mlp_norm_LD[...], "gate": self.gate_LDF[...],
        "up": self.up_LDF[...], "down": self.down_LFD[...],
    }

    if cache is None:
      def body(x_BTD, lyr):
        x_BTD = self._layer(x_BTD, lyr, cos_BTH, sin_BTH, attend)
        return x_BTD, (x_BTD if return_hidden else None)

      if self.remat:
        body = jax.checkpoint(body)
      x_BTD, hidden_L = jax.lax.scan(body, x_BTD, weights)
    else:
      # The cache rides in the carry and each layer writes only its new slots, so the loop updates it in place
      # instead of assembling a fresh [L, B, S, K, H] buffer from per-layer outputs.
      def body(carry, xs):
        x_BTD, k_LBSKH, v_LBSKH = carry
        lyr, l = xs
        stored = {}

        def keys_values(k_BTKH, v_BTKH):
          at = (l, 0, cache_index, 0, 0)
          stored["k"] = jax.lax.dynamic_update_slice(k_LBSKH, k_BTKH[None].astype(k_LBSKH.dtype), at)
          stored["v"] = jax.lax.dynamic_update_slice(v_LBSKH, v_BTKH[None].astype(v_LBSKH.dtype), at)
          return stored["k"][l], stored["v"][l]

        x_BTD = self._layer(x_BTD, lyr, cos_BTH, sin_BTH, attend, keys_values)
        return (x_BTD, stored["k"], stored["v"]), (x_BTD if return_hidden else None)

      (x_BTD, k_L, v_L), hidden_L = jax.lax.scan(body, (x_BTD, cache.k_LBSKH, cache.v_LBSKH),
                                                 (weights, jnp.arange(cfg.num_layers)))
      cache = KVCache(k_L, v_L)
    h_BTD = layers.rms_norm(x_BTD, self.final_norm_D[...], cfg.rms_norm_eps)
    out = {"hidden_LBTD": hidden_L} if return_hidden else {}
    return h_BTD, cache, out
