r"""OPSD on the demo, as ViGOS's baseline: one privileged teacher on every completion token (methods.md 4.1, 4.3).

  python -m jaxvg.train --config configs/opsd_demo.py

configs/vigos_demo.py's student format, warm start, teacher weights and budget; the teacher reads the privileged
full-format prompt (problem, reference answer, transition, the three-part format; `<description>` prefilled like
the student's) and supervises all completion tokens with the forward KL(q_T || p_S), clamped at 0.05 per token. The
teacher is trained in the student's format only, and the tiny model reads the privileged prompt badly (docs/results.md,
the reading of OPSD).
"""

import dataclasses
import os

from jaxvg.core import config_lib
from jaxvg.run.experiment import Config, DistillCfg


def get_config() -> Config:
  base = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "vigos_demo.py"))
  return dataclasses.replace(
      base,
      distill=DistillCfg(method="opsd", teacher="initial", teacher_sft_steps=300,
                         teacher_context="vigos_reference_teacher", divergence="kl_teacher_student",
                         max_token_value=0.05, aggregation="token_mean"),
      train=dataclasses.replace(base.train, out_dir="runs/opsd_demo"),
  )
