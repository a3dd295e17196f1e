"""Sharding in one file: the mesh, a typed logical-axis table, regex overrides by parameter path.

Every parameter carries logical axis names, one per dimension (`q_LDNH`: layers, embed, heads, head_dim). The table
`AxisRules` maps each name to mesh axes; a first-match regex table over parameter paths ("decoder/q_LDNH") can
override the spec of whole parameters:

  mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
  model = load_hf_sharded(path, mesh)                                  # each device reads only its slice
  state = init_sharded(make_model, tx, mesh)                           # a TrainState born sharded
  shardings = state_shardings(mesh, jax.eval_shape(init_fn))           # for jit in/out_shardings, restore

A dimension whose size is not divisible by its mesh axes, or whose mesh axis an earlier dimension of the same
parameter already uses, is replicated instead (logged once per parameter and dimension). With the default table on
(data, fsdp, tensor) = (1, 8, 1) every matrix is split 8 ways along its model width; with tensor > 1, heads, MLP and
vocabulary columns are split Megatron-style, and Qwen's few kv heads (2 in 3B, 4 in 7B) fall back to replication
when the tensor axis does not divide them.

Shardings are computed from shapes only (`jax.eval_shape`), so full-size weights never exist on one device.
"""

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger("jaxvg")

MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; one of them may be -1 (all remaining devices)."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class AxisRules:
  """Logical dimension name -> mesh axes (a name, a tuple of names, or None for replicated)."""

  batch: MeshAxes = ("data", "fsdp")
  layers: MeshAxes = None
  embed: MeshAxes = "fsdp"
  heads: MeshAxes = "tensor"
  kv_heads: MeshAxes = "tensor"
  head_dim: MeshAxes = None
  mlp: MeshAxes = "tensor"
  vocab: MeshAxes = "tensor"
  vision_patch: MeshAxes = None
  vision_embed: MeshAxes = "fsdp"
  vision_heads: MeshAxes = "tensor"
  vision_mlp: MeshAxes = "tensor"
  # The merger is fc1 [M, M] -> gelu -> fc2 [M, D]: fc2's input (named vision_merge) is fc1's output, so fc1 is
  # split by columns over "fsdp" and fc2 by rows over "tensor", and no spec names one mesh axis twice.
  vision_merge: MeshAxes = "tensor"
  vision_merge_out: MeshAxes = "fsdp"

  def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
    """The mesh axes of one logical name, as a tuple (empty: replicated)."""
    if logical is None:
      return ()
    table = dataclasses.asdict(self)
    if logical not in table:
      raise ValueError(f"unknown logical axis {logical!r}; AxisRules knows {tuple(table)}")
    return _as_tuple(table[logical])


Overrides = tuple[tuple[str, P], ...]


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


# ------------------------------------------------------------------------------------------------------------ mesh


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with the -1 entry resolved; their product must be `num_devices`."""
  sizes = (cfg.data, cfg.fsdp, cfg.tensor)
  for name, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{name}={size}: sizes are positive, or -1 for the remaining devices")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices")
  shape = tuple(num_devices // known if s == -1 else s for s in sizes)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices, not {num_devices}")
  return shape


def initialize_distributed() -> bool:
  """Joins a multi-process run before JAX is used: `jax.distributed.initialize()` reads the coordinator from the
  environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or, on a TPU pod slice / SLURM, finds it
  itself (JAXVG_DISTRIBUTED=1). A single-host run sets neither and stays one process. Returns True when joined."""
  if "JAX_COORDINATOR_ADDRESS" not in os.environ and os.environ.get("JAXVG_DISTRIBUTED") != "1":
    return False
  env = {name: int(os.environ[var]) for name, var in (("num_processes", "JAX_NUM_PROCESSES"),
                                                       ("process_id", "JAX_PROCESS_ID")) if var in os.environ}
  jax.distributed.initialize(**env)  # JAX itself reads only the coordinator's address from the environment
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return True


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh with Auto axes (sharding propagation decides the activations')."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
  return dict(mesh.shape)


# ---------------------------------------------------------------------------------------------- specs from tables

_reported: set[tuple[str, int, str]] = set()


def _report(name: str, dim: int, why: str):
  if (name, dim, why) not in _reported:
    _reported.add((name, dim, why))
    log.warning("sharding: %s dimension %d replicated (%s)", name, dim, why)


def partition_spec(name: str, logical_axes, shape, sizes: Mapping[str, int], *, rules: AxisRules = AxisRules(),
                   overrides: Overrides = ()) -> P:
  """The PartitionSpec of one parameter: the first matching override, else the logical table, then the fallbacks.

  Args:
    name: the parameter path, "decoder/q_LDNH".
    logical_axes: one logical name per dimension (None entries are replicated).
    shape: the parameter's shape; None skips the divisibility check.
    sizes: mesh axis name -> size (a `Mesh.shape`, or a plain dict for planning without devices).
    rules: the logical-axis table.
    overrides: (regex over `name`, PartitionSpec) pairs, first full match wins.

  Example: ("layers", "embed", "kv_heads", "head_dim") of shape (36, 2048, 2, 128) on {fsdp: 4, tensor: 4} is
  P(None, "fsdp", None, None): 2 kv heads do not split 4 ways.
  """
  rank = len(logical_axes) if shape is None else len(shape)
  entries = None
  for pattern, spec in overrides:
    if re.fullmatch(pattern, name):
      if len(spec) > rank:
        raise ValueError(f"override {pattern!r} gives {name} the spec {spec}, longer than its rank {rank}")
      entries = [_as_tuple(a) for a in spec] + [()] * (rank - len(spec))
      break
  if entries is None:
    if logical_axes is None or len(logical_axes) != rank:
      raise ValueError(f"parameter {name}: logical axes {logical_axes} do not match its shape {shape}")
    entries = [rules.mesh_axes(a) for a in logical_axes]
  used, out = set(), []
  for dim, axes in enumerate(entries):
    for a in axes:
      if a not in sizes:
        raise ValueError(f"parameter {name}: mesh axis {a!r} is not in the mesh {dict(sizes)}")
    kept = tuple(a for a in axes if a not in used)
    if kept != axes:
      _report(name, dim, f"mesh axes {sorted(set(axes) - set(kept))} already split an earlier dimension")
    if shape is not None and kept and shape[dim] % math.prod(sizes[a] for a in kept):
      _report(name, dim, f"size {shape[dim]} is not divisible by {'x'.join(f'{a}={sizes[a]}' for a in kept)}")
      kept = ()
    used.update(kept)
    out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return P(*out)


def shard_count(spec: P, sizes: Mapping[str, int]) -> int:
  """How many distinct pieces a spec cuts an array into (the replication factor is the rest of the mesh)."""
  return math.prod(sizes[a] for entry in spec for a in _as_tuple(entry))


def param_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
  """{"decoder/q_LDNH": shape, ...} of a `Qwen25VL(model_cfg)`, from `nnx.eval_shape` (nothing allocated)."""
  from jaxvg.models import Qwen25VL
  abstract = nnx.eval_shape(lambda: Qwen25VL(model_cfg, rngs=nnx.Rngs(0)))
  return {"/".join(str(k) for k in path): tuple(v.get_value().shape)
          for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def param_sharding(mesh: Mesh, model_cfg=None, *, rules: AxisRules = AxisRules(),
                   overrides: Overrides = ()) -> Callable[..., NamedSharding]:
  """`fn(param_name, logical_axes, shape=None) -> NamedSharding`, the placement `jaxvg.models.load_hf` takes.

  The divisibility fallback needs shapes: from the `shape` argument, else from `model_cfg` (a ModelConfig). Without
  either the table's spec is used as is (`load_hf_sharded` reads the checkpoint's config for you).
  """
  shapes = param_shapes(model_cfg) if model_cfg is not None else {}
  sizes = mesh_sizes(mesh)

  def fn(name: str, logical_axes, shape=None) -> NamedSharding:
    shape = shape if shape is not None else shapes.get(name)
    return NamedSharding(mesh, partition_spec(name, logical_axes, shape, sizes, rules=rules, overrides=overrides))

  return fn


def load_hf_sharded(path: str, mesh: Mesh, *, rules: AxisRules = AxisRules(), overrides: Overrides = (), **kwargs):
  """`load_hf(path, sharding=param_sharding(mesh, <the checkpoint's ModelConfig>), **kwargs)`."""
  from jaxvg.models import load_hf, ModelConfig
  with open(os.path.join(path, "config.json")) as f:
    model_cfg = ModelConfig.from_hf(json.load(f))
  return load_hf(path, sharding=param_sharding(mesh, model_cfg, rules=rules, overrides=overrides), **kwargs)


# -------------------------------------------------------------------------------------------- whole-state shardings


def _keys(path) -> list[str]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
  return out


def _name_of(path, names: set[str]) -> str:
  """The parameter name a state leaf mirrors: the longest suffix of its path that names a parameter."""
  keys = _keys(path)
  for i in range(len(keys)):
    candidate = "/".join(keys[i:])
    if candidate in names:
      return candidate
  return "/".join(keys)


def state_shardings(mesh: Mesh, abstract_state, *, rules: AxisRules = AxisRules(), overrides: Overrides = ()):
  """NamedShardings for a whole (abstract) state: a TrainState, or a parameter tree alone.

  Parameters and every optimizer-state copy of a parameter (Adam's mu and nu keep the nnx.Param wrapper and its
  logical axes) get the parameter's sharding; scalars and any other leaf (step counts) are replicated. The result
  has the structure of `abstract_state`, ready for `jax.jit(..., out_shardings=...)`.
  """
  sizes = mesh_sizes(mesh)
  params = abstract_state.params if hasattr(abstract_state, "params") else abstract_state
  is_var = lambda x: isinstance(x, nnx.Variable)
  names = {"/".join(_keys(p)) for p, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_var)[0]}
  replicated = NamedSharding(mesh, P())

  def place(path, leaf):
    if not is_var(leaf):
      return replicated
    value = leaf.get_value()
    if not hasattr(value, "shape"):  # an optax MaskedNode (a frozen parameter's empty state)
      return leaf
    name = _name_of(path, names)
    logical = leaf.get_metadata().get("logical_axes")
    if logical is None or len(logical) != len(value.shape):
      _report(name, -1, f"no logical axes for shape {value.shape}")
      return leaf.replace(replicated)
    spec = partition_spec(name, logical, value.shape, sizes, rules=rules, overrides=overrides)
    return leaf.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(place, abstract_state, is_leaf=is_var)


def with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs carrying `shardings`: the target of a sharded checkpoint restore."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def init_sharded(make_model: Callable[[], nnx.Module], tx, mesh: Mesh, *, rules: AxisRules = AxisRules(),
                 overrides: Overrides = ()):
  """A TrainState (model + optimizer state) created directly in its shards by one jitted init.

  `make_model()` builds the module (e.g. `lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0))`); its shapes come from
  `jax.eval_shape`, and each device computes only its own slices of the random weights.
  """
  from jaxvg.rl import update

  def init():
    return update.init_state(make_model(), tx)

  shardings = state_shardings(mesh, jax.eval_shape(init), rules=rules, overrides=overrides)
  return jax.jit(init, out_shardings=shardings)()


# ---------------------------------------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh, *, rules: AxisRules = AxisRules()) -> NamedSharding:
  """Arrays with the batch as their leading dimension: split over the batch axes ("data", "fsdp")."""
  return NamedSharding(mesh, P(rules.mesh_axes("batch")))


def batch_shardings(mesh: Mesh, batch, *, letters: str = "BN", rules: AxisRules = AxisRules()):
  """Shardings for a batch pytree, read from its field names' shape suffixes.

  A leaf named `x_<SUFFIX>` is split over the batch axes along the first dimension whose letter is in `letters`
  (B prompts, N = B * G completions): `positions_3BT` along dimension 1, `tokens_NT` along 0. Leaves without such
  a letter (`pixel_values_PX`, the flattened patches of all images; scalar weights) and batch dimensions the batch
  axes do not divide are replicated.
  """
  axes = rules.mesh_axes("batch")
  count = math.prod(mesh.shape[a] for a in axes)

  def place(path, leaf):
    keys = _keys(path)
    suffix = keys[-1].rsplit("_", 1)[-1] if keys and "_" in keys[-1] else ""
    shape = jnp.shape(leaf)
    if len(suffix) == len(shape) and suffix.isalnum() and not suffix.islower():
      for dim, letter in enumerate(suffix):
        if letter in letters:
          if shape[dim] % count == 0:
            return NamedSharding(mesh, P(*([None] * dim), axes))
          _report(keys[-1], dim, f"batch size {shape[dim]} is not divisible by {count} batch shards")
          break
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(place, batch)
