"""Credit assignment by visual dependency, between the advantages and the update: the glue for each method.

  none   the group advantage on every token (GRPO / DAPO / Dr.GRPO / GSPO).
  pgpo   the counterfactual pass (mask_visual by default) -> k3 token dependency -> threshold-gated,
         mass-conserving token weights -> A_i * w_t (methods.md section 2).
  pacr   reasoning steps on the token ids -> the K + 1 answer-forcing confidences c_k from ONE tree-masked pass
         (`confidence`) -> returns G_k = sum_{m >= k} gamma^(m-k) (c_m - c_{m-1}) -> one min-max over all steps of
         the batch -> A_total = lambda_O A_O + lambda_P A_P on every token of step k (methods.md sections 3 and 8).
  pdcr   PACR plus the step visual dependence V_k = sum_{t in step k} log pi(o_t | I) - log pi(o_t | I_white) from
         the counterfactual pass (white_image by default in the PDCR configs), an Otsu split of V over the batch's
         steps, and the min-max inside each cluster.

`make_credit_fn` returns `fn(state, minibatch, logp_real_NT, adv_NT) -> (adv_NT, metrics, dependency maps)`. The
minibatch has `.prompts` (a data PromptBatch), `.tokens_NT` and `.mask_NT`; PACR and PDCR also read `.answers`, the
B ground-truth answers of the prompts (Y_gt of the suffix), and need the prompt format (`fmt=`). PACR / PDCR pool
the steps of what they are given for the Otsu split and the min-max; `make_batch_credit_fn` takes the list of a
rollout batch's micro-batches, so the pools are the whole rollout batch (methods.md section 8).

`adv_NT` carries the outcome (group) advantage A_O on each response token. The image-conditioned log-probs are the
old-policy scores the step computes anyway, so PGPO costs one compacted text-only forward, PACR one tree-masked
forward, PDCR a tree-masked and a white-image one.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvg.core import hosts
from jaxvg.credit import confidence, pdcr, pgpo, steps
from jaxvg.credit.config import CreditCfg
from jaxvg.credit.dependency import COUNTERFACTUALS
from jaxvg.data.prompts import PromptFormat
from jaxvg.data.tokenizer import special_token_ids
from jaxvg.rl import scoring, update
from jaxvg.rl.scoring import PromptInputs

METHODS = ("none", "pgpo", "pacr", "pdcr")
BLANK_TOKENS = ("<|im_end|>", "<|endoftext|>")  # never open a step: "answer\n\n<|im_end|>" keeps EOS in the last one
log = logging.getLogger("jaxvg")


def counterfactuals_needed(cfg: CreditCfg) -> tuple[str, ...]:
  """The counterfactual prompt variants the data pipeline must build for `cfg.method` (validates the config)."""
  if cfg.method not in METHODS:
    raise ValueError(f"credit.method={cfg.method!r}: choose one of {METHODS}")
  if cfg.counterfactual not in COUNTERFACTUALS:
    raise ValueError(f"credit.counterfactual={cfg.counterfactual!r}: choose one of {COUNTERFACTUALS}")
  if cfg.max_steps < 1:
    raise ValueError(f"credit.max_steps={cfg.max_steps}: need at least one step slot")
  return (cfg.counterfactual,) if cfg.method in ("pgpo", "pdcr") else ()


def as_prompt_inputs(p) -> PromptInputs:
  """The fields of a data-pipeline PromptBatch that a scoring pass reads."""
  return PromptInputs(jnp.asarray(p.input_ids_BT), jnp.asarray(p.attention_mask_BT), jnp.asarray(p.positions_3BT),
                      jnp.asarray(p.next_position_B, jnp.int32), p.vision)


def counterfactual_inputs(p, mode: str) -> PromptInputs:
  if mode not in p.counterfactuals:
    raise ValueError(f"the prompt batch has no {mode!r} variant (it has {sorted(p.counterfactuals)}): build the data "
                     f"with counterfactuals=credit.counterfactuals_needed(cfg.credit)")
  return as_prompt_inputs(p.counterfactuals[mode])


def outcome_advantages(adv_NT, mask_NT) -> jax.Array:
  """A_O per row [N]: the mean of the broadcast group advantage over the row's response tokens (0 for empty rows)."""
  mask_NT = jnp.asarray(mask_NT, jnp.float32)
  return jnp.sum(jnp.asarray(adv_NT, jnp.float32) * mask_NT, axis=1) / jnp.maximum(jnp.sum(mask_NT, axis=1), 1.0)


def step_tables(tokenizer, vocab_size: int) -> steps.StepTables:
  """Step tables over the model's vocabulary; ids past the tokenizer decode to "" (blank), EOS ids are blank."""
  n = min(len(tokenizer), vocab_size)
  texts = tokenizer.batch_decode([[i] for i in range(n)]) + [""] * (vocab_size - n)
  special = special_token_ids(tokenizer)
  blank = [special[t] for t in BLANK_TOKENS if t in special and special[t] < vocab_size]
  return steps.build_step_tables(lambda i: texts[i], vocab_size, blank_ids=blank)


def dependency_metrics(score_NT, mask_NT, has_image_N) -> dict[str, float]:
  """Mean, sparsity and image-prompt mean of a token dependency map (host side)."""
  score, mask = hosts.to_numpy(score_NT), hosts.to_numpy(mask_NT) > 0
  vals = score[mask]
  img = mask & np.asarray(has_image_N, bool)[:, None]
  return {
      "dependency/mean": float(vals.mean()) if vals.size else 0.0,
      "dependency/frac_above_0.1": float((vals > 0.1).mean()) if vals.size else 0.0,
      "dependency/mean_image_prompts": float(score[img].mean()) if img.any() else 0.0,
  }


# ------------------------------------------------------------------------------------------------------ PACR / PDCR


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
  """What one micro-batch contributes to the step advantages (computed by the old policy, no gradient)."""

  segments: steps.StepSegments
  c_NK1: jax.Array  # float32 [N, C + 1]: c_0..c_C (0 past K_n)
  logp_real_NT: jax.Array  # float32: response-token log-probs with the real image (0 on padding)
  logp_cf_NT: jax.Array | None  # the same under the counterfactual prompt (PDCR), None for PACR
  adv_o_N: jax.Array  # float32: the outcome advantage A_O of each row


def step_inputs(model, prompt: PromptInputs, counterfactual: PromptInputs | None, tokens_NT, mask_NT, logp_real_NT,
                adv_o_N, suffix: confidence.AnswerSuffix, tables: steps.StepTables, *, group_size: int,
                max_steps: int) -> StepInputs:
  """The model side of PACR (counterfactual None) and PDCR for one micro-batch: steps, and c_0..c_K in one pass.

  Args:
    model: the (old) policy.
    prompt, counterfactual: the real prompts and, for PDCR, the counterfactual ones (white image).
    tokens_NT, mask_NT: the completions; logp_real_NT: their log-probs with the real image (old policy).
    adv_o_N: the outcome advantage A_O of each row (passed through).
    suffix: the answer-forcing suffixes (`confidence.answer_suffixes`).
    tables: the step tables (`step_tables`, as device arrays).
    group_size, max_steps: G and the static step slots C.
  """
  mask_NT = jnp.asarray(mask_NT, bool)
  segments = steps.segment_steps(tokens_NT, mask_NT, **vars(tables), max_steps=max_steps)
  T0 = prompt.input_ids_BT.shape[1]
  boundary_NK1 = steps.confidence_boundaries(jnp.full((tokens_NT.shape[0],), T0, jnp.int32), segments)
  c_NK1 = confidence.tree_confidences(model, prompt, tokens_NT, mask_NT, group_size, boundary_NK1=boundary_NK1,
                                      suffix=suffix)
  logp_cf_NT = None
  if counterfactual is not None:
    logp_cf_NT = jax.lax.stop_gradient(scoring.completion_logps(model, counterfactual, tokens_NT, mask_NT,
                                                                group_size))
  return StepInputs(segments=segments, c_NK1=c_NK1, logp_real_NT=jnp.where(mask_NT, logp_real_NT, 0.0),
                    logp_cf_NT=logp_cf_NT, adv_o_N=jnp.asarray(adv_o_N, jnp.float32))


def concat_step_inputs(parts: list[StepInputs]) -> StepInputs:
  """The micro-batches of a rollout batch as one: rows stacked, completion widths padded (step id -1, log-prob 0)."""
  width = max(p.logp_real_NT.shape[1] for p in parts)
  pad_T = lambda x, value: jnp.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=value)
  rows = lambda xs: jnp.concatenate(xs, axis=0)
  segments = steps.StepSegments(step_ids_BT=rows([pad_T(p.segments.step_ids_BT, -1) for p in parts]),
                                num_steps_B=rows([p.segments.num_steps_B for p in parts]),
                                step_end_BC=rows([p.segments.step_end_BC for p in parts]))
  has_cf = parts[0].logp_cf_NT is not None
  return StepInputs(segments=segments, c_NK1=rows([p.c_NK1 for p in parts]),
                    logp_real_NT=rows([pad_T(p.logp_real_NT, 0.0) for p in parts]),
                    logp_cf_NT=rows([pad_T(p.logp_cf_NT, 0.0) for p in parts]) if has_cf else None,
                    adv_o_N=rows([p.adv_o_N for p in parts]))


def step_advantages(inputs: StepInputs, *, cfg: pdcr.PDCRConfig) -> pdcr.StepAdvantages:
  """PDCR (with a counterfactual pass) or PACR (without) over every step of `inputs`: the Otsu and min-max pools."""
  if inputs.logp_cf_NT is None:
    return pdcr.pacr_advantages(inputs.adv_o_N, inputs.c_NK1, inputs.segments, cfg=cfg)
  return pdcr.pdcr_advantages(inputs.adv_o_N, inputs.c_NK1, inputs.segments, logp_real_BT=inputs.logp_real_NT,
                              logp_white_BT=inputs.logp_cf_NT, cfg=cfg)


def _masked_stats(x) -> tuple[float, float]:
  return (float(x.mean()), float(x.std())) if x.size else (0.0, 0.0)


def step_metrics(method: str, adv: pdcr.StepAdvantages, inputs: StepInputs) -> dict[str, float]:
  """Host-side metrics: steps per response, confidences, and per cluster its size and advantage statistics."""
  adv = hosts.fetch(adv)
  num_N = hosts.to_numpy(inputs.segments.num_steps_B)
  c_NK1 = hosts.to_numpy(inputs.c_NK1)
  C = adv.step_adv_BC.shape[1]
  rows = num_N > 0
  valid_NC = np.arange(C)[None, :] < num_N[:, None]
  m = {
      f"{method}/steps_per_response": float(num_N[rows].mean()) if rows.any() else 0.0,
      f"{method}/frac_step_slots_full": float((num_N[rows] == C).mean()) if rows.any() else 0.0,
      f"{method}/c0_mean": float(c_NK1[rows, 0].mean()) if rows.any() else 0.0,
      f"{method}/c_final_mean": float(c_NK1[rows, num_N[rows]].mean()) if rows.any() else 0.0,
      f"{method}/gain_mean": _masked_stats(adv.gains_BC[valid_NC])[0],
  }
  names = {1: "visual", 0: "textual"} if method == "pdcr" else {0: "all"}
  for label, name in names.items():
    sel_NC = valid_NC & (adv.cluster_BC == label)
    m[f"{method}/{name}_steps"] = float(sel_NC.sum())
    m[f"{method}/{name}_adv_mean"], m[f"{method}/{name}_adv_std"] = _masked_stats(adv.step_adv_BC[sel_NC])
    m[f"{method}/{name}_process_mean"] = _masked_stats(adv.process_adv_BC[sel_NC])[0]
  if method == "pdcr":
    m["pdcr/threshold"] = float(adv.threshold)
    m["pdcr/visual_frac"] = m["pdcr/visual_steps"] / max(float(valid_NC.sum()), 1.0)
    m["pdcr/visual_dependence_mean"] = _masked_stats(adv.visual_BC[valid_NC])[0]
  return m


def _step_inputs_params(params, graphdef, prompt, counterfactual, tokens_NT, mask_NT, logp_real_NT, adv_o_N, suffix,
                        tables, *, group_size, max_steps):
  return step_inputs(nnx.merge(graphdef, params), prompt, counterfactual, tokens_NT, mask_NT, logp_real_NT, adv_o_N,
                     suffix, tables, group_size=group_size, max_steps=max_steps)


def _make_step_batch_fn(cfg: CreditCfg, model_cfg, tokenizer, group_size: int, fmt: PromptFormat):
  if fmt is None:
    raise ValueError(f"credit.method={cfg.method!r} needs the prompt format (fmt=...) to build its answer-forcing "
                     f"suffix")
  if cfg.method == "pdcr" and cfg.counterfactual != "white_image":
    log.warning("credit.method=pdcr with counterfactual=%r: PDCR's visual dependence uses white_image",
                cfg.counterfactual)
  pdcr_cfg = pdcr.PDCRConfig(gamma=cfg.gamma, lambda_o=cfg.lambda_o, lambda_p=cfg.lambda_p,
                             step_score=cfg.step_score)
  tables = jax.tree.map(jnp.asarray, step_tables(tokenizer, model_cfg.text.vocab_size))
  inputs_fn = jax.jit(functools.partial(_step_inputs_params, group_size=group_size, max_steps=cfg.max_steps),
                      static_argnums=(1,))
  advantages_fn = jax.jit(functools.partial(step_advantages, cfg=pdcr_cfg))

  def batch_credit_fn(state, mbs, logps_real, advs):
    parts = []
    for mb, logp_real_NT, adv_NT in zip(mbs, logps_real, advs, strict=True):
      if not hasattr(mb, "answers"):
        raise ValueError(f"credit.method={cfg.method!r} reads mb.answers (the prompts' ground-truth answers)")
      B = np.shape(mb.prompts.input_ids_BT)[0]
      if len(mb.answers) != B:
        raise ValueError(f"mb.answers has {len(mb.answers)} entries for {B} prompts")
      mask_NT = jnp.asarray(mb.mask_NT)
      cf = counterfactual_inputs(mb.prompts, cfg.counterfactual) if cfg.method == "pdcr" else None
      suffix = confidence.answer_suffixes(tokenizer, mb.answers, fmt=fmt, group_size=group_size)
      parts.append(inputs_fn(state.params, state.graphdef, as_prompt_inputs(mb.prompts), cf,
                             jnp.asarray(mb.tokens_NT), mask_NT, jnp.asarray(logp_real_NT),
                             outcome_advantages(adv_NT, mask_NT), suffix, tables))
    inputs = parts[0] if len(parts) == 1 else concat_step_inputs(parts)
    adv = advantages_fn(inputs)
    out, row = [], 0
    for mb in mbs:
      n, width = np.shape(mb.mask_NT)
      out.append(adv.adv_BT[row:row + n, :width] * (jnp.asarray(mb.mask_NT) > 0))
      row += n
    dep = None
    if cfg.method == "pdcr":
      valid_NC = np.arange(cfg.max_steps)[None, :] < hosts.to_numpy(inputs.segments.num_steps_B)[:, None]
      dep = {"step_V": hosts.to_numpy(adv.visual_BC)[valid_NC]}
    return out, step_metrics(cfg.method, adv, inputs), dep

  return batch_credit_fn


# -------------------------------------------------------------------------------------------------------------- PGPO


def _make_pgpo_credit_fn(cfg: CreditCfg, group_size: int):
  score = jax.jit(update.score_fn, static_argnums=(1, 5))
  weight_fn = jax.jit(lambda s, m: pgpo.pgpo_weights(s, m, tau=cfg.tau, beta=cfg.beta,
                                                     threshold_mode=cfg.threshold_mode,
                                                     low_weight_floor=cfg.low_weight_floor,
                                                     mass_normalize=cfg.mass_normalize))

  def pgpo_credit(state, mb, logp_real_NT, adv_NT):
    cf = counterfactual_inputs(mb.prompts, cfg.counterfactual)
    mask_NT = jnp.asarray(mb.mask_NT)
    logp_cf_NT, _ = score(state.params, state.graphdef, cf, jnp.asarray(mb.tokens_NT), mask_NT, group_size)
    dep_NT = pgpo.k3_dependency(logp_real_NT, logp_cf_NT, mask_NT)
    w_NT = weight_fn(dep_NT, mask_NT > 0)
    has_image_N = np.repeat(np.asarray(mb.prompts.num_images_B) > 0, group_size)
    on_NT, dep_host_NT, w_host_NT = hosts.to_numpy(mask_NT) > 0, hosts.to_numpy(dep_NT), hosts.to_numpy(w_NT)
    m = dependency_metrics(dep_host_NT, on_NT, has_image_N)
    w = w_host_NT[on_NT]
    m.update({"pgpo/weight_max": float(w.max()) if w.size else 0.0,
              "pgpo/frac_boosted": float((w > 1.0).mean()) if w.size else 0.0})
    # "rows/..." maps keep the [N, T] layout (zeros past each response) for the sample rollouts' dependency maps.
    rows = {"rows/token_k3": dep_host_NT, "rows/pgpo_weight": np.where(on_NT, w_host_NT, 0.0)}
    dep = dep_host_NT[on_NT]
    return pgpo.pgpo_advantages(adv_NT, w_NT), m, {"token_k3": dep, **rows}

  return pgpo_credit


def make_batch_credit_fn(cfg: CreditCfg, model_cfg, tokenizer, group_size: int, *, fmt: PromptFormat | None = None):
  """The credit function over a whole rollout batch: `fn(state, mbs, logps_real, advs) -> (advs, metrics, maps)`.

  `mbs`, `logps_real` and `advs` are lists with one entry per micro-batch; PACR / PDCR pool every step of every
  micro-batch for the Otsu threshold and the min-max statistics (methods.md section 8: over the rollout batch), so the
  result does not depend on how the batch is split. PGPO and none work per response, micro-batch by micro-batch; their
  metrics are the mean over the micro-batches and their dependency maps are concatenated.
  """
  counterfactuals_needed(cfg)
  if cfg.method in ("pacr", "pdcr"):
    return _make_step_batch_fn(cfg, model_cfg, tokenizer, group_size, fmt)
  if cfg.method == "none":
    single = lambda state, mb, logp_real, adv_NT: (adv_NT, {}, None)
  else:
    single = _make_pgpo_credit_fn(cfg, group_size)

  def batch_credit_fn(state, mbs, logps_real, advs):
    results = [single(state, mb, lp, a) for mb, lp, a in zip(mbs, logps_real, advs, strict=True)]
    metrics = {k: float(np.mean([r[1][k] for r in results])) for k in (results[0][1] if results else {})}
    maps = [r[2] for r in results if r[2] is not None]
    dep = {k: np.concatenate([m[k] for m in maps]) for k in maps[0]} if maps else None
    return [r[0] for r in results], metrics, dep

  return batch_credit_fn


def make_credit_fn(cfg: CreditCfg, model_cfg, tokenizer, group_size: int, *, fmt: PromptFormat | None = None):
  """The credit function of one micro-batch: `fn(state, mb, logp_real_NT, adv_NT) -> (adv_NT, metrics, maps)`.

  For PACR / PDCR the Otsu and min-max pools are this micro-batch's steps; use `make_batch_credit_fn` to pool a whole
  rollout batch. PACR / PDCR need the prompt format `fmt` and read `mb.answers`.
  """
  counterfactuals_needed(cfg)
  if cfg.method == "none":
    return lambda state, mb, logp_real, adv_NT: (adv_NT, {}, None)
  if cfg.method == "pgpo":
    return _make_pgpo_credit_fn(cfg, group_size)
  batch_fn = _make_step_batch_fn(cfg, model_cfg, tokenizer, group_size, fmt)

  def credit_fn(state, mb, logp_real_NT, adv_NT):
    advs, metrics, dep = batch_fn(state, [mb], [logp_real_NT], [adv_NT])
    return advs[0], metrics, dep

  return credit_fn
