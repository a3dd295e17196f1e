"""Sampler throughput on CPU: jaxvg `rollout` against transformers' `generate()`, same weights, same prompts.

  python bench/sampler.py                        # B=16 prompts x G=8 samples, 32 new tokens, tiny + mid-size
  python bench/sampler.py --batch 4 --samples 4  # quicker

Both sides load one checkpoint written by transformers' `save_pretrained` (jaxvg through `load_hf`), sample at
temperature 1 with top-k / top-p off and no stop token, so every row generates exactly `--new` tokens. transformers
expands each prompt G times before its prefill; jaxvg prefills each prompt once and repeats its cache. Compile time is
reported separately and excluded from jaxvg's tokens/s; transformers gets one warm-up call. The two then alternate
(`common.interleaved`, --pairs pairs, 7 by default; both use all cores): `speedup` = transformers' time / jaxvg's for
the same tokens, the median of the per-pair ratios, with their interquartile range in `speedup_iqr`; tokens/s are at
each side's median time. At the default sizes a mid-size transformers call takes minutes, so the run takes about
half an hour on a 2-core CPU.

`frac_of_bandwidth_roofline` = (decoder weight bytes / measured memory bandwidth) / jaxvg decode-step time: 1.0 would
mean a decode step costs no more than reading the weights once. The bandwidth is a large numpy copy (read + write).
At B*G = 128 rows a CPU decode step is compute bound, so `frac_of_compute_roofline` (step FLOPs / the measured
throughput of one [B*G, D] x [D, V] float32 matmul / step time) is reported beside it.
Prints ONE JSON line; progress goes to stderr.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import common  # noqa: E402  (before torch: it sets the OpenMP wait policy)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

import jaxvg.models as M  # noqa: E402
from jaxvg.rl import rollout as R  # noqa: E402

IMAGE_GRID = (1, 4, 8)  # one 56 x 112 px image per prompt: 32 patches -> 8 image tokens
SIZES = {
    # name: (vocab, hidden, intermediate, layers, heads, kv_heads, vision depth, vision hidden)
    "tiny": (512, 64, 128, 2, 4, 2, 2, 32),
    "mid": (32000, 768, 2048, 12, 12, 2, 2, 128),
}


def log(*args):
  print(*args, file=sys.stderr, flush=True)


def memory_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
  """Bytes per second of a large numpy copy (counting the read and the write), best of `repeats`."""
  src = np.ones(nbytes // 8, np.float64)
  dst = np.empty_like(src)
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - t)
  return 2 * nbytes / best


def matmul_flops_per_s(m: int, k: int, n: int, repeats: int = 5) -> float:
  """FLOP/s of one jitted float32 [m, k] x [k, n] matmul, best of `repeats`."""
  x, w = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  jax.block_until_ready(f(x, w))
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(x, w))
    best = min(best, time.perf_counter() - t)
  return 2 * m * k * n / best


def hf_config(size: str) -> Qwen2_5_VLConfig:
  vocab, d, f, layers, heads, kv, vdepth, vhidden = SIZES[size]
  half = d // heads // 2
  section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
  text = dict(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv, max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
              tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
  vision = dict(depth=vdepth, hidden_size=vhidden, intermediate_size=2 * vhidden, num_heads=2, out_hidden_size=d,
                fullatt_block_indexes=[vdepth - 1], window_size=56, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2)
  return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 4, video_token_id=vocab - 3,
                          vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1, tie_word_embeddings=True)


def make_checkpoint(size: str, path: str) -> Qwen2_5_VLForConditionalGeneration:
  """A random model at unit scale (fan-in normal weights), saved with `save_pretrained`; returns the torch model."""
  torch.manual_seed(0)
  model = Qwen2_5_VLForConditionalGeneration(hf_config(size)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "ln_q" in name:
        p.fill_(1.0)
      elif p.ndim == 1:
        p.zero_()
      else:
        p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
  model.save_pretrained(path)
  return model


def make_prompts(cfg, batch: int, text_tokens: int, seed: int = 0):
  """Left-padded prompts [text, vision_start, image pads, vision_end, text] of varied lengths, one image each."""
  rng = np.random.default_rng(seed)
  t, h, w = IMAGE_GRID
  n_img = t * h * w // cfg.vision.merge_unit
  seqs = []
  for b in range(batch):
    n_text = text_tokens - (b % 4) * 2
    pre, post = rng.integers(1, cfg.image_token_id - 4, (2, n_text // 2)).tolist()
    seqs.append(pre + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id] + post)
  T = max(map(len, seqs))
  ids = np.zeros((batch, T), np.int64)
  mask = np.zeros((batch, T), np.int64)
  for b, s in enumerate(seqs):
    ids[b, T - len(s):], mask[b, T - len(s):] = s, 1
  types = (ids == cfg.image_token_id).astype(np.int64)
  grid = np.tile(np.asarray([IMAGE_GRID]), (batch, 1))
  pixels = rng.standard_normal((batch * t * h * w, cfg.vision.patch_dim)).astype(np.float32)
  return ids, mask, types, pixels, grid


def jax_inputs(cfg, ids, mask, types, pixels, grid):
  positions, deltas = M.mrope_positions(ids, types, grid, mask)
  v = cfg.vision
  layout = M.vision_layout(grid, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                           patch_size=v.patch_size)
  return dict(input_ids_BT=jnp.asarray(ids, jnp.int32), attention_mask_BT=jnp.asarray(mask, jnp.int32),
              positions_3BT=jnp.asarray(positions), deltas_B=jnp.asarray(deltas),
              vision=M.VisionInputs.from_layout(pixels, layout))


def hf_generate(model, ids, mask, types, pixels, grid, *, samples: int, new: int, greedy: bool = False):
  with torch.no_grad():
    out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         mm_token_type_ids=torch.from_numpy(types), pixel_values=torch.from_numpy(pixels),
                         image_grid_thw=torch.from_numpy(grid), max_new_tokens=new, min_new_tokens=new,
                         num_return_sequences=samples, pad_token_id=0, eos_token_id=None,
                         **(dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_p=1.0,
                                                                      top_k=0)))
  return out[:, ids.shape[1]:].numpy()


def bench_size(size: str, *, batch: int, samples: int, new: int, text_tokens: int, bandwidth: float,
               pairs: int) -> dict:
  with tempfile.TemporaryDirectory() as path:
    hf = make_checkpoint(size, path)
    model = M.load_hf(path, dtype=jnp.float32)
  cfg = model.cfg
  graphdef, params = nnx.split(model)
  ids, mask, types, pixels, grid = make_prompts(cfg, batch, text_tokens)
  inputs = jax_inputs(cfg, ids, mask, types, pixels, grid)
  config = R.SamplingConfig(num_samples=samples, max_new_tokens=new, temperature=1.0)
  key = jax.random.key(0)
  result = {"prompt_tokens": int(ids.shape[1]), "params_M": round(sum(x.size for x in jax.tree.leaves(params)) / 1e6,
                                                                   1)}

  # Same weights, same prompts: greedy tokens agree (2 prompts, 4 tokens).
  greedy = R.SamplingConfig(num_samples=1, max_new_tokens=4, temperature=0.0)
  sub = make_prompts(cfg, 2, text_tokens, seed=1)
  ours = R.rollout(graphdef, params, **jax_inputs(cfg, *sub), key=key, config=greedy).tokens_BT
  result["greedy_match_hf"] = bool((np.asarray(ours) == hf_generate(hf, *sub, samples=1, new=4, greedy=True)).all())

  # jaxvg: compile; a timed rollout is split into prefill and decode.
  t = time.perf_counter()
  prefill_args = (inputs["input_ids_BT"], inputs["attention_mask_BT"], inputs["positions_3BT"], inputs["deltas_B"],
                  inputs["vision"])
  static = dict(mesh=None, data_axes=("data",))
  R.prefill.lower(graphdef, params, *prefill_args, num_samples=samples, max_new_tokens=new, **static).compile()
  cache, prefix = R.prefill(graphdef, params, *prefill_args, num_samples=samples, max_new_tokens=new, **static)
  R.decode.lower(graphdef, params, cache, prefix, key, config=config, **static).compile()
  result["jaxvg_compile_s"] = round(time.perf_counter() - t, 2)
  jax.block_until_ready(R.decode(graphdef, params, cache, prefix, key, config=config, **static))
  tokens = batch * samples * new
  prefill_s, decode_s = [], []

  def jaxvg_rollout():
    t0 = time.perf_counter()
    cache, prefix = jax.block_until_ready(R.prefill(graphdef, params, *prefill_args, num_samples=samples,
                                                    max_new_tokens=new, **static))
    t1 = time.perf_counter()
    out, _ = jax.block_until_ready(R.decode(graphdef, params, cache, prefix, key, config=config, **static))
    prefill_s.append(t1 - t0)
    decode_s.append(time.perf_counter() - t1)
    assert int(np.asarray(out.lengths_B).sum()) == tokens

  def hf_rollout():
    hf_tokens = hf_generate(hf, ids, mask, types, pixels, grid, samples=samples, new=new)
    assert hf_tokens.shape == (batch * samples, new), hf_tokens.shape

  # transformers: one small warm-up call; then the two alternate.
  hf_generate(hf, *make_prompts(cfg, 1, text_tokens, seed=2), samples=1, new=2)
  timing = common.interleaved(jaxvg_rollout, hf_rollout, pairs=pairs, warmup=0)
  step_s = float(np.median(decode_s)) / new
  result.update(jaxvg_prefill_s=round(float(np.median(prefill_s)), 3), jaxvg_decode_step_ms=round(1e3 * step_s, 2),
                jaxvg_tokens_per_s=round(tokens / timing["a_s"], 1), hf_tokens_per_s=round(tokens / timing["b_s"], 1),
                speedup=round(timing["ratio"], 2), speedup_iqr=[round(q, 2) for q in timing["ratio_iqr"]],
                pairs=pairs)
  log(f"[{size}] jaxvg and transformers: {result}")

  decoder = jax.tree.leaves(nnx.state(model.decoder, nnx.Param))
  decoder_bytes = sum(x.size * x.dtype.itemsize for x in decoder)
  t_cfg = cfg.text
  S = ids.shape[1] + new
  step_flops = 2 * batch * samples * (sum(x.size for x in decoder) + 2 * S * t_cfg.hidden_size * t_cfg.num_layers)
  flops = matmul_flops_per_s(batch * samples, t_cfg.hidden_size, t_cfg.vocab_size)
  result["decoder_weight_MB"] = round(decoder_bytes / 2**20, 1)
  result["frac_of_bandwidth_roofline"] = round(decoder_bytes / bandwidth / step_s, 3)
  result["matmul_GFLOPs"] = round(flops / 1e9, 1)
  result["frac_of_compute_roofline"] = round(step_flops / flops / step_s, 3)
  log(f"[{size}] {result}")
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16, help="prompts B")
  parser.add_argument("--samples", type=int, default=8, help="samples per prompt G")
  parser.add_argument("--new", type=int, default=32, help="new tokens per sample")
  parser.add_argument("--text", type=int, default=24, help="text tokens per prompt (plus 10 image tokens)")
  parser.add_argument("--sizes", default="tiny,mid")
  parser.add_argument("--pairs", type=int, default=7, help="alternated jaxvg / transformers pairs (7 or more)")
  args = parser.parse_args()
  common.use_all_cores()
  bandwidth = memory_bandwidth()
  log(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s")
  sizes = {s: bench_size(s, batch=args.batch, samples=args.samples, new=args.new, text_tokens=args.text,
                         bandwidth=bandwidth, pairs=args.pairs) for s in args.sizes.split(",")}
  main_size = "mid" if "mid" in sizes else next(iter(sizes))
  line = {
      "bench": "sampler", "device": "cpu", "cpu_count": os.cpu_count(), "batch": args.batch,
      "samples_per_prompt": args.samples, "new_tokens": args.new,
      "speedup": sizes[main_size]["speedup"], "speedup_iqr": sizes[main_size]["speedup_iqr"], "pairs": args.pairs,
      "speedup_config": main_size,
      "compile_s": {s: r["jaxvg_compile_s"] for s, r in sizes.items()},
      "frac_of_bandwidth_roofline": sizes[main_size]["frac_of_bandwidth_roofline"],
      "frac_of_compute_roofline": sizes[main_size]["frac_of_compute_roofline"],
      "bandwidth_GBps": round(bandwidth / 1e9, 2), "sizes": sizes,
  }
  if (args.batch, args.samples) != (16, 8):
    line["note"] = f"batch reduced from 16 x 8 to {args.batch} x {args.samples}"
  print(json.dumps(line))


if __name__ == "__main__":
  main()
