"""Hard kills: a run SIGKILLed once a checkpoint exists (the kill may land mid-save) resumes to the uninterrupted run.

No handler runs on SIGKILL, so nothing is saved on the way out: the resumed run starts from whatever orbax had
finished writing, and an asynchronous save of the next step may have been cut short (orbax writes each step in a
temporary directory and renames it when complete, so a cut save never shows up as a step). A second copy of the
killed run gets its newest step damaged (the parameter bytes truncated, as a full disk or a bad copy would leave
them): a real train run must set that step aside and resume from the one before.

Every process shares one warm start (copied from the uninterrupted run) and one persistent compilation cache, so
only the first run compiles.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from test_resume import _rl_rows  # the RL rows of a run, timings left out

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
STEPS = 5
KILL_AFTER = 1  # kill once the checkpoint of this RL step exists
MINI = ["--set", "sft.steps=1", "--set", "sft.perception_steps=2", "--set", "sft.batch_size=2",
        "--set", "sft_optim.total_steps=1", "--set", "data.prompts_per_batch=2",
        "--set", "data.num_eval=2", "--set", "rollout.group_size=2", "--set", "rollout.max_new_tokens=8",
        "--set", "algo.dynamic_sampling=false", "--set", "model.tiny_width=32", "--set", "model.tiny_layers=1",
        "--set", "model.tiny_vision_width=32", "--set", f"train.steps={STEPS}", "--set", "train.keep_checkpoints=3"]


def _env(cache_dir):
  return {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _start(out_dir, env):
  cmd = [sys.executable, "-m", "jaxvg.train", "--config", CONFIG, "--set", f"train.out_dir={out_dir}", *MINI]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc):
  output, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, output
  return output


def _logged_steps(out_dir):
  return [json.loads(line)["step"] for line in open(os.path.join(out_dir, "metrics.jsonl"))
          if '"reward/overall"' in line]


def _steps_on_disk(ckpt_dir):
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def _resumed_from(output):
  """The step a process said it resumed from."""
  found = re.findall(r"resumed from step (\d+)", output)
  assert len(found) == 1, output
  return int(found[0])


@pytest.mark.slow
def test_sigkill_mid_save_then_resume_and_damaged_latest_step(tmp_path):
  env = _env(tmp_path / "compile_cache")
  whole, cut, damaged = tmp_path / "whole", tmp_path / "cut", tmp_path / "damaged"
  _finish(_start(whole, env))
  whole_rows = _rl_rows(whole)
  assert sorted(whole_rows) == list(range(STEPS))

  # ---- SIGKILL as soon as the checkpoint of step KILL_AFTER is complete; the next save may be under way.
  cut.mkdir()
  shutil.copytree(whole / "sft", cut / "sft")  # the shared warm start (reused: same config signature)
  proc = _start(cut, env)
  ready = cut / "checkpoints" / str(KILL_AFTER)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not ready.is_dir():
    time.sleep(0.02)
  assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.communicate()[0]}"
  assert ready.is_dir(), "no checkpoint appeared in time"
  proc.kill()
  output, _ = proc.communicate(timeout=60)
  assert proc.returncode == -9, output
  assert not any('"sft/' in line for line in open(cut / "metrics.jsonl")), "the warm start was trained again"
  assert "accuracy after" not in output and not (cut / "final").exists(), output
  on_disk = _steps_on_disk(cut / "checkpoints")
  assert on_disk and KILL_AFTER in on_disk and max(on_disk) < STEPS - 1, on_disk

  # ---- a copy of the killed run whose newest complete step has its parameter bytes truncated
  shutil.copytree(cut, damaged)
  latest = max(on_disk)
  assert latest - 1 in on_disk, on_disk  # keep_checkpoints=3 keeps the previous step
  victims = glob.glob(str(damaged / "checkpoints" / str(latest) / "params" / "**" / "d" / "*"), recursive=True)
  assert victims
  for victim in victims:
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 2)

  # ---- resume both (in parallel: two processes, one core each)
  resume_cut, resume_damaged = _start(cut, env), _start(damaged, env)
  out_cut, out_damaged = _finish(resume_cut), _finish(resume_damaged)

  # The killed run resumed from its newest complete step (at least KILL_AFTER; a save of the step being written when
  # the kill landed is either complete or absent) and ended with the uninterrupted run's metrics.
  assert _resumed_from(out_cut) == latest, on_disk
  assert _rl_rows(cut) == whole_rows
  # Each step logged once: what the killed process logged past its newest checkpoint was dropped, then logged again.
  assert _logged_steps(cut) == list(range(STEPS))
  assert "accuracy after" in out_cut and (cut / "final").is_dir()

  # The damaged copy set its newest step aside, resumed from the one before, and still matches the uninterrupted run.
  assert "unreadable" in out_damaged and "falling back" in out_damaged, out_damaged
  assert "Event loop is closed" not in out_damaged and "Traceback" not in out_damaged, out_damaged  # one warning
  assert _resumed_from(out_damaged) == latest - 1, out_damaged
  assert (damaged / "checkpoints" / f"{latest}.unreadable").is_dir()
  assert _rl_rows(damaged) == whole_rows
  assert _logged_steps(damaged) == list(range(STEPS))
  assert _steps_on_disk(damaged / "checkpoints")[-1] == STEPS - 1  # the step set aside was written again
