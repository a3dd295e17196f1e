"""Peak temporary memory of a chunked vs a naive full-vocabulary KL (value and gradient), from XLA's compile-time
memory analysis; nothing of size T x V is allocated.

  python bench/divergence_memory.py

Prints one JSON line. The loss is the forward KL(p_T || p_S) summed over B x T tokens, with logits = h @ w for both
sides (h [B, T, D], w [D, V]), differentiated with respect to the student's h and w. The chunked version's temp bytes
should not grow with T; the naive one holds several [B, T, V] float32 arrays.
"""

import json

import jax
import jax.numpy as jnp

from jaxvg.distill import divergences as dv

V = 151936  # Qwen2.5 vocabulary (embedding rows)
D = 64  # small on purpose: the point is the T x V term
B = 1
CHUNK = 256
SEQ_LENS = (512, 2048)
CONFIG = dv.DivergenceConfig(kind="kl_teacher_student")


def naive_loss(h_s, w_s, h_t, w_t):
  logp_s = dv.log_probs(jnp.einsum("BTD,DV->BTV", h_s, w_s))
  logp_t = jax.lax.stop_gradient(dv.log_probs(jnp.einsum("BTD,DV->BTV", h_t, w_t)))
  return jnp.sum(dv.token_divergence(logp_t, logp_s, config=CONFIG))


def chunked_loss(h_s, w_s, h_t, w_t):
  values = dv.chunked_divergence(student=dv.Logits(h_s, w_s), teacher=dv.Logits(h_t, w_t), config=CONFIG,
                                 chunk_size=CHUNK)
  return jnp.sum(values)


def temp_bytes(loss_fn, seq_len: int) -> int:
  h = jax.ShapeDtypeStruct((B, seq_len, D), jnp.float32)
  w = jax.ShapeDtypeStruct((D, V), jnp.float32)
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
  return int(step.lower(h, w, h, w).compile().memory_analysis().temp_size_in_bytes)


def main():
  chunked = {str(t): temp_bytes(chunked_loss, t) for t in SEQ_LENS}
  naive = {str(t): temp_bytes(naive_loss, t) for t in SEQ_LENS}
  print(json.dumps({
      "bench": "divergence_memory",
      "V": V,
      "D": D,
      "B": B,
      "chunk_size": CHUNK,
      "backend": jax.default_backend(),
      "chunked_temp_bytes": chunked,
      "naive_temp_bytes": naive,
      "kl_peak_mem_chunked_over_naive": chunked[str(SEQ_LENS[-1])] / naive[str(SEQ_LENS[-1])],
  }))


if __name__ == "__main__":
  main()
