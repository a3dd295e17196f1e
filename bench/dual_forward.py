"""The dual forward of PGPO: does the compacted text-only pass cost what its FLOPs say, relative to the image pass?

  python bench/dual_forward.py

Prints one JSON line.
  cost_over_flop_ratio = (text-only pass time / image pass time) / (text-only FLOPs / image FLOPs)
    1.0: the compacted pass (image pads dropped, vision tower skipped) saves exactly its share of FLOPs; > 1: it saves
    less time than FLOPs (fixed overheads). Both passes score the same completion (log-probs, no entropy). The two
    passes alternate (`common.interleaved`, 9 pairs): the time ratio is the median of the per-pair ratios, and
    `cost_over_flop_ratio_iqr` the interquartile range of those ratios over the FLOP ratio.
  kl_peak_mem_chunked_over_naive = XLA's compile-time temp bytes of the chunked full-vocabulary KL between the two
    passes (`divergences.chunked_kl`, what `dependency.full_kl` runs) / those of a naive [N, T, V] log-softmax KL,
    at Qwen's vocabulary; nothing is allocated.

Sizes, reduced for a 2-core CPU (Qwen-like mix at half scale): one prompt of 64 text + 512 visual tokens (a 448 x 896
image: 2048 patches) and a 448-token completion; decoder D=512, 8 layers, V=32000; vision E=256, 4 blocks. FLOPs are
counted analytically (`common.forward_flops`; the vocabulary head runs on completion positions only).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import common  # noqa: E402
from jaxvg.credit import dependency  # noqa: E402
from jaxvg.distill import divergences
from jaxvg.rl import scoring
from jaxvg.models import ModelConfig, Qwen25VL  # noqa: E402

TEXT_PROMPT, GRID, COMPLETION = 64, (1, 32, 64), 448
KL_VOCAB, KL_TOKENS, KL_WIDTH, KL_CHUNK = 151936, 2048, 64, 256
PAIRS = 9


def bench_config() -> ModelConfig:
  return common.synthetic_config(width=512, layers=8, heads=8, vision_width=256, vision_depth=4, tie=False)


def inputs(cfg: ModelConfig):
  rng = np.random.default_rng(0)
  t, h, w = GRID
  n_visual = t * h * w // cfg.vision.merge_unit
  ids, _, _ = common.prompt_ids(cfg, [GRID], TEXT_PROMPT - 2)  # text around <vision_start> pads <vision_end>
  pixels = rng.standard_normal((t * h * w, cfg.vision.patch_dim)).astype(np.float32)
  prompt = scoring.prompt_inputs(cfg, input_ids=ids, attention_mask=np.ones_like(ids),
                                 mm_token_type_ids=(ids == cfg.image_token_id).astype(np.int64), pixel_values=pixels,
                                 image_grid_thw=np.asarray([GRID]))
  text_only = dependency.compact_visual_prompt(prompt.input_ids_BT, prompt.attention_mask_BT, prompt.positions_3BT,
                                               prompt.next_position_B, image_token_id=cfg.image_token_id)
  tokens = jnp.asarray(rng.integers(1, 1000, (1, COMPLETION)), jnp.int32)
  return prompt, text_only, tokens, jnp.ones((1, COMPLETION), jnp.int32), n_visual, t * h * w


def pass_flops(cfg: ModelConfig, *, tokens: int, patches: int) -> float:
  """`forward_flops` with the vocabulary head on the completion positions only (what scoring computes)."""
  head = 2 * cfg.text.hidden_size * cfg.text.vocab_size
  return common.forward_flops(cfg, tokens=tokens, patches=patches) - (tokens - COMPLETION) * head


def kl_temp_bytes(chunked: bool) -> int:
  h = jax.ShapeDtypeStruct((1, KL_TOKENS, KL_WIDTH), jnp.float32)
  w = jax.ShapeDtypeStruct((KL_WIDTH, KL_VOCAB), jnp.float32)

  def kl(h_real, h_cf, w_DV):
    if chunked:
      return divergences.chunked_kl(divergences.Logits(h_real, w_DV), divergences.Logits(h_cf, w_DV),
                                    chunk_size=KL_CHUNK)
    logp = jax.nn.log_softmax(jnp.einsum("BTD,DV->BTV", h_real, w_DV), axis=-1)
    logq = jax.nn.log_softmax(jnp.einsum("BTD,DV->BTV", h_cf, w_DV), axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)

  return int(jax.jit(kl).lower(h, h, w).compile().memory_analysis().temp_size_in_bytes)


def main():
  cfg = bench_config()
  model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  prompt, text_only, tokens, mask, n_visual, patches = inputs(cfg)
  logps = jax.jit(lambda p, prompt: scoring.completion_logps(nnx.merge(graphdef, p), prompt, tokens, mask, 1))

  t0 = time.perf_counter()
  jax.block_until_ready((logps(params, prompt), logps(params, text_only)))
  compile_s = time.perf_counter() - t0
  timing = common.interleaved(lambda: jax.block_until_ready(logps(params, prompt)),
                              lambda: jax.block_until_ready(logps(params, text_only)), pairs=PAIRS, warmup=0)
  image_s, text_s = timing["a_s"], timing["b_s"]
  image_tokens = prompt.input_ids_BT.shape[1] + COMPLETION
  text_tokens = text_only.input_ids_BT.shape[1] + COMPLETION
  image_flops = pass_flops(cfg, tokens=image_tokens, patches=patches)
  text_flops = pass_flops(cfg, tokens=text_tokens, patches=0)
  chunked, naive = kl_temp_bytes(True), kl_temp_bytes(False)
  common.emit({
      "bench": "dual_forward",
      "backend": jax.default_backend(),
      **common.machine(),
      "sizes": {"visual_tokens": n_visual, "text_tokens": TEXT_PROMPT + COMPLETION, "completion_tokens": COMPLETION,
                "patches": patches, "decoder": "D512 L8 V32000", "vision": "E256 L4",
                "note": "reduced from a 1000 visual + 1000 text mix for a 2-core CPU"},
      "image_pass_s": image_s,
      "text_only_pass_s": text_s,
      "compile_s": compile_s,
      "image_gflop": image_flops / 1e9,
      "text_only_gflop": text_flops / 1e9,
      "time_ratio": timing["ratio"],
      "flop_ratio": text_flops / image_flops,
      "cost_over_flop_ratio": timing["ratio"] / (text_flops / image_flops),
      "cost_over_flop_ratio_iqr": [q / (text_flops / image_flops) for q in timing["ratio_iqr"]],
      "pairs": PAIRS,
      "kl": {"vocab": KL_VOCAB, "tokens": KL_TOKENS, "chunk": KL_CHUNK, "chunked_temp_bytes": chunked,
             "naive_temp_bytes": naive},
      "kl_peak_mem_chunked_over_naive": chunked / naive,
  })


if __name__ == "__main__":
  main()
