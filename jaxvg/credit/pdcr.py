"""PACR / PDCR step advantages from answer-forcing confidences (PDCR Eq. 4-14, methods.md sections 3 and 8).

For rollout i with K_i steps and confidences c_0..c_K (c_0 before any step, see `steps.answer_confidences`):

  g_k = c_k - c_{k-1}                                   confidence gain of step k (k = 1..K)
  G_k = sum_{m=k}^{K} gamma^{m-k} g_m                   return of step k
  V_k = sum_{t in step k} log pi(o_t | I) - log pi(o_t | I_white)       visual dependence (option: per-token mean)
  PDCR: Otsu on V over all valid steps of the batch -> visual / textual clusters;
        A_P = (G - min_cluster G) / (max_cluster G - min_cluster G + eps), 0 for a degenerate cluster
  PACR: the same min-max with one global cluster and no V
  A_total,k = lambda_O * A_O + lambda_P * A_P,k         given to every token of step k

Everything here is a stop-gradient constant. Steps are stored in C static slots (C = max_steps): slot k - 1 holds
step k, so c_BK1 has C + 1 columns. Statistics are batch-global; under jit on a sharded mesh XLA reduces across
devices (see `clusters`).
"""

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxvg.credit import clusters
from jaxvg.credit.steps import StepSegments

STEP_SCORES = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class PDCRConfig:
  """PACR / PDCR hyperparameters (methods.md section 8 defaults)."""

  gamma: float = 1.0
  lambda_o: float = 1.0
  lambda_p: float = 0.5
  step_score: str = "sum"  # V_k as the sum over the step's tokens, or "mean" per token
  eps: float = 1e-8

  def __post_init__(self):
    if not 0.0 <= self.gamma <= 1.0:
      raise ValueError(f"gamma must lie in [0, 1], got {self.gamma}")
    if self.step_score not in STEP_SCORES:
      raise ValueError(f"step_score must be one of {STEP_SCORES}, got {self.step_score!r}")
    if self.eps <= 0.0:
      raise ValueError(f"eps must be > 0, got {self.eps}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepAdvantages:
  adv_BT: jax.Array  # float32 [B, T]: A_total of each token's step; 0 on padding
  step_adv_BC: jax.Array  # float32 [B, C]: A_total,k; 0 past K_b
  process_adv_BC: jax.Array  # float32 [B, C]: A_P,k in [0, 1]
  returns_BC: jax.Array  # float32 [B, C]: G_k
  gains_BC: jax.Array  # float32 [B, C]: g_k
  visual_BC: jax.Array  # float32 [B, C]: V_k (0 for PACR)
  cluster_BC: jax.Array  # int32 [B, C]: 1 visual, 0 textual (PACR: all 0), -1 past K_b
  threshold: jax.Array  # float32 []: Otsu c* (0 for PACR)


def step_mask(num_steps_B: Int[Array, " B"], num_slots: int) -> Bool[Array, "B C"]:
  """[B, C] True for the K_b used step slots of each rollout."""
  return jnp.arange(num_slots)[None, :] < jnp.asarray(num_steps_B)[:, None]


def confidence_gains(c_BK1: Float[Array, "B K1"], num_steps_B: Int[Array, " B"]) -> Float[Array, "B C"]:
  """g_k = c_k - c_{k-1} for k = 1..K_b, in slot k - 1; 0 past K_b (whatever c holds there).

  Example: c = [-3, -2, -2.5, -1], K = 3 -> g = [1, -0.5, 1.5].
  """
  c_BK1 = jnp.asarray(c_BK1, jnp.float32)
  if c_BK1.ndim != 2 or c_BK1.shape[1] < 2:
    raise ValueError(f"c_BK1 must be [B, C + 1] with C >= 1, got shape {c_BK1.shape}")
  gains_BC = c_BK1[:, 1:] - c_BK1[:, :-1]
  return jnp.where(step_mask(num_steps_B, gains_BC.shape[1]), gains_BC, 0.0)


def discounted_returns(gains_BC: Float[Array, "B C"], mask_BC: Bool[Array, "B C"], *,
                       gamma: float) -> Float[Array, "B C"]:
  """G_k = sum_{m >= k} gamma^{m-k} g_m over the valid slots of each row (a reverse scan); 0 on masked slots.

  Example (gamma 0.5): g = [1, -0.5, 1.5] -> G_3 = 1.5, G_2 = -0.5 + 0.75 = 0.25, G_1 = 1 + 0.125 = 1.125.
  """
  gains_BC = jnp.where(mask_BC, jnp.asarray(gains_BC, jnp.float32), 0.0)

  def step(carry_B, g_B):
    ret_B = g_B + gamma * carry_B
    return ret_B, ret_B

  _, returns_CB = jax.lax.scan(step, jnp.zeros(gains_BC.shape[0], jnp.float32), gains_BC.T, reverse=True)
  return jnp.where(mask_BC, returns_CB.T, 0.0)


def step_visual_dependence(logp_real_BT: Float[Array, "B T"], logp_white_BT: Float[Array, "B T"],
                           step_ids_BT: Int[Array, "B T"], num_slots: int, *,
                           step_score: str = "sum") -> Float[Array, "B C"]:
  """V_k = sum_{t in step k} (log pi(o_t | I) - log pi(o_t | I_white)) (PDCR Eq. 7); "mean" divides by the step length.

  Tokens with step id -1 (padding) are ignored; empty slots get 0.
  """
  if step_score not in STEP_SCORES:
    raise ValueError(f"step_score must be one of {STEP_SCORES}, got {step_score!r}")
  if jnp.shape(logp_real_BT) != jnp.shape(logp_white_BT) or jnp.shape(logp_real_BT) != jnp.shape(step_ids_BT):
    raise ValueError(f"logp_real_BT {jnp.shape(logp_real_BT)}, logp_white_BT {jnp.shape(logp_white_BT)} and "
                     f"step_ids_BT {jnp.shape(step_ids_BT)} must have equal shapes")
  step_ids_BT = jnp.asarray(step_ids_BT, jnp.int32)
  valid_BT = step_ids_BT >= 0
  diff_BT = jnp.where(valid_BT, jnp.asarray(logp_real_BT, jnp.float32) - jnp.asarray(logp_white_BT, jnp.float32), 0.0)
  ids_BT = jnp.where(valid_BT, step_ids_BT, num_slots)  # out of range: dropped by segment_sum
  per_row = jax.vmap(lambda x_T, ids_T: jax.ops.segment_sum(x_T, ids_T, num_segments=num_slots))
  visual_BC = per_row(diff_BT, ids_BT)
  if step_score == "mean":
    visual_BC = visual_BC / jnp.maximum(per_row(valid_BT.astype(jnp.float32), ids_BT), 1.0)
  return visual_BC


def broadcast_to_steps(values_BC: Float[Array, "B C"], step_ids_BT: Int[Array, "B T"]) -> Float[Array, "B T"]:
  """Give every token the value of its step slot; 0 where the step id is -1."""
  step_ids_BT = jnp.asarray(step_ids_BT, jnp.int32)
  gathered_BT = jnp.take_along_axis(values_BC, jnp.maximum(step_ids_BT, 0), axis=1)
  return jnp.where(step_ids_BT >= 0, gathered_BT, 0.0)


def _step_advantages(adv_o_B, c_BK1, segments: StepSegments, visual_BC, cfg: PDCRConfig) -> StepAdvantages:
  num_slots = segments.step_end_BC.shape[1]
  if jnp.shape(c_BK1) != (segments.step_end_BC.shape[0], num_slots + 1):
    raise ValueError(f"c_BK1 has shape {jnp.shape(c_BK1)}, expected (B, C + 1) = "
                     f"{(segments.step_end_BC.shape[0], num_slots + 1)} from the segments")
  if jnp.shape(adv_o_B) != (segments.step_end_BC.shape[0],):
    raise ValueError(f"adv_o_B must be [B] = ({segments.step_end_BC.shape[0]},), got {jnp.shape(adv_o_B)}")
  mask_BC = step_mask(segments.num_steps_B, num_slots)
  gains_BC = confidence_gains(c_BK1, segments.num_steps_B)
  returns_BC = discounted_returns(gains_BC, mask_BC, gamma=cfg.gamma)

  mask_M = mask_BC.reshape(-1)
  if visual_BC is None:  # PACR: one global cluster
    threshold = jnp.zeros((), jnp.float32)
    cluster_M = jnp.where(mask_M, 0, -1).astype(jnp.int32)
    visual_BC = jnp.zeros_like(returns_BC)
  else:
    visual_BC = jnp.where(mask_BC, visual_BC, 0.0)
    threshold, cluster_M = clusters.otsu_threshold(visual_BC.reshape(-1), mask_M)
  process_M = clusters.segment_normalize(returns_BC.reshape(-1), cluster_M, mask_M, 2, mode="minmax", eps=cfg.eps)
  process_BC = process_M.reshape(mask_BC.shape)
  step_adv_BC = cfg.lambda_o * jnp.asarray(adv_o_B, jnp.float32)[:, None] + cfg.lambda_p * process_BC
  step_adv_BC = jnp.where(mask_BC, step_adv_BC, 0.0)
  out = StepAdvantages(adv_BT=broadcast_to_steps(step_adv_BC, segments.step_ids_BT), step_adv_BC=step_adv_BC,
                       process_adv_BC=process_BC, returns_BC=returns_BC, gains_BC=gains_BC, visual_BC=visual_BC,
                       cluster_BC=cluster_M.reshape(mask_BC.shape), threshold=threshold)
  return jax.lax.stop_gradient(out)


def pdcr_advantages(adv_o_B: Float[Array, " B"], c_BK1: Float[Array, "B K1"], segments: StepSegments, *,
                    logp_real_BT: Float[Array, "B T"], logp_white_BT: Float[Array, "B T"],
                    cfg: PDCRConfig) -> StepAdvantages:
  """PDCR: decomposed (per visual / textual cluster) min-max of the step returns, plus the outcome advantage.

  Args:
    adv_o_B: each rollout's outcome (group) advantage A_O.
    c_BK1: confidences c_0..c_C (`steps.answer_confidences`); columns past K_b are ignored.
    segments: the response steps (`steps.segment_steps` with max_steps = C).
    logp_real_BT, logp_white_BT: response-token log-probs with the real image and with a white image.
    cfg: gamma, lambda_o, lambda_p, step_score, eps.

  Returns:
    StepAdvantages; adv_BT goes into the clipped surrogate.

  Example (lambda_O 1, lambda_P 0.5, gamma 1): two rollouts, A_O = [1, -1], returns G = [[2, 1, 1.5], [1, 3]] and
    V = [[5, 0.1, 0.2], [4.5, 0]]. Otsu: visual {5, 4.5} (c* = 4.5), textual {0.1, 0.2, 0}.
    Visual G {2, 1} -> A_P = [1, 0]; textual G {1, 1.5, 3} -> A_P = [0, 0.25, 1].
    A_total = [[1 + 0.5, 1 + 0, 1 + 0.125], [-1 + 0, -1 + 0.5]] = [[1.5, 1, 1.125], [-1, -0.5]].
  """
  visual_BC = step_visual_dependence(logp_real_BT, logp_white_BT, segments.step_ids_BT,
                                     segments.step_end_BC.shape[1], step_score=cfg.step_score)
  return _step_advantages(adv_o_B, c_BK1, segments, visual_BC, cfg)


def pacr_advantages(adv_o_B: Float[Array, " B"], c_BK1: Float[Array, "B K1"], segments: StepSegments, *,
                    cfg: PDCRConfig) -> StepAdvantages:
  """PACR: the same with one global min-max cluster over all steps of the batch and no visual score.

  Example (the PDCR one): global G {2, 1, 1.5, 1, 3} -> A_P = (G - 1) / 2 = [[0.5, 0, 0.25], [0, 1]]
    -> A_total = [[1.25, 1, 1.125], [-1, -0.5]].
  """
  return _step_advantages(adv_o_B, c_BK1, segments, None, cfg)
