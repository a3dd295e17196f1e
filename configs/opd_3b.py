r"""Standard OPD on a Qwen2.5-VL-3B student: configs/vgs_3b.py's teacher, data and budget with l_Standard alone.

  python -m jaxvg.train --config configs/opd_3b.py [--set model.hf_path=... --set distill.teacher=...]

The VGS paper's baseline (Eq. 3-4): the reverse KL(p_S || q_T) of every response token, full vocabulary.
"""

import dataclasses
import os

from jaxvg.core.config_lib import load_config
from jaxvg.run.experiment import Config


def get_config() -> Config:
  cfg = load_config(os.path.join(os.path.dirname(__file__), "vgs_3b.py"))
  return dataclasses.replace(
      cfg,
      distill=dataclasses.replace(cfg.distill, method="opd", divergence="kl_student_teacher"),
      train=dataclasses.replace(cfg.train, out_dir="runs/opd_3b"),
  )
