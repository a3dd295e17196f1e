"""Sharding on 8 simulated CPU devices, a (data, fsdp, tensor) = (2, 2, 2) mesh:

- one policy update on the mesh gives the parameters of the same update on one device;
- each device holds only its pieces of the parameters and of Adam's moments (bytes read from addressable_shards,
  equal to the memory plan's count, and the pieces tile each array exactly once);
- `init_sharded` creates a state whose pieces are born on their devices;
- `load_hf` with the sharding tables equals the single-device load;
- a checkpoint saved from one device restores sharded on 8, and back;
- two processes on localhost (jax.distributed, 4 CPU devices each) form one 8-device mesh: sharded init, a step on
  a batch assembled from each host's rows, a checkpoint with each host's data iterator state, a stop request seen
  by both.

The checks run in their own processes: XLA_FLAGS must be set before JAX starts.
"""

import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
G = 2


def test_sharded_update_load_and_restore_on_8_devices(tmp_path):
  # Cheaper CPU code generation: the two compiled update steps dominate the run time, not their speed.
  flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 " \
          "--xla_llvm_disable_expensive_passes=true"
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for line in ("update equal on 1 and 8 devices", "bytes per device match the plan", "init born sharded",
               "load_hf equal on 1 and 8 devices", "checkpoint restored across meshes"):
    assert line in proc.stdout, proc.stdout[-3000:]


def test_two_processes_share_one_mesh(tmp_path):
  with socket.socket() as sock:  # a free port for the coordinator
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
  procs = [subprocess.Popen([sys.executable, __file__, "--host", str(i), str(port), str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=300)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out[-3000:]
    assert f"process {i} of 2: multi-host checks passed" in out, out[-3000:]


def host_main(index: int, port: int, tmp: str):
  """One of two processes: 4 local CPU devices each, 8 in the global mesh."""
  import jax
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=index)
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from jax.experimental import multihost_utils
  from jax.sharding import PartitionSpec as P

  from jaxvg.core import sharding
  from jaxvg.models import layers
  from jaxvg.rl import update
  from jaxvg.run import checkpoint

  jax.config.update("jax_default_matmul_precision", "highest")
  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=-1, tensor=1))
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))

  class Small(nnx.Module):
    def __init__(self, rngs):
      self.w_DF = layers.param(rngs, (8, 16), ("embed", "mlp"), jnp.float32)
      self.up_LDF = layers.param(rngs, (2, 8, 16), ("layers", "embed", "mlp"), jnp.float32)

  tx = optax.sgd(0.5)
  state = sharding.init_sharded(lambda: Small(nnx.Rngs(0)), tx, mesh)
  ref = update.init_state(Small(nnx.Rngs(0)), tx)  # this process's local, unsharded copy
  w = state.params["w_DF"][...]
  assert w.sharding.spec == P("fsdp", "tensor") and len(w.addressable_shards) == 4  # tensor has size 1
  assert all(s.data.shape == (2, 16) for s in w.addressable_shards)
  np.testing.assert_allclose(gather(w), np.asarray(ref.params["w_DF"][...]), rtol=1e-6, atol=1e-9)

  # A global batch of 8 rows from two hosts' 4 rows each, as a grain pipeline sharded by process_index gives them.
  rows = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
  x_BD = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), rows[4 * index:4 * index + 4])
  assert x_BD.shape == (8, 8)

  def loss_fn(params, x_BD):
    h_BF = x_BD @ params["w_DF"][...]
    return jnp.mean(h_BF**2) + jnp.mean(params["up_LDF"][...]**2)

  def step(st, x_BD):
    grads = jax.grad(loss_fn)(st.params, x_BD)
    updates, opt_state = tx.update(grads, st.opt_state, st.params)
    return st.replace(params=optax.apply_updates(st.params, updates), opt_state=opt_state, step=st.step + 1)

  shardings = sharding.state_shardings(mesh, jax.eval_shape(lambda: state))
  new = jax.jit(step, out_shardings=shardings)(state, x_BD)
  want = step(ref, jnp.asarray(rows))
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(gather(a), np.asarray(b), atol=1e-6)

  ckpt = checkpoint.Checkpointer(os.path.join(tmp, "ckpt"))
  ckpt.save(1, new, rng=jax.random.key(3), data_state={"host": index, "next": 10 + index})
  ckpt.wait()
  abstract = jax.eval_shape(lambda: new)
  restored = ckpt.restore(None, sharding.with_shardings(abstract, shardings))
  assert restored.step == 1 and restored.data_state == {"host": index, "next": 10 + index}, restored.data_state
  for a, b in zip(jax.tree.leaves(restored.state.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(gather(a), np.asarray(b), atol=1e-6)
  ckpt.close()

  flag = checkpoint.StopFlag()
  assert not checkpoint.should_stop(flag)
  flag.requested = index == 1  # only one host received SIGTERM
  assert checkpoint.should_stop(flag)
  print(f"process {index} of 2: multi-host checks passed")


def pieces_tile(arr):
  """The distinct pieces of a sharded array cover it exactly once, and each piece holds its slice's values."""
  import numpy as np
  full = np.asarray(arr)
  distinct = {}
  for shard in arr.addressable_shards:
    key = tuple((s.start, s.stop) for s in shard.index)
    np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
    distinct[key] = shard.data.size
  return sum(distinct.values()) == full.size


def bytes_per_device(tree):
  """{device: bytes of the pieces it holds} over every array leaf with at least one dimension."""
  import jax
  out = {}
  for leaf in jax.tree.leaves(tree):
    if leaf.ndim == 0:
      continue
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def main(tmp):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from jaxvg import memory_plan
  from jaxvg.core import sharding
  from jaxvg.models import layers, load_hf, Qwen25VL, tiny
  from jaxvg.rl import losses, optim, scoring, update
  from jaxvg.run import checkpoint
  from model_inputs import images_to_pixels, left_padded_prompts
  from test_rollout import unit_scale

  jax.config.update("jax_default_matmul_precision", "highest")
  assert jax.device_count() == 8, jax.devices()
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))

  # ---------------------------------------------------------------- one update on 1 and on 8 devices
  cfg = tiny(vocab_size=64)
  model = unit_scale(nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0))), seed=1)
  # eps = 1e-2: Adam's first step is lr * g / (|g| + eps), so gradients that differ by float rounding cannot flip a
  # near-zero component's update by 2 * lr.
  tx = optim.make_optimizer(optim.OptimConfig(lr=1e-2, eps=1e-2, merger_lr_mult=2.0), nnx.state(model, nnx.Param))
  state1 = update.init_state(model, tx)

  pixels, grid = images_to_pixels([(56, 56)] * 4, seed=2)
  ids, mask, mm = left_padded_prompts(cfg, [1, 1, 1, 1], grid, seed=2)
  prompt = scoring.prompt_inputs(cfg, input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, pixel_values=pixels,
                                 image_grid_thw=grid)
  rng = np.random.default_rng(3)
  N, T = 4 * G, 6
  tokens = jnp.asarray(rng.integers(1, 50, (N, T)), jnp.int32)
  resp = jnp.asarray((np.arange(T)[None] < rng.integers(2, T + 1, N)[:, None]).astype(np.int32))
  adv = jnp.asarray(rng.normal(size=(N, 1)) * np.ones((1, T)), jnp.float32) * resp
  # A uniform old policy and (almost) no clipping: every token contributes -A * ratio to the surrogate.
  batch = update.PolicyBatch(prompt, tokens, resp, jnp.full((N, T), -np.log(64.0), jnp.float32), adv,
                             jnp.zeros((N, T)), jnp.asarray(1.0))
  loss_cfg = losses.preset("grpo", clip_low=0.999, clip_high=1e9)
  step = lambda s, m: update.policy_step(s, m, tx=tx, group_size=G, loss_cfg=loss_cfg)

  new1, metrics1 = jax.jit(step)(state1, (batch,))

  shardings = sharding.state_shardings(mesh, jax.eval_shape(lambda: state1))
  in_batch = sharding.batch_shardings(mesh, (batch,))
  assert in_batch[0].tokens_NT.spec == P(("data", "fsdp"))  # 8 completions over 4 batch shards
  assert in_batch[0].prompt.positions_3BT.spec == P(None, ("data", "fsdp"))
  state8 = jax.device_put(state1, shardings)
  step8 = jax.jit(step, in_shardings=(shardings, in_batch), out_shardings=(shardings, NamedSharding(mesh, P())))
  new8, metrics8 = step8(state8, jax.device_put((batch,), in_batch))

  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(new1.params), jax.tree.leaves(state1.params)))
  assert moved > 5e-3, moved  # the update is not a no-op
  for a, b in zip(jax.tree.leaves(new8), jax.tree.leaves(new1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
  np.testing.assert_allclose(float(metrics8["grad_norm"]), float(metrics1["grad_norm"]), rtol=1e-5)
  q = new8.params["decoder"]["q_LDNH"][...]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None), q.sharding
  print("update equal on 1 and 8 devices")

  # ---------------------------------------------------------------- bytes per device
  total_param_bytes = sum(x.nbytes for x in jax.tree.leaves(new8.params))
  params_dev = bytes_per_device(new8.params)
  moments_dev = bytes_per_device(new8.opt_state)
  planned = memory_plan.param_elements_per_device(cfg, (2, 2, 2)) * 4
  assert len(params_dev) == 8 and set(params_dev.values()) == {planned}, (params_dev, planned)
  # AdamW keeps mu and nu (float32) of every trainable parameter: twice the parameters, split the same way.
  assert set(moments_dev.values()) == {2 * planned}, moments_dev
  # Under the default table every tiny parameter has a dimension split on this mesh: at most half of it per device.
  assert planned <= total_param_bytes // 2, (planned, total_param_bytes)
  for leaf in jax.tree.leaves(new8.params):
    assert all(2 * s.data.size <= leaf.size for s in leaf.addressable_shards), leaf.sharding
  for leaf in jax.tree.leaves((new8.params, new8.opt_state)):
    if leaf.ndim:
      assert pieces_tile(leaf)
  print("bytes per device match the plan")

  # ---------------------------------------------------------------- init_sharded on the mesh
  class Small(nnx.Module):
    def __init__(self, rngs):
      self.w_DF = layers.param(rngs, (8, 16), ("embed", "mlp"), jnp.float32)
      self.up_LDF = layers.param(rngs, (2, 8, 16), ("layers", "embed", "mlp"), jnp.float32)

  small = sharding.init_sharded(lambda: Small(nnx.Rngs(0)), optax.adam(1e-3), mesh)
  ref = update.init_state(Small(nnx.Rngs(0)), optax.adam(1e-3))
  for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
  w = small.params["w_DF"][...]
  assert w.sharding.spec == P("fsdp", "tensor") and all(s.data.shape == (4, 8) for s in w.addressable_shards)
  # 8 * 16 + 2 * 8 * 16 float32 values in 4 pieces: 96 bytes + 192 bytes per device, for params and mu and nu each.
  assert set(bytes_per_device(small.params).values()) == {(8 * 16 + 2 * 8 * 16) * 4 // 4}
  assert set(bytes_per_device(small.opt_state).values()) == {2 * (8 * 16 + 2 * 8 * 16) * 4 // 4}
  print("init born sharded")

  # ---------------------------------------------------------------- load_hf onto the mesh
  from hf_fixtures import make_tiny_hf_checkpoint
  path = make_tiny_hf_checkpoint(os.path.join(tmp, "hf"), tie=False, kv_heads=2)
  one = nnx.state(load_hf(path), nnx.Param)
  many = nnx.state(sharding.load_hf_sharded(path, mesh), nnx.Param)
  for (p1, a), (p8, b) in zip(nnx.to_flat_state(one), nnx.to_flat_state(many)):
    assert p1 == p8
    np.testing.assert_array_equal(np.asarray(b.get_value()), np.asarray(a.get_value()))
    assert len(b.get_value().sharding.device_set) == 8
  assert many["decoder"]["head_DV"][...].sharding.spec == P("fsdp", "tensor")
  assert many["decoder"]["k_LDKH"][...].sharding.spec == P(None, "fsdp", "tensor", None)
  print("load_hf equal on 1 and 8 devices")

  # ---------------------------------------------------------------- checkpoint: 1 device -> 8 devices -> 1 device
  ckpt = checkpoint.Checkpointer(os.path.join(tmp, "ckpt"))
  ckpt.save(1, new1, rng=jax.random.key(5), data_state={"parent": {"next_index": 9}})
  ckpt.wait()
  abstract = jax.eval_shape(lambda: new1)
  restored = ckpt.restore(None, sharding.with_shardings(abstract, shardings))
  assert restored.step == 1 and restored.data_state == {"parent": {"next_index": 9}}
  for a, b, s in zip(jax.tree.leaves(restored.state), jax.tree.leaves(new1), jax.tree.leaves(shardings)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == s, (a.sharding, s)
  ckpt.save(2, restored.state)
  ckpt.wait()
  single = jax.sharding.SingleDeviceSharding(jax.devices()[3])
  back = ckpt.restore(2, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single), abstract))
  for a, b in zip(jax.tree.leaves(back.state), jax.tree.leaves(new1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == single
  ckpt.close()
  print("checkpoint restored across meshes")


if __name__ == "__main__":
  if sys.argv[1] == "--host":
    host_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  else:
    main(sys.argv[1])
