"""PACR / PDCR answer-forcing confidences: K + 1 separate passes vs one tree-masked pass, K = 8 steps.

  python bench/pdcr_confidence.py

Prints one JSON line. `speedup` = (time of the K + 1 = 9 causal passes over [prompt | H_<=k | suffix], each as wide as
its longest prefix rounded up to 32 tokens, `confidence.separate_confidences`) / (time of the one pass over
[prompt | completion | 9 suffix copies] under the tree mask, `confidence.tree_confidences`). Both compute the same
c_k (their largest difference is reported). Compilation is excluded (each is run once first). The two alternate
(`common.interleaved`, 9 pairs): `speedup` is the median of the per-pair ratios, `speedup_iqr` their interquartile
range, `pairs` their number.

Sizes (a small model for a 2-core CPU): B = 2 prompts of 96 text + 64 visual tokens (a 224 x 224 image), G = 2
samples each, 512-token completions of 8 steps of 64 tokens, a 16-token suffix; decoder D=256, 4 layers, V=32000.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import common  # noqa: E402
from jaxvg.credit import confidence  # noqa: E402
from jaxvg.rl import scoring
from jaxvg.models import ModelConfig, Qwen25VL  # noqa: E402

B, G, TEXT, GRID, STEPS, STEP_LEN, SUFFIX, ANSWER = 2, 2, 96, (1, 16, 16), 8, 64, 16, 4
PAIRS = 9


def bench_config() -> ModelConfig:
  return common.synthetic_config(width=256, layers=4, heads=4, vision_width=128, vision_depth=2, tie=True)


def inputs(cfg: ModelConfig):
  rng = np.random.default_rng(0)
  t, h, w = GRID
  ids, _, _ = common.prompt_ids(cfg, [GRID] * B, TEXT - 2)  # text around <vision_start> pads <vision_end>
  pixels = rng.standard_normal((B * t * h * w, cfg.vision.patch_dim)).astype(np.float32)
  prompt = scoring.prompt_inputs(cfg, input_ids=ids, attention_mask=np.ones_like(ids),
                                 mm_token_type_ids=(ids == cfg.image_token_id).astype(np.int64), pixel_values=pixels,
                                 image_grid_thw=np.asarray([GRID] * B))
  N, width = B * G, STEPS * STEP_LEN
  tokens = jnp.asarray(rng.integers(1, 1000, (N, width)), jnp.int32)
  mask = jnp.ones((N, width), bool)
  T0 = ids.shape[1]
  # c_0 after the last prompt token, c_k after the last token of step k.
  boundary = np.asarray([[T0 - 1] + [T0 + (k + 1) * STEP_LEN - 1 for k in range(STEPS)]] * N, np.int32)
  suffix_ids = rng.integers(1, 1000, (N, SUFFIX)).astype(np.int32)
  answer = np.zeros((N, SUFFIX), bool)
  answer[:, SUFFIX - ANSWER - 1:SUFFIX - 1] = True  # "... \\boxed{" [answer] "}"
  suffix = confidence.AnswerSuffix(jnp.asarray(suffix_ids), jnp.ones((N, SUFFIX), bool), jnp.asarray(answer))
  return prompt, tokens, mask, jnp.asarray(boundary), suffix


def main():
  cfg = bench_config()
  graphdef, params = nnx.split(Qwen25VL(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  prompt, tokens, mask, boundary, suffix = inputs(cfg)

  def one_pass():
    return np.asarray(confidence.tree_confidences_fn(params, graphdef, prompt, tokens, mask, G, boundary, suffix))

  def separate():
    return confidence.separate_confidences(params, graphdef, prompt, tokens, mask, G, boundary_NK1=boundary,
                                           suffix=suffix, width_multiple=32)

  c_one, c_sep = one_pass(), separate()  # compiles (every pass width of the separate ones included)
  timing = common.interleaved(one_pass, separate, pairs=PAIRS, warmup=0)
  one_s, sep_s = timing["a_s"], timing["b_s"]
  T0 = prompt.input_ids_BT.shape[1]
  tree_tokens = T0 + tokens.shape[1] + (STEPS + 1) * SUFFIX
  separate_tokens = sum(T0 + -(-(k * STEP_LEN + SUFFIX) // 32) * 32 for k in range(STEPS + 1))
  common.emit({
      "bench": "pdcr_confidence",
      "backend": jax.default_backend(),
      **common.machine(),
      "sizes": {"prompts": B, "samples": G, "prompt_tokens": T0, "completion_tokens": int(tokens.shape[1]),
                "steps": STEPS, "suffix_tokens": SUFFIX, "decoder": "D256 L4 V32000"},
      "separate_passes_s": sep_s,
      "one_pass_s": one_s,
      "speedup": timing["ratio"],
      "speedup_iqr": timing["ratio_iqr"],
      "pairs": PAIRS,
      "row_tokens_separate_over_one_pass": separate_tokens / tree_tokens,
      "max_abs_diff": float(np.max(np.abs(c_one - c_sep))),
  })


if __name__ == "__main__":
  main()
