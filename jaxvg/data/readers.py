"""Readers of the dataset formats in use, each a random-access source (len + getitem) of canonical records:

  {"id": str, "images": [bytes | path | PIL.Image], "problem": str (one "<image>" per image), "answer": str,
   "source": str, optional "solution", optional "system"}

  HFParquetSource     HF-datasets parquet, the Geometry3K form: `images` = list of {bytes, path} (or a single `image`),
                      `problem` (or `question`) with <image> placeholders, `answer`; optional `id`, `solution`.
  VerlParquetSource   verl parquet: `prompt` = chat list whose user turn holds the problem with "<image>" placeholders
                      (a system turn becomes the record's "system"), `images`, `reward_model.ground_truth`.
  JsonlSource         JSONL with an image folder: {"image": "a.png"} or {"images": [...]}, "problem" or "question",
                      "answer"; image paths are relative to `image_dir`. A leading UTF-8 byte-order mark is skipped.
  synthetic_source    the built-in synthetic dataset (its records are already canonical).

Local paths only. Parquet is read with pyarrow, memory-mapped, so a row's image bytes are paged in when the row is
read. Image paths are relative to the image folder (JSONL: `image_dir`; parquet: the file's folder), and a path that
resolves outside it (`..`, an absolute path, a symlink) is refused as "image_outside_dir" unless `allow_outside`.

Faults of a whole file (unreadable parquet, no rows, a missing column) raise a ValueError naming the file and the
columns found. A row that cannot be turned into a record raises `RecordError` naming its file, row and id, which the
pipeline counts and skips like any other bad record; an unexpected exception while parsing a row becomes a
"malformed_record" RecordError, so no row ends the run. Sources pickle without their open tables (grain worker
processes reopen them).
"""

import bisect
import codecs
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxvg.data.processing import RecordError

log = logging.getLogger(__name__)
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


def image_path(name: str, image_dir: str, allow_outside: bool) -> str:
  """`name` joined to `image_dir` (an absolute name stays as it is); raises "image_outside_dir" when the path, symlinks
  resolved, is not inside `image_dir` (unless `allow_outside`)."""
  path = os.path.join(image_dir, name)
  if not allow_outside:
    root = os.path.realpath(image_dir)
    if os.path.commonpath([os.path.realpath(path), root]) != root:
      raise RecordError("image_outside_dir", f"{name!r} resolves outside the image folder {root}")
  return path


def _image_entry(value, base_dir: str, allow_outside: bool):
  """An HF image cell ({bytes, path} or raw bytes or a path) -> bytes or a local path."""
  if isinstance(value, dict):
    if value.get("bytes") is not None:
      return value["bytes"]
    value = value.get("path")
  if isinstance(value, str):
    return image_path(value, base_dir, allow_outside)
  return value


def _image_list(value, base_dir: str, allow_outside: bool) -> list:
  """An `images` cell (a list of image cells, or None) -> a list of bytes or local paths."""
  if value is None:
    return []
  if not isinstance(value, (list, tuple)):
    raise RecordError("bad_images_field", f"images is a {type(value).__name__}, not a list")
  return [_image_entry(im, base_dir, allow_outside) for im in value]


def _is_list(t) -> bool:
  return pa.types.is_null(t) or pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_struct(t) -> bool:
  return pa.types.is_null(t) or pa.types.is_struct(t)


def _parse(parse, where: str, *args) -> dict:
  """`parse(*args)`, every failure re-raised as a RecordError that names `where`."""
  try:
    return parse(*args)
  except RecordError as e:
    raise RecordError(e.reason, f"{where}: {e.detail}" if e.detail else where) from None
  except Exception as e:  # a row the parser did not foresee is still a counted skip, never the end of the run
    raise RecordError("malformed_record", f"{where}: {type(e).__name__}: {e}") from None


class _ParquetRows:
  """Row access over one or more parquet files, opened lazily (and again after unpickling).

  Each file is checked when the source is built: it must be readable parquet and hold one column of each group in
  `required` (a ValueError names the file and the columns found); a column whose type fails its check in `types`
  ({name: (check, what it should be)}) is logged, and its rows are skipped by the reader.
  """

  def __init__(self, paths, *, required: tuple[tuple[str, ...], ...] = (), types: dict | None = None):
    self.files = _parquet_files(paths)
    sizes = []
    for f in self.files:
      try:
        meta = pq.ParquetFile(f)
      except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{f} is not a readable parquet file ({type(e).__name__}: {e})") from None
      schema = meta.schema_arrow
      found = ", ".join(f"{field.name}: {field.type}" for field in schema)
      missing = [" or ".join(repr(n) for n in group) for group in required
                 if not any(n in schema.names for n in group)]
      if missing:
        raise ValueError(f"{f} has no column {', '.join(missing)}; columns found: {found}")
      for name, (check, expected) in (types or {}).items():
        if name in schema.names and not check(schema.field(name).type):
          log.warning("%s: column %r is %s, not %s; its rows will be skipped (columns found: %s)", f, name,
                      schema.field(name).type, expected, found)
      sizes.append(meta.metadata.num_rows)
    if sum(sizes) == 0:
      raise ValueError(f"{', '.join(self.files)}: no rows")
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
      self._tables = [_read_table(f) for f in self.files]
    k = bisect.bisect_right(self.offsets, index) - 1
    table, i = self._tables[k], index - self.offsets[k]
    return {name: table.column(name)[i].as_py() for name in table.column_names}, self.files[k], i


def _read_table(path: str):
  try:
    return pq.read_table(path, memory_map=True)
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


class HFParquetSource:
  """HF-datasets parquet in the Geometry3K form (see the module docstring)."""

  def __init__(self, paths, *, source: str | None = None, allow_outside: bool = False):
    self._rows = _ParquetRows(paths, required=(("problem", "question"), ("answer",)),
                              types={"images": (_is_list, "a list of images")})
    self.source = source
    self.allow_outside = allow_outside

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> dict:
    row, path, i = self._rows.row(index)
    record_id = str(row["id"]) if row.get("id") is not None else f"{_stem(path)}:{i}"
    return _parse(self._record, f"record {record_id} ({path} row {i})", row, path, record_id)

  def _record(self, row: dict, path: str, record_id: str) -> dict:
    base = os.path.dirname(path)
    if "images" in row:
      images = _image_list(row["images"], base, self.allow_outside)
    else:
      images = [] if row.get("image") is None else [_image_entry(row["image"], base, self.allow_outside)]
    record = {
        "id": record_id,
        "images": images,
        "problem": row.get("problem", row.get("question")),
        "answer": row.get("answer"),
        "source": self.source or _stem(path),
    }
    if row.get("solution") is not None:
      record["solution"] = row["solution"]
    return record


class VerlParquetSource:
  """verl parquet (see the module docstring)."""

  def __init__(self, paths, *, source: str | None = None, allow_outside: bool = False):
    self._rows = _ParquetRows(paths, required=(("prompt",), ("reward_model",)), types={
        "prompt": (_is_list, "a list of messages"), "images": (_is_list, "a list of images"),
        "reward_model": (_is_struct, "a struct"), "extra_info": (_is_struct, "a struct")})
    self.source = source
    self.allow_outside = allow_outside

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> dict:
    row, path, i = self._rows.row(index)
    extra = row.get("extra_info")
    index_in_split = extra.get("index") if isinstance(extra, dict) else None
    record_id = f"{_stem(path)}:{i if index_in_split is None else index_in_split}"
    return _parse(self._record, f"record {record_id} ({path} row {i})", row, path, record_id)

  def _record(self, row: dict, path: str, record_id: str) -> dict:
    for name, kind in (("prompt", list), ("reward_model", dict), ("extra_info", dict)):
      if row.get(name) is not None and not isinstance(row[name], kind):
        raise RecordError("malformed_record", f"{name} is a {type(row[name]).__name__}, not a {kind.__name__}")
    messages = row.get("prompt") or []
    users = [m for m in messages if m.get("role") == "user"]
    systems = [m for m in messages if m.get("role") == "system"]
    if len(users) != 1 or len(systems) > 1:
      raise RecordError("malformed_record", f"prompt has {len(users)} user and {len(systems)} system turns "
                        "(expected 1 and at most 1)")
    record = {
        "id": record_id,
        "images": _image_list(row.get("images"), os.path.dirname(path), self.allow_outside),
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

  def __init__(self, path, *, image_dir=None, source: str | None = None, allow_outside: bool = False):
    self.path = _local(path)
    self.image_dir = _local(image_dir) if image_dir is not None else os.path.dirname(self.path)
    self.source = source or _stem(self.path)
    self.allow_outside = allow_outside
    with open(self.path, "rb") as f:
      data = f.read()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # the first line starts after it
    starts = np.concatenate([[bom], np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n")) + 1])
    ends = np.append(starts[1:] - 1, len(data))
    keep = np.asarray([data[s:e].strip() != b"" for s, e in zip(starts, ends)], bool)
    if not keep.any():
      raise ValueError(f"{self.path} holds no record")
    self._starts, self._ends = starts[keep], ends[keep]
    self._line_numbers = np.flatnonzero(keep)

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(f"line {index} out of range for {len(self)} records")
    line = int(self._line_numbers[index]) + 1
    line_id = f"{self.source}:{line}"
    with open(self.path, "rb") as f:
      f.seek(int(self._starts[index]))
      raw = f.read(int(self._ends[index] - self._starts[index]))
    return _parse(self._record, f"record {line_id} ({self.path} line {line})", raw, line_id)

  def _record(self, raw: bytes, line_id: str) -> dict:
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise RecordError("non_utf8_text", str(e)) from None
    try:
      row = json.loads(text)
    except json.JSONDecodeError as e:
      raise RecordError("malformed_record", str(e)) from None
    if not isinstance(row, dict):
      raise RecordError("malformed_record", f"a JSON {type(row).__name__}, not an object")
    if "problem" not in row and "question" not in row:
      raise RecordError("missing_problem", f"no 'problem' or 'question' key; keys found: {sorted(row)}")
    if "images" in row:
      names = row["images"] or []
      if not isinstance(names, list):
        raise RecordError("bad_images_field", f"images is a {type(names).__name__}, not a list")
    else:
      names = [] if row.get("image") is None else [row["image"]]
    if not all(isinstance(n, str) for n in names):
      raise RecordError("malformed_record", "images must be a list of file names")
    record = {
        "id": str(row["id"]) if row.get("id") is not None else line_id,
        "images": [image_path(n, self.image_dir, self.allow_outside) for n in names],
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
