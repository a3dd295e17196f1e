r"""The embedded default: a tiny Qwen2.5-VL-style model on the synthetic dataset, on CPU.

  python -m jaxvg.train --config configs/demo.py

A short supervised warm start on the reference solutions (reused when already done), then DAPO with dynamic
sampling. Prints `accuracy before` and `accuracy after` on the held-out synthetic split.
"""

from jaxvg.experiment import (AlgoCfg, Config, CreditCfg, DataCfg, ModelCfg, RolloutCfg, SFTCfg, TrainCfg)
from jaxvg.optim import OptimConfig


def get_config() -> Config:
  return Config(
      model=ModelCfg(preset="tiny", tiny_width=128, tiny_layers=4, tiny_heads=2, tiny_vision_width=64, seed=0),
      data=DataCfg(source="synthetic", prompt_format="pgpo", num_train=20000, num_eval=64, image_size=112,
                   prompts_per_batch=8, max_pixels=112 * 112, length_buckets=(96, 128, 256),
                   patch_buckets=(256, 512, 1024)),
      rollout=RolloutCfg(group_size=8, max_new_tokens=96, temperature=1.0),
      algo=AlgoCfg(name="dapo", advantage="grpo", dynamic_sampling=True, ds_max_tries=3),
      credit=CreditCfg(method="none"),
      optim=OptimConfig(lr=5e-5, weight_decay=0.0, clip_norm=1.0),
      sft=SFTCfg(steps=300, batch_size=8),
      sft_optim=OptimConfig(lr=2e-3, schedule="cosine", warmup_steps=20, total_steps=300, weight_decay=0.0),
      train=TrainCfg(steps=20, out_dir="runs/demo", eval_greedy=True),
  )
