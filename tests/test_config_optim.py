"""Config overrides (errors name the key) and the optimizer's per-tower rules and non-finite guard."""

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxvg.core import config_lib
from jaxvg.models import Qwen25VL, tiny
from jaxvg.rl import optim
from jaxvg.rl import config as rl_config
from jaxvg.run import experiment


def test_override_parses_by_declared_type():
  cfg = experiment.Config()
  cfg = config_lib.apply_overrides(cfg, ["rollout.group_size=4", "optim.lr=3e-4", "algo.dynamic_sampling=false",
                                         "model.hf_path=none", "data.length_buckets=64,128", "optim.clip_norm=None"])
  assert cfg.rollout.group_size == 4 and cfg.optim.lr == 3e-4 and cfg.algo.dynamic_sampling is False
  assert cfg.model.hf_path is None and cfg.data.length_buckets == (64, 128) and cfg.optim.clip_norm is None
  assert dataclasses.is_dataclass(cfg.rollout)


@pytest.mark.parametrize("assignment,match", [
    ("rollout.group_sz=4", "unknown key 'group_sz'"),
    ("nosuch.x=1", "unknown key 'nosuch'"),
    ("rollout.group_size=four", "rollout.group_size=four: expected an integer"),
    ("algo.dynamic_sampling=maybe", "expected a boolean"),
    ("rollout.group_size.x=1", "is not a config section"),
    ("rollout.group_size", "expected key=value"),
])
def test_override_errors_name_the_problem(assignment, match):
  with pytest.raises((KeyError, ValueError), match=match):
    config_lib.override(experiment.Config(), assignment)


def _params():
  model = Qwen25VL(tiny(vocab_size=64), rngs=nnx.Rngs(0))
  return nnx.state(model, nnx.Param)


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_freeze_vision_and_merger_multiplier():
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  for cfg, frozen, doubled in [
      (optim.OptimConfig(lr=0.1, weight_decay=0.0, clip_norm=None, freeze_vision=True), "vision/", None),
      (optim.OptimConfig(lr=0.1, weight_decay=0.0, clip_norm=None, merger_lr_mult=2.0), None, "vision/merger_"),
  ]:
    tx = optim.make_optimizer(cfg, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for name, u in _flat(updates).items():
      u = np.asarray(u)
      if frozen and name.startswith(frozen):
        assert np.all(u == 0), name
      elif doubled and name.startswith(doubled):
        # Adam's first step moves every coordinate by lr * mult (grad / sqrt(grad^2) = 1).
        np.testing.assert_allclose(u, -0.2, rtol=1e-4, err_msg=name)
      else:
        np.testing.assert_allclose(u, -0.1, rtol=1e-4, err_msg=name)


def test_non_finite_gradient_skips_the_update():
  params = _params()
  tx = optim.make_optimizer(optim.OptimConfig(lr=0.1), params)
  state = tx.init(params)
  bad = jax.tree.map(jnp.ones_like, params)
  leaves, treedef = jax.tree.flatten(bad)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
  new_params, new_state, reason = optim.guarded_update(tx, jax.tree.unflatten(treedef, leaves), state, params)
  assert int(reason) == 1
  for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  good = jax.tree.map(jnp.ones_like, params)
  moved, _, reason = optim.guarded_update(tx, good, state, params)
  assert int(reason) == 0
  assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(params)))
  _, _, reason = optim.guarded_update(tx, good, state, params, loss=jnp.float32(jnp.inf))
  assert int(reason) == 1  # a non-finite loss with finite gradients is skipped too


def _norm(tree):
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


def test_runaway_and_overflowing_updates_are_skipped():
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  # Adam's first step moves every coordinate by lr (sign of the gradient): |update| = lr * sqrt(n) exactly.
  n = sum(x.size for x in jax.tree.leaves(params))
  p_norm = _norm(params)
  for lr, bound, want in ((1e-3, 1.0, 0), (2 * p_norm / np.sqrt(n), 1.0, 3), (2 * p_norm / np.sqrt(n), 3.0, 0)):
    tx = optim.make_optimizer(optim.OptimConfig(lr=lr, weight_decay=0.0, clip_norm=None), params)
    new, _, reason = optim.guarded_update(tx, grads, tx.init(params), params, max_update_ratio=bound)
    assert int(reason) == want, (lr, bound)
    moved = _norm(jax.tree.map(jnp.subtract, new, params))
    np.testing.assert_allclose(moved, 0.0 if want else lr * np.sqrt(n), rtol=1e-4)
  # Finite gradients whose update overflows float32 (lr = 1e38, parameters of size ~1e38 + 1e38 = inf).
  tx = optim.make_optimizer(optim.OptimConfig(lr=3e38, weight_decay=0.0, clip_norm=None), params)
  big = jax.tree.map(lambda x: jnp.full_like(x, -3e38), params)
  _, _, reason = optim.guarded_update(tx, grads, tx.init(big), big)
  assert int(reason) == 2


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match="optim.schedule='warmup-cosine'"):
    optim.schedule(optim.OptimConfig(schedule="warmup-cosine"))


CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".py")))
def test_every_shipped_config_loads_and_names_valid_choices(name):
  from jaxvg.credit import assign
  from jaxvg.data import prompts
  from jaxvg.distill import teachers
  from jaxvg.rl import losses
  from jaxvg.run import validation
  cfg = config_lib.load_config(os.path.join(CONFIGS, name))
  validation.validate(cfg)
  assert isinstance(cfg, experiment.Config)
  prompts.get_format(cfg.data.prompt_format)
  assign.counterfactuals_needed(cfg.credit)
  losses.preset(cfg.algo.name, **({"max_len": cfg.rollout.max_new_tokens} if cfg.algo.name == "drgrpo" else {}))
  rl_config.advantage_estimator(cfg.algo)
  if cfg.distill.method in ("opd", "opsd"):
    teachers.divergence_config(cfg.distill)
  optim.schedule(cfg.optim)


def test_each_loss_preset_carries_its_advantage_estimator():
  est = lambda **kw: rl_config.advantage_estimator(experiment.AlgoCfg(**kw))
  assert [est(name=n) for n in ("grpo", "dapo", "gspo", "drgrpo")] == ["grpo", "grpo", "grpo", "drgrpo"]
  assert est(name="dapo", advantage="rloo") == "rloo" and est(name="drgrpo", advantage="rloo") == "rloo"
  # The README's `--set algo.name=drgrpo` on the demo: Dr.GRPO's loss and its own (std-free) advantage.
  demo = config_lib.apply_overrides(config_lib.load_config(os.path.join(CONFIGS, "demo.py")), ["algo.name=drgrpo"])
  assert rl_config.advantage_estimator(demo.algo) == "drgrpo"
  for std_normalized in ("grpo", "batch"):
    with pytest.raises(ValueError, match=f"algo.name='drgrpo' with algo.advantage='{std_normalized}'"):
      est(name="drgrpo", advantage=std_normalized)


def test_each_distillation_method_defaults_to_its_papers_divergence():
  from jaxvg.distill import teachers
  kind = lambda **kw: teachers.divergence_config(experiment.DistillCfg(**kw)).kind
  assert kind(method="opd") == "kl_student_teacher"   # standard OPD: reverse KL (methods.md, Eq. 3-4)
  assert kind(method="opsd") == "kl_teacher_student"  # OPSD: forward KL (methods.md section 8)
  assert kind(method="opsd", divergence="jsd") == "jsd"


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(("_3b.py", "_7b.py"))))
def test_real_scale_recipes_fit_8_h100(name):
  """Each real-scale recipe's per-device budget on 8 x H100 ((1, 8, 1) mesh), by `jaxvg.memory_plan` on the real
  model sizes: weights, Adam, gradients, one pass's activations (a drawn batch of prompts_per_batch x group_size
  rollouts of the longest prompt bucket + max_new_tokens, the largest image, the vision tower on every prompt's
  patches on every device) and its KV cache, plus any frozen copy
  (teacher or KL reference), under the 80 GiB of one H100."""
  from jaxvg import memory_plan
  from jaxvg.models.config import QWEN25VL_3B, QWEN25VL_7B
  cfg = config_lib.load_config(os.path.join(CONFIGS, name))
  models = {"qwen2.5-vl-3b": QWEN25VL_3B, "qwen2.5-vl-7b": QWEN25VL_7B}
  mesh, c = (1, 8, 1), {"float32": 4, "bfloat16": 2}
  rows = cfg.data.prompts_per_batch * cfg.rollout.group_size
  seq = max(cfg.data.length_buckets) + cfg.rollout.max_new_tokens
  patches = cfg.data.max_pixels // 14**2 * cfg.data.max_images
  plan = memory_plan.plan(models[cfg.model.preset], mesh, micro_batch=rows, seq_len=seq, patches=patches,
                          cache_batch=rows, cache_len=seq, param_bytes=c[cfg.model.param_dtype],
                          compute_bytes=c[cfg.model.dtype], tower_patches=cfg.data.prompts_per_batch * patches)
  frozen = 0
  if cfg.algo.kl_coef > 0 or (cfg.distill.method != "none" and cfg.distill.teacher == "initial"):
    frozen += plan.params
  if cfg.distill.method != "none" and cfg.distill.teacher != "initial":  # the recipes' HF teachers are 7B
    assert "7B" in cfg.distill.teacher, cfg.distill.teacher
    frozen += memory_plan.param_elements_per_device(QWEN25VL_7B, mesh) * c[cfg.model.param_dtype]
  total_gib = (plan.total + frozen) / 2**30
  assert total_gib < 80, f"{name}: {total_gib:.1f} GiB per device"


@pytest.mark.parametrize("assignment, message", [
    ("train.save_every=0", "train.save_every=0: must be an integer >= 1"),
    ("train.steps=-1", "train.steps=-1: must be an integer >= 0"),
    ("train.max_skipped_updates=0", "train.max_skipped_updates=0"),
    ("rollout.group_size=1", "rollout.group_size=1 with the 'grpo' advantage"),
    ("rollout.top_p=0", "rollout.top_p=0.0: must lie in (0.0, 1.0]"),
    ("algo.name=gpro", "algo.name='gpro': choose one of ('grpo', 'dapo', 'gspo', 'drgrpo')"),
    ("algo.ds_low=0.995", "algo.ds_low=0.995, algo.ds_high=0.99"),
    ("credit.method=pgpoo", "credit.method='pgpoo'"),
    ("data.source=jsonl", "data.path is empty"),
    ("data.tasks=count,colour", "data.tasks=('count', 'colour')"),
    ("data.length_buckets=128,64", "data.length_buckets=(128, 64): must be increasing"),
    ("data.teacher_error=1.5", "data.teacher_error=1.5: must lie in [0.0, 1.0]"),
    ("data.teacher_error_kind=answer", "data.teacher_error_kind='answer'"),
    ("data.teacher_error_kind=perception", "data.teacher_error_kind='perception' changes nothing without "
     "data.teacher_error > 0"),
    ("optim.schedule=step", "optim.schedule='step'"),
    ("optim.max_update_ratio=0", "optim.max_update_ratio=0.0"),
    ("sft_optim.lr=-1", "sft_optim.lr=-1.0"),
    ("model.dtype=fp8", "model.dtype='fp8'"),
])
def test_the_config_is_validated_before_any_work_with_the_field_named(assignment, message):
  from jaxvg.run import validation
  cfg = config_lib.apply_overrides(config_lib.load_config(os.path.join(CONFIGS, "demo.py")), [assignment])
  with pytest.raises(validation.ConfigError) as e:
    validation.validate(cfg)
  assert message in str(e.value)


@pytest.mark.parametrize("assignments, message", [
    (["data.tasks=count,color"], "'largest' in data.tasks (got ('count', 'color'))"),
    (["sft.steps=0", "sft.perception_steps=0"], "sft.steps > 0 (got 0)"),
])
def test_a_fallible_teacher_needs_a_warm_start_on_the_largest_task(assignments, message):
  from jaxvg.run import validation
  demo = config_lib.load_config(os.path.join(CONFIGS, "demo.py"))
  validation.validate(config_lib.apply_overrides(demo, ["data.teacher_error=0.6"]))
  with pytest.raises(validation.ConfigError, match=re.escape(message)):
    validation.validate(config_lib.apply_overrides(demo, ["data.teacher_error=0.6", *assignments]))


def test_group_of_one_is_allowed_where_no_group_baseline_is_used():
  from jaxvg.run import validation
  demo = config_lib.load_config(os.path.join(CONFIGS, "demo.py"))
  validation.validate(config_lib.apply_overrides(demo, ["rollout.group_size=1", "algo.advantage=batch"]))
  opd = config_lib.load_config(os.path.join(CONFIGS, "opd_demo.py"))
  validation.validate(config_lib.apply_overrides(opd, ["rollout.group_size=1"]))  # pure distillation: no advantage
