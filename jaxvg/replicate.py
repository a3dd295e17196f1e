r"""Replication: every method x seed from one shared warm start and one rollout budget, compared on paired prompts.

  python -m jaxvg.replicate [--seeds 3] [--steps N] [--out runs/replicate] [--methods GRPO,DAPO,...] [--jobs K]
                            [--pin] [--set key=value ...] [--eval-prompts 512] [--eval-every 5]
                            [--dependency-records 64] [--results <out>/results.md]

1. Each method's config gets its overrides, then `--set`, then the seed, steps and folder. A missing config file is
   an error, and so are rollout budgets (RL steps x rollouts per step) that differ between methods; the cap on new
   tokens is a method's own (its output format sets it) and is listed with it.
2. The warm start is trained once per signature (the model, data, sft and sft_optim sections: what `sft.warm_start`
   compares) in <out>/warm_start/<key>; each run gets a copy as its out_dir/sft, and retraining it is an error.
3. Each method x seed (train.seed = 0, 1, ...) runs `train.run` in its own process, `--jobs` at a time (`--pin`
   gives each a slice of the cores). Its final policy, like the warm start, is scored prompt by prompt (0/1, greedy
   when train.eval_greedy) on the first `--eval-prompts` records of the held-out split, of `prior_conflict`, and of the
   held-out split with white images (the control): the same prompts, in record order, for every method and seed. The
   synthetic ground truth (`analysis.evaluate_groundtruth`), tokens/s, step time and rollouts complete its result. A
   finished run (same spec) is reused; a result without per-prompt scores (an older driver's) is run again, resuming
   from its checkpoints; an interrupted run resumes from its checkpoint.
   Every run also evaluates every `--eval-every` RL steps (train.eval_every) and measures its dependency on
   `--dependency-records` reference solutions at each evaluation (train.eval_dependency): its curves.
4. `--results` (default <out>/results.md; `--results docs/results.md` publishes it) gets each method's accuracies, the
   mean over seeds and prompts with a 95 % bootstrap interval, overall and by task family; each method against its
   baseline on the same seeds and prompts: the paired difference, its interval, a verdict and the minimum detectable
   difference (`jaxvg.run.stats`); with `--set data.teacher_error=q` (a fallible teacher for the warm start), the
   same on the task it taught wrong and on the others, with the prompts RL turned right and wrong;
   the papers' mechanisms as measured (`run_mechanisms`); the methods' mean curves, drawn into <page>_curves.png
   beside the page; cost and analysis figures (mean ± sample standard deviation over seeds); the machine, date and
   wall time.

Runs are loaded for notebooks/training_curves.ipynb by `jaxvg.run.runlog`; the page is `jaxvg.run.results_page`,
which also loads a finished replication (`load_results`).
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import threading
import sys
import time

import numpy as np

from jaxvg.data.synthetic import TEACHER_ERROR_TASK
from jaxvg.run.results_page import EVAL_CURVES, SPLITS, aggregate, plot_curves, render_results

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  config: str                       # a file under configs/
  overrides: tuple[str, ...] = ()   # --set assignments applied on top of the config
  baseline: str | None = None       # the method it is expected to beat


_GRPO = ("algo.name=grpo", "algo.dynamic_sampling=false")
METHODS = (
    Method("GRPO", "demo.py", _GRPO),
    Method("DAPO", "demo.py", (), baseline="GRPO"),
    Method("PGPO-GRPO", "pgpo_demo.py", _GRPO, baseline="GRPO"),
    Method("PGPO-DAPO", "pgpo_demo.py", (), baseline="DAPO"),
    # PGPO on the white-image counterfactual, which tells a visual word from a reasoning word better on this testbed
    # than the paper's text-only pass (docs/analysis.md, "Two counterfactuals"): the counterfactual alone changes.
    Method("PGPO-DAPO (white image)", "pgpo_demo.py", ("credit.counterfactual=white_image",), baseline="PGPO-DAPO"),
    Method("PACR", "pacr_demo.py", (), baseline="GRPO"),
    Method("PDCR", "pdcr_demo.py", (), baseline="PACR"),
    # GRPO from OPSD's and ViGOS's warm start (their describe-then-reason format): OPSD's paired baseline, so that
    # its comparison holds the method alone, not the gap between the two warm starts.
    Method("GRPO (ViGOS format)", "vigos_demo.py", ("distill.method=none", "distill.teacher_sft_steps=0", *_GRPO)),
    Method("OPSD", "opsd_demo.py", ("distill.palr=true",), baseline="GRPO (ViGOS format)"),  # PALR: mechanisms
    Method("ViGOS", "vigos_demo.py", ("distill.palr=true",), baseline="OPSD"),
    Method("OPD", "opd_demo.py", (), baseline="GRPO"),
    Method("VGS", "vgs_demo.py", ("distill.gradient_stats_every=5",), baseline="OPD"),  # the g_Lang-g_Vis angle
    Method("GRPO+VGS", "grpo_vgs_demo.py", ("distill.gradient_stats_every=5",), baseline="GRPO"),
)
def select_methods(names: list[str] | None, *, config_dir: str = CONFIG_DIR) -> list[Method]:
  """The methods named (all when None), each with an existing config file; unknown names and missing files raise."""
  by_name = {m.name.lower(): m for m in METHODS}
  wanted = [n.strip() for arg in (names or [m.name for m in METHODS]) for n in arg.split(",") if n.strip()]
  if not wanted:
    raise ValueError("--methods selects no method")
  unknown = [n for n in wanted if n.lower() not in by_name]
  if unknown:
    raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(m.name for m in METHODS)}")
  chosen = list(dict.fromkeys(by_name[n.lower()] for n in wanted))
  missing = [f"{m.name} needs {os.path.join(config_dir, m.config)}" for m in chosen
             if not os.path.isfile(os.path.join(config_dir, m.config))]
  if missing:
    raise FileNotFoundError("missing config file(s): " + "; ".join(missing))
  return chosen


def run_dir_name(method: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", method.lower()).strip("_")


def warm_start_key(cfg) -> str | None:
  """What `sft.warm_start` compares before reusing a warm start (None: the config has none)."""
  if cfg.sft.steps == 0:
    return None
  signature = [cfg.model.identity(), cfg.data.identity(), repr(cfg.sft), repr(cfg.sft_optim)]
  return hashlib.sha256(json.dumps(signature).encode()).hexdigest()[:12]


def plan_runs(methods: list[Method], *, seeds: int, steps: int | None, common: list[str], out_dir: str,
              eval_prompts: int = 512, eval_every: int = 0, dependency_records: int = 0,
              config_dir: str = CONFIG_DIR) -> list[dict]:
  """One spec (a JSON-able dict) per method x seed; raises when the rollout budgets differ.

  `eval_every` and `dependency_records` set train.eval_every and train.eval_dependency (the curves) unless 0."""
  from jaxvg.core import config_lib
  if seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {seeds}")
  if eval_prompts < 1:
    raise ValueError(f"--eval-prompts must be >= 1, got {eval_prompts}")
  out_dir = os.path.abspath(out_dir)
  specs, budgets = [], {}
  for m in methods:
    for seed in range(seeds):
      run_dir = os.path.join(out_dir, run_dir_name(m.name), f"seed{seed}")
      curves = [*([f"train.eval_every={eval_every}"] if eval_every else []),
                *([f"train.eval_dependency={dependency_records}"] if dependency_records else [])]
      overrides = [*m.overrides, *curves, *common, f"train.seed={seed}", *([f"train.steps={steps}"] if steps else []),
                   f"train.out_dir={run_dir}"]
      config = os.path.join(os.path.abspath(config_dir), m.config)
      cfg = config_lib.apply_overrides(config_lib.load_config(config), overrides)
      key = warm_start_key(cfg)
      budgets[m.name] = (cfg.train.steps, cfg.data.prompts_per_batch * cfg.rollout.group_size)
      specs.append({"kind": "run", "method": m.name, "seed": seed, "config": config, "overrides": overrides,
                    "out_dir": run_dir, "warm_dir": os.path.join(out_dir, "warm_start", key) if key else None,
                    "eval_prompts": eval_prompts})
  if len(set(budgets.values())) > 1:
    groups = {}
    for name, (s, r) in budgets.items():
      groups.setdefault(f"{s} steps x {r} rollouts", []).append(name)
    listed = "; ".join(f"{', '.join(names)}: {b}" for b, names in groups.items())
    raise ValueError(f"the methods' rollout budgets differ ({listed}); align them with --set or --steps")
  return specs


def warm_start_specs(runs: list[dict]) -> list[dict]:
  """One warm-start job per distinct warm-start folder, built from the first run that uses it (a distillation run
  first, if any: its job also trains the shared teacher, the warm start continued for distill.teacher_sft_steps)."""
  jobs = {}
  teacher_first = sorted(runs, key=lambda r: _resolve(r).distill.teacher_sft_steps == 0)
  for r in teacher_first:
    if r["warm_dir"] and r["warm_dir"] not in jobs:
      overrides = [o for o in r["overrides"] if not o.startswith("train.out_dir=")] + [f"train.out_dir={r['warm_dir']}"]
      jobs[r["warm_dir"]] = {"kind": "warm", "method": r["method"], "seed": None, "config": r["config"],
                             "overrides": overrides, "out_dir": r["warm_dir"], "warm_dir": None,
                             "eval_prompts": r["eval_prompts"]}
  return list(jobs.values())


# --------------------------------------------------------------------------------------------- worker processes


def result_path(spec: dict) -> str:
  return os.path.join(spec["out_dir"], f"{spec['kind']}_result.json")


def _resolve(spec):
  from jaxvg.core import config_lib
  return config_lib.apply_overrides(config_lib.load_config(spec["config"]), spec["overrides"])


def teacher_settings(configs) -> str | None:
  """The fallible teachers (`data.teacher_error` > 0) among the runs' configs, as the settings that ask for them
  ("data.teacher_error=0.6" or "data.teacher_error=0.6, data.teacher_error_kind=perception"; several joined by "; "),
  None when every teacher was truthful."""
  taught = sorted({(c.data.teacher_error, c.data.teacher_error_kind) for c in configs if c.data.teacher_error})
  return "; ".join(f"data.teacher_error={q:g}" + ("" if kind == "reasoning" else f", data.teacher_error_kind={kind}")
                   for q, kind in taught) or None


def heldout_scores(cfg, graphdef, params, tokenizer, model_cfg, *, split: str, num: int,
                   white_image: bool = False) -> dict | None:
  """{"ids": ids_P, "scores": scores_P, "tasks": tasks_P}: each prompt's accuracy and task family on the first `num`
  records of a synthetic split ("test": the run's held-out split, or "prior_conflict"), in record order;
  `white_image`: the same records with white images. None when the data is not synthetic."""
  from jaxvg import evaluate
  from jaxvg.data import pipeline, synthetic
  from jaxvg.rl import rewards
  from jaxvg.run import builders
  if cfg.data.source != "synthetic":
    return None
  source = synthetic.SyntheticSource(split=split, num_records=num, cfg=builders.synthetic_config(cfg.data))
  batches = list(pipeline.make_dataset(builders.WhiteImages(source) if white_image else source, tokenizer=tokenizer,
                                       prompt=builders.prompt_config(cfg.data),
                                       data=builders.data_config(cfg.data, shuffle=False, num_epochs=1),
                                       vision=model_cfg.vision))
  scores_P = evaluate.scores(graphdef, params, batches, tokenizer=tokenizer, fmt=builders.prompt_format(cfg.data),
                             reward_fn=rewards.load_reward_fn(cfg.algo.reward_fn),
                             max_new_tokens=cfg.rollout.max_new_tokens,
                             stop_token_ids=builders.stop_token_ids(tokenizer), greedy=cfg.train.eval_greedy)
  rows = [(i, src) for b in batches for i, src, valid in zip(b.ids, b.sources, np.asarray(b.prompts.valid_B)) if valid]
  return {"ids": [i for i, _ in rows], "scores": scores_P.tolist(),
          "tasks": [src.rsplit("/", 1)[-1] for _, src in rows]}  # a record's source is "synthetic/<split>/<task>"


def per_prompt(cfg, graphdef, params, tokenizer, model_cfg, *, num: int) -> dict[str, dict | None]:
  """SPLITS -> `heldout_scores` ("white": the held-out split with white images)."""
  return {split: heldout_scores(cfg, graphdef, params, tokenizer, model_cfg, num=num, white_image=split == "white",
                                split="test" if split == "white" else split) for split in SPLITS}


def _mean(entry: dict | None) -> float:
  return float(np.mean(entry["scores"])) if entry else float("nan")


def summarize_metrics(rows: list[dict], *, group_size: int) -> dict:
  """tokens/s and step time: medians over the RL steps after the first (which compiles); rollouts: sampled in all.

  A step logged twice (re-run after a resume) counts once, with its last row. Rollouts are the groups DAPO's
  dynamic sampling saw times the group size (nan when the rows do not log them).
  """
  per_step = {r["step"]: r for r in rows if r["step"] >= 0 and "time/step" in r}
  steps = sorted(per_step)
  if not steps:
    raise ValueError("no RL step row (with time/step) in the metrics")
  timed = [per_step[s] for s in (steps[1:] if len(steps) > 1 else steps)]
  seen = [per_step[s]["dynamic_sampling/groups_seen"] for s in steps if "dynamic_sampling/groups_seen" in per_step[s]]
  return {"tokens_per_s": float(np.median([r["tokens_per_s"] for r in timed])),
          "step_time": float(np.median([r["time/step"] for r in timed])),
          "rollouts": float(sum(seen) * group_size) if len(seen) == len(steps) else float("nan")}


def _rl_mean(table: dict, key: str) -> float:
  """The mean of a metric over the RL steps where it is finite; nan when it was never logged."""
  if key not in table:
    return float("nan")
  steps_S, values_S = table[key]
  values_S = values_S[(steps_S >= 0) & np.isfinite(values_S)]
  return float(values_S.mean()) if values_S.size else float("nan")


def run_mechanisms(truth: dict, table: dict, *, credit: str, distill: str, eta: float, gamma: float) -> dict:
  """MECHANISMS of one run, from its final policy's ground-truth analysis (`truth`) and its logged metrics (`table`).

  pgpo_visual_mass / visual_share: PGPO's weight mass on the words that state an image fact against their share of the
  tokens (reference solutions, the run's counterfactual). step_split: the Otsu split of the step score V into
  perception and reasoning steps. pdcr_*: per RL step, the advantage spread within PDCR's visual and textual clusters
  and the visual share of the steps. vigos_valid: the rollouts ViGOS judged valid (summed over steps); palr: the
  privileged answer leakage rate. vgs_eta: VGS's step-size correction (its config); vgs_eta_measured: Eq. 15 from the
  run's own gradient statistics (distill.gradient_stats_every; the means over the measured steps, at the config's
  gamma); vgs_angle: the angle between g_Lang and g_Vis (degrees, mean over the measured steps); vgs_lp_fraction: the
  tokens its language-prior term acted on. A cell a method does not have is nan.
  """
  valid = table.get("vigos/valid_rows", (np.zeros(0), np.zeros(0)))[1]
  rows = table.get("vigos/rows", (np.zeros(0), np.zeros(0)))[1]
  grad = {k: _rl_mean(table, f"vgs/grad/{k}") for k in ("norm_std", "norm_vis", "cos_std_vis", "angle_lang_vis")}
  eta_measured = float("nan")
  if np.isfinite([grad["norm_std"], grad["norm_vis"], grad["cos_std_vis"]]).all():
    from jaxvg.distill import vgs
    eta_measured = vgs.eta_from_gradient_stats(norm_std=grad["norm_std"], norm_vis=grad["norm_vis"],
                                               cosine=grad["cos_std_vis"], gamma=gamma)
  return {"pgpo_visual_mass": float(truth.get("pgpo_visual_mass", float("nan"))),
          "visual_share": float(truth.get("visual_share", float("nan"))),
          "step_split": float(truth.get("split_accuracy_v", float("nan"))),
          "pdcr_visual_adv_std": _rl_mean(table, "pdcr/visual_adv_std"),
          "pdcr_textual_adv_std": _rl_mean(table, "pdcr/textual_adv_std"),
          "pdcr_visual_frac": _rl_mean(table, "pdcr/visual_frac"),
          "vigos_valid": float(valid.sum() / rows.sum()) if rows.sum() > 0 else float("nan"),
          "palr": _rl_mean(table, "palr"),
          "vgs_eta": float(eta) if distill == "vgs" else float("nan"),
          "vgs_eta_measured": float(eta_measured), "vgs_angle": grad["angle_lang_vis"],
          "vgs_lp_fraction": _rl_mean(table, "vgs/lp_fraction"),
          "credit": credit, "distill": distill}


def run_curves(table: dict) -> dict:
  """{"reward": [[step, value], ...]} per RL step, and each of EVAL_CURVES as [[steps done, value], ...]."""
  from jaxvg.run import runlog
  out = {}
  if "reward/overall" in table:
    steps_S, values_S = table["reward/overall"]
    out["reward"] = [[int(s), float(v)] for s, v in zip(steps_S, values_S) if s >= 0]
  for name in EVAL_CURVES:
    done_S, values_S = runlog.eval_curve(table, name)
    out[name] = [[int(d), float(v)] for d, v in zip(done_S, values_S)]
  return out


def _device() -> str:
  import jax
  return f"{jax.default_backend()}: {jax.device_count()} x {jax.devices()[0].device_kind}"


def _warm_worker(spec: dict) -> dict:
  cfg = _resolve(spec)
  from flax import nnx
  from jaxvg.run import builders, sft
  tokenizer, model = builders.build_model(cfg.model, cfg.data)
  model = sft.warm_start(cfg, model, tokenizer)
  graphdef, params = nnx.split(model, nnx.Param)
  if cfg.distill.teacher_sft_steps:  # the distillation runs' teacher, trained once here like the student's start
    from jaxvg.run import teachers as run_teachers
    run_teachers.make_teacher(cfg, model, tokenizer, params)
  scores = per_prompt(cfg, graphdef, params, tokenizer, model.cfg, num=spec["eval_prompts"])
  return {"spec": spec, "accuracy": _mean(scores["test"]), "prior_conflict": _mean(scores["prior_conflict"]),
          "white": _mean(scores["white"]), "per_prompt": scores, "device": _device()}


def _run_worker(spec: dict) -> dict:
  cfg = _resolve(spec)
  from jaxvg import analysis, train
  from jaxvg.run import folder, runlog
  marker = os.path.join(spec["out_dir"], "sft", "done.json")
  if spec["warm_dir"] and not os.path.exists(marker):
    shutil.rmtree(os.path.join(spec["out_dir"], "sft"), ignore_errors=True)
    shutil.copytree(os.path.join(spec["warm_dir"], "sft"), os.path.join(spec["out_dir"], "sft"))
  teacher = os.path.join(spec["warm_dir"] or "", "teacher")
  if spec["warm_dir"] and cfg.distill.teacher_sft_steps and os.path.isdir(teacher):
    shutil.rmtree(os.path.join(spec["out_dir"], "teacher"), ignore_errors=True)
    shutil.copytree(teacher, os.path.join(spec["out_dir"], "teacher"))
  stamp = os.stat(marker).st_mtime_ns if spec["warm_dir"] else None
  _, logged, saved = folder.previous_run(spec["out_dir"])
  if logged and not saved:  # killed before its first checkpoint: nothing to resume, start it over
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, overwrite=True))
  out = train.run(cfg)
  if spec["warm_dir"] and os.stat(marker).st_mtime_ns != stamp:
    raise RuntimeError(f"{spec['method']} seed {spec['seed']} trained its own warm start instead of reusing "
                       f"{spec['warm_dir']}: its warm-start signature differs from the shared one")
  policy = analysis.load_policy(run_dir=spec["out_dir"], params="final")
  scores = per_prompt(cfg, policy.graphdef, policy.params, policy.tokenizer, policy.model_cfg,
                      num=spec["eval_prompts"])
  # Against the synthetic generator's labels: visual words vs reasoning words, perception vs reasoning steps.
  truth = (analysis.evaluate_groundtruth(policy, num=cfg.data.num_eval, batch_size=cfg.data.prompts_per_batch,
                                         counterfactual=cfg.credit.counterfactual)
           if cfg.data.source == "synthetic" else {"auroc_k3": float("nan"), "split_accuracy_v": float("nan")})
  rows = [json.loads(line) for line in open(os.path.join(spec["out_dir"], "metrics.jsonl")) if line.strip()]
  table = runlog.read_run(spec["out_dir"])
  # accuracy_before/after: train.run's own evaluation (data.num_eval prompts); the table uses the per-prompt scores.
  return {"spec": spec, "accuracy_before": out["accuracy_before"], "accuracy_after": out["accuracy_after"],
          "heldout_after": _mean(scores["test"]), "prior_conflict_after": _mean(scores["prior_conflict"]),
          "white_after": _mean(scores["white"]), "per_prompt": scores,
          **summarize_metrics(rows, group_size=cfg.rollout.group_size),
          "dependency_auroc": float(truth["auroc_k3"]), "step_split_accuracy": float(truth["split_accuracy_v"]),
          "mechanisms": run_mechanisms(truth, table, credit=cfg.credit.method, distill=cfg.distill.method,
                                       eta=cfg.distill.eta, gamma=cfg.distill.gamma),
          "curves": run_curves(table),
          "budget": {"steps": cfg.train.steps, "prompts_per_batch": cfg.data.prompts_per_batch,
                     "group_size": cfg.rollout.group_size, "max_new_tokens": cfg.rollout.max_new_tokens},
          "device": _device()}


def _worker(spec_path: str):
  import logging
  t0 = time.time()
  with open(spec_path) as f:
    spec = json.load(f)
  if spec["cpus"]:
    os.sched_setaffinity(0, spec["cpus"])
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout,
                      force=True)
  logging.getLogger("jaxvg").setLevel(logging.INFO)
  spec = {k: v for k, v in spec.items() if k != "cpus"}
  result = _warm_worker(spec) if spec["kind"] == "warm" else _run_worker(spec)
  result["wall_s"] = time.time() - t0  # the job's process, imports included
  with open(result_path(spec), "w") as f:
    json.dump(result, f, indent=2)


# ----------------------------------------------------------------------------------------------------- the driver


def _done(spec: dict) -> dict | None:
  """The result of a finished job with the same spec and per-prompt scores, if any (else the job runs again)."""
  if not os.path.exists(result_path(spec)):
    return None
  with open(result_path(spec)) as f:
    result = json.load(f)
  return result if result["spec"] == spec and "per_prompt" in result else None


def split_cpus(cpus: list[int], jobs: int) -> list[list[int]]:
  """`jobs` disjoint, contiguous, near-equal slices of `cpus` (the first ones get the remainder)."""
  if jobs < 1:
    raise ValueError(f"--jobs must be >= 1, got {jobs}")
  if jobs > len(cpus):
    raise ValueError(f"--pin with --jobs {jobs} needs at least {jobs} cores; {len(cpus)} available")
  size, extra = divmod(len(cpus), jobs)
  bounds = np.cumsum([0] + [size + (i < extra) for i in range(jobs)])
  return [list(cpus[bounds[i]:bounds[i + 1]]) for i in range(jobs)]


def execute(specs: list[dict], *, jobs: int, pin: bool, env: dict) -> list[dict]:
  """Runs every job not already done, `jobs` processes at a time, and returns the results in the order of `specs`.

  A run job whose warm start is among the `specs` (a warm job listed before it) waits for that job alone, so runs from
  a finished warm start proceed while another warm start still trains. A free slot goes to the first job, in the order
  of `specs`, that is ready for one; after a failure no further job starts, and the first failure is raised once the
  running ones end.
  """
  if jobs < 1:
    raise ValueError(f"--jobs must be >= 1, got {jobs}")
  cpu_sets = split_cpus(sorted(os.sched_getaffinity(0)), jobs) if pin else [None] * jobs
  free, changed, failed = list(range(len(cpu_sets))), threading.Condition(), threading.Event()
  pending, warms = set(range(len(specs))), {}  # jobs not started nor ended; a run's warm-start future

  def notify(*_):
    with changed:
      changed.notify_all()

  def take_slot(i: int) -> int:  # a free slot, once every job before i whose warm start is done has started
    first = lambda: min((j for j in pending if j not in warms or warms[j].done()), default=None)
    with changed:
      changed.wait_for(lambda: free and first() == i)
      pending.discard(i)
      return free.pop(0)

  def give_back(slot: int):
    with changed:
      free.append(slot)
      changed.notify_all()

  def leave(i: int):
    with changed:
      pending.discard(i)
      changed.notify_all()

  def say(message: str):
    """One timestamped progress line, written whole: the jobs' threads print concurrently."""
    with changed:
      print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

  def launch(i, spec):
    try:
      if i in warms:
        warms[i].result()  # its warm start first (a failed one raises here)
      done = _done(spec)
      if done is None:
        os.makedirs(spec["out_dir"], exist_ok=True)
        slot = take_slot(i)
    finally:
      leave(i)  # a job reused, failed or started no longer holds back the ones after it
    if done is not None:
      return done
    spec_path, log_path = os.path.join(spec["out_dir"], "spec.json"), os.path.join(spec["out_dir"], "log.txt")
    name = f"{spec['kind']} job of {spec['method']}" + (f" seed {spec['seed']}" if spec["kind"] == "run" else "")
    try:
      if failed.is_set():
        raise RuntimeError(f"the {name} did not start: another job failed")
      say(f"started the {name} (log: {log_path})")
      with open(spec_path, "w") as f:
        json.dump({**spec, "cpus": cpu_sets[slot]}, f, indent=2)
      with open(log_path, "a") as log:
        rc = subprocess.run([sys.executable, "-m", "jaxvg.replicate", "--worker", spec_path], stdout=log,
                            stderr=subprocess.STDOUT, env=env).returncode
      if rc != 0:
        failed.set()
        tail = "".join(open(log_path).readlines()[-15:])
        raise RuntimeError(f"the {name} failed with exit code {rc}; log: {log_path}\n{tail}")
    finally:
      give_back(slot)
    say(f"finished the {name}")
    return _done(spec)

  with concurrent.futures.ThreadPoolExecutor(max(len(specs), 1)) as pool:
    warm_jobs, futures = {}, []
    for i, spec in enumerate(specs):  # every thread waits on its warm start or on a slot: one per job
      if spec["kind"] == "run" and spec["warm_dir"] in warm_jobs:
        warms[i] = warm_jobs[spec["warm_dir"]]
      futures.append(pool.submit(launch, i, spec))
      if spec["kind"] == "warm":
        warm_jobs[spec["out_dir"]] = futures[-1]
        futures[-1].add_done_callback(notify)
    concurrent.futures.wait(futures)
  errors = [f.exception() for f in futures if f.exception() is not None]
  if errors:  # the first failure itself, not a job that only did not start after it
    raise next((e for e in errors if "did not start" not in str(e)), errors[0])
  return [f.result() for f in futures]


def describe_machine(devices: list[str]) -> str:
  return (f"{platform.system()} {platform.machine()} with {os.cpu_count()} CPU cores"
          f" ({'; '.join(sorted(set(devices))) or 'no device recorded'})")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=None, help="RL steps of every run (default: the configs')")
  parser.add_argument("--out", default="runs/replicate")
  parser.add_argument("--methods", nargs="+", default=None, help=f"from {', '.join(m.name for m in METHODS)}")
  parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
  parser.add_argument("--pin", action="store_true", help="pin each parallel process to its own slice of the cores")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
  parser.add_argument("--eval-prompts", type=int, default=512,
                      help="records of each held-out split scored per run (the same for every method and seed)")
  parser.add_argument("--eval-every", type=int, default=5,
                      help="train.eval_every of every run: held-out accuracy and the dependency curves (0: off)")
  parser.add_argument("--dependency-records", type=int, default=64,
                      help="train.eval_dependency of every run: records of the dependency curves (0: off)")
  parser.add_argument("--results", default=None, help="the results page (default <out>/results.md)")
  parser.add_argument("--configs", default=CONFIG_DIR, help="the folder holding the methods' config files")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return _worker(args.worker)
  t0 = time.time()
  methods = select_methods(args.methods, config_dir=args.configs)
  runs = plan_runs(methods, seeds=args.seeds, steps=args.steps, common=args.set, out_dir=args.out,
                   eval_prompts=args.eval_prompts, eval_every=args.eval_every,
                   dependency_records=args.dependency_records, config_dir=args.configs)
  results_path = args.results or os.path.join(args.out, "results.md")
  # One persistent compilation cache for every process: each stage compiles once per shape, not once per run.
  env = {"JAX_COMPILATION_CACHE_DIR": os.path.join(os.path.abspath(args.out), "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
         **os.environ}
  warm_specs = warm_start_specs(runs)
  # Warm starts first, then the runs seed by seed, so that an interrupted invocation leaves every method with the
  # same number of finished seeds (a run waits only for its own warm start).
  done = execute(warm_specs + sorted(runs, key=lambda r: r["seed"]), jobs=args.jobs, pin=args.pin, env=env)
  warm, results = done[:len(warm_specs)], done[len(warm_specs):]
  for w in warm:
    w["methods"] = [r["spec"]["method"] for r in results if r["spec"]["warm_dir"] == w["spec"]["out_dir"]]
  command = shlex.join(["python", "-m", "jaxvg.replicate", *(sys.argv[1:] if argv is None else argv)])
  summary = aggregate(results)
  teachers = teacher_settings(_resolve(r["spec"]) for r in results)
  curves_png = os.path.splitext(results_path)[0] + "_curves.png"
  os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
  text = render_results(summary, methods=methods, warm=warm, command=command,
                        curves_png=curves_png if plot_curves(summary, curves_png) else None,
                        taught=(TEACHER_ERROR_TASK, teachers) if teachers else None,
                        budgets={r["spec"]["method"]: r["budget"] for r in results},
                        machine=describe_machine([r["device"] for r in results]),
                        date=datetime.date.today().isoformat(), wall_s=time.time() - t0,
                        jobs_s=sum(r["wall_s"] for r in warm + results))
  with open(results_path, "w") as f:
    f.write(text)
  print(f"wrote {results_path}")
  return results


if __name__ == "__main__":
  main()
