"""Several processes (hosts), one program: host values in and out of global arrays, and host data exchanged.

A multi-host run is one SPMD program per process over a mesh that spans every process's devices. Each host reads its
own shard of the data; the training loop then keeps the *global* batch's host-side values (the prompt arrays, the
answers, the sampled token ids) identical on every host, so that every decision made on the host (rewards, dynamic
sampling, clustering, logging) is the same everywhere and every process issues the same collectives in the same
order. Three operations make that work, each the identity (or plain `jax.device_put` / `jax.device_get`) in a single
process:

  * `put(tree, shardings)`: host values that are the same on every host -> global arrays (each device keeps its slice);
  * `fetch(tree)`: global arrays -> numpy on every host (sharded arrays are gathered across processes);
  * `allgather_examples(examples)`: every host's processed records, the same lists on every host.

Records travel as bytes in a small self-describing format (a JSON header and the raw array buffers), never pickle.
"""

import dataclasses
import json

import jax
import numpy as np
from jax.experimental import multihost_utils


def multiprocess() -> bool:
  return jax.process_count() > 1


def put(tree, shardings):
  """`jax.device_put(tree, shardings)`, also across processes for host values every process holds identically.

  In a multi-process run a numpy (or host-local) leaf becomes a global array built from this host's copy: each
  device takes its slice of it. A leaf that is already a global array is resharded.
  """
  if not multiprocess():
    return jax.device_put(tree, shardings)

  def one(leaf, sharding):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return jax.device_put(leaf, sharding)
    value = np.asarray(leaf)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(one, tree, shardings)


def fetch(tree):
  """`jax.device_get(tree)` on every host: a leaf sharded across processes is gathered (a collective, so every
  process must fetch the same arrays in the same order)."""
  if not multiprocess():
    return jax.device_get(tree)

  def one(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return jax.device_get(leaf)

  return jax.tree.map(one, tree)


def to_numpy(x) -> np.ndarray:
  """`np.asarray(x)` that also works for a global array sharded across processes."""
  return np.asarray(fetch(x))


# ------------------------------------------------------------------------------------------------ record exchange


def allgather_bytes(data: bytes) -> list[bytes]:
  """Each process's `data` -> the list of all of them, in process order, on every process."""
  if not multiprocess():
    return [data]
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int64))).reshape(-1)
  buffer = np.zeros(int(sizes.max()) if sizes.size else 0, np.uint8)
  buffer[:len(data)] = np.frombuffer(data, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buffer)).reshape(len(sizes), -1)
  return [gathered[p, :n].tobytes() for p, n in enumerate(sizes)]


def _encode(value, arrays: list[np.ndarray]):
  """A JSON-able description of `value`, its numpy arrays appended to `arrays` (referenced by position)."""
  if isinstance(value, np.ndarray):
    arrays.append(np.ascontiguousarray(value))
    return {"__array__": len(arrays) - 1}
  if dataclasses.is_dataclass(value):
    return {"__dataclass__": type(value).__name__,
            "fields": {f.name: _encode(getattr(value, f.name), arrays) for f in dataclasses.fields(value)}}
  if isinstance(value, dict):
    return {"__dict__": {k: _encode(v, arrays) for k, v in value.items()}}
  if isinstance(value, (list, tuple)):
    return {"__list__": [_encode(v, arrays) for v in value]}
  if value is None or isinstance(value, (str, int, float, bool)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"cannot send a {type(value).__name__} between hosts")


def encode_examples(examples) -> bytes:
  """Processed records (`jaxvg.data.processing.Example`s) as bytes: a JSON header, then the arrays' buffers."""
  arrays = []
  tree = _encode(list(examples), arrays)
  header = {"tree": tree, "arrays": [[a.dtype.str, list(a.shape), a.nbytes] for a in arrays]}
  head = json.dumps(header).encode()
  return b"".join([len(head).to_bytes(8, "little"), head, *(a.tobytes() for a in arrays)])


def decode_examples(data: bytes) -> list:
  """The inverse of `encode_examples`."""
  from jaxvg.data import processing
  kinds = {"Example": processing.Example, "Prompt": processing.Prompt}
  size = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + size])
  arrays, offset = [], 8 + size
  for dtype, shape, nbytes in header["arrays"]:
    arrays.append(np.frombuffer(data, np.dtype(dtype), count=int(np.prod(shape)), offset=offset).reshape(shape))
    offset += nbytes

  def decode(node):
    if isinstance(node, dict):
      if "__array__" in node:
        return arrays[node["__array__"]]
      if "__dataclass__" in node:
        if node["__dataclass__"] not in kinds:
          raise ValueError(f"unknown record type {node['__dataclass__']!r} from another host")
        return kinds[node["__dataclass__"]](**{k: decode(v) for k, v in node["fields"].items()})
      if "__dict__" in node:
        return {k: decode(v) for k, v in node["__dict__"].items()}
      if "__list__" in node:
        return [decode(v) for v in node["__list__"]]
    return node

  return decode(header["tree"])


def allgather_examples(examples: list) -> list[list]:
  """This host's processed records -> every host's list of them, in process order (the same on every host)."""
  if not multiprocess():
    return [list(examples)]
  return [decode_examples(data) for data in allgather_bytes(encode_examples(examples))]
