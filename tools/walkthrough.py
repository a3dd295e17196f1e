"""A new user's first hour, scripted: a fresh clone, the README's commands and examples in order, a Ctrl-C during
compilation and one during training, re-runs, and three typical mistakes, each checked for what the terminal shows.

  python tools/walkthrough.py [--tiny] [--workdir DIR] [--no-clone]

Every command is run as the README writes it, in a subprocess from the clone's root, and read as a user reads it
(stdout and stderr together). `--tiny` appends size overrides to the training commands (a minute instead of the
demo's ten) and shares a JAX compilation cache between the processes; the test suite runs it that way. Each check
prints one line, `ok` or `FAIL` with the output's tail; the exit code is the number of failed checks.

What is checked, per step:
  - the main job: exit 0; `accuracy before` and `accuracy after` once each; a line per jitted stage while it
    compiles; no traceback, no library warning, no math-verify timeout notice;
  - the same command again: it finds the run complete, exit 0, and metrics.jsonl still logs each step once;
  - the README's example with its own out_dir trains GRPO; the same example without it is refused (exit 2) with one
    message that names the differing fields and suggests a new out_dir, and the run folder is untouched;
  - evaluate on final/ and on the run folder itself;
  - Ctrl-C during compilation: exit 130, one line, no traceback or segfault;
  - Ctrl-C during training: exit 130, a checkpoint of the step, the same command resumes from it and finishes;
  - mistakes (a misspelt enum value, a misspelt key, a missing config file): exit 2, one line naming the field,
    nothing written;
  - `memory_plan --help` prints help.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Size overrides of --tiny: the demo's recipe on a 1-layer, 32-wide model, 2 warm-start and 2 RL steps.
TINY = ["--set", "sft.steps=2", "--set", "sft.perception_steps=2", "--set", "sft.batch_size=2",
        "--set", "sft_optim.total_steps=2", "--set", "data.prompts_per_batch=2", "--set", "data.num_eval=2",
        "--set", "rollout.max_new_tokens=8", "--set", "model.tiny_width=32", "--set", "model.tiny_layers=1",
        "--set", "model.tiny_vision_width=32", "--set", "train.steps=2"]
TINY_MODEL = TINY[TINY.index("model.tiny_width=32") - 1:TINY.index("model.tiny_vision_width=32") + 1]
NOISE = ("Traceback", "Segmentation fault", "Timeout is disabled", "Warning:", "WARNING: All log messages before")


class Walk:
  def __init__(self, root: str, tiny: bool, env: dict):
    self.root, self.tiny, self.env = root, tiny, env
    self.failed = 0

  def check(self, name: str, ok: bool, output: str = ""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    if not ok:
      self.failed += 1
      print("     " + output[-2500:].replace("\n", "\n     "), flush=True)

  def train_args(self, *extra) -> list[str]:
    # The README's own overrides come last on its command line; the size overrides go first, so the README's win.
    return ["-m", "jaxvg.train", "--config", "configs/demo.py", *(TINY if self.tiny else []), *extra]

  def run(self, *args, timeout: float = 3600) -> tuple[int, str, float]:
    start = time.time()
    proc = subprocess.run([sys.executable, *args], cwd=self.root, env=self.env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, time.time() - start

  def start(self, *args) -> "Running":
    return Running([sys.executable, *args], self.root, self.env)


class Running:
  """A command whose output is read line by line while it runs (to send it a signal at the right moment)."""

  def __init__(self, cmd, cwd, env):
    self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
    self._reader.start()

  def wait_for(self, text: str, timeout: float = 1800) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and self.proc.poll() is None:
      if any(text in line for line in self.lines):
        return True
      time.sleep(0.05)
    return any(text in line for line in self.lines)

  def finish(self, timeout: float = 600) -> tuple[int, str]:
    self.proc.wait(timeout=timeout)
    self._reader.join(timeout=10)
    return self.proc.returncode, "".join(self.lines)


def quiet(output: str) -> bool:
  return not any(n in output for n in NOISE)


def logged_steps(run_dir: str) -> list[int]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if r["step"] >= 0 and "reward/overall" in r]


def walk(w: Walk):
  demo = os.path.join(w.root, "runs", "demo")
  steps = 2 if w.tiny else 20  # configs/demo.py's train.steps

  # ---- the README's main job, then the same command again
  code, out, _ = w.run(*w.train_args())
  w.check("main job: exit 0, accuracy before/after once each", code == 0 and out.count("accuracy before:") == 1
          and out.count("accuracy after:") == 1, out)
  # (A tiny random policy samples no informative group, so it never compiles an update.)
  stages = ("held-out evaluation", "sampler") + (() if w.tiny else ("old-policy scoring", "policy update"))
  w.check("main job: a line per jitted stage while it compiles", all(
      f"compiling {stage} ..." in out and f"{stage} compiled and ran in" in out for stage in stages), out)
  w.check("main job: no traceback, warning or timeout notice", quiet(out), out)
  code, out, _ = w.run(*w.train_args())
  w.check("re-run: finds the run complete, exit 0", code == 0 and f"resumed from step {steps - 1}" in out, out)
  w.check("re-run: each step logged once", logged_steps(demo) == list(range(steps)), str(logged_steps(demo)))

  # ---- the README's example: with its own out_dir it trains GRPO; into the demo's folder it is refused
  example = ["--set", "rollout.group_size=8", "--set", "algo.name=grpo"]
  code, out, _ = w.run(*w.train_args(*example, "--set", "train.out_dir=runs/demo_grpo"))
  with open(os.path.join(w.root, "runs", "demo_grpo", "config.json")) as f:
    trained = json.load(f)["algo"]["name"]
  w.check("README example: GRPO trains in runs/demo_grpo", code == 0 and trained == "grpo"
          and "accuracy after:" in out, out)
  before = open(os.path.join(demo, "config.json")).read()
  code, out, _ = w.run(*w.train_args(*example))
  w.check("the example into runs/demo: refused with the fields and a way out", code == 2
          and 'algo.name: "dapo" -> "grpo"' in out and "train.out_dir=runs/demo_grpo" in out
          and len(out.strip().splitlines()) == 1, out)
  w.check("the refused run left runs/demo untouched", open(os.path.join(demo, "config.json")).read() == before)

  # ---- evaluate
  for params in ("runs/demo/final", "runs/demo"):
    code, out, _ = w.run("-m", "jaxvg.evaluate", "--config", "configs/demo.py", "--params", params,
                         *(TINY_MODEL + ["--set", "data.num_eval=2"] if w.tiny else []))
    last = out.strip().splitlines()[-1] if out.strip() else ""
    w.check(f"evaluate --params {params}", code == 0 and last.startswith("{") and "accuracy" in json.loads(last)
            and quiet(out), out)

  # ---- Ctrl-C during compilation, then during training (and the same command resumes)
  run = w.start(*w.train_args("--set", "train.out_dir=runs/interrupted"))
  reached = run.wait_for("compiling ")
  run.proc.send_signal(signal.SIGINT)
  code, out = run.finish()
  w.check("Ctrl-C while compiling: exit 130, one line, no traceback", reached and code == 130
          and "Traceback" not in out and "Segmentation" not in out and out.count("SIGINT") >= 1, out)
  more = ["--set", f"train.steps={steps + 3}"]
  run = w.start(*w.train_args(*more))
  reached = run.wait_for(f"{steps + 1}/{steps + 3}")  # the progress line of the first step after the resume
  run.proc.send_signal(signal.SIGINT)
  code, out = run.finish()
  stopped = [line for line in out.splitlines() if "stopped by a signal (SIGINT) after step" in line]
  w.check("Ctrl-C while training: exit 130, one line, a checkpoint of the step", reached and code == 130
          and len(stopped) == 1 and "Traceback" not in out and "accuracy after" not in out, out)
  code, out, _ = w.run(*w.train_args(*more))
  w.check("the same command resumes and finishes", code == 0 and "resumed from step" in out
          and logged_steps(demo) == list(range(steps + 3)), out)

  # ---- three typical mistakes: one line naming the field, exit 2, before any work
  for name, args in (("a misspelt algorithm", w.train_args("--set", "algo.name=gpro", "--set", "train.out_dir=runs/x")),
                     ("a misspelt key", w.train_args("--set", "rollout.group_sz=8", "--set", "train.out_dir=runs/x")),
                     ("a missing config file", ["-m", "jaxvg.train", "--config", "configs/dmo.py"])):
    code, out, seconds = w.run(*args)
    lines = [line for line in out.splitlines() if line.strip()]
    w.check(f"mistake, {name}: one line, exit 2, nothing written ({seconds:.0f} s)", code == 2 and len(lines) == 1
            and lines[0].startswith("config error:") and not os.path.exists(os.path.join(w.root, "runs", "x")), out)

  code, out, _ = w.run("-m", "jaxvg.memory_plan", "--help")
  w.check("memory_plan --help prints help", code == 0 and out.startswith("usage:"), out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tiny", action="store_true", help="size overrides on every training command")
  parser.add_argument("--workdir", help="where the clone goes (default: a new temporary folder)")
  parser.add_argument("--no-clone", action="store_true", help="run in a copy of this working tree instead of a git "
                      "clone (uncommitted changes included)")
  args = parser.parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix="jaxvg-walkthrough-")
  root = os.path.join(workdir, "jaxvg")
  if args.no_clone or not os.path.isdir(os.path.join(REPO, ".git")):
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "*.egg-info", "__pycache__"))
  else:
    subprocess.run(["git", "clone", "-q", REPO, root], check=True)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PYTHONUNBUFFERED="1", JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"),
             MPLCONFIGDIR=os.path.join(workdir, "mpl"), TIKTOKEN_CACHE_DIR=os.path.join(workdir, "tiktoken"))
  if args.tiny:
    env.update(JAX_COMPILATION_CACHE_DIR=os.path.join(workdir, "compile_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  w = Walk(root, args.tiny, env)
  start = time.time()
  walk(w)
  print(f"{'all checks passed' if not w.failed else f'{w.failed} check(s) failed'} in {time.time() - start:.0f} s "
        f"({root})")
  sys.exit(min(w.failed, 100))


if __name__ == "__main__":
  main()
