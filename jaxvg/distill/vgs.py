"""Decomposed on-policy distillation with Visual Gradient Steering and Language Preservation (methods.md 5 and 8).

On a student rollout tau ~ p_S(.|I, x), with text-only contexts x built by dropping the image (`no_image`), all four
sides on the response grid [B, T] (position t predicts response token t):

  l_Std  = KL(p_S(.|I,x) || q_T(.|I,x))                          (Eq. 3-4, reverse KL)
  l_Lang = KL(p_S(.|x)   || q_T(.|x))                            (Eq. 6-7)
  q*     = softmax(log p_S(.|x) + log q_T(.|I,x) - log q_T(.|x))  (Eq. 9-10), a stop-gradient target
  l_Vis  = KL(p_S(.|I,x) || q*)                                  (Eq. 11): gradient only through p_S(.|I,x)
  VDS    = KL(q_T(.|I,x) || q_T(.|x))                            (Eq. 12), teacher side only
  l_LP   = 1[VDS > Q_0.7] l_Lang                                 (Eq. 16), Q_0.7 over all response tokens of the step
  L_VGS-LP = eta * E_tau[ l_Std + gamma l_Vis + lambda l_LP ],   gamma = 2, lambda = 0.01, eta fixed per config

Each E_tau term is (1/|tau|) sum_t (paper, "sequence_mean") or a token mean ("token_mean", TRL).
"""

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxvg.distill import divergences


@dataclasses.dataclass(frozen=True)
class VGSConfig:
  """VGS-LP hyperparameters.

  eta: step-size correction eta_VGS(gamma) (Eq. 15), a fixed constant per model and gamma (paper: 0.41 for
    Qwen3-VL-2B, 0.36 for 4B, at gamma = 2); measure it with `eta_from_gradient_stats` for a new model.
  gamma: weight of l_Vis (2.0). lp_weight: lambda of l_LP (0.01). lp_quantile: the VDS quantile gating LP (0.7).
  adaptive_gamma: App. E: gamma_t = 0 / gamma/2 / gamma for VDS <= Q_low / <= Q_lp / above; gamma_low_quantile: 0.4.
  alpha: RL + distillation mix (Eq. 22), 0.3.
  aggregation: "sequence_mean" (paper, 1/|tau| per trajectory) or "token_mean".
  """
  eta: float
  gamma: float = 2.0
  lp_weight: float = 0.01
  lp_quantile: float = 0.7
  adaptive_gamma: bool = False
  gamma_low_quantile: float = 0.4
  alpha: float = 0.3
  aggregation: str = "sequence_mean"
  chunk_size: int = 128

  def __post_init__(self):
    if self.eta <= 0:
      raise ValueError(f"eta must be positive, got eta={self.eta}")
    for name in ("gamma", "lp_weight"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {name}={getattr(self, name)}")
    if not 0.0 <= self.gamma_low_quantile <= self.lp_quantile <= 1.0:
      raise ValueError(f"need 0 <= gamma_low_quantile <= lp_quantile <= 1, got {self.gamma_low_quantile}, "
                       f"{self.lp_quantile}")
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"alpha must lie in [0, 1], got alpha={self.alpha}")
    if self.aggregation not in divergences.AGGREGATIONS:
      raise ValueError(f"aggregation must be one of {divergences.AGGREGATIONS}, got {self.aggregation!r}")
    if self.chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got chunk_size={self.chunk_size}")


# ----------------------------------------------------------------------------------------------------------------------
# Per-token terms.


def visual_target_logp(
    logits_student_text_V: jax.Array, logits_teacher_image_V: jax.Array, logits_teacher_text_V: jax.Array
) -> jax.Array:
  """log q* = log_softmax(z_T(I,x) + (z_S(x) - z_T(x))), stop-gradient (Eq. 9-10).

  Built from raw logits: the per-token log-normalizers of the three distributions only shift the sum by a constant,
  which the softmax (Z*) removes. When the student's text logits equal the teacher's, q* is exactly q_T(.|I,x).
  """
  shift_V = logits_student_text_V.astype(jnp.float32) - logits_teacher_text_V.astype(jnp.float32)
  return jax.lax.stop_gradient(divergences.log_probs(logits_teacher_image_V.astype(jnp.float32) + shift_V))


def vgs_token_values(
    *,
    student_image: divergences.Logits,
    student_text: divergences.Logits,
    teacher_image: divergences.Logits,
    teacher_text: divergences.Logits,
    chunk_size: int,
) -> dict[str, jax.Array]:
  """Per-token std, lang, vis and vds [B, T] in one chunked pass; teachers are stop-gradient.

  Gradients: std -> student_image; lang -> student_text; vis -> student_image only (q* is a constant); vds -> none.
  """

  def token_fn(logits, _):
    z_si, z_sx, z_ti, z_tx = logits
    logp_si, logp_sx, logq_ti, logq_tx = (divergences.log_probs(z) for z in logits)
    return {
        "std": divergences.kl(logp_si, logq_ti),
        "lang": divergences.kl(logp_sx, logq_tx),
        "vis": divergences.kl(logp_si, visual_target_logp(z_sx, z_ti, z_tx)),
        "vds": divergences.kl(logq_ti, logq_tx),
    }

  sources = (student_image, student_text, teacher_image.frozen(), teacher_text.frozen())
  return divergences.chunked_logits_map(token_fn, sources=sources, chunk_size=chunk_size)


def chunked_vds(
    *, teacher_image: divergences.Logits, teacher_text: divergences.Logits, chunk_size: int
) -> Float[Array, "B T"]:
  """VDS_t = KL(q_T(.|I,x) || q_T(.|x)) [B, T], teacher only, for the step-wide quantiles before the loss passes."""
  return divergences.chunked_kl(teacher_image.frozen(), teacher_text.frozen(), chunk_size=chunk_size)


# ----------------------------------------------------------------------------------------------------------------------
# Step-wide VDS quantiles, the LP gate and adaptive gamma.


def masked_quantile(values_BT: Float[Array, "B T"], mask_BT: Bool[Array, "B T"], q: float) -> jax.Array:
  """The q-quantile of the masked entries, with numpy's default linear interpolation; +inf when nothing is masked in.

  Pass the whole step's values (all micro-batches, all devices) to get the step-wide Q_q.
  """
  if not 0.0 <= q <= 1.0:
    raise ValueError(f"q must lie in [0, 1], got q={q}")
  if values_BT.shape != mask_BT.shape:
    raise ValueError(f"values_BT {values_BT.shape} and mask_BT {mask_BT.shape} must have the same shape")
  sorted_N = jnp.sort(jnp.where(mask_BT, values_BT.astype(jnp.float32), jnp.inf).reshape(-1))
  n = jnp.sum(mask_BT, dtype=jnp.int32)
  pos = q * (jnp.maximum(n, 1) - 1).astype(jnp.float32)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
  v_lo, v_hi = sorted_N[lo], sorted_N[hi]
  return jnp.where(n > 0, v_lo + (pos - lo) * (v_hi - v_lo), jnp.inf)


def vds_thresholds(vds_BT: Float[Array, "B T"], mask_BT: Bool[Array, "B T"], *, config: VGSConfig) -> dict:
  """{"high": Q_lp_quantile, "low": Q_gamma_low_quantile} of the step's response-token VDS."""
  return {"high": masked_quantile(vds_BT, mask_BT, config.lp_quantile),
          "low": masked_quantile(vds_BT, mask_BT, config.gamma_low_quantile)}


def lp_gate(vds_BT: Float[Array, "B T"], mask_BT: Bool[Array, "B T"], threshold: jax.Array) -> jax.Array:
  """1[VDS_t > Q] on response tokens (Eq. 16: strictly above the step-wide quantile)."""
  return mask_BT & (vds_BT > threshold)


def token_gamma(
    vds_BT: Float[Array, "B T"], *, gamma: float, adaptive: bool, threshold_low: jax.Array | None,
    threshold_high: jax.Array | None
) -> jax.Array:
  """gamma_t: the constant gamma, or App. E's bins: 0 if VDS <= Q_0.4, gamma/2 if VDS <= Q_0.7, else gamma."""
  if not adaptive:
    return jnp.full(vds_BT.shape, gamma, jnp.float32)
  if threshold_low is None or threshold_high is None:
    raise ValueError("adaptive gamma needs both threshold_low and threshold_high")
  return jnp.where(vds_BT <= threshold_low, 0.0, jnp.where(vds_BT <= threshold_high, 0.5 * gamma, gamma))


# ----------------------------------------------------------------------------------------------------------------------
# The loss.


def vgs_terms(
    *,
    student_image: divergences.Logits,
    student_text: divergences.Logits,
    teacher_image: divergences.Logits,
    teacher_text: divergences.Logits,
    mask_BT: Bool[Array, "B T"],
    vds_threshold_high: jax.Array,
    vds_threshold_low: jax.Array | None,
    count: jax.Array | None,
    config: VGSConfig,
) -> dict[str, jax.Array]:
  """The aggregated terms: std, vis, vis_steer (sum of gamma_t l_Vis), lang, lp, vds, lp_fraction.

  `count` is the step's normalizer (`divergences.aggregate_count` summed over micro-batches; None: this batch's).
  Differentiate `std` and `vis` separately to calibrate eta.
  """
  values = vgs_token_values(student_image=student_image, student_text=student_text, teacher_image=teacher_image,
                            teacher_text=teacher_text, chunk_size=config.chunk_size)
  vds_BT = values["vds"]
  gate_BT = lp_gate(vds_BT, mask_BT, vds_threshold_high)
  gamma_BT = token_gamma(vds_BT, gamma=config.gamma, adaptive=config.adaptive_gamma,
                         threshold_low=vds_threshold_low, threshold_high=vds_threshold_high)
  per_token = {
      "std": values["std"],
      "vis": values["vis"],
      "vis_steer": gamma_BT * values["vis"],
      "lang": values["lang"],
      "lp": jnp.where(gate_BT, values["lang"], 0.0),
      "vds": vds_BT,
      "lp_fraction": gate_BT.astype(jnp.float32),
  }
  return {name: divergences.masked_aggregate(v_BT, mask_BT, aggregation=config.aggregation, count=count)
          for name, v_BT in per_token.items()}


def vgs_loss(
    *,
    student_image: divergences.Logits,
    student_text: divergences.Logits,
    teacher_image: divergences.Logits,
    teacher_text: divergences.Logits,
    mask_BT: Bool[Array, "B T"],
    vds_threshold_high: jax.Array,
    vds_threshold_low: jax.Array | None,
    count: jax.Array | None,
    config: VGSConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_VGS-LP = eta * aggregate_t[l_Std + gamma_t l_Vis + lambda 1[VDS_t > Q_0.7] l_Lang] (Eq. 17-18).

  vds_threshold_high / _low: the step-wide Q_0.7 / Q_0.4 from `vds_thresholds` (low only for adaptive gamma).

  Returns:
    (loss, metrics): metrics["vgs/<term>"] for every term of `vgs_terms` (stop-gradient) and "vgs/unscaled", the
    objective before eta (Eq. 22 mixes it into RL without eta).
  """
  terms = vgs_terms(student_image=student_image, student_text=student_text, teacher_image=teacher_image,
                    teacher_text=teacher_text, mask_BT=mask_BT, vds_threshold_high=vds_threshold_high,
                    vds_threshold_low=vds_threshold_low, count=count, config=config)
  unscaled = terms["std"] + terms["vis_steer"] + config.lp_weight * terms["lp"]
  metrics = {f"vgs/{name}": jax.lax.stop_gradient(v) for name, v in terms.items()}
  metrics["vgs/unscaled"] = jax.lax.stop_gradient(unscaled)
  return config.eta * unscaled, metrics


def rl_distill_loss(*, grpo_objective: jax.Array, distill_loss: jax.Array, alpha: float) -> jax.Array:
  """Loss to minimize for Eq. 22, J = (1 - alpha) O_GRPO - alpha l_VGS:  alpha * l_VGS - (1 - alpha) * O_GRPO.

  grpo_objective: the clipped GRPO surrogate O_GRPO (an objective, larger is better; no KL term), aggregated per
  trajectory like the distillation term. distill_loss: l_VGS-LP; Eq. 22 writes it without eta, i.e. the `vgs_loss`
  of a config with eta = 1.0.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must lie in [0, 1], got alpha={alpha}")
  return alpha * distill_loss - (1.0 - alpha) * grpo_objective


# ----------------------------------------------------------------------------------------------------------------------
# Calibrating eta from gradients.


def tree_norm(tree) -> jax.Array:
  """Global L2 norm of a pytree of arrays."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def tree_cosine(tree_a, tree_b, eps: float = 1e-12) -> jax.Array:
  """cos(angle) between two pytrees of the same structure, as flat vectors."""
  if jax.tree.structure(tree_a) != jax.tree.structure(tree_b):
    raise ValueError("tree_a and tree_b must have the same structure")
  dot = sum(jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32))
            for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)))
  return dot / jnp.maximum(tree_norm(tree_a) * tree_norm(tree_b), eps)


def tree_angle_degrees(tree_a, tree_b) -> jax.Array:
  """Angle in degrees between two gradient pytrees (the paper's 60-92 degree Lang/Vis analysis)."""
  return jnp.degrees(jnp.arccos(jnp.clip(tree_cosine(tree_a, tree_b), -1.0, 1.0)))


def eta_from_gradient_stats(*, norm_std: float, norm_vis: float, cosine: float, gamma: float) -> float:
  """eta = |g_S| / sqrt(|g_S|^2 + gamma^2 |g_V|^2 + 2 gamma |g_S| |g_V| cos phi)  (= |g_S| / |g_S + gamma g_V|).

  Average |g_Std|, |g_Vis| and their cosine over ~20 steps of standard OPD (methods.md 5.2), then fix eta.
  """
  if norm_std <= 0 or norm_vis < 0 or gamma < 0 or not -1.0 <= cosine <= 1.0:
    raise ValueError(f"need norm_std > 0, norm_vis >= 0, gamma >= 0, -1 <= cosine <= 1; got {norm_std}, {norm_vis},"
                     f" {gamma}, {cosine}")
  denom_sq = norm_std**2 + gamma**2 * norm_vis**2 + 2.0 * gamma * norm_std * norm_vis * cosine
  if denom_sq <= 0:
    raise ValueError(f"g_Std + gamma g_Vis has zero norm (cosine={cosine}, gamma={gamma}); eta is undefined")
  return float(norm_std / denom_sq**0.5)
