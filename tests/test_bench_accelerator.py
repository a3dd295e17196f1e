"""bench/accelerator.py --tiny runs end to end in its own process and prints one JSON line with finite figures."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_run_prints_one_json_line():
  # The tiny run takes ~35 s of CPU, most of it compiling the policy update; the limit leaves room for a loaded machine.
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "accelerator.py"), "--tiny"], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [line for line in proc.stdout.splitlines() if line.strip()]
  assert len(lines) == 1, proc.stdout
  record = json.loads(lines[0])
  assert record["bench"] == "accelerator" and record["model"] == "tiny"
  assert record["attention_impl"] == "auto" and "attention_error" not in record
  assert set(record["attention_resolved"].values()) == {"blocked"}  # no kernel fits a CPU
  for key in ("decode_tokens_per_s", "prefill_s", "decode_s", "update_s", "update_tflops_per_s", "pgpo_over_dapo",
              "update_model_tflop", "total_s"):
    assert isinstance(record[key], float) and math.isfinite(record[key]) and record[key] > 0, (key, record[key])
  assert set(record["step_s"]) == {"dapo", "pgpo"} and all(v > 0 for v in record["step_s"].values())
  assert record["mfu"] is None and record["peak_tflops_per_s"] is None  # a CPU has no entry in the peak table
  assert record["peak_memory_gib"] is None or record["peak_memory_gib"] > 0
