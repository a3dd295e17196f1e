"""Sharding tables on one device: mesh sizes, specs derived by hand from the logical-axis table, fallbacks, the
whole-state mirror of parameter shardings in the optimizer state, and batch specs read from shape suffixes.

The same functions on 8 simulated devices are checked in test_sharding_multidevice.py.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxvg.core import sharding
from jaxvg.core.sharding import AxisRules, MeshConfig, partition_spec
from jaxvg.models import layers, Qwen25VL, tiny
from jaxvg.rl import optim, update


@pytest.mark.parametrize("cfg,devices,want", [
    (MeshConfig(data=1, fsdp=-1, tensor=1), 8, (1, 8, 1)),
    (MeshConfig(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (MeshConfig(data=-1, fsdp=2, tensor=1), 8, (4, 2, 1)),
    (MeshConfig(data=1, fsdp=4, tensor=2), 8, (1, 4, 2)),
    (MeshConfig(), 1, (1, 1, 1)),
])
def test_mesh_shape_resolves_the_remaining_devices(cfg, devices, want):
  assert sharding.mesh_shape(cfg, devices) == want


@pytest.mark.parametrize("cfg,match", [
    (MeshConfig(data=-1, fsdp=-1, tensor=1), "at most one axis"),
    (MeshConfig(data=0, fsdp=-1, tensor=1), "mesh.data=0"),
    (MeshConfig(data=3, fsdp=-1, tensor=1), "does not divide"),
    (MeshConfig(data=2, fsdp=2, tensor=1), "has 4 devices, not 8"),
    (MeshConfig(data=1, fsdp=-2, tensor=1), "mesh.fsdp=-2"),
])
def test_mesh_shape_errors_name_the_problem(cfg, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(cfg, 8)


def test_make_mesh_has_the_three_auto_axes():
  mesh = sharding.make_mesh(MeshConfig())
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


# Qwen2.5-VL 3B shapes: D=2048, N=16, K=2, H=128, F=11008, V=151936, L=36.
SIZES = {"data": 1, "fsdp": 4, "tensor": 4}


@pytest.mark.parametrize("name,axes,shape,want", [
    # embed -> fsdp, heads -> tensor, layers and head_dim replicated.
    ("decoder/q_LDNH", ("layers", "embed", "heads", "head_dim"), (36, 2048, 16, 128), P(None, "fsdp", "tensor", None)),
    # 2 kv heads do not split 4 ways: replicated along that dimension only.
    ("decoder/k_LDKH", ("layers", "embed", "kv_heads", "head_dim"), (36, 2048, 2, 128), P(None, "fsdp", None, None)),
    ("decoder/embed_VD", ("vocab", "embed"), (151936, 2048), P("tensor", "fsdp")),
    ("decoder/down_LFD", ("layers", "mlp", "embed"), (36, 11008, 2048), P(None, "tensor", "fsdp")),
    ("decoder/final_norm_D", ("embed",), (2048,), P("fsdp")),
    ("decoder/q_bias_LNH", ("layers", "heads", "head_dim"), (36, 16, 128), P(None, "tensor", None)),
    # Merger: fc1 columns over fsdp, fc2 rows over tensor (5120 = 4 * 1280).
    ("vision/merger_fc1_MM", ("vision_merge", "vision_merge_out"), (5120, 5120), P("tensor", "fsdp")),
    ("vision/merger_fc2_MD", ("vision_merge", "embed"), (5120, 2048), P("tensor", "fsdp")),
    # 1176 = 3 * 2 * 14 * 14 pixels per patch: vision_patch is replicated by the table.
    ("vision/patch_XE", ("vision_patch", "vision_embed"), (1176, 1280), P(None, "fsdp")),
    # 3420 = 4 * 855 vision MLP columns split; 6 of them would not.
    ("vision/gate_LEF", ("layers", "vision_embed", "vision_mlp"), (32, 1280, 3420), P(None, "fsdp", "tensor")),
    ("vision/gate_LEF", ("layers", "vision_embed", "vision_mlp"), (32, 1282, 6), P(None, None, None)),
])
def test_partition_spec_follows_the_table_by_hand(name, axes, shape, want):
  assert partition_spec(name, axes, shape, SIZES) == want


def test_indivisible_dimension_is_replicated_and_logged(caplog):
  with caplog.at_level(logging.WARNING, logger="jaxvg"):
    spec = partition_spec("test/odd_VD", ("vocab", "embed"), (10, 6), {"data": 1, "fsdp": 4, "tensor": 4})
  assert spec == P(None, None)  # 10 % 4 and 6 % 4 are both nonzero
  assert "test/odd_VD dimension 0 replicated" in caplog.text and "size 10 is not divisible by tensor=4" in caplog.text
  assert "test/odd_VD dimension 1 replicated" in caplog.text


def test_a_mesh_axis_is_used_once_per_parameter(caplog):
  rules = AxisRules(mlp="fsdp")  # embed and mlp both on fsdp: the later dimension loses it
  with caplog.at_level(logging.WARNING, logger="jaxvg"):
    spec = partition_spec("test/up_LDF", ("layers", "embed", "mlp"), (2, 8, 16), SIZES, rules=rules)
  assert spec == P(None, "fsdp", None)
  assert "already split an earlier dimension" in caplog.text


def test_multi_axis_entries_need_the_product_to_divide():
  sizes = {"data": 2, "fsdp": 3, "tensor": 1}
  assert partition_spec("x_BT", ("batch", None), (12, 5), sizes) == P(("data", "fsdp"), None)
  assert partition_spec("x_BT", ("batch", None), (8, 5), sizes) == P(None, None)  # 8 % 6 != 0
  assert sharding.shard_count(P(("data", "fsdp"), None), sizes) == 6
  assert sharding.shard_count(P(None, "tensor"), {"tensor": 4}) == 4
  assert sharding.shard_count(P(), sizes) == 1


def test_overrides_take_the_first_matching_regex():
  overrides = ((r"vision/.*", P()), (r"decoder/embed_VD", P("fsdp")), (r".*_VD", P("tensor", "fsdp")))
  kw = dict(sizes=SIZES, overrides=overrides)
  assert partition_spec("vision/q_LENH", ("layers", "vision_embed", "vision_heads", "head_dim"),
                        (32, 1280, 16, 80), **kw) == P(None, None, None, None)
  assert partition_spec("decoder/embed_VD", ("vocab", "embed"), (151936, 2048), **kw) == P("fsdp", None)
  # Unmatched names use the table; partial specs are padded with None.
  assert partition_spec("decoder/o_LNHD", ("layers", "heads", "head_dim", "embed"), (36, 16, 128, 2048),
                        **kw) == P(None, "tensor", None, "fsdp")


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="a", logical_axes=("nope",), shape=(4,)), "unknown logical axis 'nope'"),
    (dict(name="a", logical_axes=("embed", "mlp"), shape=(4,)), "do not match its shape"),
    (dict(name="a", logical_axes=("embed",), shape=(4,), overrides=(("a", P(None, None)),)), "longer than its rank"),
    (dict(name="a", logical_axes=("embed",), shape=(4,), overrides=(("a", P("model")),)), "mesh axis 'model'"),
])
def test_bad_specs_raise_with_the_name(kwargs, match):
  with pytest.raises(ValueError, match=match):
    partition_spec(sizes=SIZES, **kwargs)


def _tiny_state(freeze_vision=False):
  cfg = tiny(vocab_size=64)
  make = lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0))
  tx = optim.make_optimizer(optim.OptimConfig(freeze_vision=freeze_vision),
                            nnx.state(nnx.eval_shape(make), nnx.Param))
  return cfg, make, tx


def _specs_by_name(tree):
  """{(path string): spec} of every sharding leaf."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[jax.tree_util.keystr(path)] = leaf.spec
  return out


def test_state_shardings_mirror_parameters_into_the_optimizer_state():
  _, make, tx = _tiny_state(freeze_vision=True)
  abstract = jax.eval_shape(lambda: update.init_state(make(), tx))
  mesh = sharding.make_mesh(MeshConfig())
  shardings = sharding.state_shardings(mesh, abstract, overrides=((r"vision/merger_.*", P()),))
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
  specs = _specs_by_name(shardings)
  q = P(None, "fsdp", "tensor", None)  # (layers, embed, heads, head_dim)
  mu = [k for k in specs if k.endswith(".mu['decoder']['q_LDNH'].value")]
  nu = [k for k in specs if k.endswith(".nu['decoder']['q_LDNH'].value")]
  assert specs[".params['decoder']['q_LDNH'].value"] == q and len(mu) == 1 and len(nu) == 1
  assert specs[mu[0]] == q and specs[nu[0]] == q
  # The override reaches the merger's parameters (the frozen tower keeps no Adam state).
  assert specs[".params['vision']['merger_fc1_MM'].value"] == P(None, None)
  assert not any("mu['vision']" in k for k in specs)
  # Scalars (the step counters, Adam's count) are replicated.
  assert specs[".step"] == P() and specs[".skipped"] == P()
  assert all(v == P() for k, v in specs.items() if k.endswith(".count"))


class Small(nnx.Module):
  """Two parameters with logical axes: enough to check the sharded init without compiling a whole model."""

  def __init__(self, rngs: nnx.Rngs):
    self.w_DF = layers.param(rngs, (8, 16), ("embed", "mlp"), jnp.float32)
    self.b_F = layers.param(rngs, (16,), ("mlp",), jnp.float32, "zeros")


def test_init_sharded_equals_the_unsharded_init():
  make = lambda: Small(nnx.Rngs(0))
  tx = optax.adam(1e-3)
  got = sharding.init_sharded(make, tx, sharding.make_mesh(MeshConfig()))
  want = update.init_state(make(), tx)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # jit fuses scale * normal: 1-ulp differences
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
  assert got.params["w_DF"][...].sharding.spec == P("fsdp", "tensor")
  assert got.opt_state[0].mu["w_DF"][...].sharding.spec == P("fsdp", "tensor")
  assert got.opt_state[0].count.sharding.spec == P()


def test_param_sharding_takes_shapes_from_the_model_config():
  cfg = tiny(vocab_size=64)
  shapes = sharding.param_shapes(cfg)
  assert shapes["decoder/q_LDNH"] == (2, 64, 4, 16) and shapes["vision/patch_XE"] == (1176, 32)
  fn = sharding.param_sharding(sharding.make_mesh(MeshConfig()), cfg)
  assert fn("decoder/gate_LDF", ("layers", "embed", "mlp")).spec == P(None, "fsdp", "tensor")
  assert fn("x", ("embed",), shape=(3,)).spec == P("fsdp")  # size-1 axes divide anything


def test_batch_shardings_read_the_shape_suffix():
  mesh = sharding.make_mesh(MeshConfig())
  batch = {"positions_3BT": jnp.zeros((3, 4, 5)), "tokens_NT": jnp.zeros((8, 5)), "pixel_values_PX": jnp.zeros((16, 6)),
           "weight": jnp.zeros(()), "lower_case": jnp.zeros((4,))}
  specs = {k: v.spec for k, v in sharding.batch_shardings(mesh, batch).items()}
  assert specs == {"positions_3BT": P(None, ("data", "fsdp")), "tokens_NT": P(("data", "fsdp")),
                   "pixel_values_PX": P(), "weight": P(), "lower_case": P()}
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
