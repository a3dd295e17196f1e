r"""OPSD on Qwen2.5-VL-3B-Instruct, ViGOS's baseline: configs/vigos_3b.py with one privileged teacher on every token.

  python -m jaxvg.train --config configs/opsd_3b.py [--set model.hf_path=... --set data.path=...]

methods.md 4.3 [PROPOSAL]: the same student format, data, optimizer and budget as configs/vigos_3b.py; the frozen
initial model reads the privileged full-format prompt (problem, reference answer, transition, three-part format,
`<description>` prefilled) and supervises all completion tokens with the forward KL(q_T || p_S), clamped at 0.05.
"""

import dataclasses
import os

from jaxvg.core.config_lib import load_config
from jaxvg.run.experiment import Config, DistillCfg


def get_config() -> Config:
  cfg = load_config(os.path.join(os.path.dirname(__file__), "vigos_3b.py"))
  return dataclasses.replace(
      cfg,
      distill=DistillCfg(method="opsd", teacher="initial", teacher_context="vigos_reference_teacher",
                         divergence="kl_teacher_student", max_token_value=0.05, aggregation="token_mean"),
      train=dataclasses.replace(cfg.train, out_dir="runs/opsd_3b"),
  )
