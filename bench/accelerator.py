"""Qwen2.5-VL-3B on one accelerator: the actor update's MFU, decode tokens/s, PGPO over DAPO, peak device memory.

  python bench/accelerator.py                    # the 3B shape, random bf16 weights, one device (< 8 min on an H100)
  python bench/accelerator.py --attention blocked
  python bench/accelerator.py --tiny             # the tiny model, float32: a CPU smoke test of this script

Prints ONE JSON line; progress goes to stderr. Nothing is loaded: the model is `QWEN25VL_3B` (the released
config.json's shapes) with random weights, so the numbers are costs, not quality. Every stage is the library's own
jitted function (`rollout.prefill` / `decode`, `update.score_fn`, `update.policy_step`, `assign.make_credit_fn`),
compiled once by a first call that is not timed.

  mfu                   model FLOPs of one actor update / its time / the device's peak dense bf16 FLOP/s (null for a
                        device missing from PEAK_BF16_FLOPS, CPUs included). Model FLOPs = 3 x the forward's matmul
                        FLOPs (`common.forward_flops`: decoder and attention over all N = B x G rows of prompt +
                        completion, attention counted dense as the blocked path computes it, the vision tower once
                        per prompt, the LM head on completion positions only); remat's recomputation is not counted.
  decode_tokens_per_s   B x G rows x new tokens / the decode loop's time (no stop token, so every row runs to the end),
                        after a prefill of B prompts (the image included) whose time is `prefill_s`.
  pgpo_over_dapo        a PGPO step's time over a DAPO step's, as in bench/rl_step.py: old-policy scoring, group
                        advantages, the credit function (PGPO: the compacted mask_visual pass and token weights), one
                        policy update; the best of `--rounds` rounds each, the two methods alternating.
  peak_memory_gib       the device allocator's peak over the whole run (`memory_stats()`; null where there is none).

`--attention` sets `ModelConfig.attention_impl` (default auto: cuDNN on a CUDA GPU where it fits). If a run with it
fails, the script runs again with "blocked" and reports the error as `attention_error`.
"""

import argparse
import dataclasses
import gc
import math
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import common  # noqa: E402
from jaxvg.credit import assign, dependency  # noqa: E402
from jaxvg.rl import advantages, losses, optim, rollout, scoring, update
from jaxvg.run.experiment import CreditCfg  # noqa: E402
from jaxvg.models import QWEN25VL_3B, Qwen25VL, layers, mrope_positions, tiny  # noqa: E402
from jaxvg.models.config import ATTENTION_IMPLS  # noqa: E402

# Peak dense bf16 FLOP/s by device kind, first match of a substring of `device.device_kind` (H100 PCIe before H100).
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
                   ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
                   ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12))


@dataclasses.dataclass(frozen=True)
class Sizes:
  prompts: int          # B
  samples: int          # G
  prompt_tokens: int    # T0, the image's tokens included
  image_px: int         # one square image per prompt
  new_tokens: int       # decoded per row
  completion_tokens: int  # Tn of the update's rows
  rounds: int


SIZES = {"3b": Sizes(prompts=2, samples=8, prompt_tokens=1024, image_px=448, new_tokens=256, completion_tokens=512,
                     rounds=3),
         "tiny": Sizes(prompts=2, samples=8, prompt_tokens=48, image_px=112, new_tokens=8, completion_tokens=16,
                       rounds=2)}


def log(*args):
  print(*args, file=sys.stderr, flush=True)


def peak_flops(device) -> float | None:
  kind = device.device_kind
  return next((flops for name, flops in PEAK_BF16_FLOPS if name.lower() in kind.lower()), None)


def peak_memory_gib(device) -> float | None:
  stats = device.memory_stats()
  return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


def timed(fn):
  """(fn()'s result once ready, seconds)."""
  t = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t


def random_model(cfg, dtype, *, on_host: bool):
  """A Qwen25VL with random weights (normal, std 0.02; norms too: values do not matter here). On the device, one
  jitted constructor; `on_host` draws them with numpy instead, which for the tiny model skips a compile."""
  make = lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, remat=True)
  if not on_host:
    return nnx.jit(make)()
  model = nnx.eval_shape(make)
  rng = np.random.default_rng(0)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    var.set_value(jnp.asarray(0.02 * rng.standard_normal(var.get_value().shape), dtype))
  return model


def make_prompts(cfg, s: Sizes, seed: int = 0):
  """B left-padded prompts of `s.prompt_tokens` tokens, each with one random-pixel square image: (PromptInputs for
  scoring, the compacted mask_visual PromptInputs, deltas_B for the sampler)."""
  side = s.image_px // cfg.vision.patch_size
  grid = np.array([[1, side, side]] * s.prompts)
  image_tokens = side * side // cfg.vision.merge_unit
  ids, mask, mm = common.prompt_ids(cfg, grid, s.prompt_tokens - image_tokens - 2, seed=seed)
  pixels = np.random.default_rng(seed).normal(size=(s.prompts * side * side, cfg.vision.patch_dim)).astype(np.float32)
  prompt = scoring.prompt_inputs(cfg, input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, pixel_values=pixels,
                                 image_grid_thw=grid)
  _, deltas_B = mrope_positions(ids, mm, grid, mask, spatial_merge_size=cfg.vision.spatial_merge_size)
  masked = dependency.compact_visual_prompt(ids, mask, np.asarray(prompt.positions_3BT), prompt.next_position_B,
                                            image_token_id=cfg.image_token_id)
  return prompt, masked, jnp.asarray(deltas_B)


def resolved_attention(cfg, s: Sizes, dtype) -> dict:
  """What `cfg.attention_impl` runs at this benchmark's main call shapes (decided from shapes and dtypes alone)."""
  t, v = cfg.text, cfg.vision
  arr = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  T, S, N = s.prompt_tokens + s.completion_tokens, s.prompt_tokens + s.new_tokens, s.prompts * s.samples
  P = s.prompts * (s.image_px // v.patch_size) ** 2  # every prompt's patches in one sequence
  M = (v.window_size // v.patch_size) ** 2
  seg = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  calls = {"update": ((arr(N, T, t.num_heads, t.head_dim), arr(N, T, t.num_kv_heads, t.head_dim)),
                      (seg(N, T), seg(N, T))),
           "decode_step": ((arr(N, 1, t.num_heads, t.head_dim), arr(N, S, t.num_kv_heads, t.head_dim)), None),
           "vision_full": ((arr(1, P, v.num_heads, v.head_dim), arr(1, P, v.num_heads, v.head_dim)),
                           (seg(1, P), seg(1, P))),
           "vision_window": ((arr(P // M, M, v.num_heads, v.head_dim), arr(P // M, 3 * M, v.num_heads, v.head_dim)),
                             (seg(P // M, M), seg(P // M, 3 * M)))}
  return {name: layers.choose_impl(cfg.attention_impl, q, k, k, segment_ids=segs)
          for name, ((q, k), segs) in calls.items()}


def update_flops(cfg, s: Sizes) -> float:
  """3 x the forward's matmul FLOPs of one policy update (see the module docstring)."""
  N, T = s.prompts * s.samples, s.prompt_tokens + s.completion_tokens
  patches = (s.image_px // cfg.vision.patch_size) ** 2
  decoder = common.forward_flops(cfg, tokens=T, patches=0, batch=N)
  head_off_completion = N * s.prompt_tokens * 2 * cfg.text.hidden_size * cfg.text.vocab_size
  tower = common.forward_flops(cfg, tokens=0, patches=patches, batch=s.prompts)
  return 3 * (decoder - head_off_completion + tower)


def measure(cfg, s: Sizes, dtype, *, host_init: bool) -> dict:
  """Builds the model with `cfg.attention_impl`, then decodes, then runs DAPO and PGPO steps; returns the figures."""
  B, G = s.prompts, s.samples
  N = B * G
  t0 = time.perf_counter()
  model = random_model(cfg, dtype, on_host=host_init)
  graphdef, params = nnx.split(model)
  prompt, masked, deltas_B = make_prompts(cfg, s)
  log(f"model and prompts: {time.perf_counter() - t0:.1f}s")

  # ---------------------------------------------------------------- sampling: prefill once, decode G rows a prompt
  sampling = rollout.SamplingConfig(num_samples=G, max_new_tokens=s.new_tokens, temperature=1.0)

  def sample(seed):
    (cache, prefix), prefill_s = timed(lambda: rollout.prefill(
        graphdef, params, prompt.input_ids_BT, prompt.attention_mask_BT, prompt.positions_3BT, deltas_B,
        prompt.vision, num_samples=G, max_new_tokens=s.new_tokens))
    (out, _), decode_s = timed(lambda: rollout.decode(graphdef, params, cache, prefix, jax.random.key(seed),
                                                      config=sampling))
    if int(out.steps) != s.new_tokens:
      raise RuntimeError(f"decode ran {int(out.steps)} steps, expected {s.new_tokens}")
    return prefill_s, decode_s

  first = sample(0)
  log(f"sampler compiled and run: prefill {first[0]:.1f}s, decode {first[1]:.1f}s")
  prefill_s, decode_s = min((sample(r + 1) for r in range(s.rounds)), key=lambda t: t[1])
  log(f"decode: {N * s.new_tokens / decode_s:.0f} tokens/s")

  # ---------------------------------------------------------------- DAPO and PGPO steps on one batch of rollouts
  rng = np.random.default_rng(1)
  tokens_NT = jnp.asarray(rng.integers(1, min(1000, cfg.text.vocab_size - 8), (N, s.completion_tokens)), jnp.int32)
  mask_NT = jnp.ones((N, s.completion_tokens), bool)
  rewards_N = jnp.asarray(rng.integers(0, 2, N), jnp.float32)
  mb = types.SimpleNamespace(prompts=types.SimpleNamespace(counterfactuals={"mask_visual": masked},
                                                           num_images_B=np.ones(B, np.int32)),
                             tokens_NT=tokens_NT, mask_NT=mask_NT)
  tx = optim.make_optimizer(optim.OptimConfig(lr=1e-6, weight_decay=0.0), params)
  state = update.init_state(model, tx)
  del model, params  # the state holds the weights now; the update donates it
  loss_cfg = losses.preset("dapo")
  policy_step = jax.jit(lambda st, micro: update.policy_step(st, micro, tx=tx, group_size=G, loss_cfg=loss_cfg),
                        donate_argnums=(0,))
  score = jax.jit(update.score_fn, static_argnums=(1, 5))
  credit_fns = {"dapo": assign.make_credit_fn(CreditCfg(method="none"), cfg, None, G),
                "pgpo": assign.make_credit_fn(CreditCfg(method="pgpo", counterfactual="mask_visual"), cfg, None, G)}

  def step(state, credit_fn):
    """One RL step after sampling; returns (state, step seconds, policy-update seconds)."""
    t = time.perf_counter()
    logp_old_NT, _ = score(state.params, state.graphdef, prompt, tokens_NT, mask_NT, G)
    adv_NT = advantages.broadcast_to_tokens(advantages.group_advantages(rewards_N, G, estimator="grpo"), mask_NT)
    adv_NT, _, _ = credit_fn(state, mb, logp_old_NT, adv_NT)
    micro = (update.PolicyBatch(prompt, tokens_NT, mask_NT, logp_old_NT, jnp.asarray(adv_NT, jnp.float32),
                                jnp.zeros_like(logp_old_NT), jnp.ones((), jnp.float32)),)
    jax.block_until_ready(micro)
    u = time.perf_counter()
    state, metrics = policy_step(state, micro)
    jax.block_until_ready((state.params, metrics))
    end = time.perf_counter()
    return state, end - t, end - u

  for name, fn in credit_fns.items():
    state, first_s, _ = step(state, fn)
    log(f"{name} step compiled and run: {first_s:.1f}s")
  step_s, update_s = {name: math.inf for name in credit_fns}, math.inf
  for _ in range(s.rounds):  # alternating, so a change of machine load hits both methods alike
    for name, fn in credit_fns.items():
      state, total, upd = step(state, fn)
      step_s[name], update_s = min(step_s[name], total), min(update_s, upd)
  log(f"steps: {step_s}, update {update_s:.2f}s")
  return {"prefill_s": prefill_s, "decode_s": decode_s, "decode_tokens_per_s": N * s.new_tokens / decode_s,
          "step_s": step_s, "update_s": update_s, "pgpo_over_dapo": step_s["pgpo"] / step_s["dapo"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tiny", action="store_true", help="the tiny model in float32 (a CPU smoke test)")
  parser.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS, help="ModelConfig.attention_impl")
  args = parser.parse_args()
  start = time.perf_counter()
  s = SIZES["tiny" if args.tiny else "3b"]
  cfg = dataclasses.replace(tiny() if args.tiny else QWEN25VL_3B, attention_impl=args.attention)
  dtype = jnp.float32 if args.tiny else jnp.bfloat16
  device = jax.devices()[0]
  log(f"{device.device_kind}: {'tiny' if args.tiny else 'qwen2.5-vl-3b'}, attention {args.attention}, {s}")

  try:
    resolved = resolved_attention(cfg, s, dtype)
  except ValueError as e:  # an explicit "cudnn" where cuDNN does not fit: say so before compiling anything
    parser.error(str(e))
  log(f"attention runs as {resolved}")
  error = None
  try:
    figures = measure(cfg, s, dtype, host_init=args.tiny)
  except Exception as e:  # noqa: BLE001  (any failure of a non-default kernel: report it, measure the fallback)
    if args.attention == "blocked":
      raise
    error = f"{type(e).__name__}: {e}"[:500]
  if error is not None:  # outside the except block, so the failed run's arrays are released first
    log(f"attention {args.attention!r} failed ({error}); measuring again with 'blocked'")
    gc.collect()
    figures = measure(dataclasses.replace(cfg, attention_impl="blocked"), s, dtype, host_init=args.tiny)

  flops, peak = update_flops(cfg, s), peak_flops(device)
  record = {
      "bench": "accelerator",
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "model": "tiny" if args.tiny else "qwen2.5-vl-3b",
      "dtype": jnp.dtype(dtype).name,
      "attention_impl": args.attention if error is None else "blocked",
      "attention_resolved": resolved if error is None else {name: "blocked" for name in resolved},
      "sizes": dataclasses.asdict(s),
      "update_model_tflop": flops / 1e12,
      "update_tflops_per_s": flops / figures["update_s"] / 1e12,
      "peak_tflops_per_s": None if peak is None else peak / 1e12,
      "mfu": None if peak is None else flops / figures["update_s"] / peak,
      **figures,
      "peak_memory_gib": peak_memory_gib(device),
      "total_s": time.perf_counter() - start,
  }
  if error is not None:
    record["attention_error"] = error
  common.emit(record)


if __name__ == "__main__":
  main()
