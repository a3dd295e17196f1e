"""Rollouts on 8 simulated CPU devices equal rollouts on one: the batch is sharded over the mesh's data axes and
every sequence draws from fold_in(key, global row index), so sharding changes neither tokens nor log-probs.

The check runs in its own process: XLA_FLAGS must be set before JAX starts.
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_same_rollouts_on_1_and_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "rollouts equal on 1 and 8 devices" in proc.stdout


def main():
  import jax
  import numpy as np
  import pytest
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  import jaxvg.models as M
  from jaxvg.rl import rollout as R
  from test_rollout import make_prompts, unit_scale, vision_inputs

  jax.config.update("jax_default_matmul_precision", "highest")
  assert jax.device_count() == 8, jax.devices()
  cfg = M.tiny()
  model = unit_scale(nnx.eval_shape(lambda: M.Qwen25VL(cfg, rngs=nnx.Rngs(0))), seed=1)
  graphdef, params = nnx.split(model)
  rows = [[3, (4, 4), 2], [5], [2, (4, 8), 1], [7], [1], [4, (4, 4)], [6], [2, 3]]
  ids, mask, types, pixels, grid = make_prompts(cfg, rows, seed=3)
  positions, deltas = M.mrope_positions(ids, types, grid, mask)
  prompts = dict(input_ids_BT=ids, attention_mask_BT=mask, positions_3BT=positions, deltas_B=deltas,
                 vision=vision_inputs(cfg, pixels, grid))
  config = R.SamplingConfig(num_samples=2, max_new_tokens=6, temperature=1.0, top_p=0.95,
                            stop_token_ids=tuple(range(100, 164)))
  key = jax.random.key(7)

  one = jax.device_get(R.rollout(graphdef, params, **prompts, key=key, config=config))
  assert one.finished_B.any() and not one.finished_B.all()

  auto = jax.sharding.AxisType.Auto
  for shape, axes, data_axes in [((8,), ("data",), ("data",)), ((2, 4), ("replica", "data"), ("replica", "data"))]:
    mesh = jax.make_mesh(shape, axes, axis_types=(auto,) * len(axes))
    replicated = jax.device_put(params, NamedSharding(mesh, P()))  # weights replicated
    out = R.rollout(graphdef, replicated, **prompts, key=key, config=config, mesh=mesh, data_axes=data_axes)
    shards = out.tokens_BT.addressable_shards
    assert len({s.device for s in shards}) == 8 and all(s.data.shape == (2, 6) for s in shards), \
        [(s.device, s.data.shape) for s in shards]
    out = jax.device_get(out)
    for name in ("tokens_BT", "mask_BT", "prompt_index_B", "lengths_B", "finished_B", "steps"):
      np.testing.assert_array_equal(getattr(out, name), getattr(one, name), err_msg=f"{name} on mesh {shape}")
    np.testing.assert_allclose(out.logp_BT, one.logp_BT, atol=1e-5)
    np.testing.assert_allclose(out.sample_logp_BT, one.sample_logp_BT, atol=1e-5)

  mesh = jax.make_mesh((8,), ("data",), axis_types=(auto,))
  small = dict(prompts, input_ids_BT=ids[:6], attention_mask_BT=mask[:6], positions_3BT=positions[:, :6],
               deltas_B=deltas[:6])  # 6 prompts do not split over 8 shards
  with pytest.raises(ValueError, match="multiple of the 8 shards"):
    R.rollout(graphdef, params, **small, key=key, config=config, mesh=mesh)
  print("rollouts equal on 1 and 8 devices")


if __name__ == "__main__":
  main()
