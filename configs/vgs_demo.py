r"""Decomposed OPD with Visual Gradient Steering and Language Preservation on the demo (methods.md 5 and 8).

  python -m jaxvg.train --config configs/vgs_demo.py

configs/opd_demo.py's student, teacher and budget; the loss is eta [l_Std + gamma l_Vis + lambda l_LP] with the
student and the teacher each run with the image and in the no_image context, q* a stop-gradient target, LP on the
top 30% of the step's tokens by teacher VDS, gamma = 2, lambda = 0.01. eta was measured on this model with

  python -m jaxvg.calibrate --config configs/vgs_demo.py --steps 20

over 20 standard-OPD steps: |g_Std| 2.38, |g_Vis| 2.48, cos 0.887 -> eta 0.332 (paper: 0.41 for its 2B student,
0.36 for 4B, at gamma = 2); the angle between g_Lang and g_Vis was 103 +- 3 degrees (paper: 60-92, some obtuse).
"""

import dataclasses
import os

from jaxvg.core import config_lib
from jaxvg.run.experiment import Config


def get_config() -> Config:
  base = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "opd_demo.py"))
  return dataclasses.replace(
      base,
      distill=dataclasses.replace(base.distill, method="vgs", eta=0.33, gamma=2.0, lp_weight=0.01, lp_quantile=0.7),
      train=dataclasses.replace(base.train, out_dir="runs/vgs_demo"),
  )
