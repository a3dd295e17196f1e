"""The run folder (train.out_dir): one run per folder, resumed by the same command, another run refused.

A folder holds config.json, metrics.jsonl, samples.jsonl, tensorboard/, checkpoints/ and final/, beside the warm starts
(sft/, teacher/) that are reused while their own signatures match. Running again with the same configuration resumes
from the newest readable checkpoint; another configuration (beyond RESUMABLE fields), or logs without a checkpoint to
resume from, is refused before any work unless train.overwrite is set.
"""

import json
import logging
import os
import re
import shutil

import jax

from jaxvg.core import config_lib
from jaxvg.rl import rewards
from jaxvg.run import experiment
from jaxvg.run.validation import ConfigError

log = logging.getLogger("jaxvg")

# Fields a resumed run may change: none of them changes what the steps already taken computed (the checkpoint
# restores onto any mesh). A prefix ending in "." covers a section.
RESUMABLE = ("train.steps", "train.eval_every", "train.eval_dependency", "train.samples_logged",
             "train.keep_checkpoints", "train.save_every", "train.resume", "train.overwrite", "train.out_dir",
             "train.log_every", "train.max_skipped_updates", "mesh.", "train.eval_benchmark")
# What train.overwrite deletes; the warm starts (sft/, teacher/) stay, reused while their signatures match.
RUN_FILES = ("checkpoints", "final", "tensorboard", "metrics.jsonl", "samples.jsonl", "config.json")


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def config_changes(before: dict, after: dict) -> dict[str, tuple]:
  """{field: (before, after)} of the dotted fields both config dicts hold that differ, RESUMABLE ones left out."""
  b, a = _flat(before), _flat(json.loads(json.dumps(after)))  # as config.json holds it: tuples are lists
  for flat in (a, b):  # a reward module named by its former path is the same reward
    if isinstance(flat.get("algo.reward_fn"), str):
      flat["algo.reward_fn"] = rewards.canonical_spec(flat["algo.reward_fn"])
  return {k: (b[k], v) for k, v in a.items() if k in b and b[k] != v and not k.startswith(RESUMABLE)}


def previous_run(out_dir: str) -> tuple[dict | None, list[int], list[int]]:
  """(config.json, the steps metrics.jsonl logs, the complete checkpoint steps) of what `out_dir` holds."""
  config, logged, saved = None, [], []
  path = os.path.join(out_dir, "config.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        config = json.load(f)
    except ValueError as e:
      raise ConfigError(f"train.out_dir={out_dir}: {path} does not read ({e}); move that folder away or "
                                   "set train.overwrite=true") from None
  if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
    with open(os.path.join(out_dir, "metrics.jsonl"), "rb") as f:
      for line in f:
        try:
          logged.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
          pass  # a line cut short by a kill
  if os.path.isdir(os.path.join(out_dir, "checkpoints")):
    saved = sorted(int(n) for n in os.listdir(os.path.join(out_dir, "checkpoints")) if n.isdigit())
  return config, logged, saved


def check_run_folder(cfg: experiment.Config):
  """Raises ConfigError when `train.out_dir` holds another run: one of another configuration, or logs of RL steps
  that no checkpoint lets this run continue. Reads only; train.overwrite lets everything through."""
  t = cfg.train
  if t.overwrite:
    return
  config, logged, saved = previous_run(t.out_dir)
  if not logged and not saved:
    return  # a new folder, or one holding a warm start alone (reused only while its own signature matches)
  changes = config_changes(config, config_lib.to_dict(cfg)) if config is not None else {}
  if changes:
    listed = "; ".join(f"{k}: {json.dumps(b)} -> {json.dumps(a)}" for k, (b, a) in list(changes.items())[:8])
    more = f" and {len(changes) - 8} more" if len(changes) > 8 else ""
    short = [str(a) for _, a in changes.values() if isinstance(a, (str, int, float)) and not isinstance(a, bool)]
    tag = next((a for a in short if re.fullmatch(r"[\w.-]{1,24}", a)), "2")  # grpo -> runs/demo_grpo
    raise ConfigError(
        f"train.out_dir={t.out_dir} holds a run of another configuration ({listed}{more}); choose a new "
        f"train.out_dir (e.g. --set train.out_dir={t.out_dir.rstrip('/')}_{tag}), or set train.overwrite=true to "
        f"replace that run")
  rl_steps = [s for s in logged if s >= 0]
  if saved and not t.resume:
    raise ConfigError(
        f"train.out_dir={t.out_dir} holds a run with checkpoints up to step {saved[-1]} and train.resume=false; choose "
        f"a new train.out_dir, or set train.overwrite=true to start over there")
  if rl_steps and not saved:
    raise ConfigError(
        f"train.out_dir={t.out_dir} holds a previous run's metrics (steps {min(rl_steps)} to {max(rl_steps)}) but no "
        f"checkpoint to resume from; choose a new train.out_dir, or set train.overwrite=true to start over there")


def start_run_folder(cfg: experiment.Config, lead: bool):
  """train.overwrite: deletes the previous run's files; then writes config.json (atomically), once it was checked."""
  out_dir = cfg.train.out_dir
  if lead:
    if cfg.train.overwrite:
      found = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
      for name in found:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
          shutil.rmtree(path)
        else:
          os.remove(path)
      if found:
        log.warning("train.overwrite: deleted %s of the previous run in %s", ", ".join(found), out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "config.json")
    with open(f"{path}.tmp", "w") as f:
      json.dump(config_lib.to_dict(cfg), f, indent=2)
    os.replace(f"{path}.tmp", path)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("jaxvg: run folder ready")
