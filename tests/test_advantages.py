"""Group advantages against hand arithmetic and invariants."""

import functools
import math

import jax
import numpy as np
import pytest

from jaxvg.rl.advantages import broadcast_to_tokens, group_advantages

EPS = 1e-6
# Two groups of three samples: group 0 = [1, 0, 0], group 1 = [3, 1, 2].
REWARDS = np.array([1.0, 0.0, 0.0, 3.0, 1.0, 2.0], dtype=np.float32)


def test_grpo_by_hand_unbiased_std():
  # group 0: mean 1/3, deviations [2/3, -1/3, -1/3], sum of squares 6/9, unbiased var (6/9)/2 = 1/3
  std0 = math.sqrt(1 / 3)
  # group 1: mean 2, deviations [1, -1, 0], sum of squares 2, unbiased var 2/2 = 1
  std1 = 1.0
  expected = [2 / 3 / (std0 + EPS), -1 / 3 / (std0 + EPS), -1 / 3 / (std0 + EPS),
              1 / (std1 + EPS), -1 / (std1 + EPS), 0.0]
  got = group_advantages(REWARDS, 3, estimator="grpo")
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  # 2/sqrt(3) = 1.1547...
  np.testing.assert_allclose(got[0], 1.1547005, rtol=1e-5)


def test_grpo_by_hand_population_std():
  std0 = math.sqrt((4 / 9 + 1 / 9 + 1 / 9) / 3)  # sqrt(2)/3
  std1 = math.sqrt(2 / 3)
  expected = [2 / 3 / (std0 + EPS), -1 / 3 / (std0 + EPS), -1 / 3 / (std0 + EPS),
              1 / (std1 + EPS), -1 / (std1 + EPS), 0.0]
  got = group_advantages(REWARDS, 3, estimator="grpo", std_ddof=0)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got[0], math.sqrt(2), rtol=1e-5)  # (2/3) / (sqrt(2)/3)


def test_drgrpo_by_hand():
  got = group_advantages(REWARDS, 3, estimator="drgrpo")
  np.testing.assert_allclose(got, [2 / 3, -1 / 3, -1 / 3, 1.0, -1.0, 0.0], rtol=1e-6, atol=1e-7)


def test_rloo_by_hand():
  # group 0: baselines (0+0)/2, (1+0)/2, (1+0)/2; group 1: (1+2)/2, (3+2)/2, (3+1)/2
  expected = [1 - 0, 0 - 0.5, 0 - 0.5, 3 - 1.5, 1 - 2.5, 2 - 2.0]
  np.testing.assert_allclose(group_advantages(REWARDS, 3, estimator="rloo"), expected, rtol=1e-6, atol=1e-7)


def test_batch_by_hand():
  mean = 7 / 6
  dev = [1 - mean, 0 - mean, 0 - mean, 3 - mean, 1 - mean, 2 - mean]
  std = math.sqrt(sum(d * d for d in dev) / 5)  # (1 + 49 + 49 + 121 + 1 + 25) / 36 / 5
  np.testing.assert_allclose(std, math.sqrt(246 / 36 / 5))
  got = group_advantages(REWARDS, 3, estimator="batch")
  np.testing.assert_allclose(got, [d / (std + EPS) for d in dev], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo", "batch"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_zero_variance_and_singletons_are_finite_zero(estimator, ddof):
  # float32 means of these constants miss them by an ulp (e.g. five 0.9s); the advantage must still be exactly 0.
  for value in (0.7, 0.9, 0.1, 1 / 3):
    for group_size in (3, 5, 8):
      constant = np.full(2 * group_size, value, dtype=np.float32)
      got = group_advantages(constant, group_size, estimator=estimator, std_ddof=ddof)
      np.testing.assert_array_equal(got, np.zeros(2 * group_size))
  singles = np.array([1.0, 0.0, 0.5], dtype=np.float32)
  got = np.asarray(group_advantages(singles, 1, estimator=estimator, std_ddof=ddof))
  assert np.all(np.isfinite(got))
  if estimator != "batch":  # 'batch' ignores groups, so singletons still see the batch mean
    np.testing.assert_array_equal(got, np.zeros(3))


def test_group_properties():
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=20).astype(np.float32)
  for estimator in ("grpo", "drgrpo", "rloo"):
    adv_BG = np.asarray(group_advantages(rewards, 5, estimator=estimator)).reshape(4, 5)
    np.testing.assert_allclose(adv_BG.sum(axis=1), 0.0, atol=1e-5)  # zero mean within each group
  # rloo = G/(G-1) * (R - mean)
  np.testing.assert_allclose(group_advantages(rewards, 5, estimator="rloo"),
                             5 / 4 * np.asarray(group_advantages(rewards, 5, estimator="drgrpo")), rtol=1e-5, atol=1e-6)
  # GRPO is invariant to a positive affine map of the rewards (eps set to 0 for exactness)
  a = np.asarray(group_advantages(rewards, 5, estimator="grpo", eps=0.0))
  b = np.asarray(group_advantages(3.0 * rewards + 7.0, 5, estimator="grpo", eps=0.0))
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # permuting samples inside a group permutes the advantages
  perm = np.array([2, 0, 4, 1, 3])
  r_BG = rewards.reshape(4, 5)
  c = np.asarray(group_advantages(r_BG[:, perm].reshape(-1), 5, estimator="grpo")).reshape(4, 5)
  np.testing.assert_allclose(c, a.reshape(4, 5)[:, perm], rtol=1e-4, atol=1e-5)


def test_groups_are_contiguous_in_layout():
  # [1, 0 | 1, 1]: group 0 has a signal, group 1 has none; a strided layout would mix them.
  got = np.asarray(group_advantages(np.array([1.0, 0.0, 1.0, 1.0]), 2, estimator="drgrpo"))
  np.testing.assert_allclose(got, [0.5, -0.5, 0.0, 0.0])


def test_jit_matches_eager():
  fn = jax.jit(functools.partial(group_advantages, group_size=3, estimator="grpo"))
  np.testing.assert_allclose(fn(REWARDS), group_advantages(REWARDS, 3, estimator="grpo"), rtol=1e-6)


def test_bad_inputs():
  with pytest.raises(ValueError, match="estimator"):
    group_advantages(REWARDS, 3, estimator="ppo")
  with pytest.raises(ValueError, match="group_size"):
    group_advantages(REWARDS, 4, estimator="grpo")
  with pytest.raises(ValueError, match="group_size"):
    group_advantages(REWARDS, 0, estimator="grpo")
  with pytest.raises(ValueError, match="rewards_B"):
    group_advantages(REWARDS.reshape(2, 3), 3, estimator="grpo")
  with pytest.raises(ValueError, match="std_ddof"):
    group_advantages(REWARDS, 3, estimator="grpo", std_ddof=2)
  with pytest.raises(ValueError, match="mask_BT"):
    broadcast_to_tokens(np.ones(2), np.ones((3, 4)))


def test_broadcast_to_tokens_by_hand():
  adv_BT = broadcast_to_tokens(np.array([2.0, -1.0, 5.0]), np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=bool))
  np.testing.assert_array_equal(adv_BT, [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  assert adv_BT.dtype == np.float32
