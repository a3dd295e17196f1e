r"""ViGOS on Qwen2.5-VL-7B-Instruct: the recipe of configs/vigos_3b.py (read its docstring) with the 7B checkpoint.

  python -m jaxvg.train --config configs/vigos_7b.py [--set model.hf_path=... --set data.path=...]

The released 7B script keeps 32 prompts per step (1 per device x 4 accumulation x 8 GPUs). Memory: 8.3B parameters x
16 bytes = 133 GB over the mesh (8.3 GB per device at fsdp = 16).
"""

import dataclasses
import os

from jaxvg.core.config_lib import load_config
from jaxvg.run.experiment import Config


def get_config() -> Config:
  cfg = load_config(os.path.join(os.path.dirname(__file__), "vigos_3b.py"))
  return dataclasses.replace(
      cfg,
      model=dataclasses.replace(cfg.model, hf_path="checkpoints/Qwen2.5-VL-7B-Instruct", preset="qwen2.5-vl-7b"),
      train=dataclasses.replace(cfg.train, out_dir="runs/vigos_7b"),
  )
