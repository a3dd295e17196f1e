"""The cost of visual-dependency credit in one RL step: PGPO / PACR / PDCR step time over DAPO's on the same batch.

  python bench/rl_step.py

Prints one JSON line. A step here is what follows sampling in `jaxvg.train`: old-policy scoring, group advantages,
the credit function (`assign.make_credit_fn`; nothing for DAPO), and one accumulated policy update (forward and
backward). `pgpo_over_dapo` = PGPO step time / DAPO step time; `pacr_over_dapo` and `pdcr_over_dapo` likewise.
Each method runs one step first (compilation), then 7 rounds (`common.round_robin`), each of one sampling and one
step per method in an order rotated every round, so a change of machine load hits every method alike; each ratio
is the median over rounds of the two steps' ratio within a round, `*_iqr` its interquartile range, `rounds` their
number. The paper reports +10.6% wall-clock for PGPO over DAPO on 3B, where sampling dominates the step; without
sampling the ratio is larger. `*_over_dapo_with_sampling` adds, to both steps of a round, the sampling that precedes a
step in the training loop (G samples of up to 96 new tokens per prompt with the jitted sampler, timed in the same
round), the whole-step figure the paper's +10.6% compares with.

Sizes (the demo's model on a 2-core CPU): the tiny Qwen2.5-VL-style model (D=128, 4 layers), 4 synthetic prompts
(112 x 112 images) from the real pipeline, G = 4 random 48- to 96-token completions each.
"""

import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from jaxvg.credit import assign  # noqa: E402
from jaxvg.rl import advantages, losses, optim, rollout, update
from jaxvg.run import builders
from jaxvg.run.experiment import CreditCfg, DataCfg, ModelCfg  # noqa: E402

G, WIDTH, ROUNDS = 4, 96, 7
METHODS = {"dapo": CreditCfg(method="none"), "pgpo": CreditCfg(method="pgpo", counterfactual="mask_visual"),
           "pacr": CreditCfg(method="pacr", max_steps=8),
           "pdcr": CreditCfg(method="pdcr", counterfactual="white_image", max_steps=8)}


def main():
  data = DataCfg(source="synthetic", num_train=64, prompts_per_batch=4, image_size=112, max_pixels=112 * 112,
                 length_buckets=(128,), patch_buckets=(256,))
  tok, model = builders.build_model(ModelCfg(preset="tiny", tiny_width=128, tiny_layers=4), data)
  fmt = builders.prompt_format(data)
  batch = next(iter(builders.make_train_data(data, tok, model.cfg, counterfactuals=("mask_visual", "white_image"))))
  rng = np.random.default_rng(0)
  N = len(batch.answers) * G
  lengths = rng.integers(WIDTH // 2, WIDTH + 1, N)
  mask = np.arange(WIDTH)[None, :] < lengths[:, None]
  tokens = np.where(mask, rng.integers(0, 900, (N, WIDTH)), int(tok.pad_token_id)).astype(np.int32)
  rewards = jnp.asarray(rng.integers(0, 2, N), jnp.float32)
  mb = types.SimpleNamespace(prompts=batch.prompts, tokens_NT=jnp.asarray(tokens), mask_NT=jnp.asarray(mask),
                             answers=batch.answers)
  prompt = assign.as_prompt_inputs(batch.prompts)

  tx = optim.make_optimizer(optim.OptimConfig(lr=1e-5, weight_decay=0.0), optim.trainable_params(model))
  loss_cfg = losses.preset("dapo")
  policy_step = jax.jit(lambda s, m: update.policy_step(s, m, tx=tx, group_size=G, loss_cfg=loss_cfg),
                        donate_argnums=(0,))
  score = jax.jit(update.score_fn, static_argnums=(1, 5))
  state = update.init_state(model, tx)

  def step(state, credit_fn):
    logp_old, _ = score(state.params, state.graphdef, prompt, mb.tokens_NT, mb.mask_NT, G)
    adv = advantages.broadcast_to_tokens(advantages.group_advantages(rewards, G, estimator="grpo"), mb.mask_NT)
    adv, _, _ = credit_fn(state, mb, logp_old, adv)
    micro = (update.PolicyBatch(prompt, mb.tokens_NT, mb.mask_NT, logp_old, jnp.asarray(adv, jnp.float32),
                                jnp.zeros_like(logp_old), jnp.ones((), jnp.float32)),)
    state, metrics = policy_step(state, micro)
    jax.block_until_ready((state.params, metrics))
    return state

  sampling = rollout.SamplingConfig(num_samples=G, max_new_tokens=WIDTH, temperature=1.0,
                                    stop_token_ids=builders.stop_token_ids(tok), pad_token_id=int(tok.pad_token_id))
  p = batch.prompts

  def sample(state, seed):
    out = rollout.rollout(state.graphdef, state.params, input_ids_BT=p.input_ids_BT,
                          attention_mask_BT=p.attention_mask_BT, positions_3BT=p.positions_3BT, deltas_B=p.deltas_B,
                          vision=p.vision, key=jax.random.key(seed), config=sampling)
    jax.block_until_ready(out.tokens_BT)

  fns = {name: assign.make_credit_fn(cfg, model.cfg, tok, G, fmt=fmt) for name, cfg in METHODS.items()}
  sample(state, 0)  # compile the sampler
  holder, seeds, compile_s = [state], iter(range(1, 1 << 30)), {}

  def one_step(fn):
    def call():
      holder[0] = step(holder[0], fn)
    return call

  for name, fn in fns.items():
    t = time.perf_counter()
    one_step(fn)()
    compile_s[name] = time.perf_counter() - t
  timed = common.round_robin({"sample": lambda: sample(holder[0], next(seeds)),
                              **{name: one_step(fn) for name, fn in fns.items()}}, rounds=ROUNDS, warmup=0)
  sec = timed["seconds"]
  with_sampling = {name: np.add(sec["sample"], sec[name]) for name in METHODS}
  ratios = {}
  for name in ("pgpo", "pacr", "pdcr"):
    ratios[f"{name}_over_dapo"], ratios[f"{name}_over_dapo_iqr"] = common.ratio_stats(sec[name], sec["dapo"])
    ratios[f"{name}_over_dapo_with_sampling"], ratios[f"{name}_over_dapo_with_sampling_iqr"] = common.ratio_stats(
        with_sampling[name], with_sampling["dapo"])
  common.emit({
      "bench": "rl_step",
      "backend": jax.default_backend(),
      **common.machine(),
      "sizes": {"prompts": len(batch.answers), "samples": G, "completion_tokens": WIDTH,
                "prompt_tokens": int(prompt.input_ids_BT.shape[1]), "model": "tiny D128 L4"},
      "step_s": {name: float(np.median(sec[name])) for name in METHODS},
      "first_step_s": compile_s,
      "sample_s": float(np.median(sec["sample"])),
      "rounds": ROUNDS,
      **ratios,
  })


if __name__ == "__main__":
  main()
