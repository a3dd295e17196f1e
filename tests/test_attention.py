"""layers.attention in query blocks equals a naive per-row softmax loop, and its gradients equal the one-piece pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvg.models import layers


def naive_attention(q, k, v, mask):
  """softmax(q k^T / sqrt(H)) v row by row; query head n reads kv head n // (N / K); a fully masked row averages v."""
  B, T, N, H = q.shape
  K = k.shape[2]
  mask = np.broadcast_to(mask, (B, T, k.shape[1]))
  out = np.zeros((B, T, N, H))
  for b in range(B):
    for t in range(T):
      for n in range(N):
        kv = n // (N // K)
        s = k[b, :, kv] @ q[b, t, n] / np.sqrt(H)
        s = np.where(mask[b, t], s, -np.inf) if mask[b, t].any() else np.zeros_like(s)
        p = np.exp(s - s.max())
        out[b, t, n] = (p / p.sum()) @ v[b, :, kv]
  return out


@pytest.mark.parametrize("mask_batch", [1, 2])
def test_blocks_equal_the_naive_loop(mask_batch):
  rng = np.random.default_rng(0)
  B, T, S, N, K, H = 2, 10, 10, 4, 2, 8
  q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
  mask = np.tril(np.ones((T, S), bool))[None].repeat(mask_batch, 0)
  mask[-1, 3] = False  # a fully masked row (left padding)
  want = naive_attention(q, k, v, mask)
  for block in (3, 4, 10, 1024):  # padded blocks, exact blocks, one block, the dense path
    got = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), query_block=block)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, err_msg=f"query_block={block}")


def test_block_gradients_equal_the_dense_pass():
  rng = np.random.default_rng(1)
  B, T, N, K, H = 1, 12, 2, 1, 4
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
  w = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
  mask = jnp.tril(jnp.ones((T, T), bool))[None]
  loss = lambda block: jax.grad(lambda q, k, v: jnp.sum(w * layers.attention(q, k, v, mask, query_block=block)),
                                argnums=(0, 1, 2))(q, k, v)
  for dense, blocked in zip(loss(1024), jax.jit(lambda: loss(5))()):
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(dense), atol=1e-5)
