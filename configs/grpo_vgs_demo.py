r"""GRPO + VGS on the demo: J = (1 - alpha) O_GRPO - alpha l_VGS-LP with alpha = 0.3 (VGS paper Eq. 22).

  python -m jaxvg.train --config configs/grpo_vgs_demo.py

configs/vgs_demo.py's student, teacher and distillation terms, mixed into the GRPO loss (the clipped surrogate, no
KL, no dynamic sampling). Eq. 22 writes l_VGS-LP without the step-size correction, so eta = 1 here.
"""

import dataclasses
import os

from jaxvg.core import config_lib
from jaxvg.run.experiment import Config


def get_config() -> Config:
  base = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "vgs_demo.py"))
  return dataclasses.replace(
      base,
      algo=dataclasses.replace(base.algo, name="grpo", advantage="grpo", dynamic_sampling=False),
      distill=dataclasses.replace(base.distill, eta=1.0, rl_alpha=0.3),
      train=dataclasses.replace(base.train, out_dir="runs/grpo_vgs_demo"),
  )
