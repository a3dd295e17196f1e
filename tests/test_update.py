"""The jitted update: micro-batch accumulation equals one big batch, and repeated updates overfit a fixed batch."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvg.models import Qwen25VL, tiny
from jaxvg.rl import losses, optim, scoring, update
from model_inputs import images_to_pixels, left_padded_prompts

G = 2


def _prompt(cfg, sizes, rows, seed):
  pixels, grid = images_to_pixels(sizes, seed=seed)
  ids, mask, mm = left_padded_prompts(cfg, rows, grid, seed=seed)
  return scoring.prompt_inputs(cfg, input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, pixel_values=pixels,
                               image_grid_thw=grid)


def _batch(cfg, prompt, seed, weight=1.0):
  rng = np.random.default_rng(seed)
  N = prompt.input_ids_BT.shape[0] * G
  tokens = jnp.asarray(rng.integers(1, 50, (N, 5)))
  mask = jnp.asarray((np.arange(5)[None] < rng.integers(2, 6, N)[:, None]).astype(np.int32))
  adv = jnp.asarray(rng.normal(size=(N, 1)) * np.ones((1, 5)), jnp.float32) * mask
  return update.PolicyBatch(prompt, tokens, mask, jnp.zeros((N, 5)), adv, jnp.zeros((N, 5)), jnp.asarray(weight))


def test_micro_batches_accumulate_to_the_full_batch_gradient():
  cfg = tiny(vocab_size=64)
  model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  loss_cfg = losses.preset("dapo")  # token-mean: the normalizer is the token count of the whole mini-batch
  p1 = _prompt(cfg, [(56, 56)], [1], 1)
  p2 = _prompt(cfg, [(56, 56)], [1], 2)  # same shapes as p1: one compiled gradient serves both
  b1, b2 = _batch(cfg, p1, 1), _batch(cfg, p2, 2)
  # Old log-probs = current ones, so the ratio is 1 and the loss is -sum(adv * logp-gradient) / tokens.
  score_jit = jax.jit(update.score_fn, static_argnums=(1, 5))
  score = lambda b: score_jit(params, graphdef, b.prompt, b.tokens_NT, b.mask_NT, G)[0]
  b1 = b1.__class__(**{**b1.__dict__, "logp_old_NT": score(b1)})
  b2 = b2.__class__(**{**b2.__dict__, "logp_old_NT": score(b2)})
  w1, w2 = update.micro_weights([b1.mask_NT, b2.mask_NT], loss_cfg.aggregation)
  grad_jit = jax.jit(jax.grad(update.policy_loss_fn, has_aux=True), static_argnums=(1, 3, 4))
  grad = lambda b, w: grad_jit(params, graphdef, b.__class__(**{**b.__dict__, "weight": jnp.asarray(w)}), G,
                               loss_cfg)[0]
  acc = jax.tree.map(jnp.add, grad(b1, w1), grad(b2, w2))

  # Reference: the token-mean surrogate over both batches at once, written directly from its definition.
  def full(params):
    m = nnx.merge(graphdef, params)
    num = den = 0.0
    for b in (b1, b2):
      logp = scoring.completion_logps(m, b.prompt, b.tokens_NT, b.mask_NT, G)
      ratio = jnp.exp(logp - b.logp_old_NT)
      num += jnp.sum(-b.adv_NT * ratio * b.mask_NT)
      den += jnp.sum(b.mask_NT)
    return num / den
  ref = jax.jit(jax.grad(full))(params)
  for a, r in zip(jax.tree.leaves(acc), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, r, atol=1e-6, rtol=1e-4)


def test_repeated_updates_overfit_one_batch():
  cfg = tiny(vocab_size=64)
  model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  tx = optim.make_optimizer(optim.OptimConfig(lr=3e-3, weight_decay=0.0), nnx.state(model, nnx.Param))
  state = update.init_state(model, tx)
  prompt = _prompt(cfg, [(56, 56), (56, 112)], [1, 1], 3)
  batch = _batch(cfg, prompt, 3)
  # Positive advantages everywhere: the loss is minimized by raising the log-probs of these tokens.
  batch = batch.__class__(**{**batch.__dict__, "adv_NT": jnp.asarray(batch.mask_NT, jnp.float32)})
  loss_cfg = losses.preset("grpo", clip_high=1e9)  # no clipping: a plain likelihood-raising objective
  step = jax.jit(lambda s, b: update.policy_step(s, (b,), tx=tx, group_size=G, loss_cfg=loss_cfg))
  score = jax.jit(update.score_fn, static_argnums=(1, 5))
  logp0 = score(state.params, state.graphdef, prompt, batch.tokens_NT, batch.mask_NT, G)[0]
  for _ in range(15):
    batch = batch.__class__(**{**batch.__dict__, "logp_old_NT": score(
        state.params, state.graphdef, prompt, batch.tokens_NT, batch.mask_NT, G)[0]})
    state, metrics = step(state, batch)
  logp1 = score(state.params, state.graphdef, prompt, batch.tokens_NT, batch.mask_NT, G)[0]
  mask = np.asarray(batch.mask_NT) > 0
  before, after = np.asarray(logp0)[mask].mean(), np.asarray(logp1)[mask].mean()
  assert after > before + 1.0, (before, after)  # log-likelihood of the batch rose by more than one nat per token
  assert int(state.step) == 15 and int(state.skipped) == 0


def test_sft_loss_weights_tokens():
  """sum_t w_t (-log p_t) / sum_t w_t over the mask, and the plain token-mean NLL beside it."""
  cfg = tiny(vocab_size=64)
  model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  prompt = _prompt(cfg, [(56, 56), (56, 56)], [1, 1], 3)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, 50, (2, 6)))
  mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
  weight = jnp.asarray(rng.choice([1.0, 10.0], (2, 6)), jnp.float32)
  logp = np.asarray(scoring.completion_logps(model, prompt, tokens, mask, 1))
  m, w = np.asarray(mask, bool), np.asarray(weight)
  _, got = update.sft_loss_fn(params, graphdef, update.SFTBatch(prompt, tokens, mask, weight))
  np.testing.assert_allclose(got["sft_loss"], -(w * logp)[m].sum() / w[m].sum(), rtol=1e-5)
  np.testing.assert_allclose(got["sft_nll"], -logp[m].mean(), rtol=1e-5)
  _, plain = update.sft_loss_fn(params, graphdef, update.SFTBatch(prompt, tokens, mask))
  np.testing.assert_allclose(plain["sft_loss"], -logp[m].mean(), rtol=1e-5)
  assert float(got["sft_tokens"]) == 10
