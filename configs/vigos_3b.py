r"""ViGOS on Qwen2.5-VL-3B-Instruct with the released scripts' recipe (methods.md 4.2, 4.3 and 8).

  python -m jaxvg.train --config configs/vigos_3b.py [--set model.hf_path=... --set data.path=...]

Local files (placeholders; nothing is downloaded):
  checkpoints/Qwen2.5-VL-3B-Instruct/   the HF checkpoint directory (config.json, *.safetensors, tokenizer files)
  data/vision_sr1_47k/train.parquet     Vision-SR1-47K's train split (problem / images / answer columns)
  data/mmk12/test.parquet               a held-out set, validated before and after training

Recipe: the ViGOS student format (`<description>` prefilled), one rollout per prompt at temperature 1.1, top-p 0.95,
top-k 20, 32 prompts per step, one epoch (47.6k prompts: about 1,490 steps); teachers = the frozen initial model in
its three contexts (image only; privileged reasoning prompt + the student's reasoning tokens; privileged full format
on invalid rollouts), per-token KL clamped at 0.05, lambda 1 / 1 / 2, token means over the step's global counts.
The paper trains LoRA adapters (r 64, alpha 128) at lr 5e-6 with HF Trainer defaults (linear decay, no warmup,
wd 0) and max_grad_norm 0.1; jaxvg updates all weights, so the learning rate is the 1e-6 of full fine-tuning runs
(an adaptation: tune it), with the same schedule and clip. The teacher shares the initial weights with no copy
beyond the one frozen reference.

Memory (bf16 compute, fp32 master weights, remat): 3.75B parameters x (4 weights + 8 Adam + 4 frozen teacher) bytes
= 60 GB over the mesh, e.g. 7.5 GB per device with fsdp = 8; one micro-batch is 32 rollouts of <= 4,096 prompt +
2,048 completion tokens, scored by the student and three teacher contexts.
"""

from jaxvg.rl.optim import OptimConfig
from jaxvg.run.experiment import AlgoCfg, Config, DataCfg, DistillCfg, ModelCfg, RolloutCfg, SFTCfg, TrainCfg


def get_config() -> Config:
  return Config(
      model=ModelCfg(hf_path="checkpoints/Qwen2.5-VL-3B-Instruct", preset="qwen2.5-vl-3b", dtype="bfloat16",
                     param_dtype="float32", remat=True, seed=0),
      data=DataCfg(source="geo3k", path="data/vision_sr1_47k/train.parquet", eval_path="data/mmk12/test.parquet",
                   prompt_format="vigos", prompts_per_batch=32, max_prompt_tokens=4096, min_pixels=200_704,
                   max_pixels=1_003_520, length_buckets=(512, 1024, 2048, 4096),
                   patch_buckets=(8_192, 32_768, 65_536, 131_072), max_images=1, seed=0),
      rollout=RolloutCfg(group_size=1, max_new_tokens=2048, temperature=1.1, top_p=0.95, top_k=20),
      algo=AlgoCfg(name="grpo", dynamic_sampling=False, kl_coef=0.0, epochs=1, minibatches=1),
      distill=DistillCfg(method="vigos", teacher="initial", max_token_value=0.05, lambda_perception=1.0,
                         lambda_reasoning=1.0, lambda_reference=2.0, aggregation="token_mean"),
      optim=OptimConfig(lr=1e-6, schedule="linear", warmup_steps=0, total_steps=1490, weight_decay=0.0,
                        clip_norm=0.1, freeze_vision=False),
      sft=SFTCfg(steps=0),
      train=TrainCfg(steps=1490, seed=0, out_dir="runs/vigos_3b", eval_every=0, eval_greedy=False, save_every=50),
  )
