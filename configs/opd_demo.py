r"""Standard on-policy distillation on the demo: the student samples, a stronger teacher scores every token.

  python -m jaxvg.train --config configs/opd_demo.py

The student is configs/demo.py's warm-started tiny model; the teacher is the same warm start continued for 300 more
supervised steps (saved in out_dir/teacher). Loss: the reverse KL(p_S || q_T) of each response token, full
vocabulary, token mean over the step (VGS's l_Standard, methods.md 5.1). Same prompts, rollouts per prompt and
steps as the RL demos, so the replication table compares them on one budget.
"""

import dataclasses
import os

from jaxvg.core import config_lib
from jaxvg.run.experiment import Config, DistillCfg


def base_config() -> Config:
  """configs/demo.py with dynamic sampling off (distillation uses every rollout)."""
  base = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
  return dataclasses.replace(base, algo=dataclasses.replace(base.algo, dynamic_sampling=False))


def get_config() -> Config:
  base = base_config()
  return dataclasses.replace(
      base,
      distill=DistillCfg(method="opd", teacher="initial", teacher_sft_steps=300, divergence="kl_student_teacher",
                         aggregation="token_mean"),
      train=dataclasses.replace(base.train, out_dir="runs/opd_demo"),
  )
