"""What a benchmark is to the evaluator: where its files are, how a row becomes a prompt, how a completion is scored,
and how per-record scores become the numbers its paper reports.

  Item        one record: the benchmark's prompt (and the bare question for other prompt formats), its image refs,
              the gold answer, what the scorer needs (`meta`), its categories and its consistency groups.
  Benchmark   the folder and file patterns, the required columns, `item(row)`, `score(completion, item)` and
              `aggregate(items, scores_B)`.

A row that cannot become an item (a malformed options cell, a reference to an image the row lacks) raises
`RecordError` (or any exception, which becomes "malformed_record"): the record is a counted skip.
"""

import dataclasses
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from jaxvg.data.processing import RecordError


@dataclasses.dataclass(frozen=True)
class Item:
  """One benchmark record, before its images are read.

  Attributes:
    id: the benchmark's own id of the record (unique within the benchmark).
    prompt: the user text as the benchmark's paper / reference scorer asks it (question, options and answer-format
      instruction), with one "<image>" placeholder per entry of `images`.
    bare: the question and options without the answer-format instruction (used under a jaxvg prompt format, whose
      own instruction asks for a boxed answer).
    images: image refs in placeholder order: (column, None) for an image cell, (column, k) for entry k of a list cell.
    answer: the gold answer as the benchmark stores it.
    meta: what `score` needs (options, answer type, precision, ...).
    categories: {field: value or list of values} for the per-category breakdowns.
    groups: {name: key} for consistency metrics (records sharing a key are scored together).
  """

  id: str
  prompt: str
  bare: str
  images: tuple[tuple[str, int | None], ...]
  answer: str
  meta: dict = dataclasses.field(default_factory=dict)
  categories: dict = dataclasses.field(default_factory=dict)
  groups: dict = dataclasses.field(default_factory=dict)


Scorer = Callable[[str, Item], tuple[float, str]]


def accuracy_and_categories(items: list[Item], scores_B: np.ndarray) -> dict:
  """{"accuracy": mean score, "categories": {field: {value: mean score}}}; a list-valued category (MathVista's
  skills) counts the record under each of its values."""
  return {"accuracy": float(np.mean(scores_B)), "categories": categories(items, scores_B)}


def categories(items: list[Item], scores_B: np.ndarray) -> dict:
  """{field: {value: mean score of the records with that value}}, values sorted."""
  sums = defaultdict(lambda: defaultdict(list))
  for item, score in zip(items, scores_B):
    for field, value in item.categories.items():
      for v in (value if isinstance(value, (list, tuple)) else [value]):
        if v is not None and str(v) != "":
          sums[field][str(v)].append(float(score))
  return {field: {v: float(np.mean(s)) for v, s in sorted(values.items())} for field, values in sums.items()}


def group_all_correct(items: list[Item], scores_B: np.ndarray, group: str) -> float:
  """The fraction of groups (records sharing `item.groups[group]`; records without the key are left out) whose
  records are all right."""
  by_key = defaultdict(list)
  for item, score in zip(items, scores_B):
    if item.groups.get(group) is not None:
      by_key[item.groups[group]].append(score >= 1.0)
  return float(np.mean([all(v) for v in by_key.values()])) if by_key else float("nan")


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A benchmark: its files, its prompt builder, its scorer and its report.

  Attributes:
    name: the name `--benchmarks` takes.
    folders: folder names tried under --data-dir (the dataset's repository name first).
    files: glob patterns of its files inside that folder; the first pattern that matches is read.
    required: column groups each file must hold (one column of each group).
    image_columns: columns holding images (read one row at a time, never all at once).
    item: a row (text columns, "_file", "_row") -> `Item`, or a list of them when one row holds several records
      (ViLP asks one question of three images); an entry of that list may be a `RecordError` (a counted skip).
    score: (completion, item) -> (score in [0, 1], the extracted answer as text).
    aggregate: (items, scores_B) -> {"accuracy": headline, optional "metrics": {...}, "categories": {...}}.
    keep: a filter over rows (MathVerse's vision-only subset), applied before `item`; None keeps all.
    image_dirs: folders of the benchmark folder that a relative image path is looked up in, in order.
    source: where its prompt and scoring conventions come from (for the report).
  """

  name: str
  folders: tuple[str, ...]
  files: tuple[str, ...]
  required: tuple[tuple[str, ...], ...]
  image_columns: tuple[str, ...]
  item: Callable[[dict], Item]
  score: Scorer
  aggregate: Callable[[list[Item], np.ndarray], dict] = accuracy_and_categories
  keep: Callable[[dict], bool] | None = None
  image_dirs: tuple[str, ...] = ("",)
  source: str = ""


def need(row: dict, column: str):
  """`row[column]`, or a "missing_field" RecordError naming the column when it is absent or null."""
  value = row.get(column)
  if value is None:
    raise RecordError("missing_field", f"no {column!r} in this row")
  return value


def text_of(value) -> str:
  """A cell as stripped text (numbers in a float column come back as 3.0: shown as 3)."""
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  return str(value).strip()
