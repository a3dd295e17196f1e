"""The config tree of a training run. `configs/<name>.py` returns a `Config`; `--set a.b=value` overrides a field.

Each stage reads only its own section. Adding a field needs a caller that sets it.
"""

import dataclasses

from jaxvg.optim import OptimConfig
from jaxvg.sharding import MeshConfig


def _repr_without(cfg, *names: str) -> str:
  """The dataclass repr of `cfg` without the fields `names` (added fields that change no result: the repr of a
  config written before they existed stays the same)."""
  fields = (f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg) if f.name not in names)
  return f"{type(cfg).__qualname__}({', '.join(fields)})"


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
    return _repr_without(self, "attention_impl")


@dataclasses.dataclass(frozen=True)
class DataCfg:
  source: str = "synthetic"        # synthetic | geo3k | verl | jsonl
  path: str | None = None          # a parquet / jsonl file (not for synthetic)
  image_dir: str | None = None     # jsonl image folder
  # Image paths in the data must resolve inside their folder (image_dir; a parquet file's own folder): a path that
  # leaves it (.., absolute, a symlink) is a named skip unless this is set.
  allow_images_outside: bool = False
  eval_path: str | None = None
  tokenizer: str | None = None     # None: the checkpoint's, or the shipped one with a random model
  prompt_format: str = "pgpo"      # pgpo | vgs | vigos
  num_train: int = 4096            # synthetic records
  num_eval: int = 64
  # The synthetic generator (jaxvg.data.synthetic.SyntheticConfig): image side in pixels, board, task families and
  # the form of the perception steps. 84 = 28 x 3: each cell of the 3 x 3 board is one merged visual token.
  image_size: int = 84
  grid: int = 3
  tasks: tuple[str, ...] = ("count", "color", "largest", "spatial", "digit_sum")
  perception: str = "items"        # items (one perception step per item) | scene (one step for the whole scene)
  cell_tint: int = 24              # near-white cell backgrounds that tell the cell's position (0: a white board)
  prompts_per_batch: int = 8
  max_prompt_tokens: int = 512
  min_pixels: int = 56 * 56
  max_pixels: int = 84 * 84
  length_buckets: tuple[int, ...] = (64, 128, 256, 512)
  patch_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)
  max_images: int = 1
  seed: int = 0
  # Training batches are processed in this many grain worker processes, ahead of the loop (0: in the loop). Workers
  # change when records are processed, never which or in what order: the batches are the same. A checkpoint's data
  # position is stored in the pipeline's own form, so a run resumes with the worker count it started with.
  worker_count: int = 0
  # Image preprocessing: fast (jaxvg.data.images, equal to transformers' to the bit) | transformers.
  image_backend: str = "fast"

  def identity(self) -> str:
    """The fields that decide what is read (not how fast): warm starts are reused while this is unchanged."""
    return _repr_without(self, "worker_count", "image_backend")


@dataclasses.dataclass(frozen=True)
class RolloutCfg:
  group_size: int = 8
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0


@dataclasses.dataclass(frozen=True)
class AlgoCfg:
  name: str = "dapo"                # grpo | dapo | drgrpo | gspo: the loss preset
  advantage: str = ""               # grpo | drgrpo | rloo | batch; "" = the preset's own (`advantage_estimator`)
  dynamic_sampling: bool = True     # DAPO: keep groups whose mean accuracy is inside (ds_low, ds_high)
  ds_low: float = 0.01
  ds_high: float = 0.99
  ds_max_tries: int = 4
  kl_coef: float = 0.0
  entropy_coef: float = 0.0
  epochs: int = 1                   # passes over each rollout batch
  minibatches: int = 1              # optimizer updates per epoch
  # Drawn prompt batches (data.prompts_per_batch each) accumulated into one optimizer update: a step samples
  # prompts_per_batch x minibatches x micro_batches prompts, and scores and differentiates one drawn batch at a time,
  # so the memory a pass needs is set by prompts_per_batch alone. Dynamic sampling's ds_max_tries then counts draws
  # of micro_batches batches.
  micro_batches: int = 1
  reward_fn: str = "jaxvg.rewards:default_reward"

  def __post_init__(self):
    for name in ("ds_max_tries", "epochs", "minibatches", "micro_batches"):
      if getattr(self, name) < 1:
        raise ValueError(f"algo.{name} must be >= 1, got {getattr(self, name)}")


# Each loss preset's advantage estimator: Dr.GRPO removes GRPO's std normalization from the advantage as well as
# the length normalization from the loss (Liu et al. 2025, methods.md section 8).
PRESET_ADVANTAGE = {"grpo": "grpo", "dapo": "grpo", "gspo": "grpo", "drgrpo": "drgrpo"}
STD_NORMALIZED = ("grpo", "batch")


def advantage_estimator(algo: AlgoCfg) -> str:
  """The advantage estimator a run uses: `algo.advantage`, or the preset's own when it is empty.

  Dr.GRPO with a std-normalized estimator is refused: it would be Dr.GRPO's loss on GRPO's advantage.
  """
  if not algo.advantage:
    return PRESET_ADVANTAGE.get(algo.name, "grpo")
  if algo.name == "drgrpo" and algo.advantage in STD_NORMALIZED:
    raise ValueError(f"algo.name='drgrpo' with algo.advantage={algo.advantage!r}: Dr.GRPO's advantage is not divided "
                     "by the group's std; set algo.advantage='drgrpo' (or leave it empty for the preset's own)")
  return algo.advantage


@dataclasses.dataclass(frozen=True)
class CreditCfg:
  method: str = "none"              # none | pgpo | pacr | pdcr
  counterfactual: str = "mask_visual"
  tau: float = 0.4
  beta: float = 2.0
  threshold_mode: str = "absolute"
  low_weight_floor: float = 0.0
  mass_normalize: bool = True
  # PACR / PDCR (methods.md section 8)
  max_steps: int = 16               # static step slots C; later steps merge into the last one
  gamma: float = 1.0                # discount of the confidence-gain returns
  lambda_o: float = 1.0             # weight of the outcome advantage A_O
  lambda_p: float = 0.5             # weight of the process advantage A_P
  step_score: str = "sum"           # V_k over a step's tokens: sum | mean


DEFAULT_DIVERGENCE = {"opd": "kl_student_teacher", "opsd": "kl_teacher_student"}


@dataclasses.dataclass(frozen=True)
class DistillCfg:
  """On-policy distillation from frozen teachers (methods.md sections 4, 5 and 8); `jaxvg.distill` reads it.

  method: none | opd (teacher in the student's context) | opsd (teacher in a privileged context) | vigos | vgs.
  rl_alpha: 0 trains on the distillation loss alone; alpha > 0 minimizes alpha * L_distill + (1 - alpha) * L_RL
    with the algo's policy loss (VGS paper Eq. 22: alpha = 0.3, eta = 1).
  """
  method: str = "none"
  teacher: str = "initial"          # initial (the policy at the start of RL, shared with the KL reference) | HF dir
  teacher_sft_steps: int = 0        # the demo's teacher: the student's warm start continued for this many steps
  teacher_context: str = "vigos_reference_teacher"  # opsd: the prompt format of the privileged teacher
  # opd / opsd: kl_teacher_student (forward) | kl_student_teacher (reverse) | jsd; "" = the method's paper default
  # (DEFAULT_DIVERGENCE: OPD reverse KL, OPSD forward KL)
  divergence: str = ""
  beta: float = 0.5                 # jsd
  entry_clip: float | None = None   # OPSD's per-vocabulary-entry clip
  max_token_value: float | None = None  # per-token clamp after the vocabulary sum (ViGOS: 0.05)
  aggregation: str = "token_mean"   # token_mean | sequence_mean (normalizers are the whole step's counts)
  chunk_size: int = 128             # tokens per chunk of the full-vocabulary divergences
  # ViGOS
  lambda_perception: float = 1.0
  lambda_reasoning: float = 1.0
  lambda_reference: float = 2.0
  reasoning_teacher_sees_description: bool = False  # the paper's reading; the released code: reasoning tokens only
  palr: bool = False                # log PALR (opsd / vigos): two more teacher passes, answer and image swapped
  # VGS
  eta: float = 1.0
  gamma: float = 2.0
  lp_weight: float = 0.01
  lp_quantile: float = 0.7
  adaptive_gamma: bool = False
  gamma_low_quantile: float = 0.4
  rl_alpha: float = 0.0


@dataclasses.dataclass(frozen=True)
class SFTCfg:
  steps: int = 0                    # supervised warm-start steps on reference solutions (0: none)
  batch_size: int = 16
  # The perception stage, run first: the vision tower and a linear probe learn what each board cell holds (synthetic
  # data only; see jaxvg.sft). Freeze the tower afterwards (sft_optim.freeze_vision) to keep what it learned.
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
