r"""Decomposed OPD with VGS-LP: a Qwen2.5-VL-3B student taught by a larger Qwen2.5-VL teacher (methods.md 5.3 and 8).

  python -m jaxvg.train --config configs/vgs_3b.py \
      [--set model.hf_path=... --set distill.teacher=... --set data.path=...]

Local files (placeholders; nothing is downloaded):
  checkpoints/Qwen2.5-VL-3B-Instruct/    the student
  checkpoints/Qwen2.5-VL-7B-teacher/     the teacher: an HF directory of a Qwen2.5-VL with the same vocabulary (the
                                         paper's is Qwen3-VL-8B after GRPO on Vision-SR1-47K; here a 7B trained
                                         the same way, e.g. with configs/pgpo_7b.py and `python -m jaxvg.export`)
  data/vision_sr1_47k/train.parquet      Vision-SR1-47K
  data/mmk12/test.parquet                a held-out set

Recipe (paper App. B.2, Table 4): AdamW lr 1e-6 constant, wd 1e-2, vision tower trainable, one epoch, 128 prompts x
4 rollouts = 512 per step (353 steps), temperature 1.0, top-p 1.0, max 2,048 new tokens, no KL to a reference; the
VGS prompt (<reason> </reason> then \boxed{}). Loss eta [l_Std + gamma l_Vis + lambda l_LP], gamma = 2,
lambda = 0.01, LP on the top 30% VDS tokens of the whole step, the text-only contexts `no_image`. eta = 0.41 is the
paper's value at gamma = 2 for its 2B student; measure this pair's with

  python -m jaxvg.calibrate --config configs/vgs_3b.py --steps 20

and set distill.eta to the printed value. Memory: the student's 3.75B x 16 bytes plus the teacher's 8.3B x 4 bytes
(fp32, frozen; 2 bytes with --set model.param_dtype=bfloat16 for both) = 93 GB over the mesh. A step samples 128
prompts as 8 draws of 16, accumulated into one update (algo.micro_batches), so each pass holds 16 x 4 = 64 rollouts:
two student passes with gradient and two teacher passes. On 8 x H100 ((1, 8, 1) mesh): 1.75 GiB weights + 3.50
Adam + 1.75 gradients + 31.5 activations + 1.7 KV cache + 3.9 teacher = 44.1 GiB per device.
"""

from jaxvg.rl.optim import OptimConfig
from jaxvg.run.experiment import AlgoCfg, Config, DataCfg, DistillCfg, ModelCfg, RolloutCfg, SFTCfg, TrainCfg


def get_config() -> Config:
  return Config(
      model=ModelCfg(hf_path="checkpoints/Qwen2.5-VL-3B-Instruct", preset="qwen2.5-vl-3b", dtype="bfloat16",
                     param_dtype="float32", remat=True, seed=0),
      data=DataCfg(source="geo3k", path="data/vision_sr1_47k/train.parquet", eval_path="data/mmk12/test.parquet",
                   prompt_format="vgs", prompts_per_batch=16, max_prompt_tokens=4096, min_pixels=200_704,
                   max_pixels=1_003_520, length_buckets=(512, 1024, 2048, 4096),
                   patch_buckets=(32_768, 131_072, 327_680, 655_360), max_images=1, seed=0),
      rollout=RolloutCfg(group_size=4, max_new_tokens=2048, temperature=1.0, top_p=1.0, top_k=0),
      algo=AlgoCfg(name="grpo", dynamic_sampling=False, kl_coef=0.0, epochs=1, minibatches=1, micro_batches=8),
      distill=DistillCfg(method="vgs", teacher="checkpoints/Qwen2.5-VL-7B-teacher", eta=0.41, gamma=2.0,
                         lp_weight=0.01, lp_quantile=0.7, aggregation="token_mean"),
      optim=OptimConfig(lr=1e-6, schedule="constant", warmup_steps=0, weight_decay=1e-2, clip_norm=1.0,
                        freeze_vision=False),
      sft=SFTCfg(steps=0),
      train=TrainCfg(steps=353, seed=0, out_dir="runs/vgs_3b", eval_every=0, eval_greedy=True, save_every=20),
  )
