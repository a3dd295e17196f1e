"""Parameter checkpoints with orbax (the full training-state manager with resume is built on the same calls)."""

import os

import jax
import orbax.checkpoint as ocp


def save_params(path: str, graphdef, params):
  """Writes the parameter pytree to `path` (a directory), replacing an older copy."""
  del graphdef
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=True)


def restore_params(path: str, like):
  """Reads parameters saved by `save_params`, with the structure, shapes and shardings of `like`."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no parameter checkpoint at {path}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, abstract)
