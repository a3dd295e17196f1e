"""Preemption: a run stopped by SIGTERM saves and exits 143, and resuming it reproduces the uninterrupted run's
metrics, each step logged once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxvg import train

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
MINI = ["--set", "sft.steps=1", "--set", "sft.perception_steps=2", "--set", "sft.batch_size=2",
        "--set", "sft_optim.total_steps=1", "--set", "data.prompts_per_batch=2",
        "--set", "data.num_eval=2", "--set", "rollout.group_size=2", "--set", "rollout.max_new_tokens=8",
        "--set", "algo.dynamic_sampling=false", "--set", "model.tiny_width=32", "--set", "model.tiny_layers=1",
        "--set", "model.tiny_vision_width=32", "--set", "train.steps=3"]
# Wall-clock figures differ between runs; everything else must match exactly.
TIMING = ("time", "time/", "tokens_per_s")


def _rl_rows(out_dir):
  rows = {}
  for line in open(os.path.join(out_dir, "metrics.jsonl")):
    r = json.loads(line)
    if r["step"] >= 0 and "reward/overall" in r:
      rows[r["step"]] = {k: v for k, v in r.items() if not k.startswith(TIMING)}  # a re-run step: the last wins
  return rows


@pytest.mark.slow
def test_sigterm_saves_and_resume_reproduces_the_uninterrupted_run(tmp_path):
  whole = tmp_path / "whole"
  train.main(["--config", CONFIG, "--set", f"train.out_dir={whole}", *MINI])

  cut = tmp_path / "cut"
  cmd = [sys.executable, "-m", "jaxvg.train", "--config", CONFIG, "--set", f"train.out_dir={cut}", *MINI]
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = cut / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and any('"reward/overall"' in line for line in open(metrics)):
      proc.send_signal(signal.SIGTERM)  # mid-run: after RL step 0 has been logged
      break
    time.sleep(0.2)
  output, _ = proc.communicate(timeout=600)
  assert proc.returncode == 128 + signal.SIGTERM, output  # stopped by a signal: not a success
  assert "stopped by a signal" in output and "accuracy after" not in output, output
  assert os.listdir(cut / "checkpoints")

  train.main(["--config", CONFIG, "--set", f"train.out_dir={cut}", *MINI])  # resumes from the checkpoint
  assert _rl_rows(cut) == _rl_rows(whole)
  # It resumed rather than starting over, and each step is logged once (a step past the checkpoint, logged before the
  # signal, was dropped before it was logged again).
  logged = [json.loads(line)["step"] for line in open(cut / "metrics.jsonl") if '"reward/overall"' in line]
  assert logged == [0, 1, 2]
