"""Credit assignment by visual dependency, between the advantages and the update: the glue for each method.

  none   the group advantage on every token (GRPO / DAPO / Dr.GRPO / GSPO).
  pgpo   the counterfactual pass (mask_visual by default) -> k3 token dependency -> threshold-gated,
         mass-conserving token weights -> A_i * w_t (methods.md section 2).

`make_credit_fn` returns `fn(state, minibatch, logp_real_NT, adv_NT) -> (adv_NT, metrics, dependency maps)`. In PGPO
the image-conditioned log-probs are the old-policy scores the step computes anyway, so the dependency costs one
compacted text-only forward.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxvg import pgpo, update
from jaxvg.dependency import COUNTERFACTUALS, DependencyGuard  # noqa: F401  (re-exported for the train script)
from jaxvg.experiment import CreditCfg
from jaxvg.scoring import PromptInputs

METHODS = ("none", "pgpo")


def counterfactuals_needed(cfg: CreditCfg) -> tuple[str, ...]:
  if cfg.method not in METHODS:
    raise ValueError(f"credit.method={cfg.method!r}: choose one of {METHODS}")
  if cfg.counterfactual not in COUNTERFACTUALS:
    raise ValueError(f"credit.counterfactual={cfg.counterfactual!r}: choose one of {COUNTERFACTUALS}")
  return () if cfg.method == "none" else (cfg.counterfactual,)


def as_prompt_inputs(p) -> PromptInputs:
  """The fields of a data-pipeline PromptBatch that a scoring pass reads."""
  return PromptInputs(jnp.asarray(p.input_ids_BT), jnp.asarray(p.attention_mask_BT), jnp.asarray(p.positions_3BT),
                      jnp.asarray(p.next_position_B, jnp.int32), p.vision)


def dependency_metrics(score_NT, mask_NT, has_image_N) -> dict[str, float]:
  """Mean, sparsity and image-prompt mean of a token dependency map (host side)."""
  score, mask = np.asarray(score_NT), np.asarray(mask_NT) > 0
  vals = score[mask]
  img = mask & np.asarray(has_image_N, bool)[:, None]
  return {
      "dependency/mean": float(vals.mean()) if vals.size else 0.0,
      "dependency/frac_above_0.1": float((vals > 0.1).mean()) if vals.size else 0.0,
      "dependency/mean_image_prompts": float(score[img].mean()) if img.any() else 0.0,
  }


def make_credit_fn(cfg: CreditCfg, model_cfg, tokenizer, group_size: int):
  counterfactuals_needed(cfg)
  if cfg.method == "none":
    return lambda state, mb, logp_real, adv_NT: (adv_NT, {}, None)

  score = jax.jit(update.score_fn, static_argnums=(1, 5))
  weight_fn = jax.jit(lambda s, m: pgpo.pgpo_weights(s, m, tau=cfg.tau, beta=cfg.beta,
                                                     threshold_mode=cfg.threshold_mode,
                                                     low_weight_floor=cfg.low_weight_floor,
                                                     mass_normalize=cfg.mass_normalize))

  def pgpo_credit(state, mb, logp_real_NT, adv_NT):
    cf = as_prompt_inputs(mb.prompts.counterfactuals[cfg.counterfactual])
    mask_NT = jnp.asarray(mb.mask_NT)
    logp_cf_NT, _ = score(state.params, state.graphdef, cf, jnp.asarray(mb.tokens_NT), mask_NT, group_size)
    dep_NT = pgpo.k3_dependency(logp_real_NT, logp_cf_NT, mask_NT)
    w_NT = weight_fn(dep_NT, mask_NT > 0)
    has_image_N = np.repeat(np.asarray(mb.prompts.num_images_B) > 0, group_size)
    m = dependency_metrics(dep_NT, mask_NT, has_image_N)
    w = np.asarray(w_NT)[np.asarray(mask_NT) > 0]
    m.update({"pgpo/weight_max": float(w.max()) if w.size else 0.0,
              "pgpo/frac_boosted": float((w > 1.0).mean()) if w.size else 0.0})
    dep = np.asarray(dep_NT)[np.asarray(mask_NT) > 0]
    return pgpo.pgpo_advantages(adv_NT, w_NT), m, {"token_k3": dep}

  return pgpo_credit
