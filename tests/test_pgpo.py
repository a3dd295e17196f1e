"""PGPO: k3 scores, token weights (Eq. 4-7) and token advantages (Eq. 8), against hand arithmetic and numpy loops."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvg.credit import pgpo


def _scores_from_logs(logs):
  """Scores S with log1p(S) == logs exactly in exact arithmetic: S = exp(x) - 1."""
  return np.expm1(np.asarray(logs, np.float64)).astype(np.float32)


def _reference_weights(score, mask, *, tau, beta, eps=1e-8, threshold_mode="absolute", floor=0.0, normalize=True):
  """Naive per-response loop over Eq. 4-7 in float64."""
  out = np.zeros(score.shape, np.float64)
  for b in range(score.shape[0]):
    idx = np.flatnonzero(mask[b])
    if idx.size == 0:
      continue
    logs = np.log1p(score[b, idx].astype(np.float64))
    norm = (logs - logs.min()) / (logs.max() - logs.min() + eps)
    thr = tau if threshold_mode == "absolute" else np.sort(norm)[min(int(math.floor(idx.size * tau)), idx.size - 1)]
    w = np.array([max(i / (thr + eps), floor) if i < thr else 1 + beta * (i - thr) / (1 - thr + eps) for i in norm])
    if normalize:
      w = w * idx.size / w.sum() if w.sum() > eps else np.ones_like(w)
    out[b, idx] = w
  return out


def test_k3_hand_values():
  # pi_I = 0.5, pi_0 = 0.25: d = log(0.25) - log(0.5) = -log 2; S = 1/2 + log 2 - 1 = 0.193147.
  # d = +30 is clipped to 20: S = e^20 - 21 -> clamped to 10.  d = -30 -> -20: S = e^-20 + 19 -> clamped to 10.
  # pi_0 == pi_I: d = 0, S = 0.  The masked token gets 0 whatever its log-probs.
  logp_img = jnp.array([[math.log(0.5), -30.0, 0.0, -1.0, -5.0]])
  logp_txt = jnp.array([[math.log(0.25), 0.0, -30.0, -1.0, 0.0]])
  mask = jnp.array([[True, True, True, True, False]])
  score = pgpo.k3_dependency(logp_img, logp_txt, mask)
  expected = [0.5 + math.log(2.0) - 1.0, 10.0, 10.0, 0.0, 0.0]
  np.testing.assert_allclose(np.asarray(score)[0], expected, rtol=1e-6, atol=1e-7)


def test_k3_small_difference_matches_series():
  # For small d, exp(d) - d - 1 ~= d^2 / 2 + d^3 / 6: d = 0.1 -> 0.0051709.
  score = pgpo.k3_dependency(jnp.array([[0.0]]), jnp.array([[0.1]]), jnp.array([[True]]))
  np.testing.assert_allclose(float(score[0, 0]), math.exp(0.1) - 1.1, rtol=1e-4)


def test_weights_hand_example_absolute():
  # log1p(S) = [0, 0.2, 0.5, 1.0] (+ one padding token). min 0, max 1 -> I = [0, 0.2, 0.5, 1.0].
  # tau 0.4, beta 2: w = [0/0.4, 0.2/0.4, 1 + 2*0.1/0.6, 1 + 2*0.6/0.6] = [0, 0.5, 4/3, 3], sum = 29/6.
  # Eq. 7: w~ = w * 4 / (29/6) = w * 24/29 = [0, 12/29, 32/29, 72/29].
  score = _scores_from_logs([[0.0, 0.2, 0.5, 1.0, 0.7]])
  mask = np.array([[True, True, True, True, False]])
  w = pgpo.pgpo_weights(jnp.asarray(score), jnp.asarray(mask), tau=0.4, beta=2.0)
  np.testing.assert_allclose(np.asarray(w)[0], [0.0, 12 / 29, 32 / 29, 72 / 29, 0.0], rtol=1e-5, atol=1e-6)
  # Without Eq. 7 the raw gate values come back.
  w_raw = pgpo.pgpo_weights(jnp.asarray(score), jnp.asarray(mask), tau=0.4, beta=2.0, mass_normalize=False)
  np.testing.assert_allclose(np.asarray(w_raw)[0], [0.0, 0.5, 4 / 3, 3.0, 0.0], rtol=1e-5, atol=1e-6)
  # With a floor of 0.1 the suppressed token at I = 0 is raised to 0.1; 0.5 stays; boosted ones are untouched.
  w_floor = pgpo.pgpo_weights(jnp.asarray(score), jnp.asarray(mask), tau=0.4, beta=2.0, mass_normalize=False,
                              low_weight_floor=0.1)
  np.testing.assert_allclose(np.asarray(w_floor)[0], [0.1, 0.5, 4 / 3, 3.0, 0.0], rtol=1e-5, atol=1e-6)


def test_weights_hand_example_quantile():
  # log1p(S) = [0, 0.2, 0.5, 1.0, 0.1], L = 5: I = same; ascending [0, 0.1, 0.2, 0.5, 1.0];
  # tau 0.4 -> index floor(5 * 0.4) = 2 -> thr = 0.2.
  # w = [0/0.2, 1 + 2*0/0.8, 1 + 2*0.3/0.8, 1 + 2*0.8/0.8, 0.1/0.2] = [0, 1, 1.75, 3, 0.5], sum 6.25.
  # Eq. 7: w~ = w * 5 / 6.25 = w * 0.8 = [0, 0.8, 1.4, 2.4, 0.4].
  score = _scores_from_logs([[0.0, 0.2, 0.5, 1.0, 0.1, 0.0]])
  mask = np.array([[True, True, True, True, True, False]])
  w = pgpo.pgpo_weights(jnp.asarray(score), jnp.asarray(mask), threshold_mode="quantile")
  np.testing.assert_allclose(np.asarray(w)[0], [0.0, 0.8, 1.4, 2.4, 0.4, 0.0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threshold_mode", ["absolute", "quantile"])
@pytest.mark.parametrize("tau,floor,normalize", [(0.4, 0.0, True), (0.25, 0.1, True), (0.6, 0.0, False)])
def test_weights_match_numpy_loop(threshold_mode, tau, floor, normalize):
  rng = np.random.default_rng(0)
  score = rng.exponential(0.5, size=(6, 13)).astype(np.float32)
  lengths = np.array([13, 9, 1, 0, 5, 2])
  mask = np.arange(13)[None, :] < lengths[:, None]
  got = pgpo.pgpo_weights(jnp.asarray(score), jnp.asarray(mask), tau=tau, beta=2.0, threshold_mode=threshold_mode,
                          low_weight_floor=floor, mass_normalize=normalize)
  want = _reference_weights(score, mask, tau=tau, beta=2.0, threshold_mode=threshold_mode, floor=floor,
                            normalize=normalize)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_weights_sum_to_length_and_padding_zero():
  rng = np.random.default_rng(1)
  score = rng.exponential(1.0, size=(8, 20)).astype(np.float32)
  lengths = rng.integers(2, 21, size=8)
  mask = np.arange(20)[None, :] < lengths[:, None]
  w = np.asarray(jax.jit(pgpo.pgpo_weights)(jnp.asarray(score), jnp.asarray(mask)))
  np.testing.assert_allclose(w.sum(axis=1), lengths, rtol=1e-5)
  assert np.all(w[~mask] == 0.0)
  assert np.all(w >= 0.0)


def test_suppression_below_tau_boost_above():
  rng = np.random.default_rng(2)
  score = rng.exponential(1.0, size=(4, 30)).astype(np.float32)
  mask = np.ones((4, 30), bool)
  w = np.asarray(pgpo.pgpo_weights(jnp.asarray(score), jnp.asarray(mask), tau=0.4, beta=2.0, mass_normalize=False))
  logs = np.log1p(score.astype(np.float64))
  norm = (logs - logs.min(1, keepdims=True)) / (logs.max(1, keepdims=True) - logs.min(1, keepdims=True))
  assert np.all(w[norm < 0.4 - 1e-6] < 1.0)
  assert np.all(w[norm >= 0.4 + 1e-6] >= 1.0)
  assert np.all(w <= 3.0 + 1e-6)  # 1 + beta is the largest weight
  # The ordering of weights follows the ordering of scores (the gate is monotone).
  for b in range(4):
    order = np.argsort(score[b], kind="stable")
    assert np.all(np.diff(w[b, order]) >= -1e-6)


def test_tau_edges():
  # tau = 1: every I < 1 is suppressed, w = I / 1 = I; the maximum (I = 1) gets 1 + beta * 0 = 1. So w == I.
  # tau = 0: every token is boosted, w = 1 + beta * I / (1 + eps) = 1 + 2 I.
  score = _scores_from_logs([[0.0, 0.25, 0.5, 1.0]])
  mask = jnp.ones((1, 4), bool)
  w1 = pgpo.pgpo_weights(jnp.asarray(score), mask, tau=1.0, mass_normalize=False)
  np.testing.assert_allclose(np.asarray(w1)[0], [0.0, 0.25, 0.5, 1.0], atol=1e-6)
  w0 = pgpo.pgpo_weights(jnp.asarray(score), mask, tau=0.0, mass_normalize=False)
  np.testing.assert_allclose(np.asarray(w0)[0], [1.0, 1.5, 2.0, 3.0], atol=1e-6)
  # With Eq. 7 at tau = 0: sum = 7.5, w~ = w * 4 / 7.5.
  w0n = pgpo.pgpo_weights(jnp.asarray(score), mask, tau=0.0)
  np.testing.assert_allclose(np.asarray(w0n)[0], np.array([1.0, 1.5, 2.0, 3.0]) * 4 / 7.5, rtol=1e-6)
  # Quantile mode with tau = 1 clips the index to L - 1: thr = max I = 1, the same weights as absolute tau = 1.
  wq = pgpo.pgpo_weights(jnp.asarray(score), mask, tau=1.0, threshold_mode="quantile", mass_normalize=False)
  np.testing.assert_allclose(np.asarray(wq)[0], [0.0, 0.25, 0.5, 1.0], atol=1e-6)


def test_degenerate_rows():
  # Constant scores: I = 0 everywhere -> w = 0 -> sum 0 <= eps -> Eq. 7 falls back to ones.
  # Single valid token: I = 0 -> the same fallback -> weight 1. All-padding row: zeros, no NaN.
  score = jnp.array([[0.3, 0.3, 0.3], [5.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
  mask = jnp.array([[True, True, True], [True, False, False], [False, False, False]])
  w = np.asarray(pgpo.pgpo_weights(score, mask))
  np.testing.assert_array_equal(w, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  wq = np.asarray(pgpo.pgpo_weights(score, mask, threshold_mode="quantile"))
  assert np.all(np.isfinite(wq)) and np.all(wq[2] == 0.0)


def test_no_gradient_through_weights_and_scores():
  rng = np.random.default_rng(3)
  logp_img = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
  logp_txt = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
  mask = jnp.ones((2, 6), bool)

  def total(li, lt):
    score = pgpo.k3_dependency(li, lt, mask)
    return jnp.sum(pgpo.pgpo_weights(score, mask, mass_normalize=False) * 3.0) + jnp.sum(score)

  g_img, g_txt = jax.grad(total, argnums=(0, 1))(logp_img, logp_txt)
  assert np.all(np.asarray(g_img) == 0.0) and np.all(np.asarray(g_txt) == 0.0)
  g_score = jax.grad(lambda s: jnp.sum(pgpo.pgpo_weights(s, mask)))(jnp.abs(logp_img))
  assert np.all(np.asarray(g_score) == 0.0)


def test_advantages_hand_and_group_mass():
  # Eq. 8 by hand: A = [2, -1]; w = [[0.5, 1.5], [1, 1]] -> [[1, 3], [-1, -1]].
  got = pgpo.pgpo_advantages(jnp.array([2.0, -1.0]), jnp.array([[0.5, 1.5], [1.0, 1.0]]))
  np.testing.assert_allclose(np.asarray(got), [[1.0, 3.0], [-1.0, -1.0]])
  # Group advantage mass: for each response, sum_t A_i w~_t == sum_t A_i * 1 = A_i L_i, so the group total is kept.
  rng = np.random.default_rng(4)
  group = 5
  adv = rng.normal(size=group).astype(np.float32)
  adv -= adv.mean()
  score = rng.exponential(1.0, size=(group, 16)).astype(np.float32)
  lengths = np.array([16, 3, 9, 1, 12])
  mask = np.arange(16)[None, :] < lengths[:, None]
  weighted = np.asarray(pgpo.pgpo_advantages(adv, pgpo.pgpo_weights(jnp.asarray(score), jnp.asarray(mask))))
  np.testing.assert_allclose(weighted.sum(axis=1), adv * lengths, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(weighted.sum(), (adv * lengths).sum(), atol=1e-4)


def test_token_advantages_pipeline_and_config():
  rng = np.random.default_rng(5)
  logp_img = jnp.asarray(-rng.exponential(1.0, size=(3, 7)), jnp.float32)
  logp_txt = jnp.asarray(-rng.exponential(1.0, size=(3, 7)), jnp.float32)
  mask = jnp.asarray(np.arange(7)[None, :] < np.array([[7], [4], [2]]))
  adv = jnp.array([1.0, -0.5, 0.0])
  cfg = pgpo.PGPOConfig(threshold_mode="quantile", low_weight_floor=0.1)
  fn = jax.jit(functools.partial(pgpo.pgpo_token_advantages, cfg=cfg))
  adv_BT, w_BT = fn(adv, logp_img, logp_txt, mask)
  score = pgpo.k3_dependency(logp_img, logp_txt, mask)
  want_w = _reference_weights(np.asarray(score), np.asarray(mask), tau=0.4, beta=2.0, threshold_mode="quantile",
                              floor=0.1)
  np.testing.assert_allclose(np.asarray(w_BT), want_w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(adv_BT), np.asarray(adv)[:, None] * want_w, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="threshold_mode"):
    pgpo.PGPOConfig(threshold_mode="median")
  with pytest.raises(ValueError, match="tau"):
    pgpo.PGPOConfig(tau=1.5)
  with pytest.raises(ValueError, match="beta"):
    pgpo.pgpo_weights(jnp.zeros((1, 2)), jnp.ones((1, 2), bool), beta=-1.0)
  with pytest.raises(ValueError, match="mask_BT"):
    pgpo.pgpo_weights(jnp.zeros((1, 2)), jnp.ones((1, 3), bool))
  with pytest.raises(ValueError, match="score_BT"):
    pgpo.pgpo_weights(jnp.zeros((2,)), jnp.ones((2,), bool))
