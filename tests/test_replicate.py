"""The replication driver: method selection, planning, aggregation, the results table, run loading, end to end."""

import json
import math
import os
import shutil
import struct
import threading
import time
import types

import numpy as np
import pytest

from jaxvg import replicate
from jaxvg.core import config_lib
from jaxvg.run import metrics, results_page, runlog

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
MINI = ["--set", "sft.steps=1", "--set", "sft.perception_steps=2", "--set", "sft.batch_size=2",
        "--set", "sft_optim.total_steps=1", "--set", "data.prompts_per_batch=2",
        "--set", "data.num_eval=2", "--set", "rollout.group_size=2", "--set", "rollout.max_new_tokens=8",
        "--set", "algo.ds_max_tries=2", "--set", "model.tiny_width=32", "--set", "model.tiny_layers=1",
        "--set", "model.tiny_vision_width=32"]


# ------------------------------------------------------------------------------------------------ selection, plan


def test_select_methods_by_name_comma_or_case_and_errors(tmp_path):
  got = replicate.select_methods(["grpo,DAPO", "pgpo-grpo", "GRPO"], config_dir=CONFIGS)
  assert [m.name for m in got] == ["GRPO", "DAPO", "PGPO-GRPO"]
  with pytest.raises(ValueError, match="unknown method.*'PPO'"):
    replicate.select_methods(["GRPO,PPO"], config_dir=CONFIGS)
  shutil.copy(os.path.join(CONFIGS, "demo.py"), tmp_path / "demo.py")
  assert [m.name for m in replicate.select_methods(["GRPO", "DAPO"], config_dir=str(tmp_path))] == ["GRPO", "DAPO"]
  # A missing config is an error naming the file, never a skipped method.
  with pytest.raises(FileNotFoundError, match="OPSD needs .*opsd_demo.py.*VGS needs .*vgs_demo.py"):
    replicate.select_methods(["GRPO", "OPSD", "VGS"], config_dir=str(tmp_path))


def test_every_baseline_is_a_method_from_the_same_warm_start(tmp_path):
  names = {m.name for m in replicate.METHODS}
  assert all(m.baseline in names for m in replicate.METHODS if m.baseline is not None)
  assert len(names) == len(replicate.METHODS) == 13
  # A paired comparison holds the method alone only when both sides continue one warm start.
  runs = replicate.plan_runs(list(replicate.METHODS), seeds=1, steps=None, common=[], out_dir=str(tmp_path))
  warm = {r["method"]: r["warm_dir"] for r in runs}
  assert len(set(warm.values())) == 2 and None not in warm.values()
  for m in replicate.METHODS:
    if m.baseline is not None:
      assert warm[m.name] == warm[m.baseline], m.name


def test_plan_shares_the_warm_start_and_checks_the_budget(tmp_path):
  methods = replicate.select_methods(["GRPO", "DAPO", "PGPO-DAPO"], config_dir=CONFIGS)
  runs = replicate.plan_runs(methods, seeds=2, steps=5, common=["rollout.max_new_tokens=16"], out_dir=str(tmp_path))
  assert [(r["method"], r["seed"]) for r in runs] == [(m, s) for m in ("GRPO", "DAPO", "PGPO-DAPO") for s in (0, 1)]
  grpo0 = runs[0]
  # method overrides, then the common ones, then seed, steps and folder (the last assignment wins)
  assert grpo0["overrides"] == ["algo.name=grpo", "algo.dynamic_sampling=false", "rollout.max_new_tokens=16",
                                "train.seed=0", "train.steps=5", f"train.out_dir={tmp_path / 'grpo' / 'seed0'}"]
  assert runs[5]["out_dir"] == str(tmp_path / "pgpo_dapo" / "seed1")
  assert {r["eval_prompts"] for r in runs} == {512}  # the default: every run scores the same 512 prompts per split
  assert len({r["warm_dir"] for r in runs}) == 1  # the warm start ignores algo, credit, seed and steps
  warm = replicate.warm_start_specs(runs)
  assert len(warm) == 1 and warm[0]["out_dir"] == runs[0]["warm_dir"]
  assert warm[0]["overrides"][-1] == f"train.out_dir={runs[0]['warm_dir']}"
  assert sum(o.startswith("train.out_dir=") for o in warm[0]["overrides"]) == 1
  assert warm[0]["eval_prompts"] == 512
  fewer = replicate.plan_runs(methods, seeds=1, steps=5, common=[], out_dir=str(tmp_path), eval_prompts=64)
  assert {r["eval_prompts"] for r in fewer + replicate.warm_start_specs(fewer)} == {64}
  with pytest.raises(ValueError, match="--eval-prompts must be >= 1"):
    replicate.plan_runs(methods, seeds=1, steps=5, common=[], out_dir=str(tmp_path), eval_prompts=0)
  # a change to the data section is a different warm start
  other = replicate.plan_runs(methods[:1], seeds=1, steps=5, common=["data.image_size=112"], out_dir=str(tmp_path))
  assert other[0]["warm_dir"] != runs[0]["warm_dir"]
  with pytest.raises(ValueError, match="--seeds"):
    replicate.plan_runs(methods, seeds=0, steps=5, common=[], out_dir=str(tmp_path))


def test_unequal_rollout_budgets_are_an_error(tmp_path):
  shutil.copy(os.path.join(CONFIGS, "demo.py"), tmp_path / "demo.py")
  (tmp_path / "pgpo_demo.py").write_text(
      "import dataclasses, os\nfrom jaxvg.core import config_lib\n\ndef get_config():\n"
      "  base = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo.py'))\n"
      "  return dataclasses.replace(base, rollout=dataclasses.replace(base.rollout, group_size=4))\n")
  methods = replicate.select_methods(["GRPO", "DAPO", "PGPO-GRPO"], config_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"budgets differ \(GRPO, DAPO: 7 steps x 64 rollouts; PGPO-GRPO: 7 steps x "
                                       r"32 rollouts\); align them"):
    replicate.plan_runs(methods, seeds=1, steps=7, common=[], out_dir=str(tmp_path / "out"), config_dir=str(tmp_path))


def test_split_cpus():
  assert replicate.split_cpus([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
  assert replicate.split_cpus([4, 6], 2) == [[4], [6]]
  assert replicate.split_cpus([0, 1, 2], 1) == [[0, 1, 2]]
  with pytest.raises(ValueError, match="--jobs 3 needs at least 3 cores; 2 available"):
    replicate.split_cpus([0, 1], 3)
  with pytest.raises(ValueError, match="--jobs must be >= 1"):
    replicate.split_cpus([0, 1], 0)


# ----------------------------------------------------------------------------------------------------- aggregation


def test_mean_spread_by_hand():
  m, s = results_page.mean_spread([0.2, 0.4, 0.6])
  # mean 1.2 / 3 = 0.4; sample variance ((-0.2)^2 + 0 + 0.2^2) / (3 - 1) = 0.04 -> 0.2
  assert m == pytest.approx(0.4) and s == pytest.approx(0.2)
  assert results_page.mean_spread([0.7]) == (0.7, 0.0)  # one seed: no spread
  assert results_page.mean_spread([1.0, float("nan"), 3.0]) == pytest.approx((2.0, math.sqrt(2.0)))
  assert all(math.isnan(x) for x in results_page.mean_spread([float("nan")]))
  assert all(math.isnan(x) for x in results_page.mean_spread([]))


IDS = ("p0", "p1", "p2", "p3")


def _entry(scores, ids=IDS):
  return None if scores is None else {"ids": list(ids), "scores": [float(x) for x in scores]}


def _result(method, seed, test, prior=None, white=None, *, ids=IDS, **kw):
  """A run's result by hand: per-prompt scores (prior-conflict: the held-out ones unless given) and metrics."""
  base = {f: float("nan") for f in results_page.FIELDS}
  base.update(tokens_per_s=1000.0 + seed, step_time=2.0, **kw)
  per_prompt = {"test": _entry(test, ids), "prior_conflict": _entry(test if prior is None else prior, ids),
                "white": _entry(white, ids)}
  return {"spec": {"method": method, "seed": seed}, **base, "per_prompt": per_prompt}


def test_aggregate_groups_by_method_and_stacks_the_seeds_in_order():
  results = [_result("GRPO", 1, [0, 1, 1, 0]), _result("DAPO", 0, [1, 1, 1, 1], white=[0, 0, 0, 1]),
             _result("GRPO", 0, [1, 0, 0, 0]), _result("DAPO", 1, [0, 0, 1, 1], white=[1, 0, 0, 0])]
  summary = results_page.aggregate(results)
  assert list(summary) == ["GRPO", "DAPO"]
  assert summary["GRPO"]["seeds"] == 2
  grpo = summary["GRPO"]["test"]
  assert grpo.seeds == (0, 1) and grpo.ids == IDS  # rows in seed order, whatever order the results came in
  assert grpo.scores_SP.tolist() == [[1, 0, 0, 0], [0, 1, 1, 0]]
  assert summary["DAPO"]["white"].scores_SP.tolist() == [[0, 0, 0, 1], [1, 0, 0, 0]]
  assert summary["GRPO"]["white"] is None  # a run without white-image scores: none for the method
  assert summary["DAPO"]["tokens_per_s"] == pytest.approx((1000.5, math.sqrt(0.5)))
  assert all(math.isnan(x) for x in summary["GRPO"]["dependency_auroc"])
  with pytest.raises(ValueError, match="the seeds of GRPO were scored on different test prompts"):
    results_page.aggregate([_result("GRPO", 0, [1, 0, 0, 0]), _result("GRPO", 1, [1, 0, 0, 0], ids="abcd")])


def test_compare_pairs_the_common_seeds_on_the_same_prompts():
  results = [_result("GRPO", s, row) for s, row in enumerate([[0, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1]])]
  results += [_result("DAPO", 1, [0, 1, 1, 1], prior=[1, 1, 1, 1]), _result("DAPO", 0, [1, 0, 1, 1], prior=[1] * 4),
              _result("PGPO-GRPO", 0, [1, 1, 1, 1], ids="abcd"), _result("OPD", 5, [1, 1, 1, 1]),
              _result("PDCR", 0, [1, 1, 1, 1]), {**_result("VGS", 0, [1] * 4), "per_prompt": dict.fromkeys(
                  results_page.SPLITS)}]
  baselines = {"GRPO": None, "DAPO": "GRPO", "PGPO-GRPO": "GRPO", "OPD": "GRPO", "PDCR": "PACR", "VGS": "GRPO"}
  got = {c.method: c for c in results_page.compare(results_page.aggregate(results), baselines, split="test")}
  assert list(got) == ["DAPO", "PGPO-GRPO", "OPD", "PDCR", "VGS"]
  dapo = got["DAPO"]
  # Seeds 0 and 1 (GRPO's seed 2 has no partner): differences [[1, 0, 0, 1], [0, 0, 1, 0]], mean 3 / 8; per prompt
  # [.5, 0, .5, .5], sd .25 (ddof 1). The MDD is 1.960 + 0.842 = 2.802 bootstrap SEs.
  assert (dapo.baseline, dapo.seeds, dapo.prompts) == ("GRPO", 2, 4)
  assert dapo.diff.mean == pytest.approx(0.375) and dapo.diff.sd_prompt == pytest.approx(0.25)
  assert dapo.mdd == pytest.approx(2.801585 * dapo.diff.se, rel=1e-5)
  assert got["PGPO-GRPO"].diff is None and got["PGPO-GRPO"].why == "it and GRPO were scored on different prompts"
  assert got["OPD"].why == "no seed in common with GRPO"
  assert got["PDCR"].why == "its baseline PACR was not run"
  assert got["VGS"].why == "no per-prompt scores" and math.isnan(got["VGS"].mdd)
  # The prior-conflict split: DAPO 1 everywhere against GRPO's [[0, 0, 1, 0], [0, 1, 0, 1]]: 5 of 8 cells gained.
  prior = results_page.compare(results_page.aggregate(results), baselines, split="prior_conflict")[0]
  assert prior.method == "DAPO" and prior.diff.mean == pytest.approx(5 / 8)


def test_a_comparison_across_warm_starts_is_marked():
  results = [_result("GRPO", 0, [1, 0, 1, 0]), _result("OPSD", 0, [0, 0, 1, 0]), _result("PGPO-GRPO", 0, [1, 1, 1, 0])]
  for r, warm in zip(results, ("/w/demo", "/w/vigos", "/w/demo")):
    r["spec"]["warm_dir"] = warm
  summary = results_page.aggregate(results)
  got = {c.method: c for c in results_page.compare(summary, {"GRPO": None, "OPSD": "GRPO", "PGPO-GRPO": "GRPO"},
                                                split="test")}
  assert got["OPSD"].other_warm_start and not got["PGPO-GRPO"].other_warm_start
  assert results_page._diff_cells(got["OPSD"])[1].endswith(" (another warm start)")
  assert got["OPSD"].diff.mean == pytest.approx(-0.25)  # still measured: [0, 0, 1, 0] - [1, 0, 1, 0]


def _comparison(a_SP, b_SP):
  summary = results_page.aggregate([_result(m, s, row, ids=[f"p{i}" for i in range(len(row))])
                                 for m, x in (("A", a_SP), ("B", b_SP)) for s, row in enumerate(x)])
  return results_page.compare(summary, {"A": "B", "B": None}, split="test")


def test_power_sentence_says_whether_the_mdd_reaches_the_target():
  # A constant difference: every bootstrap replicate agrees, the MDD is 0.
  same = _comparison(np.full((2, 4), 0.75), np.full((2, 4), 0.25))
  assert results_page.power_sentence(same, "Held-out") == (
      "Held-out: the largest minimum detectable difference over the 1 comparison(s) is 0.000 (A against B), <= 0.05: "
      "every comparison would detect a true difference of 0.05 with 80 % power.")
  # Four prompts: far from 0.05, and the prompts are what is missing; per-prompt SD .25 -> (2.801585 x .25 / .05)^2
  # = 196.2 -> 197 prompts.
  few = _comparison([[1, 0, 1, 1], [0, 1, 1, 1]], [[0, 0, 1, 0], [0, 1, 0, 1]])
  text = results_page.power_sentence(few, "Held-out")
  assert text.startswith(f"Held-out: the largest minimum detectable difference over the 1 comparison(s) is "
                         f"{few[0].mdd:.3f} (A against B), above 0.05: this run cannot promise")
  assert text.endswith("(0.250), the prompts alone would reach 0.05 with about 197 prompts: score more "
                       "(--eval-prompts); the part from the spread between seeds falls only with more seeds.")
  # 400 prompts whose difference is +0.3 under seed 0 and -0.3 under seed 1, give or take 0.1 per prompt: the prompt
  # part (SD 0.1 * sqrt(400 / 399) = 0.10013 -> (2.801585 x 0.10013 / 0.05)^2 = 31.5 -> 32 prompts) is small, the
  # seeds' spread is not: a bootstrap SE of sqrt(var0([.3, -.3]) / 2) = 0.212, an MDD near 2.8016 x 0.212 = 0.594.
  pattern_P = np.resize([0.1, -0.1], 400)
  a_SP = 0.5 + np.stack([0.3 + pattern_P, -0.3 + pattern_P])
  seedy = _comparison(a_SP, np.full((2, 400), 0.5))
  assert seedy[0].mdd == pytest.approx(2.801585 * math.sqrt(0.09 / 2), rel=0.05)
  assert results_page.power_sentence(seedy, "Held-out").endswith(
      "(0.100), the prompts alone would reach 0.05 with about 32 prompts, and 400 were scored: the rest is the spread "
      "between seeds (with the share of the seed x prompt noise that the bootstrap counts there), which only more "
      "seeds reduce.")
  assert results_page.power_sentence([results_page.Comparison("A", "B", why="its baseline B was not run")],
                                  "Prior-conflict") == "Prior-conflict: no comparison was made."


def test_render_results_table():
  # Constant (fractional, e.g. avg@k) scores make every bootstrap replicate equal: the intervals are exact.
  results = [_result("GRPO", s, [0.25] * 4, prior=[0.5] * 4) for s in (0, 1)]
  results += [_result("DAPO", s, [0.75] * 4, prior=[0.25] * 4, white=[0.125] * 4) for s in (0, 1)]
  results += [_result("PDCR", 0, [1, 0, 1, 1])]
  warm = [{"spec": {"out_dir": "/x/warm_start/abc"}, "methods": ["GRPO", "DAPO", "GRPO"],
           "per_prompt": {"test": _entry([1, 0, 0, 0]), "prior_conflict": _entry([0, 0, 0, 0]), "white": None}}]
  methods = [replicate.Method("GRPO", "demo.py", ("algo.name=grpo", "x.y=1")),
             replicate.Method("DAPO", "demo.py", (), baseline="GRPO"),
             replicate.Method("PDCR", "demo.py", (), baseline="PACR")]
  budget = {"steps": 20, "prompts_per_batch": 8, "group_size": 8, "max_new_tokens": 96}
  text = results_page.render_results(
      results_page.aggregate(results), methods=methods, warm=warm,
      budgets={"GRPO": budget, "DAPO": {**budget, "prompts_per_batch": 4, "group_size": 16, "max_new_tokens": 128},
               "PDCR": budget},
      command="python -m jaxvg.replicate --seeds 2", machine="a test machine", date="2030-01-02", wall_s=3725.0,
      jobs_s=7199.6)
  lines = text.splitlines()
  # 3725 s = 1 h 2 min 5 s; 7199.6 s rounds to 7200 s = 2 h
  assert lines[2] == ("`python -m jaxvg.replicate --seeds 2` on a test machine, 2030-01-02; total wall time 1:02:05 "
                      "(the warm start and run processes took 2:00:00 in all, summed over parallel jobs and earlier "
                      "invocations whose runs were reused).")
  assert "Budget per run: 20 RL steps x 64 rollouts (prompts x samples per prompt, per method below)" in text
  assert "scored prompt by prompt on 4 prompts per split" in text
  header = "| method | seeds | held-out acc. | prior-conflict acc. | white-image acc. (control) |"
  assert lines[lines.index(header) + 2:lines.index(header) + 4] == [
      "| GRPO | 2 | 0.250 [0.250, 0.250] | 0.500 [0.500, 0.500] | n/a |",
      "| DAPO | 2 | 0.750 [0.750, 0.750] | 0.250 [0.250, 0.250] | 0.125 [0.125, 0.125] |"]
  # DAPO - GRPO: +0.5 held-out everywhere, -0.25 prior-conflict everywhere.
  assert ("| DAPO | GRPO | 2 | +0.500 [+0.500, +0.500] | better | 0.000 | -0.250 [-0.250, -0.250] | worse | 0.000 |"
          in lines)
  assert ("| PDCR | PACR | n/a | n/a | not compared: its baseline PACR was not run | n/a | n/a | not compared: its "
          "baseline PACR was not run | n/a |") in lines
  assert lines[lines.index("| method | baseline | seeds paired | held-out diff. | held-out verdict | held-out MDD | "
                           "prior-conflict diff. | prior-conflict verdict | prior-conflict MDD |") + 1].count("|") == 10
  assert any(line.startswith("- Held-out: the largest minimum detectable difference over the 1 comparison(s) is "
                             "0.000 (DAPO against GRPO), <= 0.05") for line in lines)
  assert any(line.startswith("- Prior-conflict: the largest minimum detectable difference") for line in lines)
  assert not any(line.startswith("**One seed.**") for line in lines)  # DAPO and GRPO paired on two seeds
  assert not any(line.startswith("**Another warm start.**") for line in lines)
  one = results_page.render_results(
      results_page.aggregate(results[:1] + results[2:3]), methods=methods[:2], warm=warm, budgets={"GRPO": budget,
                                                                                                "DAPO": budget},
      command="c", machine="m", date="d", wall_s=1.0, jobs_s=1.0)
  assert any(line.startswith("**One seed.** A comparison on one seed resamples prompts only") for line in
             one.splitlines())
  assert "| GRPO | 2 | 1000 ± 1 | 2.00 ± 0.00 | n/a | n/a | n/a |" in lines
  # The warm start's one row [1, 0, 0, 0]: a resample of 4 prompts holds k ~ Binomial(4, 1/4) right answers;
  # P(k = 0) = 0.32 > 0.025 and P(k <= 2) = 0.95 < 0.975 <= P(k <= 3): the interval is [0, 3 / 4].
  assert ("- W1 (`abc`, used by DAPO, GRPO): held-out accuracy 0.250 [0.000, 0.750], prior-conflict "
          "0.000 [0.000, 0.000], white-image n/a.") in lines
  assert "| GRPO | configs/demo.py | algo.name=grpo, x.y=1 | 8 x 8 | 96 |" in lines
  assert "| DAPO | configs/demo.py |  | 4 x 16 | 128 |" in lines
  assert "## By task" not in text and "## The taught error" not in text  # no tasks recorded, no teacher error


TASKS6 = ("count", "largest") * 3


def _tasked(method, seed, test):
  r = _result(method, seed, test, white=[0] * 6, ids=[f"p{i}" for i in range(6)])
  r["spec"]["warm_dir"] = "/x/warm_start/abc"
  for split in results_page.SPLITS:
    r["per_prompt"][split]["tasks"] = list(TASKS6)
  return r


def test_teacher_settings_name_each_fallible_teacher_once():
  demo = config_lib.load_config(os.path.join(CONFIGS, "demo.py"))
  cfgs = [config_lib.apply_overrides(demo, o) for o in (
      [], ["data.teacher_error=0.6"], ["data.teacher_error=0.6"],
      ["data.teacher_error=0.25", "data.teacher_error_kind=perception"])]
  assert replicate.teacher_settings(cfgs[:1]) is None
  assert replicate.teacher_settings(cfgs[:3]) == "data.teacher_error=0.6"
  assert replicate.teacher_settings(cfgs) == ("data.teacher_error=0.25, data.teacher_error_kind=perception; "
                                              "data.teacher_error=0.6")


def test_render_results_by_task_and_the_taught_error():
  results = [_tasked("GRPO", 0, [0, 1, 1, 0, 1, 1]), _tasked("GRPO", 1, [0, 0, 1, 1, 0, 1]),
             _tasked("DAPO", 0, [1, 1, 1, 1, 1, 1]), _tasked("DAPO", 1, [0, 1, 0, 1, 1, 1])]
  # A warm result written before tasks were recorded: its prompts' tasks come from the runs' (the same ids).
  ids = [f"p{i}" for i in range(6)]
  warm = [{"spec": {"out_dir": "/x/warm_start/abc"}, "methods": ["GRPO", "DAPO"],
           "per_prompt": {"test": _entry([0, 0, 1, 0, 1, 1], ids), "prior_conflict": _entry([0] * 6, ids),
                          "white": _entry([0] * 6, ids)}}]
  methods = [replicate.Method("GRPO", "demo.py", ()), replicate.Method("DAPO", "demo.py", (), baseline="GRPO")]
  budget = {"steps": 20, "prompts_per_batch": 8, "group_size": 8, "max_new_tokens": 96}
  summary = results_page.aggregate(results)
  largest = summary["DAPO"]["test"].where("largest".__eq__)
  assert largest.ids == ("p1", "p3", "p5") and largest.scores_SP.tolist() == [[1, 1, 1], [1, 1, 1]]
  kw = dict(methods=methods, warm=warm, budgets={"GRPO": budget, "DAPO": budget}, command="c", machine="m",
            date="d", wall_s=1.0, jobs_s=1.0)
  lines = results_page.render_results(summary, taught=("largest", "data.teacher_error=0.6"), **kw).splitlines()
  # By task, by hand: count is prompts p0, p2, p4, largest p1, p3, p5. The warm start: count (0 + 1 + 1) / 3,
  # largest (0 + 0 + 1) / 3. GRPO: count (0 + 1 + 1 + 0 + 1 + 0) / 6, largest (1 + 0 + 1 + 0 + 1 + 1) / 6. DAPO: count
  # (1 + 1 + 1 + 0 + 0 + 1) / 6, largest 6 / 6. Every white image scores 0.
  head = lines.index("| policy | count (3) | largest (3) |")
  assert lines[head + 2:head + 5] == ["| W1 (warm start) | 0.667 / 0.000 | 0.333 / 0.000 |",
                                      "| GRPO | 0.500 / 0.000 | 0.667 / 0.000 |",
                                      "| DAPO | 0.667 / 0.000 | 1.000 / 0.000 |"]
  # The taught error: largest from the warm start's [0, 0, 1]. GRPO's seeds [1, 0, 1] and [0, 1, 1] each turn one
  # prompt right; DAPO's [1, 1, 1] twice turn two. The other tasks from [0, 1, 1]: GRPO [0, 1, 1] and [0, 1, 0]
  # (one lost), DAPO [1, 1, 1] (one gained) and [0, 0, 1] (one lost).
  # The changes, paired prompt by prompt with the warm start: GRPO largest (1, 0, 0) and (0, 1, 0), mean 2 / 6; DAPO
  # largest (1, 1, 0) twice, 4 / 6; GRPO count (0, 0, 0) and (0, 0, -1), -1 / 6; DAPO count (1, 0, 0), (0, -1, 0), 0.
  rows = {line.split(" | ")[0]: line.split(" | ") for line in lines if line.startswith(("| GRPO | 2 |", "| DAPO | 2 |"))
          and "->" in line}
  assert rows["| GRPO"][2:5] == ["0.333 -> 0.667", rows["| GRPO"][3], "2 / 0"]
  assert rows["| GRPO"][3].startswith("+0.333 [") and rows["| GRPO"][6].startswith("-0.167 [")
  assert rows["| GRPO"][5:8:2] == ["0.667 -> 0.500", "0 / 1 |"]
  dapo = rows["| DAPO"]
  assert dapo[2] == "0.333 -> 1.000" and dapo[3].startswith("+0.667 [") and dapo[4] == "4 / 0"
  assert dapo[5] == "0.667 -> 0.667" and dapo[6].startswith("+0.000 [") and dapo[7] == "1 / 1 |"
  # DAPO - GRPO, paired: largest (0, 1, 0) and (1, 0, 0), mean 2 / 6; count (1, 0, 0) and (0, -1, 1), mean 1 / 6.
  (versus,) = [line for line in lines if line.startswith("| DAPO | GRPO | 2 |") and line.count("|") == 10
               and "+0.333" in line]
  cells = versus.split(" | ")
  assert cells[3].startswith("+0.333 [") and cells[6].startswith("+0.167 [")
  assert "`data.teacher_error=0.6`" in "\n".join(lines)
  # Without its warm start's scores a method's row keeps its own accuracy and nothing paired with the warm start.
  no_warm = results_page.taught_error_rows(summary, [], {"GRPO": None, "DAPO": "GRPO"}, "largest")
  assert no_warm[2].split(" | ")[2:5] == ["n/a -> 0.667", "n/a", "n/a"]
  untaught = results_page.render_results(summary, **kw)
  assert "## By task" in untaught and "## The taught error" not in untaught
  with pytest.raises(ValueError, match="the seeds of GRPO disagree on the tasks of the test prompts"):
    other = _tasked("GRPO", 1, [0] * 6)
    other["per_prompt"]["test"]["tasks"] = ["count"] * 6
    results_page.aggregate([results[0], other])


def _table(**series):
  """A read_run table by hand: key (with / as __) -> {step: value}."""
  return {k.replace("__", "/"): (np.asarray(list(v), np.int64), np.asarray(list(v.values()), np.float64))
          for k, v in series.items()}


def test_run_mechanisms_by_hand():
  table = _table(pdcr__visual_adv_std={-3: 9.0, 0: 0.5, 1: 0.7}, pdcr__textual_adv_std={0: 0.2, 1: float("nan")},
                 pdcr__visual_frac={0: 0.25, 1: 0.75}, vigos__valid_rows={0: 3.0, 1: 5.0}, vigos__rows={0: 8.0, 1: 8.0},
                 palr={0: 0.1, 1: 0.3})
  truth = {"pgpo_visual_mass": 0.6, "visual_share": 0.3, "split_accuracy_v": 0.9}
  m = replicate.run_mechanisms(truth, table, credit="pdcr", distill="vigos", eta=0.33, gamma=2.0)
  # RL steps only (the warm start's step -3 is not one), non-finite values skipped; ViGOS: (3 + 5) / (8 + 8).
  assert m["pdcr_visual_adv_std"] == pytest.approx(0.6) and m["pdcr_textual_adv_std"] == pytest.approx(0.2)
  assert m["pdcr_visual_frac"] == pytest.approx(0.5) and m["vigos_valid"] == pytest.approx(0.5)
  assert m["palr"] == pytest.approx(0.2) and (m["pgpo_visual_mass"], m["visual_share"], m["step_split"]) == (0.6, 0.3,
                                                                                                               0.9)
  assert all(math.isnan(m[k]) for k in ("vgs_eta", "vgs_eta_measured", "vgs_angle", "vgs_lp_fraction"))  # not VGS
  # Gradient statistics on steps 0 and 5: mean |g_Std| 3, |g_Vis| 4, cos 0, so Eq. 15 at gamma 2 gives
  # 3 / sqrt(9 + 4 * 16) = 3 / sqrt(73).
  grads = _table(vgs__lp_fraction={0: 0.3, 1: 0.1}, vgs__grad__norm_std={0: 2.0, 5: 4.0},
                 vgs__grad__norm_vis={0: 4.0, 5: 4.0}, vgs__grad__cos_std_vis={0: 0.5, 5: -0.5},
                 vgs__grad__angle_lang_vis={0: 100.0, 5: 110.0})
  vgs = replicate.run_mechanisms({}, grads, credit="none", distill="vgs", eta=0.33, gamma=2.0)
  assert vgs["vgs_eta"] == 0.33 and vgs["vgs_lp_fraction"] == pytest.approx(0.2)
  assert vgs["vgs_eta_measured"] == pytest.approx(3 / math.sqrt(73)) and vgs["vgs_angle"] == pytest.approx(105.0)
  assert all(math.isnan(vgs[k]) for k in ("pgpo_visual_mass", "step_split", "vigos_valid", "palr"))


def test_run_curves_and_their_mean_over_seeds():
  table = _table(reward__overall={-1: 5.0, 0: 0.25, 1: 0.5}, eval__accuracy_before={2: 0.4}, eval__accuracy={0: 0.5},
                 eval__accuracy_after={2: 0.6}, eval__white_kl_after={2: 1.5})
  curves = replicate.run_curves(table)
  assert curves["reward"] == [[0, 0.25], [1, 0.5]]
  assert curves["accuracy"] == [[0, 0.4], [1, 0.5], [2, 0.6]]
  assert curves["white_kl"] == [[2, 1.5]] and curves["dependency_auroc"] == []
  other = {"reward": [[0, 0.75], [1, float("nan")]], "accuracy": [[0, 0.4], [2, 0.8]]}
  mean = results_page.mean_curves([{"curves": curves}, {"curves": other}])
  # Every x either seed logged; a non-finite value does not count.
  assert mean["reward"] == [(0, 0.5), (1, 0.5)]
  assert mean["accuracy"] == [(0, 0.4), (1, 0.5), (2, pytest.approx(0.7))]
  assert "dependency_auroc" not in mean


def test_mechanism_table_and_curves_figure(tmp_path):
  nan = float("nan")
  base = dict.fromkeys(results_page.MECHANISMS, nan)
  results = [_result("PGPO-DAPO", s, [1, 0, 1, 0], mechanisms={**base, "pgpo_visual_mass": v, "visual_share": 0.2},
                     curves={"reward": [[0, 0.1], [1, 0.2]], "accuracy": [[0, 0.4], [2, 0.5]]})
             for s, v in ((0, 0.5), (1, 0.7))]
  results.append(_result("PDCR", 0, [1, 1, 0, 0], mechanisms={**base, "step_split": 0.9, "pdcr_visual_adv_std": 0.4,
                                                               "pdcr_textual_adv_std": 0.2, "pdcr_visual_frac": 0.3}))
  results += [_result("VGS", s, [1, 0, 0, 0], mechanisms={**base, "vgs_eta": 0.33, "vgs_eta_measured": e,
                                                          "vgs_angle": a, "vgs_lp_fraction": 0.25})
              for s, e, a in ((0, 0.3, 100.0), (1, 0.4, 104.0))]
  summary = results_page.aggregate(results)
  rows = results_page.mechanism_rows(summary)
  # PGPO: mean 0.6, sample SD of (0.5, 0.7) = 0.141.
  assert rows[2] == "| PGPO-DAPO | 0.600 ± 0.141 | 0.200 ± 0.000 | - | - | - | - | - | - | - | - |"
  assert rows[3] == ("| PDCR | - | - | 0.900 ± 0.000 | 0.400 ± 0.000 / 0.200 ± 0.000 | 0.300 ± 0.000 | - | - | - | - "
                     "| - |")
  # VGS: eta measured 0.35 ± 0.071 (SD of 0.3, 0.4) beside the config's; angle 102 ± 2.8 degrees.
  assert rows[4] == "| VGS | - | - | - | - | - | - | - | 0.33 ± 0.00 / 0.35 ± 0.07 | 102 ± 3 | 0.250 ± 0.000 |"
  assert all(row.count("|") == 12 for row in rows)
  png = tmp_path / "curves.png"
  assert results_page.plot_curves(summary, str(png)) and png.read_bytes()[:4] == b"\x89PNG"
  bare = results_page.aggregate([_result("GRPO", 0, [1, 0, 1, 0])])
  assert not results_page.plot_curves(bare, str(tmp_path / "none.png")) and not (tmp_path / "none.png").exists()


def test_summarize_metrics_by_hand():
  rows = [{"step": -1, "sft/sft_loss": 1.0},
          {"step": 0, "time/step": 30.0, "tokens_per_s": 10.0, "dynamic_sampling/groups_seen": 4.0},
          {"step": 1, "time/step": 2.0, "tokens_per_s": 500.0, "dynamic_sampling/groups_seen": 6.0},
          {"step": 2, "time/step": 9.0, "tokens_per_s": 100.0, "dynamic_sampling/groups_seen": 2.0},
          {"step": 2, "time/step": 4.0, "tokens_per_s": 300.0, "dynamic_sampling/groups_seen": 3.0},  # re-run: wins
          {"step": 3, "time/step": 3.0, "tokens_per_s": 400.0, "dynamic_sampling/groups_seen": 4.0},
          {"step": 4, "eval/accuracy_after": 0.5}]
  got = replicate.summarize_metrics(rows, group_size=8)
  # steps 1..3 (step 0 compiles): times 2, 4, 3 -> median 3; tokens/s 500, 300, 400 -> 400; groups 4+6+3+4 = 17
  assert got == {"tokens_per_s": 400.0, "step_time": 3.0, "rollouts": 17.0 * 8}
  one = replicate.summarize_metrics(rows[1:2], group_size=2)  # one step: it is all there is
  assert one == {"tokens_per_s": 10.0, "step_time": 30.0, "rollouts": 8.0}
  no_ds = replicate.summarize_metrics([{"step": 0, "time/step": 1.0, "tokens_per_s": 5.0}], group_size=2)
  assert math.isnan(no_ds["rollouts"])
  with pytest.raises(ValueError, match="no RL step row"):
    replicate.summarize_metrics(rows[:1], group_size=2)


# ------------------------------------------------------------------------------------------------- run loading


def test_read_run_last_value_wins_and_a_cut_line_is_skipped(tmp_path):
  lines = [{"step": -2, "sft/sft_loss": 3.0}, {"step": 0, "time": 5.0, "reward/overall": 0.1},
           {"step": 1, "time": 6.0, "reward/overall": 0.2}, {"step": 1, "time": 7.0, "reward/overall": 0.3},
           {"step": 2, "eval/accuracy": 0.5}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n" + '{"step": 3, "rew')
  table = runlog.read_run(str(tmp_path))
  assert sorted(table) == ["eval/accuracy", "reward/overall", "sft/sft_loss", "time"]
  steps, values = table["reward/overall"]
  assert steps.tolist() == [0, 1] and values.tolist() == [0.1, 0.3]
  assert table["sft/sft_loss"][0].tolist() == [-2] and table["eval/accuracy"][1].tolist() == [0.5]
  (tmp_path / "metrics.jsonl").write_text('{"step": 0, "a": 1}\nnot json\n{"step": 1, "a": 2}\n')
  with pytest.raises(ValueError, match="line 2 is not JSON"):
    runlog.read_run(str(tmp_path))


def test_eval_curve_orders_before_periodic_and_after_by_steps_done(tmp_path):
  # A 6-step run evaluated every 2 steps: periodic rows at steps 1 and 3 (2 and 4 done), the summary at step 6.
  lines = [{"step": 1, "eval/accuracy": 0.4, "eval/white_kl": 1.5}, {"step": 3, "eval/accuracy": 0.45},
           {"step": 6, "eval/accuracy_before": 0.3, "eval/accuracy_after": 0.5, "eval/white_kl_after": 2.0}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
  table = runlog.read_run(str(tmp_path))
  done, values = runlog.eval_curve(table, "accuracy")
  assert done.tolist() == [0, 2, 4, 6] and values.tolist() == [0.3, 0.4, 0.45, 0.5]
  done, values = runlog.eval_curve(table, "white_kl")  # no figure before RL (a run resumed from an older one)
  assert done.tolist() == [2, 6] and values.tolist() == [1.5, 2.0]
  assert runlog.eval_curve(table, "step_split")[0].size == 0


def test_non_finite_metrics_are_written_as_null_and_read_back_as_nan(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
  w.write(0, {"loss": float("nan"), "grad_norm": float("inf"), "reward/overall": 0.5})
  w.close()
  (row,) = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert row["loss"] is None and row["grad_norm"] is None and row["reward/overall"] == 0.5
  table = runlog.read_run(str(tmp_path))
  assert np.isnan(table["loss"][1][0]) and table["reward/overall"][1].tolist() == [0.5]


def test_read_tfevents_reads_what_the_writer_wrote(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path))
  w.write(0, {"reward/overall": 0.25, "time/step": 3.0}, histograms={"dependency/hist": np.arange(5.0)})
  w.write(1, {"reward/overall": 0.5})
  w.write(1, {"reward/overall": 0.75, "eval/accuracy": 0.125})
  w.close()
  table = runlog.read_tfevents(str(tmp_path))
  assert sorted(table) == ["eval/accuracy", "reward/overall", "time/step"]  # histograms are not scalars
  assert table["reward/overall"][0].tolist() == [0, 1] and table["reward/overall"][1].tolist() == [0.25, 0.75]
  assert table["eval/accuracy"][0].tolist() == [1] and table["time/step"][1].tolist() == [3.0]
  # a record cut short at the end is skipped; a flipped byte inside one is an error
  (path,) = [os.path.join(tmp_path, "tensorboard", f) for f in os.listdir(tmp_path / "tensorboard")]
  blob = open(path, "rb").read()
  open(path, "wb").write(blob[:-5])
  assert runlog.read_tfevents(str(tmp_path))["reward/overall"][1].tolist() == [0.25, 0.5]
  length = struct.unpack("<Q", blob[:8])[0]  # the first record (the file version event)
  second = 12 + length + 4
  bad = bytearray(blob)
  bad[second + 12 + 3] ^= 0xFF
  open(path, "wb").write(bytes(bad))
  with pytest.raises(ValueError, match="corrupt record"):
    runlog.read_tfevents(str(tmp_path))


def test_ema_by_hand_and_against_a_loop():
  # w = 0.5 on [1, 3]: m0 = 0.5 -> 0.5 / (1 - 0.5) = 1; m1 = 0.25 + 1.5 = 1.75 -> 1.75 / (1 - 0.25) = 7/3
  assert runlog.ema([1.0, 3.0], 0.5) == pytest.approx([1.0, 7.0 / 3.0])
  x = np.random.default_rng(0).normal(size=20)
  ref, m = [], 0.0
  for i, v in enumerate(x):
    m = 0.9 * m + 0.1 * v
    ref.append(m / (1 - 0.9**(i + 1)))
  assert runlog.ema(x, 0.9) == pytest.approx(ref)
  assert runlog.ema(x, 0.0) == pytest.approx(x)  # no smoothing
  assert runlog.ema([5.0] * 4, 0.99) == pytest.approx([5.0] * 4)  # debiased: a constant stays constant
  got = runlog.ema([1.0, float("nan"), 3.0], 0.5)
  assert got[0] == 1.0 and math.isnan(got[1]) and got[2] == pytest.approx(7.0 / 3.0)
  with pytest.raises(ValueError, match="smoothing weight"):
    runlog.ema([1.0], 1.0)


# ------------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_driver_end_to_end_two_methods_one_seed(tmp_path):
  out, results_md = tmp_path / "rep", tmp_path / "rep" / "results.md"  # the default page: <out>/results.md
  results = replicate.main(["--methods", "GRPO,DAPO", "--seeds", "1", "--steps", "2", "--out", str(out),
                            "--eval-prompts", "2", "--jobs", "2", "--eval-every", "1", "--dependency-records", "2",
                            *MINI])
  assert [r["spec"]["method"] for r in results] == ["GRPO", "DAPO"]
  (warm_dir,) = {r["spec"]["warm_dir"] for r in results}
  assert os.listdir(os.path.join(warm_dir, "sft"))  # trained once, here
  warm = json.load(open(os.path.join(warm_dir, "warm_result.json")))
  for r in results:
    run_dir = r["spec"]["out_dir"]
    # Both runs started from the shared warm start without training one: no warm-start rows in their logs, and
    # their held-out accuracy before RL is the warm start's own (the same greedy evaluation of the same weights).
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert not any(k.startswith("sft/") for row in rows for k in row)
    assert json.load(open(os.path.join(run_dir, "sft", "done.json"))) == \
        json.load(open(os.path.join(warm_dir, "sft", "done.json")))
    assert r["accuracy_before"] == warm["accuracy"]
    # Per-prompt scores, 0/1, on the first --eval-prompts records of each split, in record order (the synthetic
    # generator names record i of a split synthetic-<data seed>-<split>-<i>); white: the held-out records again.
    # Record i's task family is tasks[i % len(tasks)] (the generator's round robin).
    data = replicate._resolve(r["spec"]).data
    seed, tasks = data.seed, [data.tasks[i % len(data.tasks)] for i in range(2)]
    for entry in (r, warm):
      pp = entry["per_prompt"]
      assert pp["test"]["ids"] == pp["white"]["ids"] == [f"synthetic-{seed}-test-{i}" for i in range(2)]
      assert pp["prior_conflict"]["ids"] == [f"synthetic-{seed}-prior_conflict-{i}" for i in range(2)]
      assert all(pp[split]["tasks"] == tasks for split in results_page.SPLITS)
      assert all(x in (0.0, 1.0) for split in results_page.SPLITS for x in pp[split]["scores"])
    # train.run's own evaluation after RL scored the same 2 held-out records (data.num_eval=2) with the same weights
    assert np.mean(r["per_prompt"]["test"]["scores"]) == r["accuracy_after"] == r["heldout_after"]
    # tokens/s and step time as a naive reading of the log: the run's second RL step (the first compiles)
    (step1,) = [row for row in rows if row["step"] == 1 and "time/step" in row]
    assert r["tokens_per_s"] == step1["tokens_per_s"] and r["step_time"] == step1["time/step"]
    groups = sum(row["dynamic_sampling/groups_seen"] for row in rows if "time/step" in row)
    assert r["rollouts"] == groups * 2
    assert 0.0 <= r["prior_conflict_after"] <= 1.0 and 0.0 <= r["accuracy_after"] <= 1.0
    # the analysis module's ground-truth scores of the final policy (AUROC and a split accuracy: both in [0, 1])
    assert 0.0 <= r["dependency_auroc"] <= 1.0 and 0.0 <= r["step_split_accuracy"] <= 1.0
    assert r["budget"] == {"steps": 2, "prompts_per_batch": 2, "group_size": 2, "max_new_tokens": 8}
    assert os.path.isdir(os.path.join(run_dir, "final"))
    # The curves: the reward of both RL steps, and the evaluations before RL, after step 0 and after the last, the
    # accuracy's last point being train.run's own.
    curves, table = r["curves"], runlog.read_run(run_dir)
    assert curves["reward"] == [[0, table["reward/overall"][1][0]], [1, table["reward/overall"][1][1]]]
    for name in results_page.EVAL_CURVES:
      assert [x for x, _ in curves[name]] == [0, 1, 2], name
    assert curves["accuracy"][0][1] == r["accuracy_before"] and curves["accuracy"][-1][1] == r["accuracy_after"]
    m = r["mechanisms"]
    assert set(results_page.MECHANISMS) <= set(m) and m["credit"] == "none" and m["distill"] == "none"
    assert 0.0 <= m["pgpo_visual_mass"] <= 1.0 and 0.0 < m["visual_share"] < 1.0
    assert m["step_split"] == r["step_split_accuracy"] and math.isnan(m["pdcr_visual_frac"])
  grpo, dapo = results
  assert grpo["rollouts"] == 2 * 2 * 2  # no dynamic sampling: 2 steps x 2 prompts x 2 samples
  assert dapo["rollouts"] >= grpo["rollouts"]
  text = results_md.read_text()
  assert "| GRPO | 1 |" in text and "| DAPO | GRPO | 1 |" in text and "## Warm starts" in text
  assert "used by DAPO, GRPO" in text and "on 2 prompts per split" in text
  assert "## Mechanisms" in text and "![curves](results_curves.png)" in text
  assert (out / "results_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # A second call reuses the finished runs (same specs): nothing is trained again. --results names another page.
  stamp = os.stat(os.path.join(grpo["spec"]["out_dir"], "run_result.json")).st_mtime_ns
  again = replicate.main(["--methods", "GRPO,DAPO", "--seeds", "1", "--steps", "2", "--out", str(out),
                          "--eval-prompts", "2", "--eval-every", "1", "--dependency-records", "2",
                          "--results", str(tmp_path / "page.md"), *MINI])
  # All but command and time, and the figure named after the page.
  assert (tmp_path / "page.md").read_text().replace("page_curves", "results_curves").splitlines()[4:] == \
      text.splitlines()[4:]
  assert [(a["spec"], a["accuracy_after"], a["tokens_per_s"]) for a in again] == \
      [(r["spec"], r["accuracy_after"], r["tokens_per_s"]) for r in results]
  assert os.stat(os.path.join(grpo["spec"]["out_dir"], "run_result.json")).st_mtime_ns == stamp


def _fake_jobs(monkeypatch, events, *, seconds, failing=()):
  """replicate's subprocess.run replaced by a job that sleeps, logs its start and end, and writes its result."""
  lock = threading.Lock()

  def run(argv, **kw):
    spec = {k: v for k, v in json.load(open(argv[-1])).items() if k != "cpus"}
    with lock:
      events.append(("start", spec["method"]))
    time.sleep(seconds[spec["method"]])
    with lock:
      events.append(("end", spec["method"]))
    if spec["method"] in failing:
      return types.SimpleNamespace(returncode=1)
    with open(replicate.result_path(spec), "w") as f:
      json.dump({"spec": spec, "per_prompt": {}}, f)
    return types.SimpleNamespace(returncode=0)

  monkeypatch.setattr(replicate.subprocess, "run", run)


def _job(tmp_path, kind, method, warm_dir=None):
  out = tmp_path / method
  return {"kind": kind, "method": method, "seed": None if kind == "warm" else 0, "out_dir": str(out),
          "warm_dir": warm_dir}


def test_runs_wait_only_for_their_own_warm_start(tmp_path, monkeypatch):
  slow, fast = _job(tmp_path, "warm", "slow-warm"), _job(tmp_path, "warm", "fast-warm")
  specs = [slow, fast, _job(tmp_path, "run", "A", slow["out_dir"]), _job(tmp_path, "run", "B", fast["out_dir"])]
  events = []
  _fake_jobs(monkeypatch, events, seconds={"slow-warm": 1.0, "fast-warm": 0.1, "A": 0.1, "B": 0.1})
  results = replicate.execute(specs, jobs=2, pin=False, env={})
  assert [r["spec"]["method"] for r in results] == ["slow-warm", "fast-warm", "A", "B"]
  order = events.index
  # B ran in the slot the fast warm start freed, while the slow one still trained; A waited for the slow one.
  assert order(("start", "B")) < order(("end", "slow-warm")) < order(("start", "A"))
  assert len(events) == 8
  # One slot and six runs of one warm start, ready at once: they start in the order listed.
  warm = _job(tmp_path, "warm", "w")
  names = [f"r{k}" for k in range(6)]
  events.clear()
  _fake_jobs(monkeypatch, events, seconds={"w": 0.2, **dict.fromkeys(names, 0.01)})
  replicate.execute([warm] + [_job(tmp_path, "run", n, warm["out_dir"]) for n in names], jobs=1, pin=False, env={})
  assert [m for kind, m in events if kind == "start"] == ["w", *names]
  # Called again, every job is done: each is reused, none runs, and none waits on another.
  events.clear()
  again = replicate.execute([warm] + [_job(tmp_path, "run", n, warm["out_dir"]) for n in names], jobs=1, pin=False,
                            env={})
  assert events == [] and [r["spec"]["method"] for r in again] == ["w", *names]


def test_a_failed_warm_start_stops_its_runs_and_no_job_starts_after_it(tmp_path, monkeypatch):
  bad, good = _job(tmp_path, "warm", "bad-warm"), _job(tmp_path, "warm", "good-warm")
  specs = [bad, good, _job(tmp_path, "run", "A", bad["out_dir"]), _job(tmp_path, "run", "B", good["out_dir"]),
           _job(tmp_path, "run", "C", good["out_dir"])]
  events = []
  _fake_jobs(monkeypatch, events, seconds={"bad-warm": 0.3, "good-warm": 0.5, "A": 0.1, "B": 0.1, "C": 0.1},
             failing=("bad-warm",))
  with pytest.raises(RuntimeError, match="the warm job of bad-warm failed with exit code 1"):
    replicate.execute(specs, jobs=1, pin=False, env={})
  # One slot: the bad warm start ran first and failed; nothing started after it.
  assert events == [("start", "bad-warm"), ("end", "bad-warm")]


def test_a_failed_job_is_an_error_naming_it_and_its_log(tmp_path):
  spec = {"kind": "run", "method": "GRPO", "seed": 0, "config": str(tmp_path / "gone.py"), "overrides": [],
          "out_dir": str(tmp_path / "grpo" / "seed0"), "warm_dir": None}
  with pytest.raises(RuntimeError, match=r"the run job of GRPO seed 0 failed with exit code 1; log: .*log.txt"):
    replicate.execute([spec], jobs=1, pin=False, env=dict(os.environ))
  assert "config file" in (tmp_path / "grpo" / "seed0" / "log.txt").read_text()
  with pytest.raises(ValueError, match="--jobs must be >= 1"):
    replicate.execute([spec], jobs=0, pin=False, env=dict(os.environ))
  # a result written for another spec is not reused
  (tmp_path / "grpo" / "seed0" / "run_result.json").write_text(json.dumps({"spec": {**spec, "seed": 1}}))
  assert replicate._done(spec) is None
  # an older driver's result (no per-prompt scores) is run again, not mixed in: here the run fails again
  (tmp_path / "grpo" / "seed0" / "run_result.json").write_text(json.dumps({"spec": spec, "accuracy_after": 0.5}))
  assert replicate._done(spec) is None
  with pytest.raises(RuntimeError, match="the run job of GRPO seed 0 failed"):
    replicate.execute([spec], jobs=1, pin=False, env=dict(os.environ))
  done = {"spec": spec, "accuracy_after": 0.5, "per_prompt": {"test": None, "prior_conflict": None, "white": None}}
  (tmp_path / "grpo" / "seed0" / "run_result.json").write_text(json.dumps(done))
  assert replicate.execute([spec], jobs=1, pin=False, env=dict(os.environ)) == [done]
