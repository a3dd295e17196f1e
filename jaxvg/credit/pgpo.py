"""PGPO token weights: perception-grounded reweighting of a sequence advantage (PGPO Eq. 1, 4-8).

Pipeline for one response o_i with valid tokens t = 1..L (EOS included):

  S_t  = k3 estimate of KL(pi_I || pi_0) at the sampled token          `k3_dependency`
  S~_t = log(1 + S_t)                                                    Eq. 4
  I_t  = (S~_t - min_j S~_j) / (max_j S~_j - min_j S~_j + eps)           Eq. 5
  w_t  = I_t / (tau + eps)                       if I_t < tau            Eq. 6 (suppression)
       = 1 + beta * (I_t - tau) / (1 - tau + eps) if I_t >= tau          Eq. 6 (boosting)
  w~_t = w_t * L / sum_j w_j  (all ones when sum_j w_j <= eps)           Eq. 7
  A~_t = A_i * w~_t                                                      Eq. 8

Weights, scores and advantages are stop-gradient constants. Hyperparameters (tau, beta, eps, threshold_mode,
low_weight_floor, mass_normalize) are static python values.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

THRESHOLD_MODES = ("absolute", "quantile")


def _check_same_2d(**arrays) -> None:
  shapes = {name: jnp.shape(x) for name, x in arrays.items()}
  first_name, first_shape = next(iter(shapes.items()))
  if len(first_shape) != 2:
    raise ValueError(f"{first_name} must be 2-D [B, T], got shape {first_shape}")
  for name, shape in shapes.items():
    if shape != first_shape:
      raise ValueError(f"{name} has shape {shape}, expected {first_shape} (the shape of {first_name})")


def _check_hparams(*, tau: float, beta: float, eps: float, threshold_mode: str, low_weight_floor: float) -> None:
  if threshold_mode not in THRESHOLD_MODES:
    raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
  if not 0.0 <= tau <= 1.0:
    raise ValueError(f"tau must lie in [0, 1], got {tau}")
  if beta < 0.0:
    raise ValueError(f"beta must be >= 0, got {beta}")
  if eps <= 0.0:
    raise ValueError(f"eps must be > 0, got {eps}")
  if not 0.0 <= low_weight_floor <= 1.0:
    raise ValueError(f"low_weight_floor must lie in [0, 1], got {low_weight_floor}")


@dataclasses.dataclass(frozen=True)
class PGPOConfig:
  """PGPO hyperparameters; the defaults are the paper's (tau 0.4, beta 2.0, Eq. 7 on, absolute threshold)."""

  tau: float = 0.4
  beta: float = 2.0
  eps: float = 1e-8
  threshold_mode: str = "absolute"  # "quantile": per-response threshold at sorted index floor(L * tau)
  low_weight_floor: float = 0.0  # suppressed weights are raised to at least this value (author code: 0.1)
  mass_normalize: bool = True  # Eq. 7

  def __post_init__(self):
    _check_hparams(tau=self.tau, beta=self.beta, eps=self.eps, threshold_mode=self.threshold_mode,
                   low_weight_floor=self.low_weight_floor)


def k3_dependency(logp_img_BT: Float[Array, "B T"], logp_txt_BT: Float[Array, "B T"],
                  mask_BT: Bool[Array, "B T"]) -> Float[Array, "B T"]:
  """Sampled-token k3 estimate of KL(pi(.|s_t, I) || pi(.|s_t)) at the generated token (PGPO App. A.1).

  d = clip(log pi_0(x_t) - log pi_I(x_t), -20, 20);  S = clip(exp(d) - d - 1, 0, 10);  S = 0 outside the mask.

  Args:
    logp_img_BT: log-prob of each sampled token with the image visible.
    logp_txt_BT: log-prob of the same token with the image hidden (the counterfactual pass).
    mask_BT: response tokens (EOS included).

  Returns:
    [B, T] float32 stop-gradient scores in [0, 10].

  Example: pi_I = 0.5, pi_0 = 0.25 -> d = log 0.5 = -0.693, S = 0.5 + 0.693 - 1 = 0.193.
  """
  _check_same_2d(logp_img_BT=logp_img_BT, logp_txt_BT=logp_txt_BT, mask_BT=mask_BT)
  d_BT = jnp.clip(jnp.asarray(logp_txt_BT, jnp.float32) - jnp.asarray(logp_img_BT, jnp.float32), -20.0, 20.0)
  score_BT = jnp.clip(jnp.exp(d_BT) - d_BT - 1.0, 0.0, 10.0)
  return jax.lax.stop_gradient(jnp.where(mask_BT, score_BT, 0.0))


def _masked_row_min_max(x_BT: jnp.ndarray, mask_BT: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Min and max over the valid entries of each row, as [B, 1]; 0 for rows with no valid entry."""
  any_B1 = jnp.any(mask_BT, axis=-1, keepdims=True)
  lo_B1 = jnp.min(jnp.where(mask_BT, x_BT, jnp.inf), axis=-1, keepdims=True)
  hi_B1 = jnp.max(jnp.where(mask_BT, x_BT, -jnp.inf), axis=-1, keepdims=True)
  return jnp.where(any_B1, lo_B1, 0.0), jnp.where(any_B1, hi_B1, 0.0)


def _quantile_threshold(norm_BT: jnp.ndarray, mask_BT: jnp.ndarray, tau: float) -> jnp.ndarray:
  """Per-row threshold: the ascending valid score at index floor(L * tau), clipped to L - 1; [B, 1]."""
  length_B1 = jnp.sum(mask_BT, axis=-1, keepdims=True).astype(jnp.int32)
  sorted_BT = jnp.sort(jnp.where(mask_BT, norm_BT, jnp.inf), axis=-1)  # padding sorts last
  index_B1 = jnp.floor(length_B1.astype(jnp.float32) * tau).astype(jnp.int32)
  index_B1 = jnp.clip(index_B1, 0, jnp.maximum(length_B1 - 1, 0))
  thr_B1 = jnp.take_along_axis(sorted_BT, index_B1, axis=-1)
  return jnp.where(length_B1 > 0, thr_B1, 0.0)


def pgpo_weights(score_BT: Float[Array, "B T"], mask_BT: Bool[Array, "B T"], *, tau: float = 0.4, beta: float = 2.0,
                 eps: float = 1e-8, threshold_mode: str = "absolute", low_weight_floor: float = 0.0,
                 mass_normalize: bool = True) -> Float[Array, "B T"]:
  """Per-token PGPO weights from dependency scores (Eq. 4-7), per response over its valid tokens.

  I_t = minmax(log1p(S_t)); w_t = I_t / (thr + eps) below thr, 1 + beta (I_t - thr) / (1 - thr + eps) at or above;
  suppressed weights are raised to `low_weight_floor`; with `mass_normalize`, w~_t = w_t * L / sum_j w_j so the
  weights of a response sum to its length L (all ones when sum_j w_j <= eps, e.g. a constant-score response).

  thr = tau in "absolute" mode. In "quantile" mode thr is the normalized score at index floor(L * tau) of the
  response's ascending sorted scores (clipped to L - 1, so tau = 1 picks the maximum).

  Edge cases (absolute mode, before Eq. 7): tau = 1 gives w_t = I_t (suppression only; the max token gets exactly 1);
  tau = 0 gives w_t = 1 + beta * I_t (boosting only). Padding gets weight 0; an all-padding row is all zeros.

  Args:
    score_BT: non-negative dependency scores (e.g. `k3_dependency`).
    mask_BT: response tokens.

  Returns:
    [B, T] float32 stop-gradient weights.

  Example (tau 0.4, beta 2, L = 4): log1p(S) = [0, 0.2, 0.5, 1.0] -> I = [0, 0.2, 0.5, 1.0]
    -> w = [0, 0.5, 1 + 2 * 0.1 / 0.6, 1 + 2 * 0.6 / 0.6] = [0, 0.5, 1.333, 3] (sum 4.833)
    -> w~ = w * 4 / 4.833 = [0, 0.414, 1.103, 2.483].
  """
  _check_same_2d(score_BT=score_BT, mask_BT=mask_BT)
  _check_hparams(tau=tau, beta=beta, eps=eps, threshold_mode=threshold_mode, low_weight_floor=low_weight_floor)
  mask_BT = jnp.asarray(mask_BT, bool)
  logs_BT = jnp.log1p(jnp.maximum(jnp.asarray(score_BT, jnp.float32), 0.0))
  lo_B1, hi_B1 = _masked_row_min_max(logs_BT, mask_BT)
  norm_BT = jnp.where(mask_BT, (logs_BT - lo_B1) / (hi_B1 - lo_B1 + eps), 0.0)

  if threshold_mode == "absolute":
    thr_B1 = jnp.full((norm_BT.shape[0], 1), tau, jnp.float32)
  else:
    thr_B1 = _quantile_threshold(norm_BT, mask_BT, tau)
  low_BT = norm_BT < thr_B1
  w_BT = jnp.where(low_BT, norm_BT / (thr_B1 + eps), 1.0 + beta * (norm_BT - thr_B1) / (1.0 - thr_B1 + eps))
  if low_weight_floor > 0.0:
    w_BT = jnp.where(low_BT, jnp.maximum(w_BT, low_weight_floor), w_BT)
  w_BT = jnp.where(mask_BT, w_BT, 0.0)

  if mass_normalize:
    length_B1 = jnp.sum(mask_BT, axis=-1, keepdims=True).astype(jnp.float32)
    total_B1 = jnp.sum(w_BT, axis=-1, keepdims=True)
    ok_B1 = total_B1 > eps
    w_BT = jnp.where(ok_B1, w_BT * length_B1 / jnp.where(ok_B1, total_B1, 1.0), mask_BT.astype(jnp.float32))
  return jax.lax.stop_gradient(w_BT)


def pgpo_advantages(adv_BT: Float[Array, "B T"], weights_BT: Float[Array, "B T"]) -> Float[Array, "B T"]:
  """Eq. 8: A~_{i,t} = A_{i,t} * w~_t. A [B] sequence advantage is broadcast over T first.

  The weights are treated as constants (stop-gradient); padding keeps weight 0, so padded advantages are 0.
  """
  adv_BT = jnp.asarray(adv_BT, jnp.float32)
  if adv_BT.ndim == 1:
    adv_BT = adv_BT[:, None]
  if adv_BT.ndim != 2 or adv_BT.shape[0] != jnp.shape(weights_BT)[0]:
    raise ValueError(f"adv_BT has shape {adv_BT.shape}, incompatible with weights_BT {jnp.shape(weights_BT)}")
  return adv_BT * jax.lax.stop_gradient(jnp.asarray(weights_BT, jnp.float32))


def pgpo_token_advantages(adv_B: Float[Array, " B"], logp_img_BT: Float[Array, "B T"], logp_txt_BT: Float[Array, "B T"],
                          mask_BT: Bool[Array, "B T"],
                          cfg: PGPOConfig) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
  """The whole PGPO stage: k3 scores -> weights -> token advantages. Returns (adv_BT, weights_BT)."""
  score_BT = k3_dependency(logp_img_BT, logp_txt_BT, mask_BT)
  weights_BT = pgpo_weights(score_BT, mask_BT, tau=cfg.tau, beta=cfg.beta, eps=cfg.eps,
                            threshold_mode=cfg.threshold_mode, low_weight_floor=cfg.low_weight_floor,
                            mass_normalize=cfg.mass_normalize)
  return pgpo_advantages(adv_B, weights_BT), weights_BT
