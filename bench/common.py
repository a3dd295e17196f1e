"""Shared pieces of the benchmarks: model sizes, the machine's matmul peak, FLOP counts, timing, a torch twin."""

import gc
import json
import math
import os
import platform
import tempfile
import time

import numpy as np

# PyTorch's OpenMP threads wait for work asleep instead of spinning (libgomp reads this once, when torch loads: import
# this module before torch). On a machine shared with other jobs, a thread spinning at the end of a parallel region
# takes the core its straggler needs: under a load average of 3-4 on 2 cores PyTorch's mid-size forward took 9.0 s
# spinning and 2.8 s asleep, and jaxvg / PyTorch ratios followed the load (docs/benchmarks.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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


def use_all_cores():
  """PyTorch's intra-op threads = os.cpu_count(), the size of XLA:CPU's default thread pool, so that both sides of a
  jaxvg / PyTorch comparison compute on every core (and neither gets a head start from a smaller or larger pool)."""
  import torch
  torch.set_num_threads(os.cpu_count())


def round_robin(fns: dict, *, rounds: int, warmup: int = 1, min_sample_s: float = 0.2,
                clock=time.perf_counter) -> dict:
  """Per-call seconds of each of `fns` (name -> callable of no arguments), one sample of each per round.

  Timing each side in its own block lets a change of host load between the blocks move a ratio several-fold (on a
  shared 2-core machine `forward.py` once gave 1.26, 3.81 and 0.82 on one day); in turns, a load change hits every
  side within one round. Round r runs the callables in their order rotated by r: with two sides A goes first in even
  rounds and B in odd ones, so neither always follows the other (caches, spinning threads, allocator state). Each
  callable first runs `warmup` times untimed (compilation), then is timed to size its samples (up to 3 calls, fewer
  if they last 3 x `min_sample_s`; the fastest counts, as the first calls after compiling can be slow): a sample
  repeats the call until it lasts about `min_sample_s`, so a short call is not dominated by timer and scheduler
  jitter. The garbage collector runs before each sample and is off during it, so a collection lands on neither side.

  Returns {"seconds": {name: [per-call seconds, one per round]}, "calls": {name: calls per sample}}.
  """
  if rounds < 7:
    raise ValueError(f"rounds={rounds}: quartiles of fewer than 7 rounds say little; use 7 or more")
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  calls = {}
  for name, fn in fns.items():
    sizing = []
    while not sizing or (len(sizing) < 3 and sum(sizing) < 3 * min_sample_s):
      t = clock()
      fn()
      sizing.append(clock() - t)
    calls[name] = max(1, math.ceil(min_sample_s / max(min(sizing), 1e-9)))
  names = list(fns)
  seconds = {name: [] for name in names}
  enabled = gc.isenabled()
  gc.collect()
  gc.freeze()  # what exists now is not garbage: the collection before each sample then scans only new objects
  try:
    for r in range(rounds):
      for name in names[r % len(names):] + names[:r % len(names)]:
        gc.collect()
        gc.disable()
        t = clock()
        for _ in range(calls[name]):
          fns[name]()
        seconds[name].append((clock() - t) / calls[name])
        gc.enable()
  finally:
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()
  return {"seconds": seconds, "calls": calls}


def ratio_stats(num_s, den_s) -> tuple[float, list[float]]:
  """(median, [q25, q75]) of the per-round ratios num_s[r] / den_s[r]: each ratio compares two samples taken under
  the same load, and the median and quartiles shrug off a round that one load spike hit on one side only."""
  ratios = np.asarray(num_s) / np.asarray(den_s)
  q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
  return float(q50), [float(q25), float(q75)]


def interleaved(a, b, *, pairs: int = 9, warmup: int = 1, min_sample_s: float = 0.2, clock=time.perf_counter) -> dict:
  """Interleaved A/B timing of two callables of no arguments: `ratio` = b's time / a's time (> 1: a is faster).

  A and B alternate (A B, B A, A B, ...) after `warmup` untimed calls of each; see `round_robin` for the method. For
  a jaxvg / PyTorch comparison call `use_all_cores` first: both sides then use all cores (XLA:CPU by default).

  Returns {"ratio": median per-pair ratio b / a, "ratio_iqr": [q25, q75] of the per-pair ratios, "a_s" / "b_s":
  median per-call seconds of each side, "pairs": the number of pairs, "calls": [calls per sample of a, of b],
  "samples_s": [a's per-call seconds by pair, b's]}.
  """
  timed = round_robin({"a": a, "b": b}, rounds=pairs, warmup=warmup, min_sample_s=min_sample_s, clock=clock)
  a_s, b_s = timed["seconds"]["a"], timed["seconds"]["b"]
  ratio, iqr = ratio_stats(b_s, a_s)
  return {"ratio": ratio, "ratio_iqr": iqr, "a_s": float(np.median(a_s)), "b_s": float(np.median(b_s)),
          "pairs": pairs, "calls": [timed["calls"]["a"], timed["calls"]["b"]], "samples_s": [a_s, b_s]}


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
