r"""PGPO on Qwen2.5-VL-3B-Instruct with the paper's recipe (methods.md section 2.3; DAPO base, ViRL39K, 2 epochs).

  python -m jaxvg.train --config configs/pgpo_3b.py \
      [--set model.hf_path=... --set data.path=... --set data.eval_path=...]

Local files (placeholders; nothing is downloaded):
  checkpoints/Qwen2.5-VL-3B-Instruct/   the HF checkpoint directory (config.json, *.safetensors, tokenizer files)
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

Memory: a step samples 384 prompts as 24 draws of 16 (prompts_per_batch); each update accumulates 8 of them
(algo.micro_batches), so one pass holds 16 x 5 = 80 rollouts of <= 4,096 + 2,048 tokens. On 8 x H100 with a
(1, 8, 1) mesh, `jaxvg.memory_plan` gives per device 1.75 GiB weights (fp32) + 3.50 Adam + 1.75 gradients + 35.8
activations (bf16, remat, attention in blocks of 1,024 queries; the vision tower on all 16 x 5,120 patches, which
every device holds) + 2.1 rollout KV cache = 44.9 GiB
(tests/test_config_optim.py checks every real-scale recipe's sum against 80 GiB).
"""

from jaxvg.rl.optim import OptimConfig
from jaxvg.run.experiment import AlgoCfg, Config, CreditCfg, DataCfg, ModelCfg, RolloutCfg, SFTCfg, TrainCfg


def get_config() -> Config:
  return Config(
      model=ModelCfg(hf_path="checkpoints/Qwen2.5-VL-3B-Instruct", preset="qwen2.5-vl-3b", dtype="bfloat16",
                     param_dtype="float32", remat=True, seed=0),
      data=DataCfg(source="verl", path="data/virl39k/train.parquet", eval_path="data/mmk12/test.parquet",
                   prompt_format="pgpo", prompts_per_batch=16, max_prompt_tokens=4096, min_pixels=200_704,
                   max_pixels=1_003_520, length_buckets=(512, 1024, 2048, 4096),
                   patch_buckets=(32_768, 131_072, 327_680, 655_360), max_images=1, seed=0),
      rollout=RolloutCfg(group_size=5, max_new_tokens=2048, temperature=1.0, top_p=0.99, top_k=0),
      algo=AlgoCfg(name="dapo", advantage="grpo", dynamic_sampling=True, ds_low=0.01, ds_high=0.99, ds_max_tries=8,
                   kl_coef=0.0, entropy_coef=0.0, epochs=1, minibatches=3, micro_batches=8),
      credit=CreditCfg(method="pgpo", counterfactual="mask_visual", tau=0.4, beta=2.0, threshold_mode="absolute",
                       low_weight_floor=0.0, mass_normalize=True),
      optim=OptimConfig(lr=1e-6, schedule="constant", warmup_steps=0, weight_decay=1e-2, clip_norm=1.0,
                        freeze_vision=False),
      sft=SFTCfg(steps=0),
      train=TrainCfg(steps=202, seed=0, out_dir="runs/pgpo_3b", eval_every=0, eval_greedy=False, samples_logged=4),
  )
