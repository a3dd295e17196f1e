"""Shared pieces of the benchmarks: model sizes, the machine's matmul peak, FLOP counts, timing, a torch twin."""

import json
import os
import platform
import tempfile
import time

import numpy as np


def mid_size_hf_config(vocab: int = 32000):
  """~100M parameters: a 12-layer D=768 decoder and an 8-block E=384 vision tower."""
  from transformers import Qwen2_5_VLConfig
  return Qwen2_5_VLConfig(
      text_config=dict(vocab_size=vocab, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=4, rms_norm_eps=1e-6,
                       rope_parameters=dict(rope_type="default", mrope_section=[8, 12, 12], rope_theta=1e6)),
      vision_config=dict(depth=8, hidden_size=384, intermediate_size=1024, num_heads=6, out_hidden_size=768,
                         fullatt_block_indexes=[3, 7], window_size=112),
      image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
      vision_end_token_id=vocab - 1, tie_word_embeddings=False)


def tiny_hf_config(vocab: int = 512):
  from transformers import Qwen2_5_VLConfig
  return Qwen2_5_VLConfig(
      text_config=dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2,
                       rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=1e4)),
      vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                         fullatt_block_indexes=[1], window_size=56),
      image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
      vision_end_token_id=vocab - 1, tie_word_embeddings=True)


def save_torch_twin(hf_config, seed: int = 0):
  """A random transformers model saved to a temporary HF directory: (torch model, path)."""
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(seed)
  hf_config._attn_implementation = "sdpa"
  model = Qwen2_5_VLForConditionalGeneration(hf_config).eval()
  path = tempfile.mkdtemp(prefix="jaxvg-bench-")
  model.save_pretrained(path)
  return model, path


def matmul_peak_gflops(n: int = 1024, repeats: int = 20) -> float:
  """The machine's float32 matmul rate (GFLOP/s): the best of `repeats` timed n x n products under XLA."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / best_time(lambda: f(a).block_until_ready(), repeats) / 1e9


def forward_flops(cfg, *, tokens: int, patches: int, batch: int = 1) -> float:
  """Matmul FLOPs of one forward as computed, for `batch` rows of `tokens` and `patches` patches per row.

  Decoder attention is dense over all T keys; vision attention is dense over the image in the full-attention blocks
  and covers 3 windows' worth of keys per query in the windowed ones (the chunked layout of jaxvg.models.vision).
  """
  t, v = cfg.text, cfg.vision
  D, F, N, K, H, V = t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads, t.head_dim, t.vocab_size
  per_tok = t.num_layers * (2 * D * (N + 2 * K) * H + 2 * N * H * D + 6 * D * F + 4 * tokens * N * H) + 2 * D * V
  E, VF, M = v.hidden_size, v.intermediate_size, v.hidden_size * v.merge_unit
  full = len(v.fullatt_block_indexes)
  window_keys = 3 * (v.window_size // v.patch_size) ** 2
  per_patch = (2 * v.patch_dim * E + v.depth * (8 * E * E + 6 * E * VF)
               + 4 * E * (full * patches + (v.depth - full) * min(window_keys, patches)))
  merger = (patches // v.merge_unit) * (2 * M * M + 2 * M * D)
  return batch * (tokens * per_tok + patches * per_patch + merger)


def best_time(fn, repeats: int = 5) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def machine() -> dict:
  return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}


def emit(record: dict):
  print(json.dumps(record, sort_keys=True))


def random_images(sizes, seed: int = 0):
  """Random RGB images -> processor outputs (pixel_values, image_grid_thw) with transformers' image processor."""
  from PIL import Image
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  rng = np.random.default_rng(seed)
  imgs = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
  out = Qwen2VLImageProcessorPil(max_pixels=max(h * w for h, w in sizes) * 2)(images=imgs, return_tensors="np")
  return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"])


def synthetic_config(*, width: int, layers: int, heads: int, vision_width: int, vision_depth: int, tie: bool,
                     vocab: int = 32000):
  """A random-weight Qwen2.5-VL-shaped ModelConfig (no checkpoint): GQA with 2 kv heads, MLP 3x the width, the vision
  tower's last block full-attention, special ids at the top of the vocabulary."""
  from jaxvg.models import ModelConfig
  from jaxvg.models.config import TextConfig, VisionConfig
  text = TextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=3 * width, num_layers=layers,
                    num_heads=heads, num_kv_heads=2, mrope_section=(8, 12, 12), rope_theta=1e6,
                    tie_word_embeddings=tie)
  vision = VisionConfig(depth=vision_depth, hidden_size=vision_width, intermediate_size=4 * vision_width,
                        num_heads=vision_width // 64, out_hidden_size=width, fullatt_block_indexes=(vision_depth - 1,),
                        window_size=112)
  return ModelConfig(text=text, vision=vision, image_token_id=vocab - 4, video_token_id=vocab - 3,
                     vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1, bos_token_id=None,
                     eos_token_id=None)


def prompt_ids(cfg, grid, text_tokens: int, seed: int = 0):
  """One row per image: text, <vision_start>, image pads, <vision_end>, text."""
  rng = np.random.default_rng(seed)
  top = min(1000, cfg.text.vocab_size - 8)
  rows = []
  for t, h, w in np.asarray(grid).tolist():
    n = t * h * w // 4
    row = (list(rng.integers(1, top, text_tokens // 2)) + [cfg.vision_start_token_id] + [cfg.image_token_id] * n
           + [cfg.vision_end_token_id] + list(rng.integers(1, top, text_tokens - text_tokens // 2)))
    rows.append(row)
  T = max(map(len, rows))
  ids = np.zeros((len(rows), T), np.int64)
  mask = np.zeros((len(rows), T), np.int64)
  for b, r in enumerate(rows):
    ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
  return ids, mask, (ids == cfg.image_token_id).astype(np.int64)
