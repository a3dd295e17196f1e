"""A minimal safetensors reader/writer on numpy memory maps (bfloat16 included, no float32 detour, never pickle).

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, raw bytes.
Reading maps the file and views each tensor in place, so a slice touches only the bytes it needs.
"""

import json
import os

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile:
  """Read-only view of one .safetensors file: `keys()`, `shape(key)`, `get(key)` (a memory-mapped array)."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) != 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
      (n,) = np.frombuffer(head, "<u8")
      try:
        self.header = json.loads(f.read(int(n)))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    self.header.pop("__metadata__", None)
    self._offset = 8 + int(n)
    self._map = np.memmap(path, dtype=np.uint8, mode="r")

  def keys(self):
    return self.header.keys()

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.header[key]["shape"])

  def get(self, key: str) -> np.ndarray:
    info = self.header[key]
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    raw = self._map[self._offset + start:self._offset + end]
    return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None):
  """Writes `tensors` (numpy, any dtype in the table above) as one .safetensors file."""
  header, offset = {}, 0
  arrays = {}
  for key in sorted(tensors):
    a = np.ascontiguousarray(tensors[key])
    if a.dtype not in _NAMES:
      raise ValueError(f"tensor {key!r}: dtype {a.dtype} cannot be stored in safetensors")
    arrays[key] = a
    header[key] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # Align the data to 8 bytes.
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(np.uint64(len(blob)).tobytes())
    f.write(blob)
    for a in arrays.values():
      f.write(a.tobytes())
  os.replace(tmp, path)
