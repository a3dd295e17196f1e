r"""PGPO on Qwen2.5-VL-7B-Instruct with the paper's recipe (methods.md section 2.3; DAPO base, ViRL39K, 2 epochs).

  python -m jaxvg.train --config configs/pgpo_7b.py \
      [--set model.hf_path=... --set data.path=... --set data.eval_path=...]

Local files (placeholders; nothing is downloaded):
  checkpoints/Qwen2.5-VL-7B-Instruct/   the HF checkpoint directory (config.json, *.safetensors, tokenizer files)
  data/virl39k/train.parquet            ViRL39K in verl parquet form (the PAPO-processed 38,870 samples)
  data/mmk12/test.parquet               the MMK12 test set, validated before and after training

The parquet's user turn should hold the bare problem (with its <image> placeholder): the pgpo format appends
the paper's instruction. If it already carries an instruction, use --set data.prompt_format=raw instead.

Recipe: prompt format pgpo (EasyR1 system turn, <think> </think> then \boxed{}), reward 0.9 accuracy + 0.1 format,
AdamW lr 1e-6 constant (no warmup, no decay), vision tower trainable; rollout batch 384 prompts x 5 samples at
temperature 1.0, top-p 0.99, max 2048 new tokens; update batch 128 prompts (3 updates per rollout batch); DAPO:
clip 0.2 / 0.28, dual clip 3.0, token-mean loss, dynamic sampling keeping groups with mean accuracy in (0.01, 0.99),
no KL, no entropy bonus; PGPO: mask_visual dependency scored by the rollout policy, tau 0.4, beta 2.0, absolute
threshold, mass normalization on. 2 epochs of 38,870 prompts at 384 per step = 202 steps. Pixels 200,704-1,003,520
and a 4096-token prompt limit follow the unofficial reimplementation. The paper reports avg@8 at temperature 1.0
(PAPO protocol); run the evaluation CLI for that, the in-loop evaluation here is one sample per prompt.

Everything but the checkpoint follows configs/pgpo_3b.py. The paper's 7B DAPO baseline collapses (entropy explosion) and is reported at its best pre-collapse checkpoint, step
190 of 202; watch the entropy metric.

The train loop scores and updates one drawn prompt batch per micro-batch, so 128 prompts x 5 samples of up to
4096 + 2048 tokens must fit the mesh (bf16 compute, remat on).
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
