r"""PGPO on Qwen2.5-VL-7B-Instruct: the recipe of configs/pgpo_3b.py (read its docstring) with the 7B checkpoint.

  python -m jaxvg.train --config configs/pgpo_7b.py \
      [--set model.hf_path=... --set data.path=... --set data.eval_path=...]

Local files (placeholders; nothing is downloaded): checkpoints/Qwen2.5-VL-7B-Instruct/ (config.json, *.safetensors,
tokenizer files), and the ViRL39K / MMK12 parquet files named in configs/pgpo_3b.py.

Memory on 8 x H100 with a (1, 8, 1) mesh (`jaxvg.memory_plan`, the 3B recipe's micro-batch of 16 prompts x 5):
3.86 GiB weights (fp32) + 7.73 Adam + 3.86 gradients + 48.0 activations + 3.3 KV cache = 66.7 GiB per device.

The paper's 7B DAPO baseline collapses (entropy explosion) and is reported at its best pre-collapse checkpoint, step
190 of 202; watch the entropy metric.
"""

import dataclasses
import os

from jaxvg.core.config_lib import load_config
from jaxvg.run.experiment import Config


def get_config() -> Config:
  cfg = load_config(os.path.join(os.path.dirname(__file__), "pgpo_3b.py"))
  return dataclasses.replace(
      cfg,
      model=dataclasses.replace(cfg.model, hf_path="checkpoints/Qwen2.5-VL-7B-Instruct", preset="qwen2.5-vl-7b"),
      train=dataclasses.replace(cfg.train, out_dir="runs/pgpo_7b"),
  )
