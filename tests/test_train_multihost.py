"""The training script as two processes on localhost (jax.distributed, 2 CPU devices each, one (data 2, fsdp 2) mesh
across them) against one process holding all 4 devices: the same batches, rollouts, rewards, losses and final weights.

Each host reads its own shard of the data and the hosts exchange the processed records (jaxvg.core.hosts), so both runs
see the same global batches; the sampler draws per global row, so both sample the same completions. Every run is
its own process: the device count and the distributed client are fixed when JAX starts.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = ["train.steps=2", "sft.steps=2", "sft.perception_steps=2", "sft.batch_size=4", "sft_optim.total_steps=2",
        "data.prompts_per_batch=4", "data.num_eval=4",
        "rollout.group_size=2", "rollout.max_new_tokens=8", "algo.dynamic_sampling=false", "model.tiny_width=32",
        "model.tiny_layers=1", "model.tiny_vision_width=32", "model.tiny_heads=2", "credit.method=pgpo",
        # A gradient at step 0 even when every reward is equal (the tiny untrained policy scores 0 everywhere).
        "algo.entropy_coef=0.01", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1"]
CODE = ("import sys, jax; jax.config.update('jax_default_matmul_precision', 'highest'); "
        "from jaxvg import train; train.main(sys.argv[1:])")


def _command(out_dir) -> list[str]:
  cmd = [sys.executable, "-c", CODE, "--config", os.path.join(ROOT, "configs", "demo.py")]
  for s in [*TINY, f"train.out_dir={out_dir}"]:
    cmd += ["--set", s]
  return cmd


def _env(devices: int, **extra) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
              **extra)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _read(out_dir) -> tuple[list[dict], list[dict]]:
  with open(os.path.join(out_dir, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if r["step"] >= 0 and "reward/overall" in r]
  with open(os.path.join(out_dir, "samples.jsonl")) as f:
    samples = [json.loads(line) for line in f]
  return rows, samples


def _final_params(out_dir):
  from jaxvg import analysis
  import jax
  return jax.tree.leaves(jax.device_get(analysis.load_policy(run_dir=str(out_dir), params="final").params))


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  one_dir, two_dir = tmp_path / "one", tmp_path / "two"
  one = subprocess.run(_command(one_dir), env=_env(4), cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert one.returncode == 0, one.stderr[-4000:]

  port = _free_port()
  procs = [subprocess.Popen(_command(two_dir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                     JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
    assert "process %d of 2, 2 local / 4 global devices" % i in out, out[-2000:]
    assert "over 4 devices" in out

  (rows1, samples1), (rows2, samples2) = _read(one_dir), _read(two_dir)
  assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [0, 1]
  # The same prompts in the same order, the same completions and rewards (only process 0 wrote rows: no doubles).
  assert [(s["prompt_id"], s["completion"], s["overall"]) for s in samples1] == \
         [(s["prompt_id"], s["completion"], s["overall"]) for s in samples2]
  for a, b in zip(rows1, rows2):
    assert a["reward/overall"] == b["reward/overall"] and a["response_length"] == b["response_length"]
    for key in ("loss", "pg_loss", "grad_norm", "dependency/mean", "adv/std"):
      assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
  assert rows1[0]["grad_norm"] > 0  # the comparison is of a real update
  # Both processes wrote the one checkpoint together; the final weights equal the one-process run's.
  p1, p2 = _final_params(one_dir), _final_params(two_dir)
  assert len(p1) == len(p2)
  assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(p1, p2)) <= 1e-5
