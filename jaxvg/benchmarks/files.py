"""Reading a benchmark's files as published: HF parquet, VLMEvalKit TSV (base64 images), JSON with an image folder.

A benchmark lives in one folder under `--data-dir` (`DIR/MathVista`, `DIR/MMMU`, ...), laid out as the dataset's
repository lays it out (`huggingface-cli download AI4Math/MathVista --repo-type dataset --local-dir DIR/MathVista`).
`Table` reads the rows of the files a glob pattern finds there, without the image columns: those stay in the file
(memory-mapped parquet) and are read for one row at a time (`Table.cell`), when the pipeline processes that row.

Faults name what is wrong, so that a user can fix the folder:
  * a missing folder or file: `BenchmarkFileError` naming the benchmark, the folder and the patterns looked for;
  * a file that cannot be read, or lacks a required column: the benchmark, the file, the column and the columns found;
  * an image path that resolves outside the benchmark folder ("image_outside_dir"), a missing image file, an image
    cell that is neither bytes, a path nor base64: a `RecordError` of that row, which the pipeline counts and skips.
"""

import base64
import binascii
import csv
import glob
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from jaxvg.data import readers
from jaxvg.data.processing import RecordError

_REMOTE = ("://", "hf:")


class BenchmarkFileError(ValueError):
  """A benchmark whose files cannot be read at all (the message names the benchmark, the file and the column)."""


def benchmark_dir(data_dir: str, folders: tuple[str, ...], benchmark: str) -> str:
  """The first of `folders` that exists under `data_dir` (local paths only)."""
  data_dir = os.fspath(data_dir)
  if any(marker in data_dir for marker in _REMOTE):
    raise BenchmarkFileError(f"{benchmark}: only local folders are read, got --data-dir {data_dir!r}")
  for name in folders:
    path = os.path.join(data_dir, name)
    if os.path.isdir(path):
      return path
  raise BenchmarkFileError(f"{benchmark}: no folder {' or '.join(repr(f) for f in folders)} under {data_dir} "
                           "(download the dataset's files there; nothing is fetched)")


def find_files(root: str, patterns: tuple[str, ...], benchmark: str) -> list[str]:
  """The files of the first glob pattern (relative to `root`) that matches any, sorted."""
  for pattern in patterns:
    files = sorted(f for f in glob.glob(os.path.join(glob.escape(root), pattern)) if os.path.isfile(f))
    if files:
      return files
  raise BenchmarkFileError(f"{benchmark}: no file matching {' or '.join(repr(p) for p in patterns)} in {root}")


def _suffix(path: str) -> str:
  lower = path.lower()
  for ext in (".parquet", ".tsv", ".jsonl", ".json"):
    if lower.endswith(ext):
      return ext
  return os.path.splitext(lower)[1]


class Table:
  """The rows of a benchmark's files: text columns read up front, image columns read one row at a time.

  Attributes:
    rows: one dict per row of every file, in file order, without the `image_columns`; each has "_file" (the file),
      "_row" (the row number in that file) and "_index" (its position in `rows`: an id for rows that have none).
    columns: the columns of the files (those of the first file; every file must hold the required ones).
  """

  def __init__(self, files: list[str], *, benchmark: str, required: tuple[tuple[str, ...], ...] = (),
               image_columns: tuple[str, ...] = ()):
    self.benchmark = benchmark
    self.files = files
    self.image_columns = image_columns
    self.rows: list[dict] = []
    self.columns: list[str] = []
    self._images: dict[str, object] = {}  # file -> its memory-mapped table (parquet) or rows (tsv / json)
    for path in files:
      columns, rows = self._read(path)
      missing = [" or ".join(repr(c) for c in group) for group in required if not any(c in columns for c in group)]
      if missing:
        raise BenchmarkFileError(f"{benchmark}: {path} has no column {', '.join(missing)}; columns found: "
                                 f"{', '.join(columns)}")
      self.columns = self.columns or list(columns)
      for i, row in enumerate(rows):
        self.rows.append({**row, "_file": path, "_row": i, "_index": len(self.rows)})

  def _read(self, path: str) -> tuple[list[str], list[dict]]:
    ext = _suffix(path)
    try:
      if ext == ".parquet":
        table = pq.read_table(path, memory_map=True)
        text = [c for c in table.column_names if c not in self.image_columns]
        self._images[path] = table
        return table.column_names, table.select(text).to_pylist()
      if ext == ".tsv":
        rows = _read_tsv(path)
      elif ext == ".jsonl":
        with open(path, encoding="utf-8") as f:
          rows = [json.loads(line) for line in f if line.strip()]
      elif ext == ".json":
        with open(path, encoding="utf-8") as f:
          data = json.load(f)
        rows = list(data.values()) if isinstance(data, dict) else data
      else:
        raise BenchmarkFileError(f"{self.benchmark}: {path} is not a .parquet, .tsv, .json or .jsonl file")
    except (pa.ArrowException, OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
      raise BenchmarkFileError(f"{self.benchmark}: {path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
      raise BenchmarkFileError(f"{self.benchmark}: {path} is not a list of records")
    self._images[path] = rows
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return columns, [{k: v for k, v in r.items() if k not in self.image_columns} for r in rows]

  def __len__(self) -> int:
    return len(self.rows)

  def cell(self, index: int, column: str):
    """The value of an image column in row `index` (None when the file lacks the column)."""
    row = self.rows[index]
    source = self._images[row["_file"]]
    if isinstance(source, pa.Table):
      if column not in source.column_names:
        return None
      return source.column(column)[row["_row"]].as_py()
    return source[row["_row"]].get(column)


def _read_tsv(path: str) -> list[dict]:
  """A VLMEvalKit TSV (a header row, tab separated, base64 images in a column of megabytes)."""
  csv.field_size_limit(sys.maxsize)
  with open(path, encoding="utf-8", newline="") as f:
    return [dict(r) for r in csv.DictReader(f, delimiter="\t")]


def image_value(value, *, root: str, allow_outside: bool = False, base64_text: bool = False,
                dirs: tuple[str, ...] = ("",)):
  """An image cell -> encoded bytes or a local path the pipeline can open.

  Accepts the HF image struct {"bytes", "path"} (bytes win; a path alone is relative to `root`), raw bytes, a path
  string relative to `root`, or (TSV: `base64_text`) a base64 string. A relative path is looked up under each of
  `dirs` (folders of `root`) in turn: some JSON files name their images relative to their own folder (LogicVista's
  data/dataset.json says "v1_0.png" for data/images/v1_0.png).
  """
  if isinstance(value, dict):
    if value.get("bytes") is not None:
      return value["bytes"]
    value = value.get("path")
  if isinstance(value, (bytes, bytearray)):
    return bytes(value)
  if isinstance(value, str) and value.strip():
    if base64_text:
      try:
        return base64.b64decode(value, validate=True)
      except (binascii.Error, ValueError):
        raise RecordError("corrupt_image", "the image cell is not base64") from None
    paths = [readers.image_path(os.path.join(d, value), root, allow_outside) for d in dirs]
    for path in paths:
      if os.path.isfile(path):
        return path
    raise RecordError("missing_image_file", " or ".join(paths))
  raise RecordError("missing_image", f"an image cell holding {type(value).__name__}")
