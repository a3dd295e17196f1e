"""The whole configuration checked before any work: every choice, size and interval, and the combinations the methods
need. `validate(cfg)` raises `ConfigError` naming the field, its value and what it accepts.

  python -m jaxvg.train --config configs/demo.py --set train.save_every=0
  config error: train.save_every=0: must be an integer >= 1
"""

from jaxvg.credit import assign, pgpo
from jaxvg.data import processing, prompts, synthetic
from jaxvg.distill import divergences, teachers
from jaxvg.models import config as model_config
from jaxvg.rl import advantages, optim
from jaxvg.rl import config as rl_config
from jaxvg.run import experiment

SOURCES = ("synthetic", "geo3k", "verl", "jsonl")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("constant", "cosine", "linear")
STEP_SCORES = ("sum", "mean")
# Estimators that compare a completion with the rest of its group: a group of one has no baseline.
GROUP_ESTIMATORS = ("grpo", "drgrpo", "rloo")


class ConfigError(ValueError):
  """A configuration field that cannot run; the message names it."""


def _choice(name: str, value, options):
  if value not in options:
    raise ConfigError(f"{name}={value!r}: choose one of {tuple(options)}")


def _at_least(name: str, value, low, *, kind=int):
  if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value < low:
    noun = "an integer" if kind is int else "a number"
    raise ConfigError(f"{name}={value!r}: must be {noun} >= {low}")


def _within(name: str, value, low, high, *, open_low: bool = False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      low < value <= high if open_low else low <= value <= high)
  if not ok:
    raise ConfigError(f"{name}={value!r}: must lie in {'(' if open_low else '['}{low}, {high}]")


def _optim(prefix: str, o: optim.OptimConfig):
  _at_least(f"{prefix}.lr", o.lr, 0.0, kind=float)
  _choice(f"{prefix}.schedule", o.schedule, SCHEDULES)
  _at_least(f"{prefix}.warmup_steps", o.warmup_steps, 0)
  _at_least(f"{prefix}.total_steps", o.total_steps, 1)
  _within(f"{prefix}.b1", o.b1, 0.0, 1.0)
  _within(f"{prefix}.b2", o.b2, 0.0, 1.0)
  _at_least(f"{prefix}.weight_decay", o.weight_decay, 0.0, kind=float)
  if o.clip_norm is not None and not o.clip_norm > 0:
    raise ConfigError(f"{prefix}.clip_norm={o.clip_norm!r}: must be > 0, or None for no clipping")
  if o.max_update_ratio is not None and not o.max_update_ratio > 0:
    raise ConfigError(f"{prefix}.max_update_ratio={o.max_update_ratio!r}: must be > 0, or None for no bound")


def validate(cfg: experiment.Config) -> None:
  """Raises ConfigError for the first field of `cfg` that cannot run."""
  m, d, r, a, c, s, t = cfg.model, cfg.data, cfg.rollout, cfg.algo, cfg.credit, cfg.sft, cfg.train
  if m.hf_path is None:
    _choice("model.preset", m.preset, ("tiny",) + tuple(model_config.PRESETS))
  _choice("model.dtype", m.dtype, DTYPES)
  _choice("model.param_dtype", m.param_dtype, DTYPES)
  for name in ("tiny_width", "tiny_layers", "tiny_heads", "tiny_vision_width"):
    _at_least(f"model.{name}", getattr(m, name), 1)

  _choice("model.attention_impl", cfg.model.attention_impl, model_config.ATTENTION_IMPLS)
  _choice("data.source", d.source, SOURCES)
  if d.source != "synthetic" and not d.path:
    raise ConfigError(f"data.path is empty: data.source={d.source!r} reads a file")
  _choice("data.prompt_format", d.prompt_format, tuple(prompts.FORMATS))
  _choice("data.perception", d.perception, synthetic.PERCEPTION_FORMS)
  if not d.tasks or any(task not in synthetic.TASKS for task in d.tasks):
    raise ConfigError(f"data.tasks={d.tasks!r}: choose one or more of {synthetic.TASKS}")
  for name in ("num_train", "num_eval", "prompts_per_batch", "max_prompt_tokens", "image_size", "grid", "min_pixels",
               "max_images"):
    _at_least(f"data.{name}", getattr(d, name), 1)
  _within("data.cell_tint", d.cell_tint, 0, 255)
  _within("data.teacher_error", d.teacher_error, 0.0, 1.0)
  task = synthetic.TEACHER_ERROR_TASK
  if d.teacher_error and (d.source != "synthetic" or task not in d.tasks or not s.steps):
    raise ConfigError(f"data.teacher_error={d.teacher_error} rewrites the synthetic `{task}` references of the "
                      f"warm start: it needs data.source='synthetic' (got {d.source!r}), '{task}' in data.tasks "
                      f"(got {d.tasks!r}) and sft.steps > 0 (got {s.steps})")
  _choice("data.teacher_error_kind", d.teacher_error_kind, synthetic.TEACHER_ERROR_KINDS)
  if d.teacher_error_kind != "reasoning" and not d.teacher_error:
    raise ConfigError(f"data.teacher_error_kind={d.teacher_error_kind!r} changes nothing without data.teacher_error "
                      "> 0")
  _at_least("data.worker_count", d.worker_count, 0)
  _choice("data.image_backend", d.image_backend, processing.IMAGE_BACKENDS)
  if d.max_pixels < d.min_pixels:
    raise ConfigError(f"data.max_pixels={d.max_pixels} is below data.min_pixels={d.min_pixels}")
  for name in ("length_buckets", "patch_buckets"):
    buckets = getattr(d, name)
    if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
      raise ConfigError(f"data.{name}={buckets!r}: must be increasing positive sizes")

  _at_least("rollout.group_size", r.group_size, 1)
  _at_least("rollout.max_new_tokens", r.max_new_tokens, 1)
  _at_least("rollout.temperature", r.temperature, 0.0, kind=float)
  _within("rollout.top_p", r.top_p, 0.0, 1.0, open_low=True)
  _at_least("rollout.top_k", r.top_k, 0)

  _choice("algo.name", a.name, tuple(rl_config.PRESET_ADVANTAGE))
  _choice("algo.advantage", a.advantage, ("",) + advantages.ESTIMATORS)
  try:
    estimator = rl_config.advantage_estimator(a)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if r.group_size < 2 and estimator in GROUP_ESTIMATORS and (cfg.distill.method == "none" or cfg.distill.rl_alpha > 0):
    raise ConfigError(f"rollout.group_size=1 with the {estimator!r} advantage: a group of one has no baseline (every "
                      "advantage is 0); use rollout.group_size >= 2 or algo.advantage='batch'")
  if not 0.0 <= a.ds_low < a.ds_high <= 1.0:
    raise ConfigError(f"algo.ds_low={a.ds_low}, algo.ds_high={a.ds_high}: need 0 <= ds_low < ds_high <= 1")
  _at_least("algo.kl_coef", a.kl_coef, 0.0, kind=float)

  _choice("credit.method", c.method, assign.METHODS)
  _choice("credit.counterfactual", c.counterfactual, processing.COUNTERFACTUALS)
  _choice("credit.threshold_mode", c.threshold_mode, pgpo.THRESHOLD_MODES)
  _choice("credit.step_score", c.step_score, STEP_SCORES)
  _at_least("credit.max_steps", c.max_steps, 1)

  _at_least("sft.steps", s.steps, 0)
  _at_least("sft.batch_size", s.batch_size, 1)
  _at_least("sft.perception_steps", s.perception_steps, 0)
  if s.perception_steps and d.source != "synthetic":
    raise ConfigError(f"sft.perception_steps={s.perception_steps}: the perception stage needs the synthetic data's "
                      f"cell labels, and data.source={d.source!r}")
  _optim("optim", cfg.optim)
  _optim("sft_optim", cfg.sft_optim)

  _at_least("train.steps", t.steps, 0)
  for name in ("log_every", "save_every", "keep_checkpoints", "max_skipped_updates"):
    _at_least(f"train.{name}", getattr(t, name), 1)
  _at_least("train.eval_every", t.eval_every, 0)
  _at_least("train.eval_dependency", t.eval_dependency, 0)
  if t.eval_dependency and d.source != "synthetic":
    raise ConfigError(f"train.eval_dependency={t.eval_dependency}: the dependency figures need the synthetic data's "
                      f"word and step labels, and data.source={d.source!r}")
  _at_least("train.samples_logged", t.samples_logged, 0)
  _at_least("train.eval_benchmark_limit", t.eval_benchmark_limit, 0)
  if t.eval_benchmarks:
    from jaxvg import benchmarks  # local: only runs that evaluate on them read the benchmark tables
    unknown = [n for n in t.eval_benchmarks if n not in benchmarks.BENCHMARKS]
    if unknown:
      raise ConfigError(f"train.eval_benchmarks: unknown {', '.join(map(repr, unknown))}; choose from "
                        f"{tuple(benchmarks.BENCHMARKS)}")
    if not t.eval_benchmark_dir:
      raise ConfigError("train.eval_benchmark_dir is empty: train.eval_benchmarks reads the benchmarks' files there")
  if not t.out_dir:
    raise ConfigError("train.out_dir is empty")

  try:
    _distill(cfg)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _distill(cfg: experiment.Config):
  """Raises ValueError naming the field when the distillation config cannot run."""
  d = cfg.distill
  if d.method not in teachers.METHODS:
    raise ValueError(f"distill.method={d.method!r}: choose one of {teachers.METHODS}")
  if d.method == "none":
    return
  if not 0.0 <= d.rl_alpha <= 1.0:
    raise ValueError(f"distill.rl_alpha={d.rl_alpha} must lie in [0, 1]")
  if d.rl_alpha == 0.0 and cfg.algo.dynamic_sampling:
    raise ValueError("pure distillation (distill.rl_alpha=0) uses every rollout: set algo.dynamic_sampling=False")
  if d.rl_alpha == 0.0 and cfg.credit.method != "none":
    raise ValueError(f"credit.method={cfg.credit.method!r} reweights RL advantages; pure distillation "
                     "(distill.rl_alpha=0) has none: set credit.method='none' or distill.rl_alpha > 0")
  if d.aggregation not in divergences.AGGREGATIONS:
    raise ValueError(f"distill.aggregation={d.aggregation!r}: choose one of {divergences.AGGREGATIONS}")
  if d.teacher_sft_steps and d.teacher != "initial":
    raise ValueError("distill.teacher_sft_steps continues the student's warm start: it needs distill.teacher='initial'")
  if d.method in ("opd", "opsd"):
    teachers.divergence_config(d)
  if d.method == "opsd":
    teacher_fmt, student_fmt = prompts.get_format(d.teacher_context), prompts.get_format(cfg.data.prompt_format)
    if teacher_fmt.prefill != student_fmt.prefill:
      raise ValueError(f"distill.teacher_context={d.teacher_context!r} prefills {teacher_fmt.prefill!r} but the "
                       f"student's format {student_fmt.name!r} prefills {student_fmt.prefill!r}: the teacher must "
                       "score the same completion tokens")
  if d.method == "vigos":
    if not prompts.describes_then_reasons(prompts.get_format(cfg.data.prompt_format)):
      layouts = sorted(n for n, f in prompts.FORMATS.items() if prompts.describes_then_reasons(f))
      raise ValueError(f"distill.method='vigos' needs a describe-then-reason student format ({', '.join(layouts)}), "
                       f"got data.prompt_format={cfg.data.prompt_format!r}")
    teachers.vigos_config(d)
  if d.method == "vgs":
    teachers.vgs_config(d)
  if d.gradient_stats_every < 0:
    raise ValueError(f"distill.gradient_stats_every={d.gradient_stats_every} must be >= 0 (0: never)")
  if d.gradient_stats_every and d.method != "vgs":
    raise ValueError(f"distill.gradient_stats_every measures VGS's gradients g_Std, g_Vis and g_Lang: it needs "
                     f"distill.method='vgs', not {d.method!r}")
  if d.palr and d.method not in ("opsd", "vigos"):
    raise ValueError(f"distill.palr measures a privileged teacher's answer leakage: it needs distill.method opsd or "
                     f"vigos, not {d.method!r}")
