"""Readers of the dataset formats in use, each a random-access source (len + getitem) of canonical records:

  {"id": str, "images": [bytes | path | PIL.Image], "problem": str (one "<image>" per image), "answer": str,
   "source": str, optional "solution", optional "system"}

  HFParquetSource     HF-datasets parquet, the Geometry3K form: `images` = list of {bytes, path} (or a single `image`),
                      `problem` (or `question`) with <image> placeholders, `answer`; optional `id`, `solution`.
  VerlParquetSource   verl parquet: `prompt` = chat list whose user turn holds the problem with "<image>" placeholders
                      (a system turn becomes the record's "system"), `images`, `reward_model.ground_truth`.
  JsonlSource         JSONL with an image folder: {"image": "a.png"} or {"images": [...]}, "problem" or "question",
                      "answer"; image paths are relative to `image_dir`.
  synthetic_source    the built-in synthetic dataset (its records are already canonical).

Local paths only. Parquet is read with pyarrow, memory-mapped, so a row's image bytes are paged in when the row is
read. A row that cannot be turned into a record (an undecodable JSONL line) raises `RecordError`, which the pipeline
counts and skips like any other bad record. Sources pickle without their open tables (grain worker processes reopen
them).
"""

import bisect
import json
import os

import numpy as np
import pyarrow.parquet as pq

from jaxvg.data.processing import RecordError

_REMOTE = ("://", "hf:")


def _local(path) -> str:
  path = os.fspath(path)
  if any(marker in path for marker in _REMOTE):
    raise ValueError(f"only local paths are read, got {path!r}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path!r} does not exist")
  return path


def _parquet_files(paths) -> list[str]:
  """A file, a directory (its *.parquet files, sorted) or a list of files."""
  if isinstance(paths, (str, os.PathLike)):
    path = _local(paths)
    if os.path.isdir(path):
      files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
      if not files:
        raise ValueError(f"directory {path!r} holds no .parquet file")
      return files
    return [path]
  return [_local(p) for p in paths]


def _image_entry(value, base_dir: str):
  """An HF image cell ({bytes, path} or raw bytes or a path) -> bytes or a local path."""
  if isinstance(value, dict):
    if value.get("bytes") is not None:
      return value["bytes"]
    value = value.get("path")
  if isinstance(value, str):
    return value if os.path.isabs(value) else os.path.join(base_dir, value)
  return value


class _ParquetRows:
  """Row access over one or more parquet files, opened lazily (and again after unpickling)."""

  def __init__(self, paths):
    self.files = _parquet_files(paths)
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in self.files]
    self.offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    self._tables = None

  def __len__(self) -> int:
    return self.offsets[-1]

  def __getstate__(self):
    return {**self.__dict__, "_tables": None}

  def row(self, index: int) -> tuple[dict, str, int]:
    """(row as a dict of python values, file path, row number in the file)."""
    if not 0 <= index < len(self):
      raise IndexError(f"row {index} out of range for {len(self)} rows")
    if self._tables is None:
      self._tables = [pq.read_table(f, memory_map=True) for f in self.files]
    k = bisect.bisect_right(self.offsets, index) - 1
    table, i = self._tables[k], index - self.offsets[k]
    return {name: table.column(name)[i].as_py() for name in table.column_names}, self.files[k], i


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


class HFParquetSource:
  """HF-datasets parquet in the Geometry3K form (see the module docstring)."""

  def __init__(self, paths, *, source: str | None = None):
    self._rows = _ParquetRows(paths)
    self.source = source

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> dict:
    row, path, i = self._rows.row(index)
    base = os.path.dirname(path)
    if "images" in row:
      images = row["images"] or []
    elif "image" in row:
      images = [] if row["image"] is None else [row["image"]]
    else:
      images = []
    record = {
        "id": str(row["id"]) if row.get("id") is not None else f"{_stem(path)}:{i}",
        "images": [_image_entry(im, base) for im in images],
        "problem": row.get("problem", row.get("question")),
        "answer": row.get("answer"),
        "source": self.source or _stem(path),
    }
    if row.get("solution") is not None:
      record["solution"] = row["solution"]
    return record


class VerlParquetSource:
  """verl parquet (see the module docstring)."""

  def __init__(self, paths, *, source: str | None = None):
    self._rows = _ParquetRows(paths)
    self.source = source

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> dict:
    row, path, i = self._rows.row(index)
    messages = row.get("prompt") or []
    users = [m for m in messages if m.get("role") == "user"]
    systems = [m for m in messages if m.get("role") == "system"]
    extra = row.get("extra_info") or {}
    record_id = f"{_stem(path)}:{extra['index']}" if extra.get("index") is not None else f"{_stem(path)}:{i}"
    if len(users) != 1 or len(systems) > 1:
      raise RecordError("malformed_record", f"{record_id}: prompt has {len(users)} user and {len(systems)} system "
                        "turns (expected 1 and at most 1)")
    record = {
        "id": record_id,
        "images": [_image_entry(im, os.path.dirname(path)) for im in row.get("images") or []],
        "problem": _content_text(users[0]["content"]),
        "answer": (row.get("reward_model") or {}).get("ground_truth"),
        "source": self.source or row.get("data_source") or _stem(path),
    }
    if systems:
      record["system"] = _content_text(systems[0]["content"])
    return record


def _content_text(content):
  """Message content: a string, or a list of {"type": "text"/"image"} entries (images become "<image>")."""
  if content is None or isinstance(content, (str, bytes)):
    return content
  pieces = []
  for entry in content:
    if entry.get("type") == "image" or entry.get("image") is not None:
      pieces.append("<image>")
    elif entry.get("text") is not None:
      pieces.append(entry["text"])
  return "".join(pieces)


class JsonlSource:
  """JSONL with an image folder (see the module docstring). Line offsets are indexed once, lines parsed on access."""

  def __init__(self, path, *, image_dir=None, source: str | None = None):
    self.path = _local(path)
    self.image_dir = _local(image_dir) if image_dir is not None else os.path.dirname(self.path)
    self.source = source or _stem(self.path)
    with open(self.path, "rb") as f:
      data = f.read()
    starts = np.concatenate([[0], np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n")) + 1])
    ends = np.append(starts[1:] - 1, len(data))
    keep = np.asarray([data[s:e].strip() != b"" for s, e in zip(starts, ends)], bool)
    self._starts, self._ends = starts[keep], ends[keep]
    self._line_numbers = np.flatnonzero(keep)

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(f"line {index} out of range for {len(self)} records")
    line_id = f"{self.source}:{int(self._line_numbers[index]) + 1}"
    with open(self.path, "rb") as f:
      f.seek(int(self._starts[index]))
      raw = f.read(int(self._ends[index] - self._starts[index]))
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise RecordError("non_utf8_text", f"{line_id}: {e}") from None
    try:
      row = json.loads(text)
    except json.JSONDecodeError as e:
      raise RecordError("malformed_record", f"{line_id}: {e}") from None
    if not isinstance(row, dict):
      raise RecordError("malformed_record", f"{line_id}: a JSON {type(row).__name__}, not an object")
    if "images" in row:
      names = row["images"] or []
    else:
      names = [] if row.get("image") is None else [row["image"]]
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
      raise RecordError("malformed_record", f"{line_id}: images must be a list of file names")
    record = {
        "id": str(row["id"]) if row.get("id") is not None else line_id,
        "images": [n if os.path.isabs(n) else os.path.join(self.image_dir, n) for n in names],
        "problem": row.get("problem", row.get("question")),
        "answer": row.get("answer"),
        "source": row.get("source") or self.source,
    }
    if row.get("solution") is not None:
      record["solution"] = row["solution"]
    return record


def synthetic_source(*, split: str = "train", num_records: int = 1000, cfg=None):
  """The built-in synthetic dataset as a source (its records are already canonical, images as PIL); `cfg` is a
  `jaxvg.data.synthetic.SyntheticConfig` (default: its defaults)."""
  from jaxvg.data import synthetic

  return synthetic.SyntheticSource(split=split, num_records=num_records,
                                   cfg=synthetic.SyntheticConfig() if cfg is None else cfg)
