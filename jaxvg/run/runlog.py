"""A finished or running run's logged scalars, for notebooks: metrics.jsonl or the TensorBoard event files as
key -> (steps_S, values_S), TensorBoard's debiased moving average, and the curves of the evaluations.

  tables = runlog.read_run("runs/demo")                    # metrics.jsonl
  steps_S, values_S = tables["reward/overall"]
  smooth_S = runlog.ema(values_S, 0.6)
  done_S, accuracy_S = runlog.eval_curve(tables, "accuracy")  # before RL, every train.eval_every steps, after
"""

import glob
import json
import math
import os
import struct

import numpy as np

# train.eval_dependency's figures, logged as eval/<name>: <- the key of analysis.evaluate_groundtruth, run with a
# white image as the counterfactual on the reference solutions of held-out synthetic records.
DEPENDENCY_FIGURES = {"white_kl": "mean_kl", "white_kl_visual": "mean_kl_visual", "dependency_auroc": "auroc_kl",
                      "step_split": "split_accuracy_kl_mean"}


def _columns(table: dict[str, dict[int, float]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  return {k: (np.asarray(sorted(v), np.int64), np.asarray([v[s] for s in sorted(v)], np.float64))
          for k, v in sorted(table.items())}


def read_run(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """metrics.jsonl as key -> (steps_S int64, values_S float64), by step; a step logged twice keeps its last value.

  A final line cut short (a killed process) is skipped; any other unreadable line raises, naming it.
  """
  path = os.path.join(run_dir, "metrics.jsonl")
  lines = open(path).read().split("\n")
  table: dict[str, dict[int, float]] = {}
  for n, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if n == len(lines) - 1:  # the last line has no newline: its writer was killed mid-write
        continue
      raise ValueError(f"{path}: line {n + 1} is not JSON: {line[:80]!r}") from None
    for key, value in row.items():
      if key != "step":
        table.setdefault(key, {})[int(row["step"])] = float("nan") if value is None else float(value)
  return _columns(table)


def read_tfevents(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The scalars of run_dir/tensorboard's event files, like `read_run`, without TensorBoard's reader.

  An event file is a sequence of records: uint64 length, uint32 masked CRC-32C of the length, the serialized Event,
  uint32 masked CRC of the data (little-endian). A record cut short at the end of a file is skipped; a record whose
  checksum fails raises.
  """
  from tensorboard.compat.proto import event_pb2
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
  table: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "*tfevents*"))):
    blob = open(path, "rb").read()
    pos = 0
    while pos + 12 <= len(blob):
      (length,), (length_crc,) = struct.unpack("<Q", blob[pos:pos + 8]), struct.unpack("<I", blob[pos + 8:pos + 12])
      if masked_crc32c(blob[pos:pos + 8]) != length_crc:
        raise ValueError(f"{path}: corrupt record length at byte {pos}")
      end = pos + 12 + length + 4
      if end > len(blob):
        break  # cut short
      data = blob[pos + 12:pos + 12 + length]
      if masked_crc32c(data) != struct.unpack("<I", blob[end - 4:end])[0]:
        raise ValueError(f"{path}: corrupt record at byte {pos}")
      event = event_pb2.Event.FromString(data)
      for value in event.summary.value:
        if value.WhichOneof("value") == "simple_value":
          table.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
      pos = end
  return _columns(table)


def ema(values_S, weight: float) -> np.ndarray:
  """TensorBoard's debiased exponential moving average: m_i = w m_{i-1} + (1 - w) x_i, s_i = m_i / (1 - w^(i+1)).

  m_{-1} = 0; weight 0 returns the values. Non-finite values are carried over without entering the average.
  """
  if not 0.0 <= weight < 1.0:
    raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
  x_S = np.asarray(values_S, np.float64)
  out_S = np.empty_like(x_S)
  m, n = 0.0, 0
  for i, x in enumerate(x_S):
    if not math.isfinite(x):
      out_S[i] = x
      continue
    m, n = weight * m + (1.0 - weight) * x, n + 1
    out_S[i] = m / (1.0 - weight**n)
  return out_S


def eval_curve(table: dict[str, tuple[np.ndarray, np.ndarray]], name: str) -> tuple[np.ndarray, np.ndarray]:
  """A figure evaluated during training, by RL steps done: (done_S int64, values_S float64).

  From `read_run`'s table: eval/<name>_before at 0 steps done, the periodic eval/<name> logged at step i (after it:
  i + 1 done) and eval/<name>_after, logged at the step count train.steps. Empty arrays when none was logged.
  """
  points = {}
  if f"eval/{name}_before" in table:
    points[0] = table[f"eval/{name}_before"][1][-1]
  if f"eval/{name}" in table:
    points.update(zip((table[f"eval/{name}"][0] + 1).tolist(), table[f"eval/{name}"][1].tolist()))
  if f"eval/{name}_after" in table:
    steps_S, values_S = table[f"eval/{name}_after"]
    points[int(steps_S[-1])] = values_S[-1]
  done = sorted(points)
  return np.asarray(done, np.int64), np.asarray([points[d] for d in done], np.float64)
