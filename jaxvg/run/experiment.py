"""The config tree of a training run. `configs/<name>.py` returns a `Config`; `--set a.b=value` overrides a field.

Each stage owns its section (`jaxvg.data.config`, `jaxvg.rl.config`, `jaxvg.credit.config`, `jaxvg.distill.config`,
`jaxvg.rl.optim.OptimConfig`, `jaxvg.core.sharding.MeshConfig`) and reads only that; this module composes them with
the run's own sections (model, warm start, train) into the tree. Adding a field needs a caller that sets it.
"""

import dataclasses

from jaxvg.core.config_lib import repr_without
from jaxvg.core.sharding import MeshConfig
from jaxvg.credit.config import CreditCfg
from jaxvg.data.config import DataCfg
from jaxvg.distill.config import DistillCfg
from jaxvg.rl.config import AlgoCfg, RolloutCfg
from jaxvg.rl.optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class ModelCfg:
  hf_path: str | None = None       # a local HF Qwen2.5-VL directory; None builds a random `preset` model
  preset: str = "tiny"             # tiny | qwen2.5-vl-3b | qwen2.5-vl-7b | qwen2.5-vl-32b | qwen2.5-vl-72b
  tiny_width: int = 64             # the tiny preset's decoder width D
  tiny_layers: int = 2
  tiny_heads: int = 4              # query heads (kv heads: half of them)
  tiny_vision_width: int = 32      # the tiny preset's vision width E
  dtype: str = "float32"           # compute dtype
  param_dtype: str = "float32"     # master weights
  remat: bool = False
  seed: int = 0
  # The attention kernel (jaxvg.models.layers.attention): blocked (XLA, any device) | xla | cudnn | pallas_tpu | auto
  # (cuDNN flash attention on GPU and the Pallas kernel on TPU where the shapes allow, else blocked). The same
  # weights compute the same function under each; warm starts are shared between them.
  attention_impl: str = "blocked"

  def identity(self) -> str:
    """The fields that decide the model's weights (not the kernel that runs them)."""
    return repr_without(self, "attention_impl")


@dataclasses.dataclass(frozen=True)
class SFTCfg:
  steps: int = 0                    # supervised warm-start steps on reference solutions (0: none)
  batch_size: int = 16
  # The perception stage, run first: the vision tower and a linear probe learn what each board cell holds (synthetic
  # data only; see jaxvg.run.sft). Freeze the tower afterwards (sft_optim.freeze_vision) to keep what it learned.
  perception_steps: int = 0
  perception_lr: float = 2e-3
  visual_weight: float = 1.0        # loss weight of the reference words that state an image fact (others: 1)
  reuse: bool = True                # reuse a finished warm-start from out_dir


@dataclasses.dataclass(frozen=True)
class TrainCfg:
  steps: int = 10
  seed: int = 0
  out_dir: str = "runs/default"
  log_every: int = 1
  eval_every: int = 0               # 0: evaluate only before and after
  eval_greedy: bool = True
  eval_white_image: bool = False    # also evaluate with every image white (the control of the accuracy)
  # Held-out synthetic records (0: none) on whose reference solutions every evaluation also measures the visual
  # dependency against the generator's labels, with a white image as the counterfactual: eval/white_kl (mean KL per
  # token), eval/white_kl_visual (on visual words), eval/dependency_auroc (KL, visual vs reasoning words) and
  # eval/step_split (Otsu split of the steps' mean KL): the dependency curves of a run.
  eval_dependency: int = 0
  # The papers' benchmarks (jaxvg.benchmarks, docs/benchmarks_eval.md), read from eval_benchmark_dir: evaluated
  # greedily at every eval_every step and after the last, into metrics.jsonl / TensorBoard as bench/<name>/...,
  # with out_dir/benchmarks/ holding each evaluation's summary and predictions. The run's data section sets their
  # pixel budget, images per prompt and buckets; records that do not fit are counted skips.
  eval_benchmarks: tuple[str, ...] = ()
  eval_benchmark_dir: str | None = None
  eval_benchmark_limit: int = 0     # records per benchmark (0: all)
  samples_logged: int = 4           # rollouts written to samples.jsonl per step
  save_every: int = 1               # checkpoint interval in RL steps (params, optimizer, RNG, data position)
  keep_checkpoints: int = 2
  max_skipped_updates: int = 3      # consecutive updates the guard may skip (non-finite, runaway) before the run stops
  resume: bool = True               # continue from the newest readable checkpoint in out_dir/checkpoints
  # Start over in an out_dir that holds another run (another config, or logs without a checkpoint to resume from):
  # its checkpoints, logs and final parameters are deleted; the warm start (out_dir/sft) stays, reused if it matches.
  overwrite: bool = False


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelCfg = ModelCfg()
  data: DataCfg = DataCfg()
  rollout: RolloutCfg = RolloutCfg()
  algo: AlgoCfg = AlgoCfg()
  credit: CreditCfg = CreditCfg()
  distill: DistillCfg = DistillCfg()
  optim: OptimConfig = OptimConfig()
  sft: SFTCfg = SFTCfg()
  sft_optim: OptimConfig = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=10, weight_decay=0.0)
  train: TrainCfg = TrainCfg()
  mesh: MeshConfig = MeshConfig()   # (data, fsdp, tensor) over all devices; -1 takes the rest
