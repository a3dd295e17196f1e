"""The eta calibration command: its l_Std gradient is standard OPD's, and its eta follows Eq. 15 from its means."""

import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxvg import calibrate
from jaxvg.distill import teachers
from test_distill import G, _batch, _cfg, _distill_batch  # noqa: F401  (shared fixtures)
from test_distill import tok  # noqa: F401


def test_the_std_gradient_is_the_gradient_of_standard_opd(tok):  # noqa: F811
  """g_Std from the VGS terms equals the gradient of the OPD loss (reverse KL, token mean) computed by the OPD path."""
  cfg = _cfg(method="vgs", aggregation="token_mean")
  variants, contexts = teachers.prompt_variants(cfg.distill)
  from jaxvg.run import builders
  model, ctx, tokens, mask = _batch(cfg, tok, variants, contexts)
  teacher_model = builders.build_model(dataclasses.replace(cfg.model, seed=4), cfg.data)[1]
  teacher = teachers.Teacher(*nnx.split(teacher_model, nnx.Param))
  batch = _distill_batch(cfg, model, teacher, ctx, tokens, mask, tok)
  graphdef, params = nnx.split(model, nnx.Param)
  w_T = teacher.model().decoder.head_weight_DV()
  grads = teachers.vgs_term_gradients(params, graphdef, w_T, batch, d=cfg.distill, group_size=G)

  opd = dataclasses.replace(cfg.distill, method="opd", divergence="kl_student_teacher")
  opd_out = teachers.make_teacher_pass(opd, G)(teacher, ctx, tokens, mask)
  opd_batch = dataclasses.replace(batch, teacher=opd_out, prompt_text=None)
  g_opd, _ = jax.grad(teachers.distill_loss_fn, has_aux=True)(params, graphdef, w_T, opd_batch, d=opd, group_size=G,
                                                             loss_cfg=None)
  for a, b in zip(jax.tree.leaves(grads["std"]), jax.tree.leaves(g_opd)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-8)
  stats = jax.device_get(teachers.gradient_statistics(grads))
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
  s, v, lang = flat(grads["std"]), flat(grads["vis"]), flat(grads["lang"])
  np.testing.assert_allclose(stats["norm_std"], np.linalg.norm(s), rtol=1e-5)
  np.testing.assert_allclose(stats["cos_std_vis"], s @ v / np.linalg.norm(s) / np.linalg.norm(v), rtol=1e-4)
  np.testing.assert_allclose(stats["angle_lang_vis"],
                             np.degrees(np.arccos(lang @ v / np.linalg.norm(lang) / np.linalg.norm(v))), atol=1e-2)


def test_calibration_config_is_standard_opd_with_vgs_passes():
  cfg = calibrate.calibration_config(_cfg(method="vgs", eta=0.4, gamma=3.0, lp_weight=0.1, rl_alpha=0.3))
  d = cfg.distill
  assert (d.method, d.gamma, d.lp_weight, d.eta, d.rl_alpha) == ("vgs", 0.0, 0.0, 1.0, 0.0)
  assert cfg.train.out_dir.endswith("calibrate") and not cfg.train.resume
  with pytest.raises(ValueError, match="distill.method"):
    calibrate.calibration_config(_cfg(method="vigos"))


@pytest.mark.slow
def test_calibrate_command_prints_eta_from_its_means(tmp_path, capsys):
  result = calibrate.main([
      "--config", os.path.join(os.path.dirname(__file__), "..", "configs", "vgs_demo.py"), "--steps", "2",
      "--set", f"train.out_dir={tmp_path}", "--set", "sft.steps=2",
        "--set", "sft.perception_steps=2", "--set", "sft.batch_size=2", "--set", "sft_optim.total_steps=2",
      "--set", "distill.teacher_sft_steps=2", "--set", "data.prompts_per_batch=2", "--set", "data.num_eval=2",
      "--set", "rollout.group_size=2", "--set", "rollout.max_new_tokens=8", "--set", "model.tiny_width=32",
      "--set", "model.tiny_layers=1", "--set", "model.tiny_vision_width=32"])
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed == result and result["steps"] == 2 and 0.0 <= result["angle_lang_vis"] <= 180.0
  ns, nv, c, g = result["norm_std"], result["norm_vis"], result["cos_std_vis"], result["gamma"]
  assert g == 2.0
  assert math.isclose(result["eta"], ns / math.sqrt(ns**2 + g**2 * nv**2 + 2 * g * ns * nv * c), rel_tol=1e-9)
  assert os.path.isdir(tmp_path / "calibrate" / "checkpoints")
