"""Tiny Qwen2.5-VL checkpoints and processor-like batches, built locally with transformers (nothing downloaded).

Reusable by any test that needs a reference model:

  path = make_tiny_hf_checkpoint(tmp_path / "ckpt", tie=False, kv_heads=1)
  hf = load_torch_model(path)
  batch = make_mm_batch([[3, (56, 112), 2], [4]], ids=TinyIds(vocab=512))
  ref = hf_reference(hf, batch)           # vision tower, merger, per-layer hidden states, logits, positions

The random weights are re-drawn at unit scale (fan-in normal, norm weights around 1, biases around 0): transformers'
default init (std 0.02) makes every activation so small that a parity test at 1e-4 could not fail.
"""

import dataclasses
import math
import os

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

PATCH = 14
MERGE = 2
TEMPORAL = 2


@dataclasses.dataclass(frozen=True)
class TinyIds:
  """Special token ids of a tiny vocabulary: the last four ids, as `jaxvg.models.config.tiny` lays them out."""

  vocab: int = 512

  @property
  def image(self) -> int:
    return self.vocab - 4

  @property
  def video(self) -> int:
    return self.vocab - 3

  @property
  def vision_start(self) -> int:
    return self.vocab - 2

  @property
  def vision_end(self) -> int:
    return self.vocab - 1

  @property
  def pad(self) -> int:
    return 0


def mrope_section_for(head_dim: int) -> list[int]:
  """(t, h, w) rotary sections summing to head_dim / 2, split like Qwen's (16, 24, 24) for head_dim 128."""
  half = head_dim // 2
  t = half // 4
  h = (half - t) // 2
  return [t, h, half - t - h]


def tiny_hf_config(*, tie: bool = True, kv_heads: int = 2, heads: int = 4, window_size: int = 56,
                   fullatt: tuple[int, ...] = (1,), vocab: int = 512, hidden: int = 64, layers: int = 2,
                   vision_depth: int = 2, vision_hidden: int = 32, vision_heads: int = 2,
                   rms_norm_eps: float = 1e-6) -> Qwen2_5_VLConfig:
  """A transformers `Qwen2_5_VLConfig` of a 2+2-layer model (D=64, E=32); eager attention for exact float32."""
  ids = TinyIds(vocab)
  text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=rms_norm_eps,
              max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, tie_word_embeddings=tie,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": mrope_section_for(hidden // heads)})
  vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                num_heads=vision_heads, out_hidden_size=hidden, fullatt_block_indexes=list(fullatt),
                window_size=window_size, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
  config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids.image,
                            video_token_id=ids.video, vision_start_token_id=ids.vision_start,
                            vision_end_token_id=ids.vision_end, tie_word_embeddings=tie)
  config._attn_implementation = "eager"
  return config


def randomize_(model: torch.nn.Module, *, seed: int) -> torch.nn.Module:
  """Redraws every parameter in place: weights N(0, 1/fan_in), norm weights 1 + N(0, 0.2^2), biases N(0, 0.2^2)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():  # A tied lm_head is the same tensor and is listed once.
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if "norm" in name or "ln_q" in name:
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim == 1:
        p.copy_(0.2 * noise)
      else:
        p.copy_(noise / math.sqrt(p[0].numel()))
  return model


def make_tiny_hf_model(*, seed: int = 0, **config_kwargs) -> Qwen2_5_VLForConditionalGeneration:
  """A randomly initialized float32 torch model in eval mode (see `tiny_hf_config` for the keyword arguments)."""
  config = tiny_hf_config(**config_kwargs)
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(config).eval()
  return randomize_(model, seed=seed)


def make_tiny_hf_checkpoint(path, *, tie: bool = True, kv_heads: int = 2, heads: int = 4, window_size: int = 56,
                            fullatt: tuple[int, ...] = (1,), vocab: int = 512, seed: int = 0,
                            dtype: torch.dtype = torch.float32, max_shard_size: str | None = None, **config_kwargs):
  """Writes a tiny random Qwen2.5-VL checkpoint with `save_pretrained` and returns `path`.

  `max_shard_size` (e.g. "20KB") makes transformers write several shards plus `model.safetensors.index.json`;
  `dtype=torch.bfloat16` stores bf16 tensors (and `"dtype": "bfloat16"` in config.json).
  """
  model = make_tiny_hf_model(seed=seed, tie=tie, kv_heads=kv_heads, heads=heads, window_size=window_size,
                             fullatt=fullatt, vocab=vocab, **config_kwargs)
  model = model.to(dtype)
  os.makedirs(path, exist_ok=True)
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(path, **kwargs)
  return path


def load_torch_model(path, dtype: torch.dtype = torch.float32) -> Qwen2_5_VLForConditionalGeneration:
  """transformers' own reader, eager attention, eval mode."""
  return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


# ---------------------------------------------------------------- processor-like inputs


def image_processor(*, patch_size: int = PATCH, merge_size: int = MERGE, temporal_patch_size: int = TEMPORAL):
  """transformers' PIL image processor; sizes that are multiples of patch*merge pass through unresized."""
  factor = patch_size * merge_size
  return Qwen2VLImageProcessorPil(min_pixels=factor * factor, max_pixels=factor * factor * 1024,
                                  patch_size=patch_size, merge_size=merge_size,
                                  temporal_patch_size=temporal_patch_size)


def make_mm_batch(rows, *, ids: TinyIds = TinyIds(), seed: int = 0, pad_to: int | None = None,
                  patch_size: int = PATCH, merge_size: int = MERGE, temporal_patch_size: int = TEMPORAL,
                  markers: bool = True) -> dict[str, np.ndarray]:
  """A left-padded multimodal batch, as the Qwen2.5-VL processor would build it.

  Args:
    rows: one list per row; an int n is n random text tokens, a (height, width) tuple is an RGB image of that many
      pixels: [vision_start] + image-pad x (grid_h/m * grid_w/m) + [vision_end] (markers only when `markers`).
    pad_to: total length T (default: the longest row).

  Returns:
    numpy arrays: input_ids [B, T] int64, attention_mask [B, T] int64 (0 = left padding), mm_token_type_ids [B, T]
    int64 (1 on image pads), pixel_values [P, patch_dim] float32, image_grid_thw [I, 3] int64, in row order.
  """
  rng = np.random.default_rng(seed)
  images, seqs, types = [], [], []
  for row in rows:
    seq, typ = [], []
    for item in row:
      if isinstance(item, (int, np.integer)):
        seq += rng.integers(1, ids.image, size=int(item)).tolist()  # 0 is the pad id; specials stay out.
        typ += [0] * int(item)
        continue
      h, w = item
      images.append(Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)))
      n = (h // patch_size // merge_size) * (w // patch_size // merge_size)
      pre, post = ([ids.vision_start], [ids.vision_end]) if markers else ([], [])
      seq += pre + [ids.image] * n + post
      typ += [0] * len(pre) + [1] * n + [0] * len(post)
    seqs.append(seq)
    types.append(typ)
  T = max(len(s) for s in seqs) if pad_to is None else pad_to
  B = len(rows)
  input_ids = np.full((B, T), ids.pad, np.int64)
  mask = np.zeros((B, T), np.int64)
  mm_types = np.zeros((B, T), np.int64)
  for b, (seq, typ) in enumerate(zip(seqs, types)):
    if len(seq) > T:
      raise ValueError(f"row {b} has {len(seq)} tokens > pad_to={T}")
    input_ids[b, T - len(seq):] = seq
    mask[b, T - len(seq):] = 1
    mm_types[b, T - len(seq):] = typ
  batch = dict(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=mm_types)
  if images:
    proc = image_processor(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size)
    out = proc(images=images, return_tensors="np")
    grid = np.asarray(out["image_grid_thw"], np.int64)
    expected = [(1, im.height // patch_size, im.width // patch_size) for im in images]
    if [tuple(g) for g in grid.tolist()] != expected:
      raise ValueError(f"image sizes must be multiples of {patch_size * merge_size}: got grids {grid.tolist()}")
    batch.update(pixel_values=np.asarray(out["pixel_values"], np.float32), image_grid_thw=grid)
  else:
    batch.update(pixel_values=None, image_grid_thw=None)
  return batch


def to_torch(batch: dict) -> dict[str, torch.Tensor]:
  """numpy batch -> torch tensors (None stays None)."""
  return {k: None if v is None else torch.from_numpy(np.asarray(v)) for k, v in batch.items()}


# ---------------------------------------------------------------- reference intermediates


@torch.no_grad()
def hf_reference(model: Qwen2_5_VLForConditionalGeneration, batch: dict) -> dict:
  """transformers' intermediates for `batch`, as float32 numpy.

  Returns a dict with:
    vision_hidden [P, E]: the tower output before the merger, in window order (`visual(...).last_hidden_state`).
    merged [P/4, D]: the merger output in original patch order (`pooler_output`).
    layers: list of [B, T, D], the output of each decoder layer (before the final norm).
    logits [B, T, V].
    positions [3, B, T], deltas [B]: `get_rope_index` with mm_token_type_ids and the attention mask.
  """
  tb = to_torch(batch)
  out = {}
  if tb["pixel_values"] is not None:
    vis = model.model.visual(tb["pixel_values"], grid_thw=tb["image_grid_thw"])
    out["vision_hidden"] = vis.last_hidden_state.float().numpy()
    out["merged"] = vis.pooler_output.float().numpy()
    positions, deltas = model.model.get_rope_index(tb["input_ids"], tb["mm_token_type_ids"],
                                                   image_grid_thw=tb["image_grid_thw"],
                                                   attention_mask=tb["attention_mask"])
    out["positions"], out["deltas"] = positions.numpy(), deltas[:, 0].numpy()
  layers = []
  hooks = [layer.register_forward_hook(lambda _m, _i, o: layers.append((o[0] if isinstance(o, tuple) else o)))
           for layer in model.model.language_model.layers]
  try:
    result = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"],
                   mm_token_type_ids=tb["mm_token_type_ids"], pixel_values=tb["pixel_values"],
                   image_grid_thw=tb["image_grid_thw"], use_cache=False)
  finally:
    for h in hooks:
      h.remove()
  out["layers"] = [x.float().numpy() for x in layers]
  out["logits"] = result.logits.float().numpy()
  return out
