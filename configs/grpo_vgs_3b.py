r"""GRPO + VGS on a Qwen2.5-VL-3B student (VGS paper Eq. 22, Table 2): J = (1 - alpha) O_GRPO - alpha l_VGS-LP.

  python -m jaxvg.train --config configs/grpo_vgs_3b.py [--set model.hf_path=... --set distill.teacher=...]

configs/vgs_3b.py with alpha = 0.3 and eta = 1 (Eq. 22 omits the step-size correction): the clipped GRPO surrogate
(0.2 / 0.2, no KL) on the 4 rollouts of each prompt plus the VGS-LP distillation of the same rollouts.
"""

import dataclasses
import os

from jaxvg.core.config_lib import load_config
from jaxvg.run.experiment import Config


def get_config() -> Config:
  cfg = load_config(os.path.join(os.path.dirname(__file__), "vgs_3b.py"))
  return dataclasses.replace(
      cfg,
      algo=dataclasses.replace(cfg.algo, name="grpo", advantage="grpo", dynamic_sampling=False),
      distill=dataclasses.replace(cfg.distill, eta=1.0, rl_alpha=0.3),
      train=dataclasses.replace(cfg.train, out_dir="runs/grpo_vgs_3b"),
  )
