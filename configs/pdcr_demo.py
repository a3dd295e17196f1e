r"""PDCR on the demo: the tiny Qwen2.5-VL-style model on the synthetic dataset, on CPU.

  python -m jaxvg.train --config configs/pdcr_demo.py

configs/pacr_demo.py plus PDCR's decomposition: the visual dependence of each step,
V_k = sum_{t in step k} log pi(o_t | I) - log pi(o_t | white image), is split by Otsu over all steps of the batch into
perception and reasoning clusters, and the confidence-gain returns are min-max normalized inside each cluster
(methods.md sections 3 and 8). The synthetic reference solutions open with perception steps (one or two items each,
"At the top left, a small red circle.") followed by reasoning steps of about the same length, so the cluster sizes
(pdcr/visual_steps, pdcr/textual_steps) are worth watching.
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
      credit=CreditCfg(method="pdcr", counterfactual="white_image", max_steps=8, gamma=1.0, lambda_o=1.0,
                       lambda_p=0.5, step_score="sum"),
      train=dataclasses.replace(base.train, out_dir="runs/pdcr_demo"),
  )
