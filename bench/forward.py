"""jaxvg's jitted forward vs transformers' PyTorch forward on CPU: same weights, same inputs.

  python bench/forward.py [--quick]

Prints one JSON line. `speedup` = PyTorch time / jaxvg time at the mid-size config (> 1: jaxvg faster): the median of
the per-pair ratios of an interleaved A/B (`common.interleaved`: jaxvg and PyTorch alternate, 9 pairs, 7 with
--quick), with their interquartile range in `speedup_iqr` and the number of pairs in `pairs`; both sides use all
cores, PyTorch's OpenMP threads waiting asleep, not spinning (see bench/common.py). `frac_of_matmul_peak` = achieved
matmul GFLOP/s of the jaxvg forward (median time) / the machine's measured float32 matmul peak.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import common  # noqa: E402  (before torch: it sets the OpenMP wait policy)
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from jaxvg.models import forward, load_hf, prepare_inputs  # noqa: E402
from jaxvg.models.vlm import _jit_call  # noqa: E402


def measure(hf_config, image_size: int, text_tokens: int, batch: int, pairs: int):
  torch_model, path = common.save_torch_twin(hf_config)
  model = load_hf(path)
  pixels, grid = common.random_images([(image_size, image_size)] * batch)
  ids, mask, mm = common.prompt_ids(model.cfg, grid, text_tokens)
  inputs = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, pixel_values=pixels, image_grid_thw=grid)
  args = prepare_inputs(model.cfg, **inputs)  # host-side positions and layout, outside the timed region
  with torch.inference_mode():
    t_inputs = {k: torch.as_tensor(v) for k, v in inputs.items()}
    timing = common.interleaved(lambda: jax.block_until_ready(_jit_call(model, *args, False)),
                                lambda: torch_model(**t_inputs), pairs=pairs)
    ref = torch_model(**t_inputs).logits.numpy()
  jax_time, torch_time = timing["a_s"], timing["b_s"]
  ours = np.asarray(forward(model, **inputs))
  valid = mask.astype(bool)
  flops = common.forward_flops(model.cfg, tokens=ids.shape[1], patches=int(np.prod(grid, 1).sum()) // batch,
                               batch=batch)
  return {"jax_s": jax_time, "torch_s": torch_time, "speedup": timing["ratio"], "speedup_iqr": timing["ratio_iqr"],
          "pairs": pairs, "calls_per_sample": timing["calls"],
          "samples_s": [[round(t, 4) for t in side] for side in timing["samples_s"]], "gflop": flops / 1e9,
          "jax_gflops": flops / jax_time / 1e9, "tokens": int(ids.shape[1]), "visual_tokens": int(mm[0].sum()),
          "max_abs_logit_diff": float(np.abs(ours[valid] - ref[valid]).max())}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="7 pairs instead of 9")
  args = parser.parse_args()
  common.use_all_cores()
  pairs = 7 if args.quick else 9
  peak = common.matmul_peak_gflops()
  tiny = measure(common.tiny_hf_config(), 112, 32, 2, pairs)
  mid = measure(common.mid_size_hf_config(), 560, 100, 1, pairs)
  common.emit({"bench": "forward", "speedup": mid["speedup"], "speedup_iqr": mid["speedup_iqr"], "pairs": pairs,
               "frac_of_matmul_peak": mid["jax_gflops"] / peak, "matmul_peak_gflops": peak, "tiny": tiny, "mid": mid,
               "load_average_1min": os.getloadavg()[0], **common.machine()})


if __name__ == "__main__":
  main()
