"""notebooks/training_curves.ipynb runs on hand-made metrics of two runs, plots them, and ships without outputs."""

import json
import os

import nbclient
import nbformat
import pytest

from jaxvg.run import metrics

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "training_curves.ipynb")


def _write_run(run_dir, *, dependency: bool, resumed: bool):
  """Five RL steps with known values (reward/overall at step s: 0.1 + 0.15 s, so 0.7 at step 4)."""
  w = metrics.MetricsWriter(str(run_dir))
  w.write(-10, {"sft/sft_loss": 3.0})
  w.write(-1, {"sft/sft_loss": 1.5})
  for s in range(5):
    row = {"reward/overall": 0.1 + 0.15 * s, "reward/accuracy": 0.05 * s, "response_length": 40.0 + s,
           "tokens_per_s": 1000.0, "time/step": 2.0, "time/sample": 1.0}
    if dependency:
      row.update({"dependency/mean": 0.5 + 0.01 * s, "dependency/mean_image_prompts": 0.6})
    w.write(s, row)
    if resumed and s == 3:  # a step re-run after a resume: the last value wins
      w.write(s, {**row, "reward/overall": 0.55})
    if s == 2:
      w.write(s, {"eval/accuracy": 0.375, **({"eval/white_kl": 1.25} if dependency else {})})
  w.write(5, {"eval/accuracy_before": 0.25, "eval/accuracy_after": 0.625 if dependency else 0.5,
              **({"eval/white_kl_before": 1.0, "eval/white_kl_after": 1.5} if dependency else {})})
  w.close()


def _write_replication(out):
  """Two methods' finished runs as the replication driver leaves them (run_result.json), with hand-made curves."""
  for method, seed, mass in (("GRPO", 0, 0.25), ("PGPO-DAPO", 0, 0.5), ("PGPO-DAPO", 1, 0.75)):
    folder = out / method.lower().replace("-", "_") / f"seed{seed}"
    folder.mkdir(parents=True)
    entry = {"ids": ["p0", "p1"], "scores": [1.0, 0.0]}
    result = {"spec": {"method": method, "seed": seed}, "tokens_per_s": 1.0, "step_time": 1.0, "rollouts": 8.0,
              "dependency_auroc": 0.9, "step_split_accuracy": 0.8,
              "per_prompt": {"test": entry, "prior_conflict": entry, "white": entry},
              "mechanisms": {"pgpo_visual_mass": mass, "visual_share": 0.25},
              "curves": {"reward": [[0, 0.1], [1, 0.2 + seed]], "accuracy": [[0, 0.4], [2, 0.5]]}}
    (folder / "run_result.json").write_text(json.dumps(result))


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.outputs == [] and c.execution_count is None for c in code)
  assert "parameters" in code[0].metadata["tags"]
  assert not any("def " in c.source for c in code)  # helpers live in jaxvg.run.runlog


@pytest.mark.slow
def test_notebook_runs_on_two_runs_and_plots(tmp_path, monkeypatch):
  for var in ("MPLCONFIGDIR", "IPYTHONDIR"):
    (tmp_path / var).mkdir()
    monkeypatch.setenv(var, str(tmp_path / var))
  monkeypatch.delenv("MPLBACKEND", raising=False)
  a, b = tmp_path / "run_a", tmp_path / "run_b"
  _write_run(a, dependency=True, resumed=False)
  _write_run(b, dependency=False, resumed=True)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  _write_replication(tmp_path / "rep")
  params.source = (f"RUNS = [{str(a)!r}, {str(b)!r}]\nSMOOTHING = 0.5\nCOLUMNS = 3\n"
                   f"REPLICATION = {str(tmp_path / 'rep')!r}")
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  # reward, length/throughput, dependency, step time, warm start, evaluations, the replication's curves
  assert len(images) == 7, [o.get("text", o.get("data", {}).keys()) for o in outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "2 run(s)" in text
  # The replication: methods in name order, PGPO-DAPO's weight share the mean of its seeds' 0.5 and 0.75.
  assert "2 method(s): GRPO (1 seeds), PGPO-DAPO (2 seeds)" in text
  assert "| PGPO-DAPO | 0.625 ± 0.177 | 0.250 ± 0.000 | - |" in text
  lines = text.splitlines()
  # final values: run a's reward/overall at step 4 is 0.1 + 0.15 * 4 = 0.7, reward/accuracy 0.2, length 44,
  # step time 2, accuracy before 0.25 and after 0.625; run b's re-run step 3 does not change its last step.
  (row_a,) = [line for line in lines if line.startswith(str(a)) and "scalar tags" not in line]
  assert row_a.split()[1:] == ["0.7000", "0.2000", "44.0000", "2.0000", "0.2500", "0.6250"]
  (row_b,) = [line for line in lines if line.startswith(str(b)) and "scalar tags" not in line]
  assert row_b.split()[1:] == ["0.7000", "0.2000", "44.0000", "2.0000", "0.2500", "0.5000"]
  # The event files hold every scalar but the wall-clock `time`, and agree with metrics.jsonl.
  # run a: sft_loss, 2 rewards, length, tokens/s, 2 times, 2 dependency, 3 accuracy and 3 white-KL evaluations = 15;
  # run b: no dependency = 10
  assert f"{a}: 15 scalar tags in the event files, 15 shared with metrics.jsonl, all equal" in text
  assert f"{b}: 10 scalar tags in the event files, 10 shared with metrics.jsonl, all equal" in text
