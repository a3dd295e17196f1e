r"""PACR on the demo: the tiny Qwen2.5-VL-style model on the synthetic dataset, on CPU.

  python -m jaxvg.train --config configs/pacr_demo.py

configs/demo.py with the PACR credit: each rollout is split into "\n\n" steps on its token ids, the K + 1
answer-forcing confidences c_k = log pi(Y_gt | I, q, H_<=k, "</think>\n\\boxed{...}") come from one tree-masked pass,
and every token of step k gets A_total = 1.0 * A_O + 0.5 * A_P with A_P the batch-wide min-max of the confidence-gain
returns (methods.md sections 3 and 8). The process term is non-zero even in all-correct or all-wrong groups, so
dynamic sampling is off (as in the GRPO setups of the PACR / PDCR papers); the loss stays the demo's.
"""

import dataclasses
import os

from jaxvg.core import config_lib
from jaxvg.run.experiment import Config, CreditCfg


def get_config() -> Config:
  base = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
  return dataclasses.replace(
      base,
      algo=dataclasses.replace(base.algo, dynamic_sampling=False),
      credit=CreditCfg(method="pacr", max_steps=8, gamma=1.0, lambda_o=1.0, lambda_p=0.5),
      train=dataclasses.replace(base.train, out_dir="runs/pacr_demo"),
  )
