"""The sampling distribution: empirical token frequencies against softmax(logits / T) with top-k / top-p applied.

The expected distribution is computed independently in numpy (float64, tie groups added whole); the frequencies are
compared with a chi-square test at a fixed seed, threshold p > 1e-3. Tokens outside the support must never appear.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import jaxvg.models as M
from jaxvg.rl import rollout as R
from test_rollout import full_logits, make_prompts, nucleus_logq, unit_scale, vision_inputs

P_MIN = 1e-3  # chi-square p-value threshold
Z = np.array([2.0, 1.5, 1.5, 0.3, -0.5, 0.0, -1.0, 1.0])  # tokens 1 and 2 tie

# (temperature, top_p, top_k) -> the support, worked by hand from p = softmax(Z / T):
CASES = {
    # T=1: every token has mass.
    "full": ((1.0, 1.0, 0), {0, 1, 2, 3, 4, 5, 6, 7}),
    # T=0.7: p = .416 .203 .203 .037 .012 .024 .006 .100; mass before 7 = .822 < .9, before 3 = .922 -> {0,1,2,7}.
    "nucleus": ((0.7, 0.9, 0), {0, 1, 2, 7}),
    # T=1: p0 = .330 < .45, and the tie {1, 2} reaches it: the whole tie group is kept, nothing after.
    "nucleus_tie": ((1.0, 0.45, 0), {0, 1, 2}),
    # the 4 largest logits: 2.0, 1.5, 1.5, 1.0.
    "top_k": ((1.3, 1.0, 4), {0, 1, 2, 7}),
    # the 2nd largest value is tied: both tokens >= it stay.
    "top_k_tie": ((1.0, 1.0, 2), {0, 1, 2}),
    # T=1.3 over top-4 renormalized: .354 .241 .241 .164; .354 + .241 < .8 <= .836 -> {0,1,2}. (Top-p on the
    # unrenormalized .281 + .191 + .191 = .664 < .8 would keep token 7 too.)
    "top_k_then_top_p": ((1.3, 0.8, 4), {0, 1, 2}),
    # top-2 with the tie keeps 3 tokens, renormalized over all 3: .330 .200 .200 / .730 = .452 .274 .274; .452 < .5
    # adds the tie group. (Renormalizing over 2 sorted entries only, .330 / .530 = .622 >= .5, would keep {0}.)
    "top_k_tie_then_top_p": ((1.0, 0.5, 2), {0, 1, 2}),
}


def chi_square_p(counts, probs, min_expected=5.0):
  """p-value of counts against probs; bins with an expected count below `min_expected` are pooled."""
  n = counts.sum()
  expected = n * probs
  small = expected < min_expected
  obs = np.append(counts[~small], counts[small].sum()) if small.any() else counts
  exp = np.append(expected[~small], expected[small].sum()) if small.any() else expected
  return stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("name", sorted(CASES))
def test_select_tokens_frequencies(name):
  (temperature, top_p, top_k), support = CASES[name]
  n = 20000
  q = np.exp(nucleus_logq(Z, temperature=temperature, top_p=top_p, top_k=top_k))
  assert set(np.flatnonzero(q > 0).tolist()) == support  # the numpy reference agrees with the hand-worked set
  logits = jnp.broadcast_to(jnp.asarray(Z, jnp.float32), (n, len(Z)))
  select = jax.jit(lambda l, k: R.select_tokens(l, R.row_keys(k, n, 3), temperature=temperature, top_p=top_p,
                                                top_k=top_k))
  tokens, logq = jax.device_get(select(logits, jax.random.key(11)))
  counts = np.bincount(tokens, minlength=len(Z))
  assert set(np.flatnonzero(counts).tolist()) == support
  assert chi_square_p(counts[q > 0], q[q > 0]) > P_MIN
  np.testing.assert_allclose(logq, np.log(q[tokens]), atol=1e-5)
  again = jax.device_get(select(logits, jax.random.key(11))[0])
  np.testing.assert_array_equal(again, tokens)  # reproducible from the key


select_jit = jax.jit(R.select_tokens, static_argnames=("temperature", "top_p", "top_k"))
logits_jit = jax.jit(R.sampling_logits, static_argnames=("temperature", "top_p", "top_k"))


def test_select_tokens_edge_cases():
  keys = R.row_keys(jax.random.key(0), 3, 0)
  logits = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [5.0, -1.0, 2.0, 4.9]])
  tokens, logq = select_jit(logits, keys, temperature=0.0, top_p=1.0, top_k=0)
  np.testing.assert_array_equal(tokens, [1, 0, 0])  # greedy ties go to the first maximum
  np.testing.assert_array_equal(logq, 0.0)
  first = jax.jit(R.first_argmax)(jnp.asarray([[0.0, 2.0, 2.0], [-jnp.inf, -jnp.inf, -1.0], [jnp.nan, 1.0, 0.0]]))
  assert first[:2].tolist() == [1, 2] and 0 <= int(first[2]) < 3  # first maximum; a NaN row stays in range
  # A tiny nucleus keeps the maximum only (its whole tie group: row 0 may draw 1 or 2, row 1 any token).
  for seed in range(5):
    tokens, logq = select_jit(logits, R.row_keys(jax.random.key(seed), 3, 0), temperature=1.0, top_p=1e-6,
                                   top_k=0)
    assert int(tokens[0]) in (1, 2) and int(tokens[2]) == 0
    np.testing.assert_allclose(logq, [np.log(0.5), np.log(0.25), 0.0], atol=1e-6)
  # top_k = 1 is greedy; top_k >= V is off.
  tokens, _ = select_jit(logits[2:], keys[2:], temperature=1.0, top_p=1.0, top_k=1)
  assert int(tokens[0]) == 0
  z = logits_jit(logits, temperature=2.0, top_p=1.0, top_k=4)
  np.testing.assert_allclose(z, logits / 2.0)
  # Rows draw independently: 64 rows of the same logits with their own keys are not all equal.
  many, _ = select_jit(jnp.zeros((64, 16)), R.row_keys(jax.random.key(1), 64, 0), temperature=1.0, top_p=1.0,
                            top_k=0)
  assert len(set(np.asarray(many).tolist())) > 8


def test_first_token_frequencies_end_to_end():
  """Many samples of one image prompt: the first generated token follows the model's truncated softmax."""
  cfg = M.tiny(vocab_size=32)
  model = unit_scale(nnx.eval_shape(lambda: M.Qwen25VL(cfg, rngs=nnx.Rngs(0))), seed=4)
  ids, mask, types, pixels, grid = make_prompts(cfg, [[2, (4, 4), 3]], seed=5)
  positions, deltas = M.mrope_positions(ids, types, grid, mask)
  vision = vision_inputs(cfg, pixels, grid)
  temperature, top_p, top_k, G = 0.9, 0.7, 12, 4000
  config = R.SamplingConfig(num_samples=G, max_new_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k)
  graphdef, params = nnx.split(model)
  out = jax.device_get(R.rollout(graphdef, params, input_ids_BT=ids, attention_mask_BT=mask, positions_3BT=positions,
                                 deltas_B=deltas, vision=vision, key=jax.random.key(6), config=config))
  logits = np.asarray(full_logits(model, ids, positions, mask, vision), np.float64)[0, -1]
  logq = nucleus_logq(logits, temperature=temperature, top_p=top_p, top_k=top_k)
  q = np.exp(logq)
  assert 3 <= (q > 0).sum() < top_k  # the nucleus cut removes some of the top-k on these logits
  tokens = out.tokens_BT[:, 0]
  counts = np.bincount(tokens, minlength=cfg.text.vocab_size)
  assert counts[q == 0].sum() == 0
  assert chi_square_p(counts[q > 0], q[q > 0]) > P_MIN
  np.testing.assert_allclose(out.sample_logp_BT[:, 0], logq[tokens], atol=1e-4)
  logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
  np.testing.assert_allclose(out.logp_BT[:, 0], logp[tokens], atol=1e-4)
