"""A replication's results page: the runs' results aggregated per method, compared with their baselines, rendered.

  results = results_page.load_results("runs/replicate")     # the finished runs of `python -m jaxvg.replicate`
  summary = results_page.aggregate(results)                 # method -> seeds, per-prompt scores, mechanisms, curves
  comparisons = results_page.compare(summary, {"DAPO": "GRPO", ...}, split="test")
  print("\n".join(results_page.mechanism_rows(summary)))
  results_page.curves_figure(summary)                        # a matplotlib figure (notebooks)

What a result holds is written by `jaxvg.replicate`'s workers; the statistics are `jaxvg.run.stats`'.
"""

import dataclasses
import glob
import json
import math
import os
import sys

import numpy as np

from jaxvg.run import stats

# result.json fields aggregated over seeds (mean ± spread), in table order.
FIELDS = ("tokens_per_s", "step_time", "rollouts", "dependency_auroc", "step_split_accuracy")
# Per-prompt scores kept by every result: held-out, prior-conflict, and held-out with white images (the control).
SPLITS = ("test", "prior_conflict", "white")
COMPARED = {"test": "held-out", "prior_conflict": "prior-conflict"}  # the splits compared with the baseline
TARGET_MDD = 0.05  # the minimum detectable difference the replication aims for
# What each paper says its method does, measured on every run (`run_mechanisms`): the page's mechanisms table.
MECHANISMS = ("pgpo_visual_mass", "visual_share", "step_split", "pdcr_visual_adv_std", "pdcr_textual_adv_std",
              "pdcr_visual_frac", "vigos_valid", "palr", "vgs_eta", "vgs_eta_measured", "vgs_angle", "vgs_lp_fraction")
# The curves every run keeps (`run_curves`): the reward per RL step, and the evaluated figures by RL steps done.
EVAL_CURVES = ("accuracy", "white_kl", "dependency_auroc")


def mean_spread(values) -> tuple[float, float]:
  """(mean, sample standard deviation (ddof 1; 0 for one value)) of the finite values; (nan, nan) when none."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if v.size == 0:
    return float("nan"), float("nan")
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class PerPrompt:
  """One method's scores on one split: a row per seed (train.seed `seeds[s]`), a column per prompt (`ids[p]`), and
  each prompt's task family (`tasks[p]`; None where the results did not record them)."""
  seeds: tuple[int, ...]
  ids: tuple[str, ...]
  scores_SP: np.ndarray
  tasks: tuple[str, ...] | None = None

  def where(self, keep) -> "PerPrompt":
    """The prompts whose task satisfies `keep(task)`."""
    cols = [p for p, t in enumerate(self.tasks) if keep(t)]
    return PerPrompt(self.seeds, tuple(self.ids[p] for p in cols), self.scores_SP[:, cols],
                     tuple(self.tasks[p] for p in cols))


def per_prompt_scores(results: list[dict], split: str) -> PerPrompt | None:
  """One method's results' scores on `split`, in seed order; None when a result has none (the data is not synthetic)."""
  rs = sorted(results, key=lambda r: r["spec"]["seed"])
  entries = [r["per_prompt"][split] for r in rs]
  if not entries or any(e is None for e in entries):
    return None
  ids = tuple(entries[0]["ids"])
  if any(tuple(e["ids"]) != ids for e in entries):
    raise ValueError(f"the seeds of {rs[0]['spec']['method']} were scored on different {split} prompts")
  tasks = {tuple(e["tasks"]) for e in entries if "tasks" in e}  # results written before tasks were recorded: none
  if len(tasks) > 1:
    raise ValueError(f"the seeds of {rs[0]['spec']['method']} disagree on the tasks of the {split} prompts")
  return PerPrompt(tuple(r["spec"]["seed"] for r in rs), ids, np.asarray([e["scores"] for e in entries], np.float64),
                   next(iter(tasks), None))


def warm_scores(warm: dict, split: str, tasks_by_id: dict[str, str]) -> PerPrompt | None:
  """A warm start's scores on `split` as one row; its prompts' tasks from its own record, else from `tasks_by_id`
  (the runs', which scored the same prompts)."""
  entry = warm["per_prompt"][split]
  if entry is None:
    return None
  tasks = entry.get("tasks") or [tasks_by_id.get(i) for i in entry["ids"]]
  return PerPrompt((0,), tuple(entry["ids"]), np.asarray([entry["scores"]], np.float64),
                   None if None in tasks else tuple(tasks))


def mean_curves(results: list[dict]) -> dict[str, list[tuple[int, float]]]:
  """Each curve of `run_curves` averaged over the results (seeds) at every x one of them logged."""
  out = {}
  for name in ("reward", *EVAL_CURVES):
    points = {}
    for r in results:
      for x, v in r.get("curves", {}).get(name, []):
        if math.isfinite(v):
          points.setdefault(int(x), []).append(v)
    if points:
      out[name] = [(x, float(np.mean(points[x]))) for x in sorted(points)]
  return out


def aggregate(results: list[dict]) -> dict[str, dict]:
  """method -> {"seeds": n, field: (mean, spread) for each of FIELDS, split: PerPrompt | None for each of SPLITS,
  "mechanisms": {name: (mean, spread)} for each of MECHANISMS, "curves": `mean_curves`}, in the order the methods
  first appear."""
  by_method = {}
  for r in results:
    by_method.setdefault(r["spec"]["method"], []).append(r)
  return {name: {"seeds": len(rs), **{f: mean_spread([r[f] for r in rs]) for f in FIELDS},
                 **{split: per_prompt_scores(rs, split) for split in SPLITS},
                 "mechanisms": {k: mean_spread([r.get("mechanisms", {}).get(k) for r in rs]) for k in MECHANISMS},
                 "warm_dirs": sorted({str(r["spec"].get("warm_dir")) for r in rs}),
                 "curves": mean_curves(rs)}
          for name, rs in by_method.items()}


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A method against its baseline on one split: the paired difference on their common seeds, or why there is none."""
  method: str
  baseline: str
  seeds: int = 0                              # the seeds both ran (the rows paired)
  prompts: int = 0
  diff: stats.Difference | None = None
  why: str = ""
  other_warm_start: bool = False              # the two ran from different warm starts: the difference includes theirs

  @property
  def mdd(self) -> float:
    """The minimum detectable difference (80 % power, 5 % level) of this paired design."""
    return stats.z_sum() * self.diff.se if self.diff else float("nan")


def compare(summary: dict[str, dict], baselines: dict[str, str | None], *, split: str) -> list[Comparison]:
  """Each method that has a baseline, against it on `split`: the same prompts, the seeds both ran."""
  out = []
  for name, row in summary.items():
    base = baselines[name]
    if base is None:
      continue
    if base not in summary:
      out.append(Comparison(name, base, why=f"its baseline {base} was not run"))
      continue
    a, b = row[split], summary[base][split]
    if a is None or b is None:
      out.append(Comparison(name, base, why="no per-prompt scores"))
      continue
    common = [s for s in a.seeds if s in b.seeds]
    if a.ids != b.ids:
      out.append(Comparison(name, base, why=f"it and {base} were scored on different prompts"))
    elif not common:
      out.append(Comparison(name, base, why=f"no seed in common with {base}"))
    else:
      a_SP, b_SP = (pp.scores_SP[[pp.seeds.index(s) for s in common]] for pp in (a, b))
      out.append(Comparison(name, base, len(common), len(a.ids), stats.paired_difference(a_SP, b_SP),
                            other_warm_start=row.get("warm_dirs") != summary[base].get("warm_dirs")))
  return out


def power_sentence(comparisons: list[Comparison], label: str) -> str:
  """The largest minimum detectable difference over the comparisons, and whether it reaches TARGET_MDD."""
  made = [c for c in comparisons if c.diff]
  if not made:
    return f"{label}: no comparison was made."
  worst = max(made, key=lambda c: c.mdd)
  head = (f"{label}: the largest minimum detectable difference over the {len(made)} comparison(s) is {worst.mdd:.3f} "
          f"({worst.method} against {worst.baseline})")
  if worst.mdd <= TARGET_MDD:
    return (f"{head}, <= {TARGET_MDD}: every comparison would detect a true difference of {TARGET_MDD} with 80 % "
            "power.")
  sd, need = worst.diff.sd_prompt, stats.required_prompts(worst.diff.sd_prompt, TARGET_MDD)
  head += (f", above {TARGET_MDD}: this run cannot promise to detect a difference of {TARGET_MDD}. At that "
           f"comparison's per-prompt paired SD ({sd:.3f}), the prompts alone would reach {TARGET_MDD} with about "
           f"{need} prompts")
  if need > worst.prompts:
    return f"{head}: score more (--eval-prompts); the part from the spread between seeds falls only with more seeds."
  return (f"{head}, and {worst.prompts} were scored: the rest is the spread between seeds (with the share of the "
          "seed x prompt noise that the bootstrap counts there), which only more seeds reduce.")


def _cell(ms: tuple[float, float], digits: int) -> str:
  m, s = ms
  return "n/a" if not math.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _ci_cell(scores_SP) -> str:
  if scores_SP is None:
    return "n/a"
  ci = stats.mean_ci(scores_SP)
  return f"{ci.mean:.3f} [{ci.lo:.3f}, {ci.hi:.3f}]"


def _diff_cells(c: Comparison) -> list[str]:
  if c.diff is None:
    return ["n/a", f"not compared: {c.why}", "n/a"]
  d = c.diff
  verdict = f"{d.verdict} (another warm start)" if c.other_warm_start else d.verdict
  return [f"{d.mean:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]", verdict, f"{c.mdd:.3f}"]


def _dash(ms: tuple[float, float], digits: int) -> str:
  return "-" if not math.isfinite(ms[0]) else _cell(ms, digits)


def mechanism_rows(summary: dict[str, dict]) -> list[str]:
  """The mechanisms table: what each paper says its method does, as measured (mean ± spread over seeds)."""
  lines = ["| method | PGPO: weight share on visual words | visual words' token share | step split (V) | "
           "PDCR adv. std, visual / textual steps | PDCR visual steps | ViGOS valid rollouts | PALR | "
           "VGS eta (config / measured) | VGS angle g_Lang-g_Vis (deg) | VGS LP tokens |", "|---" * 11 + "|"]
  for name, row in summary.items():
    m = row["mechanisms"]
    pdcr = ("-" if not math.isfinite(m["pdcr_visual_adv_std"][0]) else
            f"{_cell(m['pdcr_visual_adv_std'], 3)} / {_dash(m['pdcr_textual_adv_std'], 3)}")
    cells = [_dash(m["pgpo_visual_mass"], 3), _dash(m["visual_share"], 3), _dash(m["step_split"], 3), pdcr,
             _dash(m["pdcr_visual_frac"], 3), _dash(m["vigos_valid"], 3), _dash(m["palr"], 3),
             _dash(m["vgs_eta"], 2) + ("" if not math.isfinite(m["vgs_eta_measured"][0]) else
                                       f" / {_cell(m['vgs_eta_measured'], 2)}"),
             _dash(m["vgs_angle"], 0), _dash(m["vgs_lp_fraction"], 3)]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def _tasks_by_id(summary: dict[str, dict]) -> dict[str, str]:
  return {i: t for row in summary.values() for split in SPLITS if row[split] is not None and row[split].tasks
          for i, t in zip(row[split].ids, row[split].tasks)}


def _warm_of(row: dict, warm: list[dict]) -> dict | None:
  """The warm start a method's runs started from (None: several, or not among `warm`)."""
  found = [w for w in warm if [w["spec"]["out_dir"]] == row.get("warm_dirs")]
  return found[0] if found else None


def task_rows(summary: dict[str, dict], warm: list[dict]) -> list[str]:
  """Held-out accuracy by task family, real image / white image: each warm start (W1, W2, ... as on the page), then
  each method (mean over seeds and prompts). [] when the results do not record the prompts' tasks."""
  tasks_by_id = _tasks_by_id(summary)
  rows = [(f"W{i + 1} (warm start)", warm_scores(w, "test", tasks_by_id), warm_scores(w, "white", tasks_by_id))
          for i, w in enumerate(warm)]
  rows += [(name, row["test"], row["white"]) for name, row in summary.items()]
  if not rows or any(pp is None or pp.tasks is None for _, test, white in rows for pp in (test, white)):
    return []
  order = list(dict.fromkeys(rows[0][1].tasks))
  counts = {t: rows[0][1].tasks.count(t) for t in order}
  lines = ["| policy | " + " | ".join(f"{t} ({counts[t]})" for t in order) + " |", "|---" * (1 + len(order)) + "|"]
  for name, test, white in rows:
    cells = [f"{test.where(t.__eq__).scores_SP.mean():.3f} / {white.where(t.__eq__).scores_SP.mean():.3f}"
             for t in order]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def _from_warm(pp: PerPrompt, before: PerPrompt) -> list[str]:
  """A method's scores against its warm start's (one row), prompt by prompt: the two means, the paired change with its
  interval, and the prompts turned right / wrong (summed over seeds)."""
  col = {i: p for p, i in enumerate(before.ids)}
  b_P = before.scores_SP[0, [col[i] for i in pp.ids]]
  d = stats.paired_difference(pp.scores_SP, np.broadcast_to(b_P, pp.scores_SP.shape))
  return [f"{b_P.mean():.3f} -> {pp.scores_SP.mean():.3f}", f"{d.mean:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]",
          f"{int((pp.scores_SP > b_P).sum())} / {int((pp.scores_SP < b_P).sum())}"]


def taught_error_rows(summary: dict[str, dict], warm: list[dict], baselines: dict[str, str | None],
                      task: str) -> list[str]:
  """The taught error's tables: each method's accuracy on `task` (whose warm-start references a fallible teacher
  wrote) and on the other tasks, from the warm start to after RL, with the prompts turned right / wrong; then each
  method against its baseline on both. [] when the results do not record the prompts' tasks."""
  tasks_by_id = _tasks_by_id(summary)
  if not summary or any(row["test"] is None or row["test"].tasks is None for row in summary.values()):
    return []
  parts = {"taught": task.__eq__, "other": task.__ne__}
  lines = ["| method | seeds | " + " | ".join(f"{label}: warm start -> after RL | {label}: change [95 % CI] | {label}: "
                                             "right / wrong turned" for label in (f"`{task}`", "other tasks")) + " |",
           "|---" * 8 + "|"]
  for name, row in summary.items():
    w = _warm_of(row, warm)
    before = w and warm_scores(w, "test", tasks_by_id)
    cells = []
    for keep in parts.values():
      pp = row["test"].where(keep)
      known = before is not None and before.tasks is not None
      cells += _from_warm(pp, before.where(keep)) if known else [f"n/a -> {pp.scores_SP.mean():.3f}", "n/a", "n/a"]
    lines.append(f"| {name} | {row['seeds']} | " + " | ".join(cells) + " |")
  by_part = {part: compare({name: {**row, "test": row["test"].where(keep)} for name, row in summary.items()},
                           baselines, split="test") for part, keep in parts.items()}
  lines += ["", f"| method | baseline | seeds paired | `{task}` diff. | `{task}` verdict | `{task}` MDD | other tasks "
            "diff. | other tasks verdict | other tasks MDD |", "|---" * 9 + "|"]
  for taught, other in zip(by_part["taught"], by_part["other"]):
    lines.append(f"| {taught.method} | {taught.baseline} | {taught.seeds or 'n/a'} | "
                 + " | ".join(_diff_cells(taught) + _diff_cells(other)) + " |")
  return lines


def curves_figure(summary: dict[str, dict]):
  """A matplotlib figure of the methods' mean curves (reward, held-out accuracy, white-image KL, dependency AUROC),
  one color per method; None when no run logged a curve."""
  if not any(row["curves"] for row in summary.values()):
    return None
  import matplotlib.pyplot as plt
  from jaxvg.run import runlog
  titles = {"reward": "reward per RL step (EMA 0.6)", "accuracy": "held-out accuracy (greedy)",
            "white_kl": "white-image KL per token", "dependency_auroc": "dependency AUROC (visual vs reasoning words)"}
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
  for ax, (name, title) in zip(axes.ravel(), titles.items()):
    for i, (method, row) in enumerate(summary.items()):
      if name in row["curves"]:
        x, y = np.asarray(row["curves"][name]).T
        y = runlog.ema(y, 0.6) if name == "reward" else y
        ax.plot(x, y, color=plt.cm.tab20(i % 20), marker=None if name == "reward" else "o", markersize=3,
                label=method)
    ax.set(title=title, xlabel="RL step" if name == "reward" else "RL steps done")
    ax.grid(alpha=0.3)
  handles, labels = axes[0, 1].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels) or 1), fontsize=8)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  return fig


def plot_curves(summary: dict[str, dict], path: str) -> bool:
  """Writes `curves_figure` as a PNG at `path`; False (and no file) when no run logged a curve or matplotlib (an
  optional dependency: the `notebooks` extra) is not installed."""
  try:
    import matplotlib
  except ImportError:
    print("matplotlib is not installed: the page has no curves figure (pip install matplotlib)", file=sys.stderr)
    return False
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig = curves_figure(summary)
  if fig is None:
    return False
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def load_results(out_dir: str) -> list[dict]:
  """The finished runs' results under a replication folder (`--out`), method by method, seed by seed: for notebooks
  (`aggregate`, `curves_figure`, `mechanism_rows`)."""
  paths = glob.glob(os.path.join(out_dir, "*", "seed*", "run_result.json"))
  results = [json.load(open(p)) for p in paths]
  return sorted(results, key=lambda r: (r["spec"]["method"], r["spec"]["seed"]))


def _hms(seconds: float) -> str:
  h, rest = divmod(int(round(seconds)), 3600)
  return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def render_results(summary: dict[str, dict], *, methods: list, warm: list[dict], budgets: dict[str, dict],
                   command: str, machine: str, date: str, wall_s: float, jobs_s: float,
                   curves_png: str | None = None, taught: tuple[str, str] | None = None) -> str:
  """The results page: accuracies (overall and by task), comparisons with the baselines and their power, the taught
  error, cost, warm starts, methods.

  methods: the replication's methods (`jaxvg.replicate.Method`: name, config, overrides, baseline), in table order.
  taught: (task, settings) when the warm starts learned from a fallible teacher: the task whose references it
    rewrote and the settings that asked for it (`jaxvg.replicate.teacher_settings`). The page then ranks the methods
    by how much of the taught error their RL undoes.
  """
  baselines = {m.name: m.baseline for m in methods}
  budget = budgets[methods[0].name]
  sizes = sorted({len(row[s].ids) for row in summary.values() for s in SPLITS if row[s] is not None})
  prompts = "no" if not sizes else str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]} to {sizes[-1]}"
  lines = ["# Results: every method from a shared warm start", "",
           f"`{command}` on {machine}, {date}; total wall time {_hms(wall_s)} (the warm start and run processes took "
           f"{_hms(jobs_s)} in all, summed over parallel jobs and earlier invocations whose runs were reused).", "",
           f"Budget per run: {budget['steps']} RL steps x {budget['prompts_per_batch'] * budget['group_size']} "
           "rollouts (prompts x samples per prompt, per method below); DAPO's dynamic sampling may draw more prompts "
           "(the rollouts column counts what was sampled). Seed n is train.seed = n.", "",
           "## Accuracy", "",
           f"Each final policy scored prompt by prompt on {prompts} prompts per split, the same prompts for every "
           "method and seed: the mean over seeds and prompts [its 95 % interval, a bootstrap over seeds and prompts]. "
           "The white-image column is the held-out split with every image white: what the policy gets without "
           "looking.", "",
           "| method | seeds | held-out acc. | prior-conflict acc. | white-image acc. (control) |", "|---" * 5 + "|"]
  lines += [f"| {name} | {row['seeds']} | " + " | ".join(_ci_cell(row[s] and row[s].scores_SP) for s in SPLITS)
            + " |" for name, row in summary.items()]
  by_task = task_rows(summary, warm)
  if by_task:
    lines += ["", "## By task", "",
              "Held-out accuracy per task family (prompts per family in the header), real image / white image: the "
              "warm starts (W1, ... as listed below), then each method, the mean over seeds and prompts.", "", *by_task]
  by_split = {split: compare(summary, baselines, split=split) for split in COMPARED}
  lines += ["", "## Against the baseline", "",
            "Method minus baseline on the seeds both ran and the same prompts: the mean difference [its 95 % interval, "
            "a paired bootstrap that resamples the same seeds and prompts for both], the verdict (better: the interval "
            "lies above 0; worse: below 0; no difference detected: it holds 0), and the minimum detectable difference "
            "(MDD: the smallest true difference this design detects with 80 % power at the 5 % level).", "",
            "| method | baseline | seeds paired | " + " | ".join(f"{label} diff. | {label} verdict | {label} MDD"
                                                       for label in COMPARED.values()) + " |",
            "|---" * (3 + 3 * len(COMPARED)) + "|"]
  for row in zip(*by_split.values()):
    lines.append(f"| {row[0].method} | {row[0].baseline} | {row[0].seeds or 'n/a'} | "
                 + " | ".join(cell for c in row for cell in _diff_cells(c)) + " |")
  lines += ["", "Minimum detectable difference achieved:", ""]
  lines += [f"- {power_sentence(by_split[split], label.capitalize())}" for split, label in COMPARED.items()]
  if any(c.other_warm_start for cs in by_split.values() for c in cs):
    lines += ["", "**Another warm start.** A verdict marked so compares runs that started from different warm starts "
              "(their output formats differ; the warm starts are listed below): its difference holds the warm starts' "
              "own gap as well as the methods'."]
  if any(c.seeds == 1 for cs in by_split.values() for c in cs):
    lines += ["", "**One seed.** A comparison on one seed resamples prompts only: its interval, verdict and MDD leave "
              "out how much a run's accuracy moves with its training seed, so its verdicts are provisional until "
              "more seeds run (`--seeds`; finished runs are reused)."]
  taught_rows = taught_error_rows(summary, warm, baselines, taught[0]) if taught else []
  if taught_rows:
    lines += ["", "## The taught error", "",
              f"The warm starts learned from a fallible teacher (`{taught[1]}`): that share of the "
              f"`{taught[0]}` references of the train split name the first item described instead of the right "
              "one, while the rewards grade the true answer and the held-out references stay true. RL can undo what "
              f"the demonstrations taught wrong, so each method's gain on `{taught[0]}` measures how it learns from "
              "reward, where the other tasks (whose references were true) measure its drift. Accuracy on the held-out "
              "split: the warm start's, then the method's after RL (mean over seeds and prompts); the change, paired "
              "with the warm start's scores prompt by prompt [95 % interval, the bootstrap above]; right / wrong "
              "turned counts the prompts whose greedy answer RL made right / wrong against the warm start's, summed "
              "over seeds. Then each method against its baseline on both parts, as above.", "",
              *taught_rows]
  lines += ["", "## Cost and analysis", "", "Mean ± sample standard deviation over seeds.", "",
            "| method | seeds | tokens/s | step time (s) | rollouts | dependency AUROC | step-split acc. |",
            "|---" * 7 + "|"]
  for name, row in summary.items():
    cells = [_cell(row[f], d) for f, d in zip(FIELDS, (0, 2, 0, 3, 3))]
    lines.append(f"| {name} | {row['seeds']} | " + " | ".join(cells) + " |")
  lines += ["", "## Mechanisms", "",
            "What each paper says its method does, measured on every run (mean ± sample standard deviation over "
            "seeds; - where a method has no such part). PGPO's weight share is computed for every final policy, on "
            "the reference solutions with the run's counterfactual: PGPO does what its paper says when the visual "
            "words' share of the weight exceeds their share of the tokens. The step split scores PDCR's Otsu split "
            "of V against the generator's perception / reasoning labels (chance: the majority class). The PDCR "
            "columns, ViGOS's valid rollouts, PALR and VGS's language-prior tokens are means over the RL steps. VGS's "
            "eta is its config's (from `python -m jaxvg.calibrate` on the warm start) beside the eta of Eq. 15 from "
            "the run's own gradients; those and the angle between g_Lang and g_Vis are measured every few RL steps "
            "(`distill.gradient_stats_every`, before the update) and averaged over the run.", ""]
  lines += mechanism_rows(summary)
  if curves_png:
    lines += ["", "## Curves", "",
              "Mean over seeds per method: the reward of every RL step, and held-out accuracy, the white-image KL "
              "and the dependency AUROC (with a white image as the counterfactual, `train.eval_dependency`) before "
              "RL, every `train.eval_every` steps and after the last.", "",
              f"![curves]({os.path.basename(curves_png)})"]
  lines += ["", "## Warm starts", ""]
  for i, w in enumerate(warm):
    users = ", ".join(sorted(set(w["methods"])))
    one = {s: w["per_prompt"][s] and [w["per_prompt"][s]["scores"]] for s in SPLITS}  # one seed: prompts only
    lines.append(f"- W{i + 1} (`{os.path.basename(w['spec']['out_dir'])}`, used by {users}): held-out accuracy "
                 f"{_ci_cell(one['test'])}, prior-conflict {_ci_cell(one['prior_conflict'])}, white-image "
                 f"{_ci_cell(one['white'])}.")
  lines += ["", "## Methods", "", "| method | config | overrides | prompts x samples | max new tokens |",
            "|---" * 5 + "|"]
  lines += [f"| {m.name} | configs/{m.config} | {', '.join(m.overrides)} | {budgets[m.name]['prompts_per_batch']} x "
            f"{budgets[m.name]['group_size']} | {budgets[m.name]['max_new_tokens']} |" for m in methods]
  lines += ["", "## Columns", "",
            "- held-out: the first records of the synthetic `test` split (layouts never seen in training). "
            "prior-conflict: the same held-out layouts, with wording that suggests a wrong answer. Each prompt scores "
            "1 when the boxed answer of the greedy completion is right, else 0.",
            "- intervals: percentile intervals of a crossed bootstrap that resamples seeds and, independently, prompts "
            "(the same prompts for every seed, and for both sides of a comparison). It errs wide, counting the seed x "
            "prompt noise more than once, so a verdict of better or worse is safe and an MDD may be up to 1.5 times "
            "too large (`jaxvg.run.stats`).",
            "- tokens/s and step time: medians over each run's RL steps after the first (the first step compiles).",
            "- dependency AUROC: how well the final policy's token dependency (PGPO's k3 score, under the run's own "
            "counterfactual: the masked image by default, the white image for PDCR) ranks the words of the reference "
            "solutions that state an image fact above the words of reasoning steps. "
            "step-split accuracy: the Otsu split of PDCR's step score V into perception and reasoning steps, scored "
            "against the generator's labels. Both come from `jaxvg.analysis.evaluate_groundtruth` on the held-out "
            "split."]
  return "\n".join(lines) + "\n"
