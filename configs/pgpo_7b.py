r"""PGPO on Qwen2.5-VL-7B-Instruct: the recipe of configs/pgpo_3b.py (read its docstring) with the 7B checkpoint.

  python -m jaxvg.train --config configs/pgpo_7b.py \
      [--set model.hf_path=... --set data.path=... --set data.eval_path=...]

Local files (placeholders; nothing is downloaded): checkpoints/Qwen2.5-VL-7B-Instruct/ (config.json, *.safetensors,
tokenizer files), and the ViRL39K / MMK12 parquet files named in configs/pgpo_3b.py.

The paper's 7B DAPO baseline collapses (entropy explosion) and is reported at its best pre-collapse checkpoint, step
190 of 202; watch the entropy metric.
"""

import dataclasses
import os

from jaxvg.config_lib import load_config
from jaxvg.experiment import Config


def get_config() -> Config:
  cfg = load_config(os.path.join(os.path.dirname(__file__), "pgpo_3b.py"))
  return dataclasses.replace(
      cfg,
      model=dataclasses.replace(cfg.model, hf_path="checkpoints/Qwen2.5-VL-7B-Instruct", preset="qwen2.5-vl-7b"),
      train=dataclasses.replace(cfg.train, out_dir="runs/pgpo_7b"),
  )
