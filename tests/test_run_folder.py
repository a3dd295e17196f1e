"""A run folder holds one run: another configuration is refused before any work, a resumed run logs each step once
(records past the resumed step are dropped first), logs without a checkpoint are not silently started over (unless
train.overwrite), a checkpoint that cannot be written stops the run with one message, skipped records are counted per
reason in the logs, `jaxvg.evaluate` takes a run folder, and Ctrl-C / SIGTERM save and exit 130 / 143 (a second
Ctrl-C at once), in a subprocess.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from jaxvg import evaluate, train
from jaxvg.core import config_lib
from jaxvg.run import folder, metrics, validation

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "..", "configs", "demo.py")
TINY = ["sft.steps=0", "sft.perception_steps=0", "train.eval_white_image=false", "data.num_eval=2",
        "data.prompts_per_batch=2", "rollout.group_size=2", "rollout.max_new_tokens=8", "algo.dynamic_sampling=false",
        "model.tiny_width=32", "model.tiny_layers=1", "model.tiny_vision_width=32"]


def args(out, *overrides):
  return ["--config", CONFIG, *(a for o in (f"train.out_dir={out}", *TINY, *overrides) for a in ("--set", o))]


def records(out, name="metrics.jsonl"):
  return [json.loads(line) for line in open(os.path.join(out, name))]


def rl_steps(out):
  return [r["step"] for r in records(out) if "reward/overall" in r]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 3-step run: metrics of steps 0, 1, 2 and the summary at 3; checkpoints 1 and 2; final/."""
  out = tmp_path_factory.mktemp("finished") / "run"
  train.main(args(out, "train.steps=3"))
  assert rl_steps(out) == [0, 1, 2] and sorted(os.listdir(out / "checkpoints")) == ["1", "2"]
  return out


def copy(finished, tmp_path):
  shutil.copytree(finished, tmp_path / "run")
  return tmp_path / "run"


def test_another_configuration_is_refused_before_any_work(finished, tmp_path, capsys):
  out = copy(finished, tmp_path)
  config_json, metrics_jsonl = (out / "config.json").read_bytes(), (out / "metrics.jsonl").read_bytes()
  events = sorted(os.listdir(out / "tensorboard"))
  with pytest.raises(SystemExit) as e:
    train.main(args(out, "train.steps=3", "algo.name=grpo", "rollout.temperature=0.7"))
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"config error: train.out_dir={out} holds a run of another configuration")
  assert 'rollout.temperature: 1.0 -> 0.7' in err[0] and 'algo.name: "dapo" -> "grpo"' in err[0]
  assert f"--set train.out_dir={out}_0.7" in err[0] and "train.overwrite=true" in err[0]
  # Nothing was touched: config.json is the finished run's, no step was logged, no event file was opened.
  assert (out / "config.json").read_bytes() == config_json and (out / "metrics.jsonl").read_bytes() == metrics_jsonl
  assert sorted(os.listdir(out / "tensorboard")) == events


def test_fields_safe_to_change_resume(finished):
  """Steps, intervals, logging and the mesh may change on resume; the out_dir of a moved folder too."""
  cfg = config_lib.apply_overrides(config_lib.load_config(CONFIG), [f"train.out_dir={finished}", *TINY])
  safe = ["train.steps=40", "train.eval_every=5", "train.samples_logged=1", "train.keep_checkpoints=5",
          "train.save_every=3", "train.max_skipped_updates=9", "mesh.fsdp=1"]
  folder.check_run_folder(config_lib.apply_overrides(cfg, safe))
  with pytest.raises(validation.ConfigError, match="checkpoints up to step 2 and train.resume=false"):
    folder.check_run_folder(config_lib.apply_overrides(cfg, ["train.resume=false"]))
  changes = folder.config_changes(json.load(open(finished / "config.json")), config_lib.to_dict(
      config_lib.apply_overrides(cfg, safe + ["train.out_dir=/elsewhere", "optim.lr=1e-3"])))
  assert changes == {"optim.lr": (5e-05, 0.001)}
  # A run folder written before the layout by stage names the default reward by its former module path.
  old = json.load(open(finished / "config.json"))
  old["algo"]["reward_fn"] = "jaxvg.rewards:default_reward"
  assert folder.config_changes(old, config_lib.to_dict(cfg)) == {}
  old["algo"]["reward_fn"] = "mypkg.scorer:reward"
  assert list(folder.config_changes(old, config_lib.to_dict(cfg))) == ["algo.reward_fn"]


def test_a_resumed_run_logs_each_step_once(finished, tmp_path, capsys):
  """The newest checkpoint (step 2) is gone, as after a SIGKILL before its save completed, and the kill cut the last
  metrics line short: the run resumes from step 1, and the earlier records past it (step 2, the summary at 3, the cut
  line) are dropped before it logs again."""
  out = copy(finished, tmp_path)
  shutil.rmtree(out / "checkpoints" / "2")
  with open(out / "metrics.jsonl", "a") as f:
    f.write('{"step": 2, "ti')
  train.main(args(out, "train.steps=4"))
  assert "resumed from step 1" in capsys.readouterr().out
  steps = [r["step"] for r in records(out)]
  assert rl_steps(out) == [0, 1, 2, 3] and steps == [0, 1, 2, 3, 4]  # the summary once, at the new end
  assert [r["step"] for r in records(out, "samples.jsonl")] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
  old = {r["step"]: r["time"] for r in records(finished)}
  new = {r["step"]: r["time"] for r in records(out)}
  assert new[0] == old[0] and new[1] == old[1] and new[2] > old[3]  # steps up to the checkpoint were kept


def test_logs_without_a_checkpoint_are_refused_unless_overwrite(finished, tmp_path, capsys):
  out = copy(finished, tmp_path)
  shutil.rmtree(out / "checkpoints")
  with pytest.raises(SystemExit) as e:
    train.main(args(out, "train.steps=3"))
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"train.out_dir={out} holds a previous run's metrics (steps 0 to 3)" in err[0]
  assert "no checkpoint to resume from" in err[0] and "train.overwrite=true" in err[0]
  assert rl_steps(out) == [0, 1, 2]

  train.main(args(out, "train.steps=2", "train.overwrite=true", "rollout.temperature=0.9"))
  assert "train.overwrite: deleted" in capsys.readouterr().out
  assert rl_steps(out) == [0, 1] and [r["step"] for r in records(out)] == [0, 1, 2]
  assert len(os.listdir(out / "tensorboard")) == 1 and sorted(os.listdir(out / "checkpoints")) == ["0", "1"]
  assert json.load(open(out / "config.json"))["rollout"]["temperature"] == 0.9


def test_evaluate_takes_a_run_folder(finished, tmp_path, capsys):
  cli = ["--config", CONFIG, *(a for o in TINY for a in ("--set", o))]
  from_final = evaluate.main([*cli, "--params", str(finished / "final")])
  assert evaluate.main([*cli, "--params", str(finished)]) == from_final  # the folder's final/
  out = copy(finished, tmp_path)
  shutil.rmtree(out / "final")  # a run still going: its newest checkpoint (step 2 holds the final parameters)
  assert evaluate.main([*cli, "--params", str(out)]) == from_final
  assert "newest readable checkpoint" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    evaluate.main([*cli, "--params", str(out / "tensorboard")])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "expected a parameter checkpoint" in err[0] and "run folder" in err[0]


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_one_message(tmp_path, monkeypatch, capsys):
  """A full disk under the asynchronous save of step 1: the run stops at the next step boundary with exit code 4
  and one line naming the step, the cause and the checkpoint to resume from, instead of a traceback per write."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler
  write = json_checkpoint_handler.JsonCheckpointHandler._save_fn

  async def disk_full(self, x, directory):
    if f"checkpoints{os.sep}1." in str(directory):
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await write(self, x, directory)

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
  out = tmp_path / "run"
  with pytest.raises(SystemExit) as e:
    train.main(args(out, "train.steps=6"))
  assert e.value.code == 4
  captured = capsys.readouterr()
  logged = captured.out + captured.err
  errors = [line for line in logged.splitlines() if " ERROR " in line]
  assert len(errors) == 1 and "checkpoint step 1 could not be written" in errors[0], logged[-3000:]
  assert "No space left on device" in errors[0] and "newest complete checkpoint is step 0" in errors[0]
  assert "Traceback" not in logged
  assert rl_steps(out) == [0, 1, 2]  # noticed at the end of step 2, before its save
  assert [n for n in os.listdir(out / "checkpoints") if n.isdigit()] == ["0"]


def test_skipped_records_are_counted_per_reason_in_the_logs(tmp_path):
  from data_fixtures import png_bytes, random_image, write_jsonl
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  lines = [{"image": f"{i}.png", "problem": f"<image>How many dots in picture {i}?", "answer": str(i), "id": f"q{i}"}
           for i in range(10)]
  for i in range(10):
    if i not in (3, 6):  # two lines name files that are not there
      (tmp_path / f"{i}.png").write_bytes(png_bytes(random_image(56, 56, seed=i)))
  lines[8] = {"image": "8.png", "problem": "<image>What is this?", "answer": "", "id": "q8"}  # no answer
  write_jsonl(tmp_path / "data.jsonl", lines)
  out = tmp_path / "run"
  train.main(args(out, "train.steps=2", "data.source=jsonl", f"data.path={tmp_path / 'data.jsonl'}",
                  f"data.image_dir={tmp_path}", "data.length_buckets=256,512", "data.seed=2"))
  # Seed 2's shuffle meets q8 (no answer) in the first batch and a missing file in the second: cumulative counts.
  rl = [{k: v for k, v in r.items() if k.startswith("data/skipped/")} for r in records(out) if "reward/overall" in r]
  assert rl == [{"data/skipped/missing_answer": 1.0},
                {"data/skipped/missing_answer": 1.0, "data/skipped/missing_image_file": 1.0}]
  events = EventAccumulator(str(out / "tensorboard"))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars("data/skipped/missing_answer")] == [(0, 1.0), (1, 1.0)]
  assert [(e.step, e.value) for e in events.Scalars("data/skipped/missing_image_file")] == [(1, 1.0)]


def slow_reward(completion, answer, *, fmt):
  """The default reward, a quarter second late: a step long enough to send a second signal into."""
  from jaxvg.rl import rewards
  time.sleep(0.25)
  return rewards.default_reward(completion, answer, fmt=fmt)


class Run:
  """`python -m jaxvg.train` in a subprocess, its output read line by line as it comes."""

  def __init__(self, out, env, *overrides):
    cmd = [sys.executable, "-m", "jaxvg.train", *args(out, "train.steps=50", "rollout.max_new_tokens=4",
                                                      "algo.reward_fn=test_run_folder:slow_reward", *overrides)]
    self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines = []
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
    self._reader.start()

  def wait_for(self, text, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and self.proc.poll() is None:
      if any(text in line for line in self.lines):
        return
      time.sleep(0.05)
    assert any(text in line for line in self.lines), "".join(self.lines)[-3000:]

  def finish(self):
    self.proc.wait(timeout=300)
    self._reader.join(timeout=10)
    return self.proc.returncode, "".join(self.lines)


def test_ctrl_c_and_sigterm_save_and_exit_non_zero_a_second_ctrl_c_at_once(tmp_path):
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "compile_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  out = tmp_path / "run"

  # Ctrl-C during the loop: one line, the step ends with a save, exit 130.
  run = Run(out, env)
  run.wait_for("dapo [")  # the progress line of the first RL step
  run.proc.send_signal(signal.SIGINT)
  code, output = run.finish()
  assert code == 128 + signal.SIGINT, output[-3000:]
  assert output.count("received SIGINT") == 1 and "Traceback" not in output and "accuracy after" not in output
  stopped = [line for line in output.splitlines() if "stopped by a signal (SIGINT) after step" in line]
  assert len(stopped) == 1, output[-3000:]
  step = int(stopped[0].split("after step ")[1].split(";")[0])
  assert str(step) in os.listdir(out / "checkpoints")

  # The same command resumes it; SIGTERM (preemption) saves as well and exits 143.
  run = Run(out, env)
  run.wait_for(f"resumed from step {step}")
  run.wait_for("dapo [")
  run.proc.send_signal(signal.SIGTERM)
  code, output = run.finish()
  assert code == 128 + signal.SIGTERM and "stopped by a signal (SIGTERM)" in output, output[-3000:]
  saved = sorted(int(n) for n in os.listdir(out / "checkpoints") if n.isdigit())

  # A second Ctrl-C ends the process at once, without the save of the step it interrupts.
  run = Run(out, env)
  run.wait_for("dapo [")
  run.proc.send_signal(signal.SIGINT)
  run.wait_for("received SIGINT")
  run.proc.send_signal(signal.SIGINT)
  code, output = run.finish()
  assert code == -signal.SIGINT, output[-3000:]
  assert "stopped by a signal" not in output
  assert max(int(n) for n in os.listdir(out / "checkpoints") if n.isdigit()) <= max(saved) + 1


def test_metrics_writer_drops_what_earlier_processes_logged_past_the_resumed_step(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step in (-20, -10, 0, 1, 2):
      f.write(json.dumps({"step": step, "x": 1}) + "\n")
    f.write('{"step": 3, "x"')  # cut short by a kill
  writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
  writer.write(-10, {"x": 2})  # a warm start trained again
  writer.drop_previous(after=1)
  writer.write(2, {"x": 2})
  writer.close()
  assert [(r["step"], r["x"]) for r in records(tmp_path)] == [(-20, 1), (0, 1), (1, 1), (-10, 2), (2, 2)]
