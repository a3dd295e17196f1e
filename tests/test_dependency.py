"""The dual forward: compacted mask_visual equals the masked full-length pass; an image-blind model has no dependency."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvg.credit import dependency
from jaxvg.models import Qwen25VL, tiny
from jaxvg.rl import scoring
from model_inputs import images_to_pixels, left_padded_prompts

G = 2


def _batch(seed=0):
  cfg = tiny(vocab_size=96)
  model = Qwen25VL(cfg, rngs=nnx.Rngs(seed))
  pixels, grid = images_to_pixels([(112, 112), (56, 112), (56, 56)], seed=seed)
  ids, mask, mm = left_padded_prompts(cfg, [2, 1], grid, seed=seed)
  prompt = scoring.prompt_inputs(cfg, input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, pixel_values=pixels,
                                 image_grid_thw=grid)
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(1, 80, (ids.shape[0] * G, 6)))
  comp_mask = jnp.asarray((np.arange(6)[None] < np.array([6, 3, 4, 6])[:, None]).astype(np.int32))
  return cfg, model, prompt, (ids, mask, pixels, grid), tokens, comp_mask


def test_compacted_mask_visual_equals_masked_full_length_pass():
  cfg, model, prompt, _, tokens, comp_mask = _batch()
  compact = dependency.compact_visual_prompt(prompt.input_ids_BT, prompt.attention_mask_BT, prompt.positions_3BT,
                                             prompt.next_position_B, image_token_id=cfg.image_token_id)
  assert compact.input_ids_BT.shape[1] < prompt.input_ids_BT.shape[1]  # the compacted pass really is shorter
  assert not np.any(np.asarray(compact.input_ids_BT) == cfg.image_token_id)
  full = dependency.masked_visual_prompt(prompt, cfg.image_token_id)
  logp_compact = scoring.completion_logps(model, compact, tokens, comp_mask, G)
  logp_full = scoring.completion_logps(model, full, tokens, comp_mask, G)
  np.testing.assert_allclose(logp_compact, logp_full, atol=1e-5)
  # And masking the image really changes the prediction (otherwise the test above proves nothing).
  logp_real = scoring.completion_logps(model, prompt, tokens, comp_mask, G)
  assert np.max(np.abs(np.asarray(logp_real - logp_full))) > 1e-3


def test_image_blind_model_has_zero_dependency_with_white_image():
  cfg, model, prompt, (ids, mask, pixels, grid), tokens, comp_mask = _batch(1)
  # Zero the merger's output layer: every image yields all-zero features, so the image cannot matter.
  model.vision.merger_fc2_MD[...] = jnp.zeros_like(model.vision.merger_fc2_MD[...])
  model.vision.merger_fc2_bias_D[...] = jnp.zeros_like(model.vision.merger_fc2_bias_D[...])
  white = np.full_like(pixels, pixels.max())  # a constant (white) image in normalized pixel space
  cf = scoring.prompt_inputs(cfg, input_ids=ids, attention_mask=mask, pixel_values=white, image_grid_thw=grid)
  real, blank = dependency.dual_logps(model, prompt, cf, tokens, comp_mask, G)
  d = np.clip(np.asarray(blank - real), -20, 20)
  k3 = np.exp(d) - d - 1  # PGPO's sampled-token estimator, written out
  np.testing.assert_allclose(k3, 0.0, atol=1e-6)


def test_step_scores_sum_per_step():
  values = jnp.asarray([[1.0, 2.0, 3.0, 4.0, 0.0]])
  steps = jnp.asarray([[0, 0, 1, 2, -1]])
  np.testing.assert_allclose(dependency.step_scores(values, steps, 3), [[3.0, 3.0, 4.0]])
  np.testing.assert_allclose(dependency.step_scores(values, steps, 3, mean=True), [[1.5, 3.0, 4.0]])


def test_guard_fires_after_patience_steps_only():
  guard = dependency.DependencyGuard(threshold=1e-3, patience=2)
  assert not guard.update(1e-5)
  assert not guard.update(0.5)  # a healthy step resets the count
  assert not guard.update(1e-5)
  assert guard.update(1e-6)


def test_full_kl_equals_explicit_vocabulary_sum():
  cfg, model, prompt, _, tokens, comp_mask = _batch(2)
  compact = dependency.compact_visual_prompt(prompt.input_ids_BT, prompt.attention_mask_BT, prompt.positions_3BT,
                                             prompt.next_position_B, image_token_id=cfg.image_token_id)
  got = dependency.full_kl(model, prompt, compact, tokens, comp_mask, G, chunk=4)
  w = model.decoder.head_weight_DV()
  h_real, _ = scoring.completion_hidden(model, prompt, tokens, comp_mask, G)
  h_cf, _ = scoring.completion_hidden(model, compact, tokens, comp_mask, G)
  lp = np.asarray(jax.nn.log_softmax(np.einsum("ntd,dv->ntv", h_real, w), -1), np.float64)
  lq = np.asarray(jax.nn.log_softmax(np.einsum("ntd,dv->ntv", h_cf, w), -1), np.float64)
  want = (np.exp(lp) * (lp - lq)).sum(-1) * np.asarray(comp_mask)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert want.max() > 1e-4  # the image matters to this random model, so the comparison is not vacuous
