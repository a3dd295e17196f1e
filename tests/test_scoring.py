"""Completion log-probs against a full forward of the concatenated sequence with host-computed positions."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvg.models import forward, Qwen25VL, tiny
from jaxvg.rl import scoring
from model_inputs import images_to_pixels, left_padded_prompts


def _setup(G=2, Tn=5, seed=0):
  cfg = tiny(vocab_size=96)
  model = Qwen25VL(cfg, rngs=nnx.Rngs(seed))
  pixels, grid = images_to_pixels([(112, 168), (56, 56)], seed=seed)
  ids, mask, mm = left_padded_prompts(cfg, [1, 1], grid, seed=seed)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 80, (ids.shape[0] * G, Tn))
  lengths = np.array([Tn, 2, 3, Tn])[: ids.shape[0] * G]
  comp_mask = (np.arange(Tn)[None] < lengths[:, None]).astype(np.int64)
  tokens = tokens * comp_mask
  return cfg, model, (pixels, grid, ids, mask, mm), tokens, comp_mask


def test_completion_logps_match_full_forward():
  G = 2
  cfg, model, (pixels, grid, ids, mask, mm), tokens, comp_mask = _setup(G)
  prompt = scoring.prompt_inputs(cfg, input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, pixel_values=pixels,
                                 image_grid_thw=grid)
  got = np.asarray(scoring.completion_logps(model, prompt, jnp.asarray(tokens), jnp.asarray(comp_mask), G, chunk=2))
  # Reference: each (prompt, completion) pair as one sequence, positions from the host-side M-RoPE routine.
  for n in range(tokens.shape[0]):
    b = n // G
    # Each sample's images: row b uses image b (one image per row here).
    seq = np.concatenate([ids[b], tokens[n]])[None]
    seq_mask = np.concatenate([mask[b], comp_mask[n]])[None]
    seq_mm = (seq == cfg.image_token_id).astype(np.int64)
    start = int(np.prod(grid[:b], axis=1).sum()) if b else 0
    count = int(np.prod(grid[b]))
    logits = np.asarray(forward(model, input_ids=seq, attention_mask=seq_mask, mm_token_type_ids=seq_mm,
                                pixel_values=pixels[start:start + count], image_grid_thw=grid[b:b + 1]))
    logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    T0 = ids.shape[1]
    for j in range(tokens.shape[1]):
      want = logp[T0 - 1 + j, tokens[n, j]] if comp_mask[n, j] else 0.0
      np.testing.assert_allclose(got[n, j], want, atol=1e-4)


def test_token_logps_chunking_is_exact_and_entropy_is_correct():
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.normal(size=(2, 7, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(5, 11)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 11, (2, 7)))
  logp_full = jax.nn.log_softmax(np.einsum("ntd,dv->ntv", h, w), axis=-1)
  want = np.take_along_axis(np.asarray(logp_full), np.asarray(t)[..., None], -1)[..., 0]
  want_ent = -(np.exp(logp_full) * logp_full).sum(-1)
  for chunk in (1, 3, 7, 16):
    got, ent = scoring.token_logps(h, w, t, chunk=chunk, with_entropy=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(ent, want_ent, atol=1e-5)
  # Gradients agree with the unchunked computation too.
  f = lambda h, c: scoring.token_logps(h, w, t, chunk=c).sum()
  g_ref = jax.grad(lambda h: jnp.take_along_axis(jax.nn.log_softmax(h @ w), t[..., None], -1).sum())(h)
  np.testing.assert_allclose(jax.grad(f)(h, 3), g_ref, atol=1e-5)


def test_token_top1_is_the_argmax_of_the_full_logits():
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 7, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
  argmax = np.argmax(np.einsum("ntd,dv->ntv", np.asarray(h), np.asarray(w)), axis=-1)
  tokens = np.where(rng.random((2, 7)) < 0.5, argmax, (argmax + 1) % 11)
  for chunk in (3, 7, 16):  # a padded last chunk, one chunk, a chunk longer than T
    np.testing.assert_array_equal(scoring.token_top1(h, w, jnp.asarray(tokens), chunk=chunk), tokens == argmax)
