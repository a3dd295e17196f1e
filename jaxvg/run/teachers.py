"""The distillation teacher a config names, built once before RL (`jaxvg.distill.teachers` runs it)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvg.distill import teachers
from jaxvg.run import builders, sft
from jaxvg.run.experiment import Config


def make_teacher(cfg: Config, model, tokenizer, initial_params, *, mesh=None) -> teachers.Teacher | None:
  """The frozen teacher of `cfg.distill`: the initial policy (`initial_params`, shared with the KL reference), that
  policy's warm start continued for `teacher_sft_steps` (the demo's stronger teacher), or an HF directory."""
  d = cfg.distill
  if d.method == "none":
    return None
  graphdef = nnx.split(model, nnx.Param)[0]
  if d.teacher == "initial" and not d.teacher_sft_steps:
    return teachers.Teacher(graphdef, initial_params)
  if d.teacher == "initial":
    start = nnx.merge(graphdef, jax.tree.map(jnp.copy, initial_params))
    # The student's warm start continued: its tower has already been through the perception stage.
    teacher_sft = dataclasses.replace(cfg.sft, steps=d.teacher_sft_steps, perception_steps=0)
    teacher_cfg = dataclasses.replace(cfg, sft=teacher_sft)
    trained = sft.warm_start(teacher_cfg, start, tokenizer, name="teacher",
                             origin=f"student warm start {cfg.sft!r}", mesh=mesh)
    return teachers.Teacher(*nnx.split(trained, nnx.Param))
  if not os.path.isdir(d.teacher):
    raise ValueError(f"distill.teacher={d.teacher!r} is neither 'initial' nor a local HF checkpoint directory")
  loaded = builders.load_model(d.teacher, cfg.model, mesh=mesh)
  teachers.check_teacher(loaded.cfg, model.cfg)
  return teachers.Teacher(*nnx.split(loaded, nnx.Param))
