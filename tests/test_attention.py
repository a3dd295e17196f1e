"""layers.attention: the blocked path against a naive per-row loop, and every other implementation against it.

The "xla" path hands `jax.nn.dot_product_attention` exactly what the cuDNN kernel gets (the mask, the causal hint),
so on CPU it checks the decoder's and the vision tower's masks as the GPU kernel will see them. The TPU flash kernel
runs here in Pallas' interpret mode.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxvg.models import KVCache, layers, ModelConfig, prepare_inputs, Qwen25VL, tiny, vision
from test_rollout import make_prompts, unit_scale

TOL = 1e-5
# One compiled program per call shape: eager dispatch would compile every op on its own.
attention = jax.jit(layers.attention, static_argnames=("impl", "causal", "query_block"))


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


def qkv(rng, B, T, S, N, K, H):
  return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))


def decoder_mask(pad_B, T, S, cache_index=0, filled=None):
  """The decoder's mask: causal from `cache_index`, left padding `pad_B`, slots >= `filled` empty; [B, T, S]."""
  filled = S if filled is None else filled
  kv_BS = (np.arange(S)[None] >= np.asarray(pad_B)[:, None]) & (np.arange(S)[None] < filled)
  causal_TS = np.arange(S)[None] <= cache_index + np.arange(T)[:, None]
  return jnp.asarray(causal_TS[None] & kv_BS[:, None]), jnp.asarray(kv_BS)


@pytest.mark.parametrize("mask_batch", [1, 2])
def test_blocks_equal_the_naive_loop(mask_batch):
  rng = np.random.default_rng(0)
  B, T, S, N, K, H = 2, 10, 10, 4, 2, 8
  q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
  mask = np.tril(np.ones((T, S), bool))[None].repeat(mask_batch, 0)
  mask[-1, 3] = False  # a fully masked row (left padding)
  want = naive_attention(q, k, v, mask)
  for block in (3, 4, 10, 1024):  # padded blocks, exact blocks, one block, the dense path
    got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), query_block=block)
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


# ------------------------------------------------------------------------------------------- xla against blocked

# (name, B, T, S, N, K, cache_index, filled, causal): a forward from slot 0 (GQA 4/2 and 4/1, MHA), a prefill into a
# longer cache, and one decode step with empty slots after it. Row pads 0, 3 and T - 1 leave fully masked rows.
DECODER_CASES = [
    ("forward_gqa2", 3, 9, 9, 4, 2, 0, None, True),
    ("forward_gqa4", 3, 9, 9, 4, 1, 0, None, True),
    ("forward_mha", 3, 9, 9, 2, 2, 0, None, True),
    ("prefill_into_cache", 3, 9, 13, 4, 2, 0, 9, True),
    ("decode_step", 3, 1, 13, 4, 2, 9, 10, False),
]


@pytest.mark.parametrize("case", DECODER_CASES, ids=[c[0] for c in DECODER_CASES])
def test_xla_equals_blocked_on_decoder_masks(case):
  _, B, T, S, N, K, cache_index, filled, causal = case
  q, k, v = qkv(np.random.default_rng(2), B, T, S, N, K, 8)
  mask, _ = decoder_mask([0, 3, T - 1], T, S, cache_index, filled)
  want = attention(q, k, v, mask)
  got = attention(q, k, v, mask, impl="xla", causal=causal)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL)


def test_xla_equals_blocked_on_vision_masks():
  rng = np.random.default_rng(3)
  P, N, H = 40, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(P, N, H)), jnp.float32) for _ in range(3))
  image_seg = jnp.asarray(np.repeat([0, 1, 2], [16, 20, 4]))  # two images and a padding segment
  window_seg = jnp.asarray(np.repeat(np.arange(9), [4, 4, 4, 4, 4, 4, 4, 8, 4]))
  for fn in (vision._image_attention, lambda *a, impl: vision._window_attention(*a, window=6, impl=impl)):
    run = jax.jit(fn, static_argnames="impl")
    want = run(q, k, v, image_seg, window_seg, impl="blocked")
    got = run(q, k, v, image_seg, window_seg, impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL)


def test_gradients_match_and_stay_finite_with_fully_masked_rows():
  """Rows 1 and 2 start with padding queries that attend nowhere; their outputs still get gradient weight here."""
  B, T, N, K, H = 3, 8, 4, 2, 8
  q, k, v = qkv(np.random.default_rng(4), B, T, T, N, K, H)
  w = jnp.asarray(np.random.default_rng(5).normal(size=(B, T, N, H)), jnp.float32)
  mask, _ = decoder_mask([0, 3, T - 1], T, T)

  def grads(impl):
    loss = lambda q, k, v: jnp.sum(w * layers.attention(q, k, v, mask, impl=impl, causal=True, query_block=3))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  for name, want, got in zip("qkv", grads("blocked"), grads("xla")):
    assert np.isfinite(np.asarray(got)).all() and np.isfinite(np.asarray(want)).all(), name
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL, err_msg=f"d{name}")


# ------------------------------------------------------------------------------------------ choice and errors


def test_cudnn_off_gpu_raises_a_clear_error():
  q, k, v = qkv(np.random.default_rng(6), 1, 4, 4, 2, 1, 8)
  mask = jnp.ones((1, 4, 4), bool)
  with pytest.raises(ValueError, match="attention_impl='cudnn' cannot run: it needs a CUDA GPU"):
    layers.attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask, impl="cudnn")


def test_auto_is_blocked_on_cpu_and_unknown_names_are_refused():
  q, k, v = qkv(np.random.default_rng(7), 2, 6, 6, 2, 1, 8)
  mask, kv = decoder_mask([0, 2], 6, 6)
  segments = (kv.astype(jnp.int32), kv.astype(jnp.int32))
  assert layers.choose_impl("auto", q, k, v, segment_ids=segments) == "blocked"
  np.testing.assert_array_equal(np.asarray(attention(q, k, v, mask, impl="auto", causal=True)),
                                np.asarray(attention(q, k, v, mask)))
  with pytest.raises(ValueError, match="choose one of"):
    layers.attention(q, k, v, mask, impl="flash")
  with pytest.raises(ValueError, match="attention_impl='bogus'"):
    dataclasses.replace(tiny(), attention_impl="bogus")


def test_pallas_tpu_kernel_matches_blocked_on_real_rows():
  """The TPU flash kernel in Pallas' interpret mode: causal + left padding as segment ids, GQA 4/2, one 128 tile.

  Padding queries attend to the padding keys in segment form (not to nothing), so only real rows are compared.
  """
  from jax.experimental.pallas import tpu as pltpu
  B, T, N, K, H = 2, 128, 4, 2, 8
  q, k, v = qkv(np.random.default_rng(8), B, T, T, N, K, H)
  mask, kv = decoder_mask([0, 37], T, T)
  seg = kv.astype(jnp.int32)
  assert layers._pallas_unfit(q, k, (seg, seg)) == "" and layers._pallas_unfit(q, k, None)
  with pytest.raises(ValueError, match="attention_impl='pallas_tpu' runs a TPU kernel"):
    layers.attention(q, k, v, mask, impl="pallas_tpu", causal=True, segment_ids=(seg, seg))
  with pltpu.force_tpu_interpret_mode():
    got = layers._pallas_tpu_attention(q, k, v, (seg, seg), causal=True)
  want = attention(q, k, v, mask)
  real = np.asarray(kv)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=TOL)


# ------------------------------------------------------------------------------------------------- whole model


def test_model_with_xla_attention_equals_the_default():
  """The tiny model at unit-scale weights (so attention moves the logits): a forward with images and left padding,
  and a prefill into a cache followed by one decode step. Windows of 2 x 2 merge groups split the 4 x 8 image."""
  assert ModelConfig().attention_impl == tiny().attention_impl == "blocked"
  cfg = tiny()
  ids, mask, types, pixels, grid = make_prompts(cfg, [[3, (4, 8), 2], [1, (4, 4), 1]], seed=9)
  ids, positions, mask, vis = prepare_inputs(cfg, input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
                                             pixel_values=pixels, image_grid_thw=grid)
  graphdef, params = nnx.split(unit_scale(nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0))), seed=10))
  xla_graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen25VL(dataclasses.replace(cfg, attention_impl="xla"),
                                                              rngs=nnx.Rngs(0))))

  @functools.partial(jax.jit, static_argnums=0)
  def run(graphdef, params):
    model = nnx.merge(graphdef, params)
    logits, _ = model(ids, positions, mask, vision=vis)
    B, T = ids.shape
    cache = KVCache.zeros(cfg.text, B, T + 2)
    kv_BS = jnp.concatenate([mask.astype(bool), jnp.zeros((B, 2), bool)], axis=1)
    _, cache, _ = model.hidden(ids, positions, mask, vision=vis, cache=cache, kv_mask_BS=kv_BS)
    kv_BS = kv_BS.at[:, T].set(True)
    h_B1D, _, _ = model.hidden(ids[:, -1:], positions[:, :, -1:] + 1, None, cache=cache, cache_index=T,
                               kv_mask_BS=kv_BS)
    return logits, model.decoder.logits(h_B1D)

  (want, want_step), (got, got_step) = run(graphdef, params), run(xla_graphdef, params)
  assert np.abs(np.asarray(want)).max() > 1.0  # unit scale: attention is not a rounding error in these logits
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL)
  np.testing.assert_allclose(np.asarray(got_step), np.asarray(want_step), atol=TOL)
