r"""Replication: every method x seed from one shared warm start and one rollout budget, summarized in docs/results.md.

  python -m jaxvg.replicate [--seeds 3] [--steps N] [--out runs/replicate] [--methods GRPO,DAPO,...] [--jobs K]
                            [--pin] [--set key=value ...] [--results docs/results.md]

1. Each method's config gets its overrides, then `--set`, then the seed, steps and folder. A missing config file is
   an error, and so are rollout budgets (RL steps x rollouts per step) that differ between methods; the cap on new
   tokens is a method's own (its output format sets it) and is listed with it.
2. The warm start is trained once per signature (the model, data, sft and sft_optim sections: what `sft.warm_start`
   compares) in <out>/warm_start/<key>; each run gets a copy as its out_dir/sft, and retraining it is an error.
3. Each method x seed (train.seed = 0, 1, ...) runs `train.run` in its own process, `--jobs` at a time (`--pin`
   gives each a slice of the cores). Its final policy is evaluated on `prior_conflict` and against the synthetic
   ground truth (`analysis.evaluate_groundtruth`); tokens/s, step time and rollouts come from its metrics.jsonl. A
   finished run (same spec) is reused, an interrupted one resumes from its checkpoint.
4. The table (mean ± sample standard deviation over seeds), a sentence per method that does not beat its baseline,
   the machine, date and wall time go to `--results`.

`read_run`, `read_tfevents` and `ema` at the end load runs for notebooks/training_curves.ipynb.
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import platform
import queue
import re
import shlex
import shutil
import struct
import subprocess
import sys
import time

import numpy as np

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
    Method("PACR", "pacr_demo.py", (), baseline="GRPO"),
    Method("PDCR", "pdcr_demo.py", (), baseline="PACR"),
    Method("OPSD", "opsd_demo.py", (), baseline="GRPO"),
    Method("ViGOS", "vigos_demo.py", (), baseline="OPSD"),
    Method("OPD", "opd_demo.py", (), baseline="GRPO"),
    Method("VGS", "vgs_demo.py", (), baseline="OPD"),
    Method("GRPO+VGS", "grpo_vgs_demo.py", (), baseline="GRPO"),
)
# result.json fields aggregated over seeds, in table order.
FIELDS = ("accuracy_before", "accuracy_after", "prior_conflict_after", "tokens_per_s", "step_time", "rollouts",
          "dependency_auroc", "step_split_accuracy")


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
  signature = [repr(cfg.model), repr(cfg.data), repr(cfg.sft), repr(cfg.sft_optim)]
  return hashlib.sha256(json.dumps(signature).encode()).hexdigest()[:12]


def plan_runs(methods: list[Method], *, seeds: int, steps: int | None, common: list[str], out_dir: str,
              config_dir: str = CONFIG_DIR) -> list[dict]:
  """One spec (a JSON-able dict) per method x seed; raises when the rollout budgets differ."""
  from jaxvg import config_lib
  if seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {seeds}")
  out_dir = os.path.abspath(out_dir)
  specs, budgets = [], {}
  for m in methods:
    for seed in range(seeds):
      run_dir = os.path.join(out_dir, run_dir_name(m.name), f"seed{seed}")
      overrides = [*m.overrides, *common, f"train.seed={seed}", *([f"train.steps={steps}"] if steps else []),
                   f"train.out_dir={run_dir}"]
      config = os.path.join(os.path.abspath(config_dir), m.config)
      cfg = config_lib.apply_overrides(config_lib.load_config(config), overrides)
      key = warm_start_key(cfg)
      budgets[m.name] = (cfg.train.steps, cfg.data.prompts_per_batch * cfg.rollout.group_size)
      specs.append({"kind": "run", "method": m.name, "seed": seed, "config": config, "overrides": overrides,
                    "out_dir": run_dir, "warm_dir": os.path.join(out_dir, "warm_start", key) if key else None})
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
                             "overrides": overrides, "out_dir": r["warm_dir"], "warm_dir": None}
  return list(jobs.values())


# --------------------------------------------------------------------------------------------- worker processes


def result_path(spec: dict) -> str:
  return os.path.join(spec["out_dir"], f"{spec['kind']}_result.json")


def _resolve(spec):
  from jaxvg import config_lib
  return config_lib.apply_overrides(config_lib.load_config(spec["config"]), spec["overrides"])


def heldout_accuracy(cfg, graphdef, params, tokenizer, model_cfg, *, split: str) -> float:
  """Accuracy on a held-out synthetic split ("test": the run's eval split, or "prior_conflict"); nan otherwise."""
  from jaxvg import builders, evaluate, rewards
  from jaxvg.data import pipeline, synthetic
  if cfg.data.source != "synthetic":
    return float("nan")
  source = synthetic.SyntheticSource(split=split, num_records=cfg.data.num_eval,
                                     cfg=builders.synthetic_config(cfg.data))
  batches = list(pipeline.make_dataset(source, tokenizer=tokenizer, prompt=builders.prompt_config(cfg.data),
                                       data=builders.data_config(cfg.data, shuffle=False, num_epochs=1),
                                       vision=model_cfg.vision))
  return evaluate.accuracy(graphdef, params, batches, tokenizer=tokenizer, fmt=builders.prompt_format(cfg.data),
                           reward_fn=rewards.load_reward_fn(cfg.algo.reward_fn),
                           max_new_tokens=cfg.rollout.max_new_tokens, stop_token_ids=builders.stop_token_ids(tokenizer),
                           greedy=cfg.train.eval_greedy)


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


def _device() -> str:
  import jax
  return f"{jax.default_backend()}: {jax.device_count()} x {jax.devices()[0].device_kind}"


def _warm_worker(spec: dict) -> dict:
  cfg = _resolve(spec)
  from flax import nnx
  from jaxvg import builders, sft
  tokenizer, model = builders.build_model(cfg.model, cfg.data)
  model = sft.warm_start(cfg, model, tokenizer)
  graphdef, params = nnx.split(model, nnx.Param)
  if cfg.distill.teacher_sft_steps:  # the distillation runs' teacher, trained once here like the student's start
    from jaxvg import distill
    distill.make_teacher(cfg, model, tokenizer, params)
  acc = {split: heldout_accuracy(cfg, graphdef, params, tokenizer, model.cfg, split=split)
         for split in ("test", "prior_conflict")}
  return {"spec": spec, "accuracy": acc["test"], "prior_conflict": acc["prior_conflict"], "device": _device()}


def _run_worker(spec: dict) -> dict:
  cfg = _resolve(spec)
  from jaxvg import analysis, train
  marker = os.path.join(spec["out_dir"], "sft", "done.json")
  if spec["warm_dir"] and not os.path.exists(marker):
    shutil.rmtree(os.path.join(spec["out_dir"], "sft"), ignore_errors=True)
    shutil.copytree(os.path.join(spec["warm_dir"], "sft"), os.path.join(spec["out_dir"], "sft"))
  teacher = os.path.join(spec["warm_dir"] or "", "teacher")
  if spec["warm_dir"] and cfg.distill.teacher_sft_steps and os.path.isdir(teacher):
    shutil.rmtree(os.path.join(spec["out_dir"], "teacher"), ignore_errors=True)
    shutil.copytree(teacher, os.path.join(spec["out_dir"], "teacher"))
  stamp = os.stat(marker).st_mtime_ns if spec["warm_dir"] else None
  out = train.run(cfg)
  if spec["warm_dir"] and os.stat(marker).st_mtime_ns != stamp:
    raise RuntimeError(f"{spec['method']} seed {spec['seed']} trained its own warm start instead of reusing "
                       f"{spec['warm_dir']}: its warm-start signature differs from the shared one")
  policy = analysis.load_policy(run_dir=spec["out_dir"], params="final")
  prior = heldout_accuracy(cfg, policy.graphdef, policy.params, policy.tokenizer, policy.model_cfg,
                           split="prior_conflict")
  # Against the synthetic generator's labels: visual words vs reasoning words, perception vs reasoning steps.
  truth = (analysis.evaluate_groundtruth(policy, num=cfg.data.num_eval, batch_size=cfg.data.prompts_per_batch)
           if cfg.data.source == "synthetic" else {"auroc_k3": float("nan"), "split_accuracy_v": float("nan")})
  rows = [json.loads(line) for line in open(os.path.join(spec["out_dir"], "metrics.jsonl")) if line.strip()]
  return {"spec": spec, "accuracy_before": out["accuracy_before"], "accuracy_after": out["accuracy_after"],
          "prior_conflict_after": prior, **summarize_metrics(rows, group_size=cfg.rollout.group_size),
          "dependency_auroc": float(truth["auroc_k3"]), "step_split_accuracy": float(truth["split_accuracy_v"]),
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
  """The result of a finished job with the same spec, if any."""
  if not os.path.exists(result_path(spec)):
    return None
  with open(result_path(spec)) as f:
    result = json.load(f)
  return result if result["spec"] == spec else None


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
  """Runs every job not already done, `jobs` processes at a time; returns the results in the order of `specs`."""
  if jobs < 1:
    raise ValueError(f"--jobs must be >= 1, got {jobs}")
  cpu_sets = split_cpus(sorted(os.sched_getaffinity(0)), jobs) if pin else [None] * jobs
  slots = queue.Queue()
  for slot in range(len(cpu_sets)):
    slots.put(slot)

  def launch(spec):
    if (done := _done(spec)) is not None:
      return done
    os.makedirs(spec["out_dir"], exist_ok=True)
    spec_path, log_path = os.path.join(spec["out_dir"], "spec.json"), os.path.join(spec["out_dir"], "log.txt")
    slot = slots.get()
    name = f"{spec['kind']} job of {spec['method']}" + (f" seed {spec['seed']}" if spec["kind"] == "run" else "")
    print(f"{time.strftime('%H:%M:%S')} started the {name} (log: {log_path})", flush=True)
    try:
      with open(spec_path, "w") as f:
        json.dump({**spec, "cpus": cpu_sets[slot]}, f, indent=2)
      with open(log_path, "a") as log:
        rc = subprocess.run([sys.executable, "-m", "jaxvg.replicate", "--worker", spec_path], stdout=log,
                            stderr=subprocess.STDOUT, env=env).returncode
    finally:
      slots.put(slot)
    if rc != 0:
      tail = "".join(open(log_path).readlines()[-15:])
      raise RuntimeError(f"the {name} failed with exit code {rc}; log: {log_path}\n{tail}")
    print(f"{time.strftime('%H:%M:%S')} finished the {name}", flush=True)
    return _done(spec)

  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    futures = [pool.submit(launch, s) for s in specs]
    try:
      return [f.result() for f in futures]
    except BaseException:
      for f in futures:
        f.cancel()
      raise


def mean_spread(values) -> tuple[float, float]:
  """(mean, sample standard deviation (ddof 1; 0 for one value)) of the finite values; (nan, nan) when none."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if v.size == 0:
    return float("nan"), float("nan")
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def aggregate(results: list[dict]) -> dict[str, dict]:
  """method -> {"seeds": n, field: (mean, spread) for each of FIELDS}, in the order the methods first appear."""
  by_method = {}
  for r in results:
    by_method.setdefault(r["spec"]["method"], []).append(r)
  return {name: {"seeds": len(rs), **{f: mean_spread([r[f] for r in rs]) for f in FIELDS}}
          for name, rs in by_method.items()}


def verdicts(summary: dict[str, dict], baselines: dict[str, str | None], *, field: str = "accuracy_after") -> list[str]:
  """A sentence per method whose mean does not exceed its baseline's by more than the larger spread over seeds."""
  out = []
  for name, row in summary.items():
    base = baselines[name]
    if base is None or base not in summary:
      continue
    (m, sm), (b, sb) = row[field], summary[base][field]
    if not (math.isfinite(m) and math.isfinite(b)):
      out.append(f"{name} cannot be compared with its baseline {base}: a held-out accuracy is missing.")
    elif m - b <= 0:
      out.append(f"{name} does not beat its baseline {base}: held-out accuracy {m:.3f} ± {sm:.3f} against "
                 f"{b:.3f} ± {sb:.3f}.")
    elif m - b <= max(sm, sb):
      out.append(f"{name} does not beat its baseline {base} beyond the spread over seeds: held-out accuracy "
                 f"{m:.3f} ± {sm:.3f} against {b:.3f} ± {sb:.3f}, a gain of {m - b:.3f} within ± {max(sm, sb):.3f}.")
  return out


def _cell(ms: tuple[float, float], digits: int) -> str:
  m, s = ms
  return "n/a" if not math.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _hms(seconds: float) -> str:
  h, rest = divmod(int(round(seconds)), 3600)
  return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def render_results(summary: dict[str, dict], *, methods: list[Method], warm: list[dict], budgets: dict[str, dict],
                   command: str, machine: str, date: str, wall_s: float, jobs_s: float) -> str:
  """docs/results.md: the table, the sentences, the warm starts, the methods and what the columns mean."""
  baselines = {m.name: m.baseline for m in methods}
  budget = budgets[methods[0].name]
  lines = ["# Results: every method from a shared warm start", "",
           f"`{command}` on {machine}, {date}; total wall time {_hms(wall_s)} (the warm start and run processes took "
           f"{_hms(jobs_s)} in all, summed over parallel jobs and earlier invocations whose runs were reused).", "",
           f"Budget per run: {budget['steps']} RL steps x {budget['prompts_per_batch'] * budget['group_size']} "
           "rollouts (prompts x samples per prompt, per method below); DAPO's dynamic sampling may draw more prompts "
           "(the rollouts column counts what was sampled). Figures are mean ± sample standard deviation over seeds "
           "(train.seed = 0, 1, ...).", "",
           "| method | baseline | seeds | held-out acc. before | held-out acc. after | prior-conflict acc. after "
           "| tokens/s | step time (s) | rollouts | dependency AUROC | step-split acc. |", "|---" * 11 + "|"]
  for name, row in summary.items():
    cells = [_cell(row[f], d) for f, d in zip(FIELDS, (3, 3, 3, 0, 2, 0, 3, 3))]
    lines.append(f"| {name} | {baselines[name] or '-'} | {row['seeds']} | " + " | ".join(cells) + " |")
  lines += ["", "## Methods that do not beat their baseline", ""]
  lines += [f"- {s}" for s in verdicts(summary, baselines)] or ["Every method beats its baseline beyond the spread."]
  lines += ["", "## Warm starts", ""]
  for i, w in enumerate(warm):
    users = ", ".join(sorted(set(w["methods"])))
    lines.append(f"- W{i + 1} (`{os.path.basename(w['spec']['out_dir'])}`, used by {users}): held-out accuracy "
                 f"{w['accuracy']:.3f}, prior-conflict accuracy {w['prior_conflict']:.3f}.")
  lines += ["", "## Methods", "", "| method | config | overrides | prompts x samples | max new tokens |",
            "|---" * 5 + "|"]
  lines += [f"| {m.name} | configs/{m.config} | {', '.join(m.overrides)} | {budgets[m.name]['prompts_per_batch']} x "
            f"{budgets[m.name]['group_size']} | {budgets[m.name]['max_new_tokens']} |" for m in methods]
  lines += ["", "## Columns", "",
            "- held-out: the synthetic `test` split (layouts never seen in training). prior-conflict: the same "
            "held-out layouts, with wording that suggests a wrong answer. Both use greedy decoding and score the boxed "
            "answer.",
            "- tokens/s and step time: medians over each run's RL steps after the first (the first step compiles).",
            "- dependency AUROC: how well the final policy's token dependency (PGPO's k3 score, image vs masked image) "
            "ranks the words of the reference solutions that state an image fact above the words of reasoning steps. "
            "step-split accuracy: the Otsu split of PDCR's step score V into perception and reasoning steps, scored "
            "against the generator's labels. Both come from `jaxvg.analysis.evaluate_groundtruth` on the held-out "
            "split."]
  return "\n".join(lines) + "\n"


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
  parser.add_argument("--results", default="docs/results.md")
  parser.add_argument("--configs", default=CONFIG_DIR, help="the folder holding the methods' config files")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return _worker(args.worker)
  t0 = time.time()
  methods = select_methods(args.methods, config_dir=args.configs)
  runs = plan_runs(methods, seeds=args.seeds, steps=args.steps, common=args.set, out_dir=args.out,
                   config_dir=args.configs)
  # One persistent compilation cache for every process: each stage compiles once per shape, not once per run.
  env = {"JAX_COMPILATION_CACHE_DIR": os.path.join(os.path.abspath(args.out), "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
         **os.environ}
  warm = execute(warm_start_specs(runs), jobs=args.jobs, pin=args.pin, env=env)
  # Seed by seed, so that an interrupted invocation leaves every method with the same number of finished seeds.
  results = execute(sorted(runs, key=lambda r: r["seed"]), jobs=args.jobs, pin=args.pin, env=env)
  for w in warm:
    w["methods"] = [r["spec"]["method"] for r in results if r["spec"]["warm_dir"] == w["spec"]["out_dir"]]
  command = shlex.join(["python", "-m", "jaxvg.replicate", *(sys.argv[1:] if argv is None else argv)])
  text = render_results(aggregate(results), methods=methods, warm=warm, command=command,
                        budgets={r["spec"]["method"]: r["budget"] for r in results},
                        machine=describe_machine([r["device"] for r in results]),
                        date=datetime.date.today().isoformat(), wall_s=time.time() - t0,
                        jobs_s=sum(r["wall_s"] for r in warm + results))
  os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
  with open(args.results, "w") as f:
    f.write(text)
  print(f"wrote {args.results}")
  return results


# ------------------------------------------------------------------------------------------ run loading (notebooks)


def _columns(table: dict[str, dict[int, float]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  return {k: (np.asarray(sorted(v), np.int64), np.asarray([v[s] for s in sorted(v)], np.float64))
          for k, v in sorted(table.items())}


def read_run(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """metrics.jsonl as key -> (steps_S int64, values_S float64), by step; a step logged twice keeps its last value.

  A final line cut short (a killed process) is skipped; any other unreadable line raises, naming it.
  """
  path = os.path.join(run_dir, "metrics.jsonl")
  lines = open(path).read().split("\n")
  table: dict[str, dict[int, float]] = {}
  for n, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if n == len(lines) - 1:  # the last line has no newline: its writer was killed mid-write
        continue
      raise ValueError(f"{path}: line {n + 1} is not JSON: {line[:80]!r}") from None
    for key, value in row.items():
      if key != "step":
        table.setdefault(key, {})[int(row["step"])] = float("nan") if value is None else float(value)
  return _columns(table)


def read_tfevents(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The scalars of run_dir/tensorboard's event files, like `read_run`, without TensorBoard's reader.

  An event file is a sequence of records: uint64 length, uint32 masked CRC-32C of the length, the serialized Event,
  uint32 masked CRC of the data (little-endian). A record cut short at the end of a file is skipped; a record whose
  checksum fails raises.
  """
  from tensorboard.compat.proto import event_pb2
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
  table: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "*tfevents*"))):
    blob = open(path, "rb").read()
    pos = 0
    while pos + 12 <= len(blob):
      (length,), (length_crc,) = struct.unpack("<Q", blob[pos:pos + 8]), struct.unpack("<I", blob[pos + 8:pos + 12])
      if masked_crc32c(blob[pos:pos + 8]) != length_crc:
        raise ValueError(f"{path}: corrupt record length at byte {pos}")
      end = pos + 12 + length + 4
      if end > len(blob):
        break  # cut short
      data = blob[pos + 12:pos + 12 + length]
      if masked_crc32c(data) != struct.unpack("<I", blob[end - 4:end])[0]:
        raise ValueError(f"{path}: corrupt record at byte {pos}")
      event = event_pb2.Event.FromString(data)
      for value in event.summary.value:
        if value.WhichOneof("value") == "simple_value":
          table.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
      pos = end
  return _columns(table)


def ema(values_S, weight: float) -> np.ndarray:
  """TensorBoard's debiased exponential moving average: m_i = w m_{i-1} + (1 - w) x_i, s_i = m_i / (1 - w^(i+1)).

  m_{-1} = 0; weight 0 returns the values. Non-finite values are carried over without entering the average.
  """
  if not 0.0 <= weight < 1.0:
    raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
  x_S = np.asarray(values_S, np.float64)
  out_S = np.empty_like(x_S)
  m, n = 0.0, 0
  for i, x in enumerate(x_S):
    if not math.isfinite(x):
      out_S[i] = x
      continue
    m, n = weight * m + (1.0 - weight) * x, n + 1
    out_S[i] = m / (1.0 - weight**n)
  return out_S


if __name__ == "__main__":
  main()
