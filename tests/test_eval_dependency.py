"""train.eval_dependency: the ground-truth dependency figures at every evaluation, the curves of a run."""

import dataclasses
import json
import os

import numpy as np
import pytest

from jaxvg import analysis, train
from jaxvg.core import config_lib
from jaxvg.run import runlog, validation

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
TINY = ["train.steps=2", "train.eval_every=1", "train.eval_dependency=4", "sft.steps=0", "sft.perception_steps=0",
        "data.num_eval=2", "train.eval_white_image=false", "model.tiny_width=32", "model.tiny_layers=1",
        "model.tiny_vision_width=32", "rollout.group_size=2", "rollout.max_new_tokens=8",
        "algo.dynamic_sampling=false", "data.prompts_per_batch=4"]


@pytest.mark.slow
def test_dependency_figures_are_logged_at_every_evaluation_and_match_the_saved_policy(tmp_path):
  out = tmp_path / "run"
  result = train.main(["--config", CONFIG, *(a for o in (f"train.out_dir={out}", *TINY) for a in ("--set", o))])
  rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
  names = list(runlog.DEPENDENCY_FIGURES)
  periodic = {r["step"]: r for r in rows if "eval/white_kl" in r and "eval/accuracy" in r}
  # eval_every=1 evaluates after step 0 (logged at step 0); after the last step the summary (at train.steps = 2)
  # carries the figures before RL and after it.
  assert sorted(periodic) == [0]
  final = next(r for r in rows if r["step"] == 2 and "eval/accuracy_after" in r)
  for name in names:
    assert {f"eval/{name}_before", f"eval/{name}_after"} <= set(final), name
  assert final["eval/white_kl_before"] > 0 and final["eval/white_kl_after"] > 0
  assert 0.0 <= final["eval/dependency_auroc_after"] <= 1.0 and 0.0 <= final["eval/step_split_after"] <= 1.0
  # The curves by RL steps done: before (0), after step 0 (1), after the last (2).
  table = runlog.read_run(str(out))
  for name in ("accuracy", *names):
    done, values = runlog.eval_curve(table, name)
    assert done.tolist() == [0, 1, 2], name
    assert values.tolist() == [final[f"eval/{name}_before"], periodic[0][f"eval/{name}"], final[f"eval/{name}_after"]]
  # The live state's figures after the last step are the analysis command's on the saved final parameters.
  policy = analysis.load_policy(run_dir=str(out), params="final")
  again = analysis.evaluate_groundtruth(policy, num=4, batch_size=4, counterfactual="white_image")
  for name, key in runlog.DEPENDENCY_FIGURES.items():
    np.testing.assert_allclose(final[f"eval/{name}_after"], again[key], rtol=1e-5, err_msg=name)
    assert result["dependency_after"][name] == final[f"eval/{name}_after"]


def test_dependency_figures_need_the_synthetic_labels(tmp_path):
  cfg = config_lib.load_config(CONFIG)
  (tmp_path / "data.jsonl").write_text("")
  off = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="jsonl", path=str(tmp_path / "data.jsonl")),
                            sft=dataclasses.replace(cfg.sft, perception_steps=0),
                            train=dataclasses.replace(cfg.train, eval_dependency=8))
  with pytest.raises(validation.ConfigError, match="train.eval_dependency=8: .*data.source='jsonl'"):
    validation.validate(off)
  negative = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_dependency=-1))
  with pytest.raises(validation.ConfigError, match="train.eval_dependency"):
    validation.validate(negative)
