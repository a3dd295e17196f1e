"""The training script on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 simulated CPU devices: the same rollouts, rewards
and first update as on one device (the stages are jitted with the state's shardings, batches split over data x fsdp).
Each run is its own process: the device count is fixed when JAX starts."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = ["--set", "train.steps=2", "--set", "sft.steps=2",
        "--set", "sft.perception_steps=2", "--set", "sft.batch_size=2", "--set", "sft_optim.total_steps=2",
        "--set", "data.prompts_per_batch=4", "--set", "data.num_eval=4", "--set", "rollout.group_size=2",
        "--set", "rollout.max_new_tokens=8", "--set", "algo.dynamic_sampling=false", "--set", "model.tiny_width=32",
        "--set", "model.tiny_layers=1", "--set", "model.tiny_vision_width=32", "--set", "model.tiny_heads=2",
        "--set", "credit.method=pgpo"]


def _run(out_dir, devices: int, mesh: tuple[int, int, int]) -> list[dict]:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  code = ("import sys, jax; jax.config.update('jax_default_matmul_precision', 'highest'); "
          "from jaxvg import train; train.main(sys.argv[1:])")
  sets = [f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}", f"train.out_dir={out_dir}"]
  cmd = [sys.executable, "-c", code, "--config", os.path.join(ROOT, "configs", "demo.py"), *TINY]
  for s in sets:
    cmd += ["--set", s]
  proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"over {devices} devices" in proc.stdout + proc.stderr
  with open(os.path.join(out_dir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["step"] >= 0 and "reward/overall" in r]


@pytest.mark.slow
def test_train_on_a_2x2x2_mesh_matches_one_device(tmp_path):
  one = _run(tmp_path / "one", 1, (1, 1, 1))
  eight = _run(tmp_path / "eight", 8, (2, 2, 2))
  assert [r["step"] for r in one] == [r["step"] for r in eight] == [0, 1]
  # Step 0: identical rollouts and rewards (the sampler draws per global row), and the same update from the same
  # weights: its loss, dependency statistics and gradient norm agree to float32 reduction-order noise.
  a, b = one[0], eight[0]
  assert a["reward/overall"] == b["reward/overall"] and a["response_length"] == b["response_length"]
  for key in ("loss", "pg_loss", "grad_norm", "dependency/mean"):
    assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])
