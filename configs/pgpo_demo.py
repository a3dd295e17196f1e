r"""PGPO on the demo: the tiny Qwen2.5-VL-style model on the synthetic dataset, on CPU.

  python -m jaxvg.train --config configs/pgpo_demo.py

Everything but the credit (and the output folder) is configs/demo.py, so a run of each compares PGPO's token weights
with plain DAPO: the compacted mask_visual pass gives the sampled-token k3 dependency of every response token, and
the threshold-gated, mass-conserving weights (tau 0.4, beta 2.0) scale the group advantage (methods.md section 2).
"""

import dataclasses
import os

from jaxvg.core import config_lib
from jaxvg.run.experiment import Config, CreditCfg


def get_config() -> Config:
  base = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
  return dataclasses.replace(
      base,
      credit=CreditCfg(method="pgpo", counterfactual="mask_visual", tau=0.4, beta=2.0, threshold_mode="absolute",
                       low_weight_floor=0.0, mass_normalize=True),
      train=dataclasses.replace(base.train, out_dir="runs/pgpo_demo"),
  )
