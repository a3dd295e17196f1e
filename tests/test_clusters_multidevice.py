"""Otsu and segment normalization on arrays sharded over 8 CPU devices equal the single-device results.

The check runs in its own process: XLA_FLAGS must hold the device count before JAX starts.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json
import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxvg.credit import clusters

assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
sharded = NamedSharding(mesh, P("data"))
one_device = jax.devices()[0]


@jax.jit
def stage(values_M, valid_M, scores_M):
  threshold, labels_M = clusters.otsu_threshold(values_M, valid_M)
  minmax_M = clusters.segment_normalize(scores_M, labels_M, valid_M, 2, mode="minmax")
  zscore_M = clusters.segment_normalize(scores_M, labels_M, valid_M, 2, mode="zscore")
  return threshold, labels_M, minmax_M, zscore_M


results = []
for seed, m in [(0, 64), (1, 128), (2, 64), (3, 256)]:
  rng = np.random.default_rng(seed)
  n_vis = m // 4
  values = np.concatenate([rng.normal(3.0, 0.5, n_vis), rng.normal(0.0, 0.7, m - n_vis)]).astype(np.float32)
  values = values[rng.permutation(m)]  # spread the visual steps over all shards
  valid = rng.random(m) < 0.8
  scores = rng.normal(0.0, 2.0, m).astype(np.float32)
  host = (values, valid, scores)
  single = stage(*[jax.device_put(x, one_device) for x in host])
  inputs = [jax.device_put(x, sharded) for x in host]
  assert all(len(x.sharding.device_set) == 8 for x in inputs)
  multi = stage(*inputs)
  hlo = stage.lower(*inputs).compile().as_text()
  collectives = sorted({op for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
                        if op in hlo})
  results.append({
      "seed": seed,
      "input_devices": len(inputs[0].sharding.device_set),
      "collectives": collectives,
      "single": [np.asarray(x).tolist() for x in single],
      "multi": [np.asarray(x).tolist() for x in multi],
      "values": values.tolist(),
      "valid": valid.tolist(),
  })
print("RESULT" + json.dumps(results))
"""


def test_sharded_equals_single_device():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  results = json.loads(line[len("RESULT"):])
  assert len(results) == 4
  for r in results:
    assert r["input_devices"] == 8
    # XLA had to communicate across devices: the sort and the segment reductions see the global array.
    assert r["collectives"], f"seed {r['seed']}: no cross-device collective in the compiled program"
    thr_s, labels_s, minmax_s, zscore_s = r["single"]
    thr_m, labels_m, minmax_m, zscore_m = r["multi"]
    assert thr_s == thr_m, f"seed {r['seed']}"
    np.testing.assert_array_equal(labels_s, labels_m)
    np.testing.assert_allclose(minmax_m, minmax_s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(zscore_m, zscore_s, rtol=1e-5, atol=1e-5)
    # The split is the batch-global one: the visual cluster holds the high (about 3.0) mode, wherever its shard.
    values, valid = np.asarray(r["values"]), np.asarray(r["valid"])
    np.testing.assert_array_equal(np.asarray(labels_m), np.where(valid, (values >= thr_m).astype(int), -1))
    assert np.all(values[np.asarray(labels_m) == 1] > 1.2) and np.all(values[np.asarray(labels_m) == 0] < 2.0)
