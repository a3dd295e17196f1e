"""Seeds x prompts statistics: the crossed bootstrap against explicit resampling and its exact variance, intervals,
paired verdicts, the minimum detectable difference and the prompts a target needs."""

import math

import numpy as np
import pytest

from jaxvg.run import stats

Z_975, Z_80 = 1.959964, 0.841621  # standard normal table: z_{0.975} and z_{0.8}


def test_bootstrap_means_is_the_mean_of_explicitly_resampled_rows_and_columns():
  x_SP = np.random.default_rng(1).integers(0, 2, size=(3, 7)).astype(float)
  got_B = stats.bootstrap_means(x_SP, n_boot=50, seed=3)
  # The documented draws, then a plain loop: x[i][:, j] for the seeds i and the prompts j of each replicate.
  rng = np.random.default_rng(3)
  i_BS, j_BP = rng.integers(3, size=(50, 3)), rng.integers(7, size=(50, 7))
  ref = []
  for b in range(50):
    total = 0.0
    for s in i_BS[b]:
      for p in j_BP[b]:
        total += x_SP[s, p]
    ref.append(total / (3 * 7))
  assert got_B == pytest.approx(ref, abs=1e-12)


def test_bootstrap_variance_is_the_crossed_formula():
  # Resampling S seeds and P prompts independently has variance var0(row means) / S + var0(column means) / P
  # + mean(e^2) / (S P), e the doubly centered residual (from Var(w' X v) with multinomial counts w and v).
  x_SP = np.random.default_rng(2).normal(size=(4, 30)) + np.arange(4)[:, None] * 0.5 + np.linspace(0, 2, 30)
  S, P = x_SP.shape
  r_S, c_P = x_SP.mean(1), x_SP.mean(0)
  e_SP = x_SP - r_S[:, None] - c_P[None, :] + x_SP.mean()
  exact = np.var(r_S) / S + np.var(c_P) / P + np.mean(e_SP**2) / (S * P)
  got = stats.bootstrap_means(x_SP, n_boot=40_000, seed=0).var()
  assert got == pytest.approx(exact, rel=0.04)


def test_mean_ci_of_one_seed_is_the_normal_interval_for_many_prompts():
  x_SP = (np.random.default_rng(4).random((1, 2000)) < 0.3).astype(float)
  ci = stats.mean_ci(x_SP)
  half = Z_975 * x_SP.std() / math.sqrt(2000)  # ~ 0.020
  assert ci.mean == pytest.approx(x_SP.mean())
  assert ci.lo == pytest.approx(ci.mean - half, abs=0.002) and ci.hi == pytest.approx(ci.mean + half, abs=0.002)


@pytest.mark.parametrize("seed_sd", [0.0, 0.08])
def test_mean_ci_covers_the_population_mean(seed_sd):
  # Prompts of varied difficulty (Beta(2, 3): mean 0.4), each seed shifted by N(0, seed_sd), scored 0/1 under 3
  # seeds: the 95 % interval should hold 0.4 at least about 95 % of the time (300 data sets: binomial sd 1.3 %).
  rng = np.random.default_rng(5)
  hits = 0
  for k in range(300):
    p_SP = rng.beta(2.0, 3.0, size=60) + rng.normal(0.0, seed_sd, size=(3, 1))
    x_SP = (rng.random((3, 60)) < p_SP).astype(float)
    ci = stats.mean_ci(x_SP, n_boot=1000, seed=k)
    hits += ci.lo <= 0.4 <= ci.hi
  assert hits / 300 >= 0.92


def test_paired_difference_by_hand_and_its_verdicts():
  a_SP = [[1, 0, 1, 1], [0, 1, 1, 1]]
  b_SP = [[0, 0, 1, 0], [0, 1, 0, 1]]
  d = stats.paired_difference(a_SP, b_SP)
  # d = [[1, 0, 0, 1], [0, 0, 1, 0]]: mean 3 / 8; per prompt (seed-averaged) [.5, 0, .5, .5]: deviations from .375
  # are .125, -.375, .125, .125 -> sum of squares .1875 / 3 = .0625 -> sd .25
  assert d.mean == pytest.approx(0.375) and d.sd_prompt == pytest.approx(0.25)
  assert d.lo <= d.mean <= d.hi and d.se > 0
  # Identical scores: every replicate's difference is 0, a zero-width interval at 0, no difference detected.
  same = stats.paired_difference(a_SP, a_SP)
  assert (same.mean, same.lo, same.hi, same.se, same.verdict) == (0.0, 0.0, 0.0, 0.0, "no difference detected")
  # A clear shift: a scores 1 where b scores 0 on most prompts.
  rng = np.random.default_rng(6)
  base_SP = (rng.random((3, 200)) < 0.3).astype(float)
  up_SP = np.maximum(base_SP, rng.random((3, 200)) < 0.5)
  up = stats.paired_difference(up_SP, base_SP)
  assert up.verdict == "better" and 0 < up.lo <= up.mean <= up.hi
  down = stats.paired_difference(base_SP, up_SP)  # the same draws: the interval mirrored
  assert down.verdict == "worse" and (down.lo, down.hi) == pytest.approx((-up.hi, -up.lo))
  # A constant difference of 0.5 (fractional scores, e.g. avg@k): every replicate gives 0.5.
  half = stats.paired_difference(np.full((2, 5), 0.75), np.full((2, 5), 0.25))
  assert (half.mean, half.lo, half.hi, half.verdict) == (0.5, 0.5, 0.5, "better")


def test_paired_difference_resamples_the_same_indices_for_both_sides():
  # The paired interval is the bootstrap of the differences; resampling each side on its own would be much wider here,
  # where the prompts' difficulty (shared by both methods) dominates.
  rng = np.random.default_rng(7)
  easy_P = rng.random(300) < 0.5
  b_SP = np.tile(easy_P, (2, 1)).astype(float)
  a_SP = b_SP.copy()
  a_SP[:, :15] = 1.0 - a_SP[:, :15]  # a few prompts flip
  d = stats.paired_difference(a_SP, b_SP, n_boot=2000, seed=1)
  means_B = stats.bootstrap_means(a_SP - b_SP, n_boot=2000, seed=1)
  assert (d.lo, d.hi) == pytest.approx(tuple(np.quantile(means_B, [0.025, 0.975])))
  unpaired_se = math.hypot(stats.bootstrap_means(a_SP, n_boot=2000, seed=2).std(),
                           stats.bootstrap_means(b_SP, n_boot=2000, seed=3).std())
  assert d.se < unpaired_se / 3


def test_inputs_are_checked():
  with pytest.raises(ValueError, match="same seeds x prompts"):
    stats.paired_difference(np.zeros((2, 3)), np.zeros((3, 3)))
  with pytest.raises(ValueError, match="seeds x prompts array"):
    stats.mean_ci(np.zeros(4))
  with pytest.raises(ValueError, match="non-finite"):
    stats.mean_ci([[0.0, float("nan")]])
  with pytest.raises(ValueError, match="level"):
    stats.mean_ci([[0.0, 1.0]], level=1.0)


def test_minimum_detectable_difference():
  assert stats.z_sum() == pytest.approx(Z_975 + Z_80, abs=1e-5)
  rng = np.random.default_rng(8)
  a_SP, b_SP = (rng.random((1, 3200)) < 0.5).astype(float), (rng.random((1, 3200)) < 0.4).astype(float)
  # One seed: the bootstrap SE of the mean difference is sd0(d) / sqrt(P).
  mdd = stats.minimum_detectable_difference(a_SP, b_SP)
  assert mdd == pytest.approx((Z_975 + Z_80) * (a_SP - b_SP).std() / math.sqrt(3200), rel=0.05)
  # 16 times the prompts: a quarter of the MDD.
  small = stats.minimum_detectable_difference(a_SP[:, :200], b_SP[:, :200])
  assert small == pytest.approx(4 * mdd, rel=0.2) and small > 3 * mdd
  # A stricter test or more power needs a larger difference.
  assert stats.minimum_detectable_difference(a_SP, b_SP, alpha=0.01) > mdd
  assert stats.minimum_detectable_difference(a_SP, b_SP, power=0.9) > mdd


def test_required_prompts_by_hand():
  # (2.801585 x 0.5 / 0.05)^2 = 28.01585^2 = 784.9 -> 785; (2.801585 x 0.3 / 0.05)^2 = 16.8095^2 = 282.6 -> 283
  assert stats.required_prompts(0.5, 0.05) == 785
  assert stats.required_prompts(0.3) == 283
  assert stats.required_prompts(0.0) == 1
  with pytest.raises(ValueError, match="mdd > 0"):
    stats.required_prompts(0.5, 0.0)


def test_reproducible_with_a_seed():
  x_SP = np.random.default_rng(9).integers(0, 2, size=(3, 40)).astype(float)
  y_SP = np.random.default_rng(10).integers(0, 2, size=(3, 40)).astype(float)
  assert stats.mean_ci(x_SP, seed=4) == stats.mean_ci(x_SP, seed=4)
  assert stats.paired_difference(x_SP, y_SP, seed=4) == stats.paired_difference(x_SP, y_SP, seed=4)
  assert not np.array_equal(stats.bootstrap_means(x_SP, seed=4), stats.bootstrap_means(x_SP, seed=5))
