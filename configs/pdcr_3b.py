r"""PDCR on Qwen2.5-VL-3B-Instruct (methods.md sections 3.3 and 8; GRPO base, Vision-SR1-47K, 1 epoch).

  python -m jaxvg.train --config configs/pdcr_3b.py \
      [--set model.hf_path=... --set data.path=... --set data.eval_path=...]

Local files (placeholders; nothing is downloaded):
  checkpoints/Qwen2.5-VL-3B-Instruct/   the HF checkpoint directory (config.json, *.safetensors, tokenizer files)
  data/vision_sr1_47k/train.parquet     Vision-SR1-47K in verl parquet form
  data/vision_sr1_47k/test.parquet      a held-out split, validated before and after training

The parquet's user turn should hold the bare problem (with its <image> placeholder): the pgpo format appends its
<think> </think> + \boxed{} instruction. If it already carries an instruction, use --set data.prompt_format=raw.

PDCR's own table of training hyperparameters is not public; jaxvg follows the proposal of methods.md: Vision-SR1's
EasyR1 GRPO config (AdamW lr 1e-6, weight decay 1e-2, constant, grad clip 1.0, vision tower trainable; rollout batch
512 prompts x 8 samples at temperature 1.0, top-p 0.99, max 2048 new tokens; update batch 128 prompts, so 4 updates
per rollout batch; pixels 262,144-4,194,304). KL to a reference is off (section 8), and there is no dynamic sampling:
the process term keeps all-correct and all-wrong groups informative. 1 epoch of ~47K prompts at 512 per step = 92
steps. Vision-SR1's 12,800-token prompt limit is kept as the largest length bucket.

Credit: "\n\n" steps on token ids (fallback "\n"; <|im_end|> never opens a step), at most 16 step slots; c_0..c_K from
one tree-masked pass with the suffix "</think>\n\\boxed{" + Y_gt + "}"; gamma 1.0; V_k = sum over the step's tokens of
log pi(o_t | I) - log pi(o_t | white image); Otsu over all steps of the batch, min-max inside each cluster;
A_total = 1.0 * A_O + 0.5 * A_P (tune lambda_P in {0.1, 0.5, 1.0}).

Memory: a step samples 512 prompts as 128 draws of 4; each update accumulates 32 of them (algo.micro_batches), so
one pass holds 4 x 8 = 32 rollouts of <= 12,800 + 2,048 tokens: on 8 x H100 with a (1, 8, 1) mesh 1.75 GiB weights
+ 3.50 Adam + 1.75 gradients + 30.2 activations + 2.0 KV cache = 39.3 GiB per device (`jaxvg.memory_plan`); the
confidence pass adds (16 + 1) suffix copies of each row, without gradients.
"""

from jaxvg.rl.optim import OptimConfig
from jaxvg.run.experiment import AlgoCfg, Config, CreditCfg, DataCfg, ModelCfg, RolloutCfg, SFTCfg, TrainCfg


def get_config() -> Config:
  return Config(
      model=ModelCfg(hf_path="checkpoints/Qwen2.5-VL-3B-Instruct", preset="qwen2.5-vl-3b", dtype="bfloat16",
                     param_dtype="float32", remat=True, seed=0),
      data=DataCfg(source="verl", path="data/vision_sr1_47k/train.parquet",
                   eval_path="data/vision_sr1_47k/test.parquet", prompt_format="pgpo", prompts_per_batch=4,
                   max_prompt_tokens=12_800, min_pixels=262_144, max_pixels=4_194_304,
                   length_buckets=(1024, 2048, 4096, 8192, 12_800),
                   patch_buckets=(65_536, 262_144, 1_048_576, 2_740_224), max_images=1, seed=0),
      rollout=RolloutCfg(group_size=8, max_new_tokens=2048, temperature=1.0, top_p=0.99, top_k=0),
      algo=AlgoCfg(name="grpo", advantage="grpo", dynamic_sampling=False, kl_coef=0.0, entropy_coef=0.0, epochs=1,
                   minibatches=4, micro_batches=32),
      credit=CreditCfg(method="pdcr", counterfactual="white_image", max_steps=16, gamma=1.0, lambda_o=1.0,
                       lambda_p=0.5, step_score="sum"),
      optim=OptimConfig(lr=1e-6, schedule="constant", warmup_steps=0, weight_decay=1e-2, clip_norm=1.0,
                        freeze_vision=False),
      sft=SFTCfg(steps=0),
      train=TrainCfg(steps=92, seed=0, out_dir="runs/pdcr_3b", eval_every=0, eval_greedy=False, samples_logged=4),
  )
