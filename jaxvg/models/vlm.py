"""Qwen2.5-VL: the vision tower's features merged at the image-pad positions of the decoder's input.

`Qwen25VL.__call__` is jit-friendly (arrays in, arrays out). `forward` is the convenience entry point for the
outputs of transformers' processor (numpy arrays): it computes positions and the vision layout on the host, then
runs one jitted forward.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvg.models.config import ModelConfig
from jaxvg.models.decoder import Decoder, KVCache
from jaxvg.models.positions import mrope_positions, vision_layout
from jaxvg.models.vision import VisionInputs, VisionTower


def merge_image_features(x_BTD, image_features_QD, is_image_BT):
  """Places the image features, in order, at the image-pad positions (row-major over the batch).

  Example: is_image_BT = [[0 1 1], [1 0 0]] takes features 0, 1 into row 0 and feature 2 into row 1. Features past
  the number of image-pad tokens (bucket padding) are never read.
  """
  index_BT = jnp.cumsum(is_image_BT.reshape(-1)).reshape(is_image_BT.shape) - 1
  index_BT = jnp.clip(index_BT, 0, image_features_QD.shape[0] - 1)
  gathered_BTD = jnp.take(image_features_QD, index_BT, axis=0).astype(x_BTD.dtype)
  return jnp.where(is_image_BT[..., None], gathered_BTD, x_BTD)


class Qwen25VL(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: bool = False):
    self.cfg = cfg
    self.vision = VisionTower(cfg.vision, cfg.text.hidden_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                              remat=remat, attention_impl=cfg.attention_impl)
    self.decoder = Decoder(cfg.text, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat,
                           attention_impl=cfg.attention_impl)

  def embed(self, input_ids_BT, vision: VisionInputs | None = None, image_features_QD=None):
    """Token embeddings with image features merged in; returns (x_BTD, out dict of vision intermediates)."""
    x_BTD = self.decoder.embed(input_ids_BT)
    out = {}
    if vision is not None and image_features_QD is None:
      image_features_QD, out = self.vision(vision)
      out["image_features_QD"] = image_features_QD
    if image_features_QD is not None:
      x_BTD = merge_image_features(x_BTD, image_features_QD, input_ids_BT == self.cfg.image_token_id)
    return x_BTD, out

  def hidden(self, input_ids_BT, positions_3BT, attention_mask_BT, *, vision: VisionInputs | None = None,
             image_features_QD=None, attn_mask_BTS=None, cache: KVCache | None = None, cache_index=0,
             kv_mask_BS=None, return_hidden: bool = False):
    """Final hidden states [B, T, D] (after the last norm), the updated cache, and named intermediates.

    Without a cache, `attention_mask_BT` masks padding keys. With a cache, `kv_mask_BS` says which of its S slots
    hold real tokens (after this call's tokens are written).
    """
    x_BTD, out = self.embed(input_ids_BT, vision, image_features_QD)
    kv_mask_BS = attention_mask_BT if kv_mask_BS is None else kv_mask_BS
    h_BTD, cache, dec_out = self.decoder(x_BTD, positions_3BT, kv_mask_BS, attn_mask_BTS=attn_mask_BTS,
                                         cache=cache, cache_index=cache_index, return_hidden=return_hidden)
    out.update(dec_out)
    if return_hidden:
      out["embeddings_BTD"] = x_BTD
    return h_BTD, cache, out

  def __call__(self, input_ids_BT, positions_3BT, attention_mask_BT, *, vision: VisionInputs | None = None,
               return_hidden: bool = False):
    """Logits [B, T, V] (float32) and named intermediates."""
    h_BTD, _, out = self.hidden(input_ids_BT, positions_3BT, attention_mask_BT, vision=vision,
                                return_hidden=return_hidden)
    return self.decoder.logits(h_BTD), out


@nnx.jit(static_argnames=("return_hidden",))
def _jit_call(model, input_ids_BT, positions_3BT, attention_mask_BT, vision, return_hidden):
  return model(input_ids_BT, positions_3BT, attention_mask_BT, vision=vision, return_hidden=return_hidden)


def prepare_inputs(cfg: ModelConfig, *, input_ids, attention_mask=None, mm_token_type_ids=None, pixel_values=None,
                   image_grid_thw=None):
  """Host-side: processor outputs (numpy) -> (input_ids_BT, positions_3BT, attention_mask_BT, VisionInputs | None)."""
  input_ids = np.asarray(input_ids)
  attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
  if mm_token_type_ids is None:
    mm_token_type_ids = (input_ids == cfg.image_token_id).astype(np.int32)
  has_images = pixel_values is not None and len(pixel_values) > 0
  positions, _ = mrope_positions(input_ids, mm_token_type_ids, image_grid_thw if has_images else None,
                                 attention_mask, spatial_merge_size=cfg.vision.spatial_merge_size)
  vision = None
  if has_images:
    v = cfg.vision
    layout = vision_layout(image_grid_thw, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                           patch_size=v.patch_size)
    vision = VisionInputs.from_layout(np.asarray(pixel_values, np.float32), layout)
  return jnp.asarray(input_ids), jnp.asarray(positions), jnp.asarray(attention_mask), vision


def forward(model: Qwen25VL, *, input_ids, attention_mask=None, mm_token_type_ids=None, pixel_values=None,
            image_grid_thw=None, return_hidden: bool = False):
  """Logits [B, T, V] for the outputs of transformers' Qwen2.5-VL processor (numpy arrays).

  With `return_hidden=True` returns (logits, out) where `out` holds the intermediates: `vision_hidden_PE` (the tower
  output before the merger, window order), `image_features_QD` (merger output), `embeddings_BTD`, and
  `hidden_LBTD` (each decoder layer's output).
  """
  args = prepare_inputs(model.cfg, input_ids=input_ids, attention_mask=attention_mask,
                        mm_token_type_ids=mm_token_type_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw)
  logits, out = _jit_call(model, *args, return_hidden)
  return (logits, out) if return_hidden else logits
