"""On-policy distillation in the training loop: frozen teachers, their scoring pass, and the distillation step.

  opd    the teacher in the student's own context (image + question), reverse KL by default (VGS's l_Standard).
  opsd   the teacher in a privileged context (`teacher_context`: the reference answer in the prompt), forward KL.
  vigos  the perception teacher (image_only) on the description span, the reasoning teacher (privileged; sees only the
         student's reasoning + answer tokens) on T_r u T_a, the reference teacher (privileged, full format) on invalid
         rollouts; per-token KL clamped at 0.05, lambda 1 / 1 / 2 (methods.md 4.2 and 8).
  vgs    eta [l_Std + gamma l_Vis + lambda l_LP], the student and the teacher each in the image and the no_image
         context, Q_0.7 of the teacher's VDS over the whole step (methods.md 5 and 8).

A step has two stages, like the RL loop's score -> update:
  1. `teacher_pass` (jitted, no gradient), per micro-batch: the teachers' hidden states on the completion grid
     [N, T, D] (position t predicts completion token t), plus what the step's normalizers and thresholds need (the
     ViGOS spans, the VGS VDS).
  2. `distill_step` (jitted): the student's passes, every loss normalized by the whole step's counts (so micro-batch
     losses add up to the step's), summed gradients, one guarded optax update. With rl_alpha > 0 the algo's policy
     loss is mixed in: alpha * L_distill + (1 - alpha) * L_RL (VGS Eq. 22).

Teachers are parameter pytrees, `Teacher(graphdef, params)`: the policy at the start of RL (the same arrays as the KL
reference, no second copy) or another Qwen2.5-VL from its own HF directory (same vocabulary), placed like the policy;
`jaxvg.run.teachers.make_teacher` builds the one a config names.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvg.data.processing import DECOY
from jaxvg.data.tokenizer import special_token_ids
from jaxvg.distill import divergences, vgs, vigos
from jaxvg.distill.config import DEFAULT_DIVERGENCE, DistillCfg
from jaxvg.rl import losses, update
from jaxvg.rl.scoring import completion_hidden, PromptInputs, token_logps

METHODS = ("none", "opd", "opsd", "vigos", "vgs")
REASONING_CONTEXT, REFERENCE_CONTEXT = "vigos_reasoning_teacher", "vigos_reference_teacher"


@flax.struct.dataclass
class Teacher:
  """A frozen model: its graph and parameter pytree (never updated, never donated)."""
  graphdef: Any = flax.struct.field(pytree_node=False)
  params: Any

  def model(self):
    return nnx.merge(self.graphdef, self.params)


# ---------------------------------------------------------------------------------------------------------- config


def divergence_config(d: DistillCfg) -> divergences.DivergenceConfig:
  """OPD's / OPSD's divergence; an empty `distill.divergence` is the method's paper default (reverse / forward KL)."""
  kind = d.divergence or DEFAULT_DIVERGENCE.get(d.method, "kl_student_teacher")
  return divergences.DivergenceConfig(kind=kind, beta=d.beta, entry_clip=d.entry_clip,
                                      max_token_value=d.max_token_value)


def vigos_config(d: DistillCfg) -> vigos.ViGOSConfig:
  return vigos.ViGOSConfig(lambda_perception=d.lambda_perception, lambda_reasoning=d.lambda_reasoning,
                           lambda_reference=d.lambda_reference,
                           max_token_value=0.05 if d.max_token_value is None else d.max_token_value,
                           chunk_size=d.chunk_size)


def vgs_config(d: DistillCfg) -> vgs.VGSConfig:
  return vgs.VGSConfig(eta=d.eta, gamma=d.gamma, lp_weight=d.lp_weight, lp_quantile=d.lp_quantile,
                       adaptive_gamma=d.adaptive_gamma, gamma_low_quantile=d.gamma_low_quantile, alpha=d.rl_alpha,
                       aggregation=d.aggregation, chunk_size=d.chunk_size)


def prompt_variants(d: DistillCfg) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(counterfactuals, contexts) the data pipeline must build next to each real prompt for `d.method`."""
  decoy = lambda name: (name + DECOY,) if d.palr else ()
  if d.method == "opsd":
    return (), (d.teacher_context,) + decoy(d.teacher_context)
  if d.method == "vigos":
    return ("image_only",), (REASONING_CONTEXT, REFERENCE_CONTEXT) + decoy(REASONING_CONTEXT)
  if d.method == "vgs":
    return ("no_image",), ()
  return (), ()


def vigos_span_fn(tokenizer) -> Callable[[np.ndarray, np.ndarray], vigos.DescribeReasonSpans]:
  """The host function (tokens_NT, mask_NT) -> ViGOS spans on this tokenizer: tags searched in the decoded text,
  EOS and pad not counted as content."""
  texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
  special = special_token_ids(tokenizer)
  ignore = [special[t] for t in ("<|im_end|>", "<|endoftext|>") if t in special] + [int(tokenizer.pad_token_id)]
  return functools.partial(vigos.describe_reason_spans, token_texts=texts, ignore_ids=ignore)


def check_teacher(teacher_cfg, student_cfg):
  """A teacher must predict over the student's vocabulary and read the same special tokens."""
  if teacher_cfg.text.vocab_size != student_cfg.text.vocab_size:
    raise ValueError(f"the teacher's vocabulary ({teacher_cfg.text.vocab_size}) differs from the student's "
                     f"({student_cfg.text.vocab_size}): token-level distillation needs the same vocabulary")
  for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
    if getattr(teacher_cfg, name) != getattr(student_cfg, name):
      raise ValueError(f"the teacher's {name} ({getattr(teacher_cfg, name)}) differs from the student's "
                       f"({getattr(student_cfg, name)})")


# ---------------------------------------------------------------------------------------------------------- teacher pass


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TeacherOut:
  """What the teachers contribute to one micro-batch (no gradient)."""
  hidden: dict                               # name -> h_NTD on the completion grid
  spans: vigos.DescribeReasonSpans | None    # vigos
  vds_NT: jax.Array | None                   # vgs: KL(q_T(.|I,x) || q_T(.|x)) per completion token
  shifts: dict | None = None                 # palr: "answer" / "image" -> KL(q || q with it swapped) [N, T]


def _reasoning_only(tokens_NT, start_N, end_N):
  """The completion tokens start..end-1 moved to the front (the reasoning teacher's continuation) and their mask."""
  T = tokens_NT.shape[1]
  idx_NT = start_N[:, None] + jnp.arange(T)[None, :]
  mask_NT = idx_NT < end_N[:, None]
  tokens_NT = jnp.take_along_axis(tokens_NT, jnp.clip(idx_NT, 0, T - 1), axis=1)
  return jnp.where(mask_NT, tokens_NT, 0), mask_NT


def _back_to_grid(h_NTD, start_N):
  """h at completion position t = h_NTD[t - start] (positions before start take row 0; they are masked out)."""
  T = h_NTD.shape[1]
  idx_NT = jnp.clip(jnp.arange(T)[None, :] - start_N[:, None], 0, T - 1)
  return jnp.take_along_axis(h_NTD, idx_NT[..., None], axis=1)


def rolled_images(prompt: PromptInputs, image_patches: int) -> PromptInputs:
  """The prompts with each one's image replaced by the next prompt's (every prompt holds one image of
  `image_patches` patches, so the layout is unchanged): the image-swapped context of PALR."""
  B = prompt.input_ids_BT.shape[0]
  px = prompt.vision.pixel_values_PX
  real = B * image_patches
  rolled = jnp.concatenate([px[image_patches:real], px[:image_patches], px[real:]], axis=0)
  return dataclasses.replace(prompt, vision=dataclasses.replace(prompt.vision, pixel_values_PX=rolled))


def uniform_image_patches(prompt_batch) -> int:
  """Patches per image when every prompt of a data PromptBatch holds exactly one image of one grid, else 0."""
  num_B = np.asarray(prompt_batch.num_images_B)
  grids = np.asarray(prompt_batch.image_grid_thw_I3)[:len(num_B)]
  if prompt_batch.vision is None or not (num_B == 1).all() or not (grids == grids[0]).all():
    return 0
  return int(np.prod(grids[0]))


def teacher_pass(teacher: Teacher, contexts: dict, tokens_NT, mask_NT, *, method: str, group_size: int,
                 chunk_size: int = 128, spans: vigos.DescribeReasonSpans | None = None,
                 reasoning_sees_description: bool = False, image_patches: int = 0) -> TeacherOut:
  """The teachers' hidden states on the student's completion grid (pure; jit it with the static arguments).

  contexts: "real" -> the student's PromptInputs, and each prompt variant of `prompt_variants` by name.
  spans: vigos: the completions' spans (`vigos_span_fn`, on the host after sampling).
  image_patches: > 0 with a "<context>@decoy_answer" variant present: also the PALR shifts of the privileged teacher
    (reasoning teacher for vigos), KL(q || q with another sample's answer) and KL(q || q with the next prompt's image).
  """
  model = teacher.model()
  w_DV = model.decoder.head_weight_DV()
  hidden_of = lambda prompt, toks=tokens_NT, m=mask_NT: jax.lax.stop_gradient(
      completion_hidden(model, prompt, toks, m, group_size)[0])
  hidden = lambda ctx, toks=tokens_NT, m=mask_NT: hidden_of(contexts[ctx], toks, m)
  vds_NT = shifts = None
  palr_on = image_patches > 0 and any(k.endswith(DECOY) for k in contexts)

  def palr_shifts(h_NTD, h_answer_NTD, h_image_NTD):
    kl = lambda h_other: divergences.chunked_kl(divergences.Logits(h_NTD, w_DV, stop_gradient=True),
                                                    divergences.Logits(h_other, w_DV, stop_gradient=True),
                                                    chunk_size=chunk_size)
    return {"answer": kl(h_answer_NTD), "image": kl(h_image_NTD)}

  if method == "opd":
    out = {"teacher": hidden("real")}
  elif method == "opsd":
    (name,) = [k for k in contexts if k != "real" and not k.endswith(DECOY)]
    out = {"teacher": hidden(name)}
    if palr_on:
      shifts = palr_shifts(out["teacher"], hidden(name + DECOY),
                           hidden_of(rolled_images(contexts[name], image_patches)))
  elif method == "vigos":
    if spans is None:
      raise ValueError("teacher_pass: method='vigos' needs the completions' spans (distill.vigos_span_fn)")
    if reasoning_sees_description:
      reasoning_of = lambda prompt: hidden_of(prompt)
    else:
      toks, m = _reasoning_only(tokens_NT, spans.reasoning_start_B, spans.reasoning_end_B)
      reasoning_of = lambda prompt: _back_to_grid(hidden_of(prompt, toks, m), spans.reasoning_start_B)
    reasoning = reasoning_of(contexts[REASONING_CONTEXT])
    out = {"perception": hidden("image_only"), "reasoning": reasoning, "reference": hidden(REFERENCE_CONTEXT)}
    if palr_on:
      shifts = palr_shifts(reasoning, reasoning_of(contexts[REASONING_CONTEXT + DECOY]),
                           reasoning_of(rolled_images(contexts[REASONING_CONTEXT], image_patches)))
  elif method == "vgs":
    out = {"image": hidden("real"), "text": hidden("no_image")}
    vds_NT = vgs.chunked_vds(teacher_image=divergences.Logits(out["image"], w_DV),
                             teacher_text=divergences.Logits(out["text"], w_DV), chunk_size=chunk_size)
    vds_NT = jnp.where(mask_NT > 0, vds_NT, 0.0)
  else:
    raise ValueError(f"teacher_pass: method={method!r} is not a distillation method")
  return TeacherOut(hidden=out, spans=spans if method == "vigos" else None, vds_NT=vds_NT, shifts=shifts)


# ---------------------------------------------------------------------------------------------------------- the step


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DistillBatch:
  """One micro-batch of student rollouts with its teachers' outputs and the step-wide normalizers."""
  prompt: PromptInputs                  # the student's context
  prompt_text: PromptInputs | None      # vgs: the student's no_image context
  tokens_NT: jax.Array
  mask_NT: jax.Array
  teacher: TeacherOut
  count: jax.Array                      # opd / opsd / vgs: the step's aggregate_count
  vigos_counts: vigos.ViGOSCounts | None
  vds_high: jax.Array | None            # vgs: the step's Q_lp_quantile / Q_gamma_low_quantile of VDS
  vds_low: jax.Array | None
  policy: update.PolicyBatch | None     # rl_alpha > 0: the RL side


def step_normalizers(method: str, d: DistillCfg, masks, outs: list[TeacherOut]) -> list[dict]:
  """The whole step's counts (and VGS thresholds) for each micro-batch's `DistillBatch` fields."""
  count = sum(float(divergences.aggregate_count(jnp.asarray(m) > 0, aggregation=d.aggregation)) for m in masks)
  fields = {"count": jnp.asarray(count, jnp.float32), "vigos_counts": None, "vds_high": None, "vds_low": None}
  if method == "vigos":
    parts = [vigos.vigos_counts(o.spans) for o in outs]
    fields["vigos_counts"] = jax.tree.map(lambda *xs: sum(xs), *parts)
  if method == "vgs":
    vds = jnp.concatenate([o.vds_NT.reshape(1, -1) for o in outs], axis=1)
    mask = jnp.concatenate([(jnp.asarray(m) > 0).reshape(1, -1) for m in masks], axis=1)
    q = vgs.vds_thresholds(vds, mask, config=vgs_config(d))
    fields["vds_high"], fields["vds_low"] = q["high"], q["low"]
  return [fields] * len(masks)


def distill_loss_fn(params, graphdef, teacher_w_DV, batch: DistillBatch, *, d: DistillCfg, group_size: int,
                    loss_cfg: losses.PolicyLossConfig | None):
  """This micro-batch's share of the step loss, and its metrics (shares too: they add up over micro-batches)."""
  model = nnx.merge(graphdef, params)
  h_NTD, _ = completion_hidden(model, batch.prompt, batch.tokens_NT, batch.mask_NT, group_size)
  w_DV = model.decoder.head_weight_DV()
  student = divergences.Logits(h_NTD, w_DV)
  teacher = lambda name: divergences.Logits(batch.teacher.hidden[name], teacher_w_DV, stop_gradient=True)
  mask_NT = batch.mask_NT > 0
  shifts = batch.teacher.shifts
  if d.method in ("opd", "opsd"):  # divergences.opd_loss, with the per-token values kept for PALR
    values_NT = divergences.chunked_divergence(student=student, teacher=teacher("teacher"),
                                               config=divergence_config(d), chunk_size=d.chunk_size)
    loss = divergences.masked_aggregate(values_NT, mask_NT, aggregation=d.aggregation, count=batch.count)
    metrics = {"opd/divergence": jax.lax.stop_gradient(loss)}
    supervision_NT, region_NT = values_NT, mask_NT
  elif d.method == "vigos":
    loss, metrics = vigos.vigos_loss(student=student, perception=teacher("perception"),
                                     reasoning=teacher("reasoning"), reference=teacher("reference"),
                                     spans=batch.teacher.spans, counts=batch.vigos_counts, config=vigos_config(d))
    if shifts is not None:
      config = vigos_config(d)
      supervision_NT = vigos.vigos_token_values(
          student=student, perception=teacher("perception"), reasoning=teacher("reasoning"),
          reference=teacher("reference"), max_token_value=config.max_token_value,
          chunk_size=config.chunk_size)["reasoning"]
      region_NT = batch.teacher.spans.reasoning_BT
  elif d.method == "vgs":
    h_text_NTD, _ = completion_hidden(model, batch.prompt_text, batch.tokens_NT, batch.mask_NT, group_size)
    loss, metrics = vgs.vgs_loss(student_image=student, student_text=divergences.Logits(h_text_NTD, w_DV),
                                 teacher_image=teacher("image"), teacher_text=teacher("text"), mask_BT=mask_NT,
                                 vds_threshold_high=batch.vds_high, vds_threshold_low=batch.vds_low,
                                 count=batch.count, config=vgs_config(d))
  else:
    raise ValueError(f"distill.method={d.method!r} is not a distillation method")
  metrics = dict(metrics)
  metrics["distill/loss"] = jax.lax.stop_gradient(loss)
  if shifts is not None:  # vigos.palr's parts, summed over micro-batches: PALR = num / den
    s_NT = jax.lax.stop_gradient(jnp.where(region_NT, supervision_NT, 0.0))
    metrics["palr/num"] = jnp.sum(s_NT * shifts["answer"])
    metrics["palr/den"] = jnp.sum(s_NT * (shifts["answer"] + shifts["image"]))
  if batch.policy is None:
    return loss, (metrics, {})
  p = batch.policy
  logp_NT, ent_NT = token_logps(h_NTD, w_DV, p.tokens_NT, with_entropy=True)
  mask_f = p.mask_NT.astype(jnp.float32)
  rl_loss, rl_metrics = losses.policy_loss(logp_NT * mask_f, p.logp_old_NT, p.adv_NT, p.mask_NT, loss_cfg,
                                           logp_ref_BT=p.logp_ref_NT if loss_cfg.kl_coef > 0 else None,
                                           entropy_BT=ent_NT * mask_f)
  total = d.rl_alpha * loss + (1.0 - d.rl_alpha) * rl_loss * p.weight
  return total, (metrics, rl_metrics)


def distill_step(state: update.TrainState, teacher: Teacher, micro: tuple[DistillBatch, ...], *, tx,
                 d: DistillCfg, group_size: int, loss_cfg: losses.PolicyLossConfig | None = None,
                 max_update_ratio: float | None = None):
  """One optimizer update from the summed gradients of the micro-batches (distillation metrics summed, RL averaged)."""
  teacher_w_DV = jax.lax.stop_gradient(teacher.model().decoder.head_weight_DV())
  grad_fn = jax.value_and_grad(distill_loss_fn, has_aux=True)
  grads, loss, shares, rl = None, 0.0, [], []
  for batch in micro:
    (share, (m, rl_m)), g = grad_fn(state.params, state.graphdef, teacher_w_DV, batch, d=d, group_size=group_size,
                                    loss_cfg=loss_cfg)
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    loss = loss + share
    shares.append(m)
    rl.append(rl_m)
  keys = dict.fromkeys(k for m in shares for k in m)  # a micro-batch without PALR shifts adds nothing to its sums
  metrics = {k: sum(m[k] for m in shares if k in m) for k in keys}
  metrics.update({k: jnp.mean(jnp.stack([m[k] for m in rl])) for k in rl[0]})
  return update.apply_update(state, tx, grads, [metrics], loss=loss, max_update_ratio=max_update_ratio)


def make_step(d: DistillCfg, *, tx, group_size: int, loss_cfg: losses.PolicyLossConfig | None,
              max_update_ratio: float = 1.0, out_shardings=None):
  """The jitted distillation step for `d` (the state is donated; the teacher is not)."""
  fn = functools.partial(distill_step, tx=tx, d=d, group_size=group_size,
                         loss_cfg=loss_cfg if d.rl_alpha > 0 else None, max_update_ratio=max_update_ratio)
  if out_shardings is None:
    return jax.jit(fn, donate_argnums=(0,))
  return jax.jit(fn, donate_argnums=(0,), out_shardings=out_shardings)


def make_teacher_pass(d: DistillCfg, group_size: int):
  """The jitted teacher pass for `d` (teacher, contexts, tokens_NT, mask_NT, spans=None) -> TeacherOut; vigos takes
  the spans of `vigos_span_fn`."""

  def fn(teacher, contexts, tokens_NT, mask_NT, spans=None, image_patches=0):
    return teacher_pass(teacher, contexts, tokens_NT, mask_NT, method=d.method, group_size=group_size,
                        chunk_size=d.chunk_size, spans=spans,
                        reasoning_sees_description=d.reasoning_teacher_sees_description,
                        image_patches=image_patches)

  return jax.jit(fn, static_argnames=("image_patches",))


# ---------------------------------------------------------------------------------------------------------- calibration


def vgs_term_gradients(params, graphdef, teacher_w_DV, batch: DistillBatch, *, d: DistillCfg, group_size: int):
  """Gradients of the aggregated l_Std, l_Vis and l_Lang of a VGS micro-batch, each on its own (for eta)."""
  config = vgs_config(d)

  def terms(p):
    model = nnx.merge(graphdef, p)
    w_DV = model.decoder.head_weight_DV()
    h_NTD, _ = completion_hidden(model, batch.prompt, batch.tokens_NT, batch.mask_NT, group_size)
    h_text_NTD, _ = completion_hidden(model, batch.prompt_text, batch.tokens_NT, batch.mask_NT, group_size)
    teacher = lambda name: divergences.Logits(batch.teacher.hidden[name], teacher_w_DV, stop_gradient=True)
    out = vgs.vgs_terms(student_image=divergences.Logits(h_NTD, w_DV),
                        student_text=divergences.Logits(h_text_NTD, w_DV), teacher_image=teacher("image"),
                        teacher_text=teacher("text"), mask_BT=batch.mask_NT > 0, vds_threshold_high=batch.vds_high,
                        vds_threshold_low=batch.vds_low, count=batch.count, config=config)
    return {k: out[k] for k in ("std", "vis", "lang")}

  return jax.jacrev(terms)(params)


def make_gradient_probe(d: DistillCfg, group_size: int) -> Callable[..., dict[str, float]]:
  """(state, teacher, micro) -> `gradient_statistics` of one update's g_Std, g_Vis and g_Lang, each summed over the
  update's micro-batches (their normalizers are step-wide, so the sum is the update's gradient), at `state`."""
  grads_fn = jax.jit(functools.partial(vgs_term_gradients, d=d, group_size=group_size), static_argnums=(1,))
  stats_fn = jax.jit(gradient_statistics)

  def probe(state, teacher: Teacher, micro) -> dict[str, float]:
    w_DV = teacher.model().decoder.head_weight_DV()
    total = None
    for batch in micro:
      g = grads_fn(state.params, state.graphdef, w_DV, batch)
      total = g if total is None else jax.tree.map(jnp.add, total, g)
    return {k: float(v) for k, v in jax.device_get(stats_fn(total)).items()}

  return probe


def gradient_statistics(grads: dict) -> dict[str, jax.Array]:
  """Norms of g_Std, g_Vis, g_Lang and the cosines and angles between them (VGS paper section 3, App. A)."""
  g_std, g_vis, g_lang = grads["std"], grads["vis"], grads["lang"]
  return {"norm_std": vgs.tree_norm(g_std), "norm_vis": vgs.tree_norm(g_vis), "norm_lang": vgs.tree_norm(g_lang),
          "cos_std_vis": vgs.tree_cosine(g_std, g_vis), "angle_lang_vis": vgs.tree_angle_degrees(g_lang, g_vis),
          "angle_std_vis": vgs.tree_angle_degrees(g_std, g_vis),
          "angle_std_lang": vgs.tree_angle_degrees(g_std, g_lang)}
