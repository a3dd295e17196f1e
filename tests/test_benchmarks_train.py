"""train.eval_benchmarks: the papers' benchmarks evaluated during training, into the logs and out_dir/benchmarks."""

import json
import os

import pytest

from jaxvg import train
from test_benchmarks_fixtures import write_benchmarks

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
TINY = ["train.steps=2", "train.eval_every=1", "sft.steps=0", "sft.perception_steps=0", "data.num_eval=2",
        "train.eval_white_image=false", "model.tiny_width=32", "model.tiny_layers=1", "model.tiny_vision_width=32",
        "rollout.group_size=2", "rollout.max_new_tokens=8", "algo.dynamic_sampling=false",
        "data.prompts_per_batch=4", "data.max_images=3", "data.length_buckets=(512)", "data.patch_buckets=(256)"]


def argv(out, *extra):
  return ["--config", CONFIG, *(a for o in (f"train.out_dir={out}", *TINY, *extra) for a in ("--set", o))]


@pytest.mark.slow
def test_benchmarks_are_evaluated_every_eval_every_step_and_after_the_last(tmp_path):
  data_dir = write_benchmarks(tmp_path / "benchmarks")
  out = tmp_path / "run"
  train.main(argv(out, "train.eval_benchmarks=(mathvista,hallusionbench)", f"train.eval_benchmark_dir={data_dir}"))
  rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
  logged = {r["step"]: r for r in rows if "bench/average" in r}
  # eval_every=1 evaluates after step 0 (logged at step 0, the summary named by the steps done: 1) and, after the
  # last step, with the final accuracy (logged at train.steps = 2).
  assert sorted(logged) == [0, 2]
  for r in logged.values():
    assert 0.0 <= r["bench/mathvista/accuracy"] <= 1.0 and 0.0 <= r["bench/hallusionbench/accuracy"] <= 1.0
    assert r["bench/average"] == pytest.approx((r["bench/mathvista/accuracy"] + r["bench/hallusionbench/accuracy"]) / 2)
    assert {"bench/hallusionbench/aAcc", "bench/hallusionbench/qAcc"} <= set(r)
  for done in (1, 2):
    summary = json.loads((out / "benchmarks" / f"summary_{done}.json").read_text())
    assert summary["benchmarks"]["mathvista"]["records"] == 4  # the fixture's four MathVista rows
    predictions = (out / "benchmarks" / f"predictions_{done}.jsonl").read_text().splitlines()
    assert len(predictions) == 4 + 4  # MathVista's and HallusionBench's rows, one line each


@pytest.mark.parametrize("extra, message", [
    (("train.eval_benchmarks=(mathvist)", "train.eval_benchmark_dir=x"), "train.eval_benchmarks: unknown 'mathvist'"),
    (("train.eval_benchmarks=(mathvista)",), "train.eval_benchmark_dir is empty"),
    (("train.eval_benchmarks=(mathvista)", "train.eval_benchmark_dir=/nonexistent"), "train.eval_benchmarks: "),
])
def test_benchmark_mistakes_are_one_line_before_any_work(tmp_path, capsys, extra, message):
  out = tmp_path / "run"
  with pytest.raises(SystemExit) as e:
    train.main(argv(out, *extra))
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("config error: ") and message in err[0], err
  assert not (out / "metrics.jsonl").exists()
