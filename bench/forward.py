"""jaxvg's jitted forward vs transformers' PyTorch forward on CPU: same weights, same inputs.

  python bench/forward.py [--quick]

Prints one JSON line. `speedup` = PyTorch time / jaxvg time at the mid-size config (> 1: jaxvg faster);
`frac_of_matmul_peak` = achieved matmul GFLOP/s of the jaxvg forward / the machine's measured float32 matmul peak.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from jaxvg.models import forward, load_hf, prepare_inputs  # noqa: E402
from jaxvg.models.vlm import _jit_call  # noqa: E402


def measure(hf_config, image_size: int, text_tokens: int, batch: int, repeats: int):
  torch_model, path = common.save_torch_twin(hf_config)
  model = load_hf(path)
  pixels, grid = common.random_images([(image_size, image_size)] * batch)
  ids, mask, mm = common.prompt_ids(model.cfg, grid, text_tokens)
  inputs = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, pixel_values=pixels, image_grid_thw=grid)
  args = prepare_inputs(model.cfg, **inputs)  # host-side positions and layout, outside the timed region
  jax_time = common.best_time(lambda: jax.block_until_ready(_jit_call(model, *args, False)), repeats)
  with torch.inference_mode():
    t_inputs = {k: torch.as_tensor(v) for k, v in inputs.items()}
    torch_time = common.best_time(lambda: torch_model(**t_inputs), repeats)
    ref = torch_model(**t_inputs).logits.numpy()
  ours = np.asarray(forward(model, **inputs))
  valid = mask.astype(bool)
  flops = common.forward_flops(model.cfg, tokens=ids.shape[1], patches=int(np.prod(grid, 1).sum()) // batch,
                               batch=batch)
  return {"jax_s": jax_time, "torch_s": torch_time, "speedup": torch_time / jax_time, "gflop": flops / 1e9,
          "jax_gflops": flops / jax_time / 1e9, "tokens": int(ids.shape[1]), "visual_tokens": int(mm[0].sum()),
          "max_abs_logit_diff": float(np.abs(ours[valid] - ref[valid]).max())}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="fewer repeats")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  repeats = 2 if args.quick else 5
  peak = common.matmul_peak_gflops()
  tiny = measure(common.tiny_hf_config(), 112, 32, 2, repeats)
  mid = measure(common.mid_size_hf_config(), 560, 100, 1, repeats)
  common.emit({"bench": "forward", "speedup": mid["speedup"], "frac_of_matmul_peak": mid["jax_gflops"] / peak,
               "matmul_peak_gflops": peak, "tiny": tiny, "mid": mid, **common.machine()})


if __name__ == "__main__":
  main()
