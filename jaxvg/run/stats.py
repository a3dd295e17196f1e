r"""Accuracy over seeds x prompts with its uncertainty: intervals, paired comparisons, and the power to see a gain.

Scores are shaped seeds x prompts (`x_SP`, 0/1 or fractional): row s holds one training seed's per-prompt scores,
column p the same held-out prompt under every seed and, in a comparison, under both methods. B counts bootstrap
replicates.

Intervals come from a crossed ("pigeonhole", Owen 2007) percentile bootstrap. Each replicate draws S seeds and,
independently, P prompts with replacement, and takes the mean of the rows and columns drawn, x[i_S][:, j_P]. Every
seed gets the same prompts because a prompt's difficulty is shared by all seeds; resampling prompts per seed would
miss that correlation and give too narrow an interval. A comparison resamples the difference a_SP - b_SP, so both
methods get the same indices (paired). The interval is the (1 - level) / 2 and (1 + level) / 2 quantiles of the
replicates' means.

A bootstrap rather than a normal interval: accuracies near 0 or 1 give skewed, bounded intervals, and one resampling
serves the mean, the difference and the power. It errs on the safe side. Its variance is var0(seed means) / S +
var0(prompt means) / P + mean(e^2) / (S P), e the doubly centered residual, which counts the seed x prompt noise in
all three terms (Owen 2007): with 3 seeds, when that noise is all there is, the SE and so the MDD come out up to 1.5
times too large. In simulations of 0/1 scores with 3 seeds and 60-500 prompts, the 95 % intervals held the true mean
99 % of the time when the seed x prompt noise dominated, and 94-97 % when the seeds' own spread did (three seeds leave
that spread uncertain, which the extra noise offsets). With one seed the interval covers the sampling of prompts only.

Minimum detectable difference (MDD): (z_{1 - alpha / 2} + z_{power}) x SE, where SE is the bootstrap standard
deviation of the paired mean difference. That is the smallest true difference that the two-sided test at level alpha
detects with probability `power` under a normal approximation.
"""

import dataclasses
import math
import statistics

import numpy as np

N_BOOT = 4000


@dataclasses.dataclass(frozen=True)
class Interval:
  mean: float
  lo: float
  hi: float


@dataclasses.dataclass(frozen=True)
class Difference:
  """Method minus baseline on the same seeds and prompts."""

  mean: float
  lo: float
  hi: float
  se: float         # the bootstrap standard deviation of the mean difference
  sd_prompt: float  # per-prompt paired SD: of the prompts' seed-averaged differences (ddof 1; 0 for one prompt)
  verdict: str      # "better" (lo > 0), "worse" (hi < 0) or "no difference detected"


def _scores(x_SP, name: str = "scores") -> np.ndarray:
  x_SP = np.asarray(x_SP, np.float64)
  if x_SP.ndim != 2 or 0 in x_SP.shape:
    raise ValueError(f"{name} must be a non-empty seeds x prompts array, got shape {x_SP.shape}")
  if not np.isfinite(x_SP).all():
    raise ValueError(f"{name} holds non-finite values")
  return x_SP


def _counts(idx_BN: np.ndarray, n: int) -> np.ndarray:
  """counts_BN[b, k]: how many times row b of idx_BN drew k."""
  B = idx_BN.shape[0]
  flat = (idx_BN + n * np.arange(B)[:, None]).ravel()
  return np.bincount(flat, minlength=B * n).reshape(B, n).astype(np.float64)


def bootstrap_means(x_SP, *, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
  """means_B of `n_boot` crossed resamples of x_SP (the module docstring).

  Replicate b takes seeds i_BS[b] and prompts j_BP[b], drawn in that order from `np.random.default_rng(seed)` as
  `integers(S, size=(n_boot, S))` then `integers(P, size=(n_boot, P))`. The mean of x[i][:, j] is
  sum_sp w_s x_sp v_p / (S P), with w_s and v_p the times seed s and prompt p were drawn.
  """
  x_SP = _scores(x_SP)
  if n_boot < 2:
    raise ValueError(f"n_boot must be >= 2, got {n_boot}")
  S, P = x_SP.shape
  rng = np.random.default_rng(seed)
  w_BS = _counts(rng.integers(S, size=(n_boot, S)), S)
  v_BP = _counts(rng.integers(P, size=(n_boot, P)), P)
  return np.einsum("BS,SP,BP->B", w_BS, x_SP, v_BP) / (S * P)


def _quantiles(means_B: np.ndarray, level: float) -> tuple[float, float]:
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")
  lo, hi = np.quantile(means_B, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  return float(lo), float(hi)


def mean_ci(scores_SP, *, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
  """The mean over seeds and prompts, with its `level` crossed-bootstrap percentile interval."""
  x_SP = _scores(scores_SP)
  lo, hi = _quantiles(bootstrap_means(x_SP, n_boot=n_boot, seed=seed), level)
  return Interval(float(x_SP.mean()), lo, hi)


def paired_difference(a_SP, b_SP, *, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> Difference:
  """a - b (a method minus its baseline, on the same seeds and prompts), its paired-bootstrap interval and verdict."""
  a_SP, b_SP = _scores(a_SP, "a_SP"), _scores(b_SP, "b_SP")
  if a_SP.shape != b_SP.shape:
    raise ValueError(f"paired scores need the same seeds x prompts, got {a_SP.shape} and {b_SP.shape}")
  d_SP = a_SP - b_SP
  means_B = bootstrap_means(d_SP, n_boot=n_boot, seed=seed)
  lo, hi = _quantiles(means_B, level)
  d_P = d_SP.mean(axis=0)
  verdict = "better" if lo > 0 else "worse" if hi < 0 else "no difference detected"
  return Difference(float(d_SP.mean()), lo, hi, float(means_B.std(ddof=1)),
                    float(d_P.std(ddof=1)) if d_P.size > 1 else 0.0, verdict)


def z_sum(alpha: float = 0.05, power: float = 0.8) -> float:
  """z_{1 - alpha / 2} + z_{power}: 1.960 + 0.842 = 2.802 at the defaults."""
  if not (0.0 < alpha < 1.0 and 0.0 < power < 1.0):
    raise ValueError(f"alpha and power must be in (0, 1), got {alpha} and {power}")
  z = statistics.NormalDist().inv_cdf
  return z(1.0 - alpha / 2.0) + z(power)


def minimum_detectable_difference(a_SP, b_SP, *, alpha: float = 0.05, power: float = 0.8, n_boot: int = N_BOOT,
                                  seed: int = 0) -> float:
  """The smallest true a - b that this paired design detects with `power` at level `alpha`: z_sum x bootstrap SE."""
  return z_sum(alpha, power) * paired_difference(a_SP, b_SP, n_boot=n_boot, seed=seed).se


def required_prompts(sd_diff: float, mdd: float = 0.05, *, alpha: float = 0.05, power: float = 0.8) -> int:
  """Prompts for a target MDD: ceil((z_sum x sd_diff / mdd)^2), given the per-prompt paired SD (`Difference.sd_prompt`).

  It plans the prompt side only: the spread between the seeds' means adds to the SE and falls only with more seeds.
  """
  if mdd <= 0 or sd_diff < 0:
    raise ValueError(f"need mdd > 0 and sd_diff >= 0, got {mdd} and {sd_diff}")
  return max(1, math.ceil((z_sum(alpha, power) * sd_diff / mdd)**2))
