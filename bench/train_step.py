"""One GRPO update step: jaxvg (jitted, donated state) vs the same model, loss and AdamW in PyTorch, on CPU.

  python bench/train_step.py [--quick]

Prints one JSON line: `speedup` = PyTorch step time / jaxvg step time at the mid-size config (> 1: jaxvg faster), the
median of the per-pair ratios of an interleaved A/B (`common.interleaved`: jaxvg and PyTorch steps alternate, 9 pairs,
7 with --quick) with their interquartile range in `speedup_iqr` and the number of pairs in `pairs`; both sides use all
cores, PyTorch's OpenMP threads waiting asleep, not spinning (see bench/common.py). `frac_of_matmul_peak` = the jaxvg
step's matmul GFLOP/s (3x the forward's FLOPs, median step time) / the measured float32 matmul peak.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import common  # noqa: E402  (before torch: it sets the OpenMP wait policy)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from jaxvg.rl import losses, optim, scoring, update  # noqa: E402
from jaxvg.models import load_hf  # noqa: E402


def torch_step_fn(model, inputs, tokens, mask, adv, G, lr):
  """The GRPO token loss (ratio to detached old log-probs, clip 0.2, seq-mean-token-mean) and one AdamW step."""
  opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
  T0 = inputs["input_ids"].shape[1]
  rep = lambda x: torch.repeat_interleave(torch.as_tensor(x), G, dim=0)
  ids = torch.cat([rep(inputs["input_ids"]), torch.as_tensor(tokens)], 1)
  am = torch.cat([rep(inputs["attention_mask"]), torch.as_tensor(mask)], 1)
  mm = torch.cat([rep(inputs["mm_token_type_ids"]), torch.zeros_like(torch.as_tensor(tokens))], 1)
  # Each prompt's image goes with each of its G rows.
  pv = torch.as_tensor(np.concatenate([inputs["pixel_values"]] * G))
  grid = torch.as_tensor(np.repeat(inputs["image_grid_thw"], G, axis=0))
  t_mask = torch.as_tensor(mask, dtype=torch.float32)
  t_adv = torch.as_tensor(adv)
  tok = torch.as_tensor(tokens)

  def step():
    opt.zero_grad()
    logits = model(input_ids=ids, attention_mask=am, mm_token_type_ids=mm, pixel_values=pv,
                   image_grid_thw=grid).logits[:, T0 - 1:-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, tok[..., None])[..., 0]
    ratio = torch.exp(logp - logp.detach())
    pg = torch.maximum(-t_adv * ratio, -t_adv * torch.clamp(ratio, 0.8, 1.2))
    loss = ((pg * t_mask).sum(1) / t_mask.sum(1).clamp(min=1)).mean()
    loss.backward()
    opt.step()
  return step


def measure(hf_config, image_size, text_tokens, completion, B, G, pairs):
  torch_model, path = common.save_torch_twin(hf_config)
  torch_model.train()
  model = load_hf(path)
  pixels, grid = common.random_images([(image_size, image_size)] * B)
  ids, mask, mm = common.prompt_ids(model.cfg, grid, text_tokens)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, min(1000, model.cfg.text.vocab_size - 8), (B * G, completion)).astype(np.int64)
  cmask = np.ones((B * G, completion), np.int64)
  adv = np.repeat(rng.normal(size=(B * G, 1)), completion, 1).astype(np.float32)

  prompt = scoring.prompt_inputs(model.cfg, input_ids=ids, attention_mask=mask, mm_token_type_ids=mm,
                                 pixel_values=pixels, image_grid_thw=grid)
  tx = optim.make_optimizer(optim.OptimConfig(lr=1e-6, weight_decay=0.0, clip_norm=None), nnx.state(model, nnx.Param))
  state = update.init_state(model, tx)
  loss_cfg = losses.preset("grpo")
  step = jax.jit(lambda s, b: update.policy_step(s, (b,), tx=tx, group_size=G, loss_cfg=loss_cfg),
                 donate_argnums=(0,))
  score = jax.jit(update.score_fn, static_argnums=(1, 5))
  logp_old = score(state.params, state.graphdef, prompt, jnp.asarray(tokens), jnp.asarray(cmask), G)[0]
  batch = update.PolicyBatch(prompt, jnp.asarray(tokens), jnp.asarray(cmask), logp_old, jnp.asarray(adv),
                             jnp.zeros_like(logp_old), jnp.ones(()))
  holder = [state]

  def jax_step():
    holder[0], m = step(holder[0], batch)
    jax.block_until_ready(m)
  torch_step = torch_step_fn(torch_model, dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm,
                                               pixel_values=pixels, image_grid_thw=grid), tokens, cmask, adv, G, 1e-6)
  timing = common.interleaved(jax_step, torch_step, pairs=pairs)
  jax_time, torch_time = timing["a_s"], timing["b_s"]
  flops = 3 * common.forward_flops(model.cfg, tokens=ids.shape[1] + completion,
                                   patches=int(np.prod(grid, 1).sum()) // B, batch=B * G)
  return {"jax_s": jax_time, "torch_s": torch_time, "speedup": timing["ratio"], "speedup_iqr": timing["ratio_iqr"],
          "pairs": pairs, "calls_per_sample": timing["calls"],
          "samples_s": [[round(t, 4) for t in side] for side in timing["samples_s"]],
          "jax_gflops": flops / jax_time / 1e9, "rows": B * G, "seq_len": int(ids.shape[1] + completion)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="7 pairs instead of 9")
  args = parser.parse_args()
  common.use_all_cores()
  pairs = 7 if args.quick else 9
  peak = common.matmul_peak_gflops()
  tiny = measure(common.tiny_hf_config(), 112, 32, 32, 2, 2, pairs)
  mid = measure(common.mid_size_hf_config(), 224, 64, 64, 2, 2, pairs)
  common.emit({"bench": "train_step", "speedup": mid["speedup"], "speedup_iqr": mid["speedup_iqr"], "pairs": pairs,
               "frac_of_matmul_peak": mid["jax_gflops"] / peak, "matmul_peak_gflops": peak, "tiny": tiny, "mid": mid,
               "load_average_1min": os.getloadavg()[0], **common.machine()})


if __name__ == "__main__":
  main()
