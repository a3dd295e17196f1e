"""Peak temporary memory of attention's value and gradient, in blocks of 1,024 queries vs in one piece, from XLA's
compile-time memory analysis (nothing runs).

  python bench/attention_memory.py

Prints one JSON line. One sequence with the 3B decoder's 16 query heads over 2 kv heads of 128, a causal mask, bf16
q/k/v, the loss sum(w * attention(q, k, v)) differentiated with respect to q, k and v. The one-piece pass holds the
float32 scores and bf16 probabilities of T x T x N; the blocked one holds one block's (1,024 x T x N), so its temp
bytes grow linearly in T where the other's grow quadratically.
"""

import json

import jax
import jax.numpy as jnp

from jaxvg.models import layers

N, K, H = 16, 2, 128
SEQ_LENS = (2048, 4096, 8192)


def temp_bytes(seq_len: int, query_block: int) -> int:
  q = jax.ShapeDtypeStruct((1, seq_len, N, H), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, seq_len, K, H), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((1, seq_len, N, H), jnp.float32)

  def loss(q, k, v, w):
    mask = jnp.tril(jnp.ones((seq_len, seq_len), bool))[None]
    return jnp.sum(w * layers.attention(q, k, v, mask, query_block=query_block).astype(jnp.float32))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, w).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def main():
  out = {"device": jax.devices()[0].device_kind, "heads": N, "kv_heads": K, "head_dim": H}
  for T in SEQ_LENS:
    dense, blocked = temp_bytes(T, T), temp_bytes(T, layers.QUERY_BLOCK)
    out[f"dense_mib_T{T}"] = round(dense / 2**20, 1)
    out[f"blocked_mib_T{T}"] = round(blocked / 2**20, 1)
    out[f"blocked_over_dense_T{T}"] = round(blocked / dense, 4)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
