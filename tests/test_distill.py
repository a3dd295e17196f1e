"""The distillation stage of the training loop: teacher contexts, ViGOS tags on a real tokenizer, the teacher pass,
the step's normalizers, and the losses against references built by hand from full logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxvg.credit import assign
from jaxvg.data import tokenizer as tokenizer_lib
from jaxvg.distill import teachers, vigos
from jaxvg.rl import update
from jaxvg.run import builders, experiment, validation
from jaxvg.run import teachers as run_teachers
from jaxvg.run.experiment import Config, DataCfg, DistillCfg, ModelCfg

G = 2


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load_tokenizer(None)


@pytest.fixture(scope="module")
def vigos_spans(tok):
  return teachers.vigos_span_fn(tok)


def _spans(tok, span_fn, texts, pad_to=None):
  rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  T = pad_to or max(map(len, rows))
  ids = np.zeros((len(rows), T), np.int32)
  mask = np.zeros((len(rows), T), bool)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, True
  return ids, span_fn(ids, mask)


def _decode(tok, ids, mask):
  return tok.decode([int(i) for i, m in zip(ids, mask) if m])


@pytest.mark.parametrize("sep", [" ", "\n", "\n\n"])
def test_vigos_spans_on_the_shipped_tokenizer(tok, vigos_spans, sep):
  # The completion after the prefilled "<description>", with the tags glued to spaces or newlines as a model writes
  # them (BPE then merges the separator into the tag's first token).
  text = f"a red circle{sep}</description>{sep}<think>{sep}3 + 2 = 5{sep}</think>{sep}\\boxed{{5}}."
  ids, spans = _spans(tok, vigos_spans, [text])
  assert bool(spans.valid_B[0])
  description = _decode(tok, ids[0], np.asarray(spans.description_BT[0]))
  reasoning = _decode(tok, ids[0], np.asarray(spans.reasoning_BT[0]))
  # By hand: the description is everything before "</description>"; the reasoning runs from after "<think>" through
  # the token that closes \boxed{5} (this BPE merges "}." into one token, which the span then ends with).
  assert description.strip() == "a red circle"
  assert reasoning.strip().startswith("3 + 2 = 5") and reasoning.rstrip().removesuffix(".").endswith("\\boxed{5}")
  assert "</think>" in reasoning and "<think>" not in reasoning


@pytest.mark.parametrize("text", [
    "a red circle </description> <think> 3 + 2 = 5 \\boxed{5}",            # no </think>
    "a red circle <think> 3 + 2 = 5 </think> \\boxed{5}",                 # no </description>
    " </description> <think> 3 + 2 = 5 </think> \\boxed{5}",              # empty description
    "a red circle </description> <think> 3 + 2 = 5 </think> \\boxed{5",    # unclosed box
    "a red circle </think> <think> </description> \\boxed{5}",            # out of order
])
def test_vigos_invalid_completions_go_to_the_reference_teacher(tok, vigos_spans, text):
  ids, spans = _spans(tok, vigos_spans, [text])
  assert not bool(spans.valid_B[0])
  assert not np.asarray(spans.description_BT).any() and not np.asarray(spans.reasoning_BT).any()
  assert np.asarray(spans.reference_BT[0]).sum() == len(tok(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------------------- config


def _cfg(**distill_kwargs) -> Config:
  return Config(model=ModelCfg(tiny_width=32, tiny_layers=1, tiny_heads=2, tiny_vision_width=32),
                data=DataCfg(prompts_per_batch=2, length_buckets=(128, 256, 384), patch_buckets=(64, 128)),
                algo=experiment.AlgoCfg(dynamic_sampling=False),
                distill=DistillCfg(**distill_kwargs))


@pytest.mark.parametrize("kwargs, overrides, match", [
    (dict(method="vigos"), {}, r"describe-then-reason student format \(vigos, vigos_brief\), got "
                               "data.prompt_format='pgpo'"),
    (dict(method="vigos"), {"data": DataCfg(prompt_format="vigos_reference_teacher")}, "vigos_reference_teacher"),
    (dict(method="opd"), {"algo": experiment.AlgoCfg(dynamic_sampling=True)}, "dynamic_sampling=False"),
    (dict(method="opd"), {"credit": experiment.CreditCfg(method="pgpo")}, "credit.method"),
    (dict(method="opsd", teacher_context="vigos_reasoning_teacher"), {}, "prefills"),
    (dict(method="vgs", eta=0.0), {}, "eta"),
    (dict(method="opd", gradient_stats_every=5), {}, "gradient_stats_every.*needs distill.method='vgs'"),
    (dict(method="vgs", gradient_stats_every=-1), {}, "gradient_stats_every=-1 must be >= 0"),
    (dict(method="opd", divergence="kl"), {}, "kind"),
    (dict(method="distil"), {}, "distill.method"),
    (dict(method="opd", teacher="/no/such/dir", teacher_sft_steps=3), {}, "teacher_sft_steps"),
])
def test_invalid_distillation_configs_name_the_problem(kwargs, overrides, match):
  with pytest.raises(ValueError, match=match):
    validation.validate(dataclasses.replace(_cfg(**kwargs), **overrides))


@pytest.mark.parametrize("fmt", ["vigos", "vigos_brief"])
def test_vigos_accepts_both_student_instructions(fmt):
  cfg = _cfg(method="vigos")
  validation.validate(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prompt_format=fmt)))


# ---------------------------------------------------------------------------------------------------------- losses


def _batch(cfg: Config, tok, variants=(), contexts=(), seed=0):
  """Two synthetic prompts, their variants, and G random completions each (the tiny model's vocabulary)."""
  _, model = builders.build_model(cfg.model, cfg.data)
  data = builders.make_train_data(cfg.data, tok, model.cfg, counterfactuals=variants, contexts=contexts)
  batch = next(iter(data))
  rng = np.random.default_rng(seed)
  N, T = 2 * G, 12
  tokens = rng.integers(10, len(tok), size=(N, T)).astype(np.int32)
  mask = np.ones((N, T), np.int32)
  mask[1, 9:] = 0
  mask[3, 5:] = 0
  ctx = {"real": assign.as_prompt_inputs(batch.prompts),
         **{v: assign.counterfactual_inputs(batch.prompts, v) for v in variants + contexts}}
  return model, ctx, jnp.asarray(tokens), jnp.asarray(mask)


def _logits(model, prompt, tokens, mask):
  """Full [N, T, V] next-token logits of the completions: the naive reference (no chunking)."""
  from jaxvg.rl.scoring import completion_hidden
  h, _ = completion_hidden(model, prompt, tokens, mask, G)
  return np.asarray(jnp.einsum("NTD,DV->NTV", h, model.decoder.head_weight_DV()), np.float64)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl(logp, logq):
  return (np.exp(logp) * (logp - logq)).sum(-1)


def _distill_batch(cfg, model, teacher, ctx, tokens, mask, tok):
  spans = teachers.vigos_span_fn(tok)(np.asarray(tokens), np.asarray(mask)) if cfg.distill.method == "vigos" else None
  out = teachers.make_teacher_pass(cfg.distill, G)(teacher, ctx, tokens, mask, spans)
  (norms,) = teachers.step_normalizers(cfg.distill.method, cfg.distill, [mask], [out])
  return teachers.DistillBatch(prompt=ctx["real"], prompt_text=ctx.get("no_image"), tokens_NT=tokens, mask_NT=mask,
                              teacher=out, policy=None, **norms)


def _loss(cfg, model, teacher, batch):
  graphdef, params = nnx.split(model, nnx.Param)
  w_T = teacher.model().decoder.head_weight_DV()
  loss, (metrics, _) = teachers.distill_loss_fn(params, graphdef, w_T, batch, d=cfg.distill, group_size=G,
                                               loss_cfg=None)
  return float(loss), jax.device_get(metrics), graphdef, params, w_T


@pytest.mark.parametrize("method", ["opd", "vgs"])
def test_loss_and_gradient_vanish_when_the_teacher_is_the_student(tok, method):
  cfg = _cfg(method=method, aggregation="sequence_mean")
  variants, contexts = teachers.prompt_variants(cfg.distill)
  model, ctx, tokens, mask = _batch(cfg, tok, variants, contexts)
  teacher = teachers.Teacher(*nnx.split(model, nnx.Param))
  batch = _distill_batch(cfg, model, teacher, ctx, tokens, mask, tok)
  loss, _, graphdef, params, w_T = _loss(cfg, model, teacher, batch)
  assert abs(loss) < 1e-6
  grads, _ = jax.grad(teachers.distill_loss_fn, has_aux=True)(params, graphdef, w_T, batch, d=cfg.distill,
                                                             group_size=G, loss_cfg=None)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-5


def test_opsd_loss_equals_the_forward_kl_under_the_privileged_context_by_hand(tok):
  cfg = _cfg(method="opsd", divergence="kl_teacher_student", max_token_value=None, aggregation="token_mean",
             teacher_context="vigos_reference_teacher")
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prompt_format="vigos"))
  variants, contexts = teachers.prompt_variants(cfg.distill)
  student, ctx, tokens, mask = _batch(cfg, tok, variants, contexts)
  teacher_model = builders.build_model(dataclasses.replace(cfg.model, seed=7), cfg.data)[1]
  teacher = teachers.Teacher(*nnx.split(teacher_model, nnx.Param))
  loss, metrics, *_ = _loss(cfg, student, teacher, _distill_batch(cfg, student, teacher, ctx, tokens, mask, tok))
  # L = sum_{n,t} m KL(q_T(.|x, y*, y<t) || p_S(.|x, y<t)) / sum m, from full logits.
  logp_s = _log_softmax(_logits(student, ctx["real"], tokens, mask))
  logq_t = _log_softmax(_logits(teacher_model, ctx["vigos_reference_teacher"], tokens, mask))
  m = np.asarray(mask, bool)
  expected = _kl(logq_t, logp_s)[m].sum() / m.sum()
  np.testing.assert_allclose(loss, expected, rtol=1e-4)
  np.testing.assert_allclose(metrics["opd/divergence"], expected, rtol=1e-4)


def test_vigos_loss_equals_three_teachers_by_hand(tok):
  cfg = _cfg(method="vigos", max_token_value=0.05)
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prompt_format="vigos"))
  variants, contexts = teachers.prompt_variants(cfg.distill)
  student, ctx, _, _ = _batch(cfg, tok, variants, contexts)
  # Rows 0-1 valid, 2 invalid (no </think>), 3 valid with a longer description; one row ends early (padding).
  texts = ["red </description> <think> 3 + 2 = 5 </think> \\boxed{5}.",
           "a blue square </description>\n<think>\n1 + 1 = 2\n</think>\n\\boxed{2}",
           "red </description> <think> 3 + 2 = 5 \\boxed{5}",
           "two green dots on the left </description> <think> 4 </think> \\boxed{4}"]
  ids, spans_ref = _spans(tok, teachers.vigos_span_fn(tok), texts, pad_to=32)
  tokens = jnp.asarray(ids)
  rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  mask = jnp.asarray(np.arange(32)[None, :] < np.asarray([len(r) for r in rows])[:, None]).astype(jnp.int32)
  teacher_model = builders.build_model(dataclasses.replace(cfg.model, seed=5), cfg.data)[1]
  teacher = teachers.Teacher(*nnx.split(teacher_model, nnx.Param))
  loss, metrics, *_ = _loss(cfg, student, teacher, _distill_batch(cfg, student, teacher, ctx, tokens, mask, tok))

  clamp = lambda v: np.minimum(v, 0.05)
  logp_s = _log_softmax(_logits(student, ctx["real"], tokens, mask))
  logq_img = _log_softmax(_logits(teacher_model, ctx["image_only"], tokens, mask))
  logq_ref = _log_softmax(_logits(teacher_model, ctx["vigos_reference_teacher"], tokens, mask))
  desc, reas = np.asarray(spans_ref.description_BT), np.asarray(spans_ref.reasoning_BT)
  ref = np.asarray(spans_ref.reference_BT)
  assert desc.any() and reas.any() and ref.any() and list(np.asarray(spans_ref.valid_B)) == [1, 1, 0, 1]
  # The reasoning teacher reads its privileged prompt followed by ONLY the row's reasoning tokens: build that
  # sequence by slicing the row by hand and score it as a completion of its own.
  perc = clamp(_kl(logq_img, logp_s))[desc].sum() / desc.sum()
  refr = clamp(_kl(logp_s, logq_ref))[ref].sum() / ref.sum()
  rea_terms = []
  for n in range(4):
    t_idx = np.nonzero(reas[n])[0]
    if not len(t_idx):
      continue
    sliced = np.zeros((G * 2, 32), np.int32)  # completion_hidden scores G rows per prompt: put the slice in row n
    sliced_mask = np.zeros((G * 2, 32), np.int32)
    sliced[n, :len(t_idx)] = ids[n, t_idx]
    sliced_mask[n, :len(t_idx)] = 1
    logq_rea = _log_softmax(_logits(teacher_model, ctx["vigos_reasoning_teacher"], jnp.asarray(sliced),
                                    jnp.asarray(sliced_mask)))[n, :len(t_idx)]
    rea_terms.append(clamp(_kl(logq_rea, logp_s[n, t_idx])))
  rea = np.concatenate(rea_terms).sum() / reas.sum()
  np.testing.assert_allclose(metrics["vigos/loss_perception"], perc, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(metrics["vigos/loss_reasoning"], rea, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(metrics["vigos/loss_reference"], refr, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(loss, perc + rea + 2.0 * refr, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["opd", "vgs"])
def test_two_micro_batches_make_the_same_update_as_one_batch(tok, method):
  """The step's normalizers (token counts, VGS's step-wide Q_0.7) make micro-batch accumulation exact: two
  micro-batches of G completions per prompt update the weights like one batch of the same 2G completions."""
  cfg = _cfg(method=method, aggregation="token_mean")
  variants, contexts = teachers.prompt_variants(cfg.distill)
  model, ctx, tokens_a, mask_a = _batch(cfg, tok, variants, contexts, seed=0)
  _, _, tokens_b, mask_b = _batch(cfg, tok, variants, contexts, seed=1)
  teacher_model = builders.build_model(dataclasses.replace(cfg.model, seed=3), cfg.data)[1]
  teacher = teachers.Teacher(*nnx.split(teacher_model, nnx.Param))
  tx = optax.sgd(1.0)
  graphdef, params = nnx.split(model, nnx.Param)

  def run(parts, group_size):
    teacher_pass = teachers.make_teacher_pass(cfg.distill, group_size)
    outs = [teacher_pass(teacher, ctx, t, m) for t, m in parts]
    norms = teachers.step_normalizers(method, cfg.distill, [m for _, m in parts], outs)
    micro = tuple(teachers.DistillBatch(prompt=ctx["real"], prompt_text=ctx.get("no_image"), tokens_NT=t, mask_NT=m,
                                       teacher=o, policy=None, **n) for (t, m), o, n in zip(parts, outs, norms))
    state = update.init_state(nnx.merge(graphdef, jax.tree.map(jnp.copy, params)), tx)
    return teachers.make_step(cfg.distill, tx=tx, group_size=group_size, loss_cfg=None)(state, teacher, micro)

  split_state, split_m = run([(tokens_a, mask_a), (tokens_b, mask_b)], G)
  # One batch: prompt b's rows are its G completions from a, then its G from b.
  interleave = lambda a, b: jnp.concatenate([a.reshape(2, G, -1), b.reshape(2, G, -1)], axis=1).reshape(4 * G, -1)
  full_state, full_m = run([(interleave(tokens_a, tokens_b), interleave(mask_a, mask_b))], 2 * G)
  for a, b in zip(jax.tree.leaves(full_state.params), jax.tree.leaves(split_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
  np.testing.assert_allclose(full_m["distill/loss"], split_m["distill/loss"], rtol=1e-5)


def test_a_teacher_from_an_hf_directory_is_frozen_and_checked(tok, tmp_path):
  """distill.teacher = an HF directory: loaded (here the student's own export, so its arrays must equal the
  student's), and a teacher with another vocabulary is refused by name."""
  from jaxvg.models import save_hf
  cfg = _cfg(method="opd")
  _, student = builders.build_model(cfg.model, cfg.data)
  save_hf(student, str(tmp_path / "teacher"))
  cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher=str(tmp_path / "teacher")))
  teacher = run_teachers.make_teacher(cfg, student, tok, None)
  for a, b in zip(jax.tree.leaves(nnx.split(student, nnx.Param)[1]), jax.tree.leaves(teacher.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = dataclasses.replace(student.cfg, text=dataclasses.replace(student.cfg.text, vocab_size=1000))
  with pytest.raises(ValueError, match="vocabulary"):
    teachers.check_teacher(other, student.cfg)
  missing = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher=str(tmp_path / "nothing")))
  with pytest.raises(ValueError, match="neither 'initial' nor"):
    run_teachers.make_teacher(missing, student, tok, None)


# ---------------------------------------------------------------------------------------------------------- PALR


def test_the_decoy_context_carries_the_next_records_answer(tok):
  cfg = dataclasses.replace(_cfg(method="opsd", palr=True),
                            data=dataclasses.replace(_cfg().data, prompt_format="vigos"))
  variants, contexts = teachers.prompt_variants(cfg.distill)
  assert contexts == ("vigos_reference_teacher", "vigos_reference_teacher@decoy_answer")
  _, model = builders.build_model(cfg.model, cfg.data)
  from jaxvg.data import pipeline
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_train=8))
  ds = pipeline.make_dataset(builders.source(cfg.data, "train"), tokenizer=tok,
                             prompt=builders.prompt_config(cfg.data, contexts=contexts),
                             data=builders.data_config(cfg.data, shuffle=False), vision=model.cfg.vision)
  batch = next(iter(ds))
  src = builders.source(cfg.data, "train")
  for b in range(2):
    text = lambda name: tok.decode(np.asarray(batch.prompts.counterfactuals[name].input_ids_BT[b]))
    own, decoy = str(src[b]["answer"]), str(src[b + 1]["answer"])
    block = lambda t: t.split("=== Reference Solution Begin ===")[1].split("=== Reference Solution End ===")[0]
    assert block(text("vigos_reference_teacher")).strip() == own
    assert block(text("vigos_reference_teacher@decoy_answer")).strip() == decoy


def test_palr_parts_equal_the_formula_from_full_logits(tok):
  """PALR = sum_t S_t A_t / sum_t S_t (A_t + I_t) (methods.md 4.2): S the OPSD teacher-student KL, A the teacher's KL
  to itself with the next record's answer, I with the next prompt's image; all from full logits here."""
  cfg = dataclasses.replace(_cfg(method="opsd", divergence="kl_teacher_student", palr=True),
                            data=dataclasses.replace(_cfg().data, prompt_format="vigos"))
  variants, contexts = teachers.prompt_variants(cfg.distill)
  student, ctx, tokens, mask = _batch(cfg, tok, variants, contexts)
  teacher_model = builders.build_model(dataclasses.replace(cfg.model, seed=6), cfg.data)[1]
  for model in (student, teacher_model):  # sharper distributions: KLs of order 1, far above float32 noise
    model.decoder.final_norm_D[...] = 40.0 * model.decoder.final_norm_D[...]
  teacher = teachers.Teacher(*nnx.split(teacher_model, nnx.Param))
  name = "vigos_reference_teacher"
  grid = np.asarray(ctx[name].vision.rope_hw_P2)  # one 8 x 8 image per prompt in this batch
  P = 64
  assert grid.shape[0] >= 2 * P
  out = teachers.make_teacher_pass(cfg.distill, G)(teacher, ctx, tokens, mask, image_patches=P)
  (norms,) = teachers.step_normalizers("opsd", cfg.distill, [mask], [out])
  batch = teachers.DistillBatch(prompt=ctx["real"], prompt_text=None, tokens_NT=tokens, mask_NT=mask, teacher=out,
                               policy=None, **norms)
  _, metrics, *_ = _loss(cfg, student, teacher, batch)

  px = np.asarray(ctx[name].vision.pixel_values_PX)
  swapped = np.concatenate([px[P:2 * P], px[:P], px[2 * P:]])  # prompt 0 sees image 1 and prompt 1 image 0
  ctx_img = dataclasses.replace(ctx[name], vision=dataclasses.replace(ctx[name].vision,
                                                                       pixel_values_PX=jnp.asarray(swapped)))
  logp_s = _log_softmax(_logits(student, ctx["real"], tokens, mask))
  logq = _log_softmax(_logits(teacher_model, ctx[name], tokens, mask))
  logq_ans = _log_softmax(_logits(teacher_model, ctx[name + "@decoy_answer"], tokens, mask))
  logq_img = _log_softmax(_logits(teacher_model, ctx_img, tokens, mask))
  m = np.asarray(mask, bool)
  S, A, I = _kl(logq, logp_s), _kl(logq, logq_ans), _kl(logq, logq_img)
  assert (A[m] > 0).all() and (I[m] > 0).all()
  # The answer and image shifts differ enough that exchanging them (or dropping either) would fail the check; the
  # tolerance is float32's on products of small KLs (a random model barely moves when one input is swapped).
  assert abs((S * A)[m].sum() - (S * I)[m].sum()) > 0.1 * (S * A)[m].sum()
  np.testing.assert_allclose(metrics["palr/num"], (S * A)[m].sum(), rtol=1e-2)
  np.testing.assert_allclose(metrics["palr/den"], (S * (A + I))[m].sum(), rtol=1e-2)
