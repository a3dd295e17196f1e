"""Group advantages from scalar rewards: GRPO, Dr.GRPO, RLOO and whole-batch normalization.

Rewards arrive flattened as [B*G] with the G samples of one prompt contiguous (sample g of prompt b at b*G + g).
Every function here is pure and jittable; `group_size`, `estimator`, `eps` and `std_ddof` are static python values.
Downstream code consumes token-level advantages [B, T]: `broadcast_to_tokens` turns a sequence advantage into one.
"""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

ESTIMATORS = ("grpo", "drgrpo", "rloo", "batch")


def _check_rewards(rewards_B: ArrayLike, group_size: int) -> jnp.ndarray:
  rewards_B = jnp.asarray(rewards_B, dtype=jnp.float32)
  if rewards_B.ndim != 1:
    raise ValueError(f"rewards_B must be 1-D [B*G], got shape {rewards_B.shape}")
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
    raise ValueError(f"group_size must be a positive int, got {group_size!r}")
  if rewards_B.shape[0] % group_size != 0:
    raise ValueError(f"rewards_B has {rewards_B.shape[0]} entries, not a multiple of group_size={group_size}")
  return rewards_B


def _centered(rewards_BG: jnp.ndarray) -> jnp.ndarray:
  """R - mean(R) along the last axis, exactly 0 for a constant row.

  In float32 the mean of G equal values can miss them by an ulp (five 0.9s: 6e-8), and with eps = 1e-6 that
  rounding would become a spurious GRPO advantage of about 0.06; a constant row carries no signal, so it is zeroed.
  """
  centered_BG = rewards_BG - jnp.mean(rewards_BG, axis=-1, keepdims=True)
  constant_B1 = jnp.max(rewards_BG, axis=-1, keepdims=True) == jnp.min(rewards_BG, axis=-1, keepdims=True)
  return jnp.where(constant_B1, 0.0, centered_BG)


def _normalized(rewards_BG: jnp.ndarray, *, eps: float, ddof: int) -> jnp.ndarray:
  """(R - mean) / (std + eps) along the last axis; the variance divisor is max(n - ddof, 1)."""
  centered_BG = _centered(rewards_BG)
  n = rewards_BG.shape[-1]
  std_B1 = jnp.sqrt(jnp.sum(jnp.square(centered_BG), axis=-1, keepdims=True) / max(n - ddof, 1))
  return centered_BG / (std_B1 + eps)


def grpo_advantages(rewards_BG: jnp.ndarray, *, eps: float, std_ddof: int) -> jnp.ndarray:
  """GRPO: A_i = (R_i - mean_k R_k) / (std_k R_k + eps), per group (row)."""
  return _normalized(rewards_BG, eps=eps, ddof=std_ddof)


def drgrpo_advantages(rewards_BG: jnp.ndarray) -> jnp.ndarray:
  """Dr.GRPO: A_i = R_i - mean_k R_k (no division by the std)."""
  return _centered(rewards_BG)


def rloo_advantages(rewards_BG: jnp.ndarray) -> jnp.ndarray:
  """RLOO: A_i = R_i - (sum_k R_k - R_i) / (G - 1), the mean of the other samples as baseline; 0 when G = 1.

  Computed as the equal form A_i = G / (G - 1) * (R_i - mean_k R_k).
  """
  group_size = rewards_BG.shape[-1]
  if group_size == 1:
    return jnp.zeros_like(rewards_BG)
  return group_size / (group_size - 1) * _centered(rewards_BG)


def batch_advantages(rewards_B: jnp.ndarray, *, eps: float, std_ddof: int) -> jnp.ndarray:
  """Whole-batch normalization: A_i = (R_i - mean_batch R) / (std_batch R + eps), ignoring the groups."""
  return _normalized(rewards_B[None, :], eps=eps, ddof=std_ddof)[0]


def group_advantages(
    rewards_B: Float[ArrayLike, "B"],
    group_size: int,
    *,
    estimator: str,
    eps: float = 1e-6,
    std_ddof: int = 1,
) -> Float[Array, "B"]:
  """Sequence advantages from scalar rewards laid out as [B*G], samples of one prompt contiguous.

  Estimators (R = rewards of one group of G samples, i indexes the group):
    'grpo':   A_i = (R_i - mean(R)) / (std(R) + eps)
    'drgrpo': A_i = R_i - mean(R)
    'rloo':   A_i = R_i - (sum(R) - R_i) / (G - 1)                  (0 when G = 1)
    'batch':  A_i = (R_i - mean(R_all)) / (std(R_all) + eps)        (over the whole [B*G] batch, no groups)

  The std uses `std_ddof` degrees of freedom: the default ddof=1 (unbiased) matches EasyR1/verl, whose GRPO
  advantage calls torch.std; methods.md specifies only eps = 1e-6. ddof=0 gives the population std. The variance
  divisor is max(n - ddof, 1), and a constant group (zero variance, or a group of one sample) gets exactly 0,
  never NaN and never float32 rounding noise amplified by 1/eps. (verl instead gives a lone sample A = R; a lone
  sample carries no relative signal, so jaxvg gives it 0.)

  Worked example, group_size=3, rewards [1, 0, 0 | 1, 1, 1]:
    group 0: mean 1/3, deviations [2/3, -1/3, -1/3], unbiased std sqrt((4/9 + 1/9 + 1/9) / 2) = 1/sqrt(3)
      grpo   -> [2/sqrt(3), -1/sqrt(3), -1/sqrt(3)] (up to eps)
      drgrpo -> [2/3, -1/3, -1/3]
      rloo   -> [1 - 0, 0 - 1/2, 0 - 1/2] = [1, -1/2, -1/2]
    group 1: zero variance -> [0, 0, 0] for every estimator.

  Args:
    rewards_B: [B*G] float rewards.
    group_size: G, a python int dividing the number of rewards.
    estimator: one of 'grpo', 'drgrpo', 'rloo', 'batch'.
    eps: added to the std ('grpo', 'batch').
    std_ddof: degrees of freedom of the std ('grpo', 'batch'); 1 = unbiased (EasyR1), 0 = population.

  Returns:
    [B*G] float32 advantages, same layout as the rewards.
  """
  rewards_B = _check_rewards(rewards_B, group_size)
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
  if eps < 0:
    raise ValueError(f"eps must be >= 0, got {eps}")
  if std_ddof not in (0, 1):
    raise ValueError(f"std_ddof must be 0 or 1, got {std_ddof!r}")
  if estimator == "batch":
    return batch_advantages(rewards_B, eps=eps, std_ddof=std_ddof)
  rewards_BG = rewards_B.reshape(-1, group_size)
  if estimator == "grpo":
    adv_BG = grpo_advantages(rewards_BG, eps=eps, std_ddof=std_ddof)
  elif estimator == "drgrpo":
    adv_BG = drgrpo_advantages(rewards_BG)
  else:
    adv_BG = rloo_advantages(rewards_BG)
  return adv_BG.reshape(-1)


def broadcast_to_tokens(adv_B: Float[ArrayLike, "B"], mask_BT: ArrayLike) -> Float[Array, "B T"]:
  """Give every response token of sequence b the sequence advantage: adv_BT[b, t] = adv_B[b] * mask_BT[b, t].

  Example: adv_B = [2, -1], mask_BT = [[1, 1, 0], [1, 0, 0]] -> [[2, 2, 0], [-1, 0, 0]].

  Args:
    adv_B: [B] sequence advantages (B = prompts x samples, flattened).
    mask_BT: [B, T] bool or {0, 1} response mask.

  Returns:
    [B, T] float32 token advantages, zero outside the mask.
  """
  adv_B = jnp.asarray(adv_B, dtype=jnp.float32)
  mask_BT = jnp.asarray(mask_BT)
  if adv_B.ndim != 1:
    raise ValueError(f"adv_B must be 1-D, got shape {adv_B.shape}")
  if mask_BT.ndim != 2 or mask_BT.shape[0] != adv_B.shape[0]:
    raise ValueError(f"mask_BT must be [B, T] with B = {adv_B.shape[0]}, got shape {mask_BT.shape}")
  return adv_B[:, None] * mask_BT.astype(jnp.float32)
