"""Evaluating a policy on benchmarks: records -> the data pipeline (bucketed batches) -> jitted sampling -> scores.

  sources = load_benchmarks(["mathvista", "mmmu"], data_dir)          # every file checked before any sampling
  result = evaluate_benchmarks(graphdef, params, names=[...], data_dir=..., tokenizer=..., model_cfg=...,
                               data_cfg=..., max_new_tokens=1024, predictions_path="preds.jsonl")
  result["benchmarks"]["mathvista"]["accuracy"], result["average"], flat_metrics(result)

Prompts go through the same processing as training (`jaxvg.data.processing`: the chat template, the image
processor, M-RoPE positions), in batches of data.prompts_per_batch bucketed by data.length_buckets and
data.patch_buckets, so a run compiles one sampler per bucket shape. Greedy decoding by default; `samples` = k > 1
draws k completions per prompt at `temperature` and reports mean@k (the headline, each metric averaged over the k
draws) and pass@k (a record counts when any draw is right).

With prompt_format="raw" (the default) each record is asked exactly as its benchmark asks it (`Item.prompt`); under
another jaxvg prompt format (pgpo, vgs, ...) the bare question goes through that format, whose instruction asks for
a boxed answer, which every scorer reads first (`extract.answer_span`).

A record that cannot be used (an unreadable row, a missing or corrupt image, a prompt over the largest bucket) is a
counted skip, reported per reason with the benchmark's results.
"""

import collections
import dataclasses
import json
import logging
import os

import jax
import numpy as np

from jaxvg.benchmarks import files
from jaxvg.benchmarks.spec import Benchmark, Item
from jaxvg.data import pipeline, processing, prompts
from jaxvg.data.processing import RecordError
from jaxvg.rl import rollout
from jaxvg.run import builders

log = logging.getLogger("jaxvg")


class BenchmarkSource:
  """A benchmark's records as a random-access source for `jaxvg.data.pipeline` (len + getitem of canonical records).

  The rows' text is read and every `Item` built when the source is made (so ids, answers and categories are known
  before any image is decoded); images are read when the pipeline asks for the record. Rows that cannot become an
  item are kept as their `RecordError`, raised when the pipeline reads them: a counted skip.
  """

  def __init__(self, benchmark: Benchmark, data_dir: str, *, bare: bool = False, allow_outside: bool = False,
               limit: int | None = None):
    self.benchmark = benchmark
    self.bare = bare
    self.allow_outside = allow_outside
    self.root = files.benchmark_dir(data_dir, benchmark.folders, benchmark.name)
    paths = files.find_files(self.root, benchmark.files, benchmark.name)
    self.table = files.Table(paths, benchmark=benchmark.name, required=benchmark.required,
                             image_columns=benchmark.image_columns)
    self.entries: list[tuple[int, Item | RecordError]] = []  # (table row, item or why it is unusable)
    seen = collections.Counter()
    for index, row in enumerate(self.table.rows):
      if benchmark.keep is not None and not benchmark.keep(row):
        continue
      try:
        made = benchmark.item(row)
        made = list(made) if isinstance(made, (list, tuple)) else [made]  # ViLP: three records per row
      except RecordError as e:
        made = [e]
      except Exception as e:  # a row no rule foresaw is still one skipped record
        made = [RecordError("malformed_record", f"{type(e).__name__}: {e}")]
      for entry in made:
        if isinstance(entry, Item):
          seen[entry.id] += 1
          if seen[entry.id] > 1:  # ids must be unique: they map completions back to items
            entry = dataclasses.replace(entry, id=f"{entry.id}#{seen[entry.id]}")
        self.entries.append((index, entry))
        if limit is not None and len(self.entries) >= limit:
          break
      if limit is not None and len(self.entries) >= limit:
        break
    if not self.entries:
      raise files.BenchmarkFileError(f"{benchmark.name}: {', '.join(paths)} hold no record"
                                     f"{' of this subset' if benchmark.keep else ''}")
    self.items = {e.id: e for _, e in self.entries if isinstance(e, Item)}

  def __len__(self) -> int:
    return len(self.entries)

  def _where(self, index: int) -> str:
    row = self.table.rows[index]
    return f"{self.benchmark.name} {row['_file']} row {row['_row']}"

  def __getitem__(self, i: int) -> dict:
    index, entry = self.entries[i]
    if isinstance(entry, RecordError):
      raise RecordError(entry.reason, f"{self._where(index)}: {entry.detail}")
    try:
      images = [self._image(index, ref) for ref in entry.images]
    except RecordError as e:
      raise RecordError(e.reason, f"{self._where(index)} ({entry.id}): {e.detail}") from None
    return {"id": entry.id, "images": images, "problem": entry.bare if self.bare else entry.prompt,
            "answer": entry.answer, "source": self.benchmark.name}

  def _image(self, index: int, ref):
    """One image ref -> bytes or a path: the first non-null of its "a|b" columns, entry k of a list cell."""
    spec, k = ref
    value = None
    for column in spec.split("|"):
      value = self.table.cell(index, column)
      if value is not None:
        break
    if k is not None:
      value = value[k] if isinstance(value, (list, tuple)) and k < len(value) else None
    tsv = self.table.rows[index]["_file"].lower().endswith(".tsv")
    return files.image_value(value, root=self.root, allow_outside=self.allow_outside, base64_text=tsv,
                             dirs=self.benchmark.image_dirs)


def resolve(names) -> list[Benchmark]:
  """The benchmarks named (a list, or one comma-separated string); an unknown name is a ValueError listing all."""
  from jaxvg.benchmarks import BENCHMARKS
  if isinstance(names, str):
    names = [n for n in names.split(",")]
  names = [n.strip().lower() for n in names if n.strip()]
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown or not names:
    raise ValueError(f"unknown benchmark {', '.join(map(repr, unknown)) or '(none given)'}; choose from "
                     f"{', '.join(BENCHMARKS)}")
  return [BENCHMARKS[n] for n in dict.fromkeys(names)]


def load_benchmarks(names, data_dir: str, *, prompt_format: str = "raw", allow_images_outside: bool = False,
                    limit: int | None = None) -> dict[str, BenchmarkSource]:
  """{name: BenchmarkSource}: every benchmark's folder, files and columns checked (a `BenchmarkFileError` names the
  first that is missing), before any work."""
  prompts.get_format(prompt_format)  # a ValueError naming an unknown format
  return {b.name: BenchmarkSource(b, data_dir, bare=prompt_format != "raw", allow_outside=allow_images_outside,
                                  limit=limit) for b in resolve(names)}


def _score(benchmark: Benchmark, completion: str, item: Item) -> tuple[float, str]:
  try:
    score, extracted = benchmark.score(completion, item)
    return float(score), str(extracted)
  except Exception as e:  # a scorer meeting text it did not foresee: a wrong answer, never the end of the run
    return 0.0, f"(scoring error {type(e).__name__}: {e})"


def _mean_dicts(dicts: list[dict]):
  """The key-wise mean of equally shaped nested dicts of numbers (the k draws' reports -> one)."""
  first = dicts[0]
  if isinstance(first, dict):
    return {k: _mean_dicts([d[k] for d in dicts if k in d]) for k in first}
  return float(np.mean(dicts))


def _finite(tree):
  """Non-finite numbers as None (a metric with nothing to measure is written as null, not as NaN)."""
  if isinstance(tree, dict):
    return {k: _finite(v) for k, v in tree.items()}
  return None if isinstance(tree, float) and not np.isfinite(tree) else tree


def summarize(benchmark: Benchmark, items: list[Item], scores_BG: np.ndarray) -> dict:
  """The benchmark's report over the scored records: its own aggregate per draw, averaged over the draws."""
  report = _finite(_mean_dicts([benchmark.aggregate(items, scores_BG[:, g]) for g in range(scores_BG.shape[1])]))
  report["records"] = len(items)
  if scores_BG.shape[1] > 1:
    report["mean@k"] = float(scores_BG.mean())
    report["pass@k"] = float(scores_BG.max(axis=1).mean())
  return report


def evaluate_benchmarks(graphdef, params, *, names, data_dir: str, tokenizer, model_cfg, data_cfg,
                        max_new_tokens: int, prompt_format: str = "raw", samples: int = 1,
                        temperature: float = 1.0, greedy: bool | None = None, seed: int = 0, mesh=None,
                        data_axes: tuple[str, ...] = ("data",), predictions_path: str | None = None,
                        allow_images_outside: bool = False, limit: int | None = None, sources=None) -> dict:
  """Per-benchmark accuracy, per-category accuracies and their average for the policy (graphdef, params).

  Args:
    graphdef, params: `nnx.split(model, nnx.Param)` of a Qwen25VL (params may be sharded over `mesh`).
    names: benchmark names (`jaxvg.benchmarks.BENCHMARKS`), a list or a comma-separated string.
    data_dir: the folder holding one folder per benchmark (see docs/benchmarks_eval.md).
    tokenizer, model_cfg, data_cfg: the run's tokenizer, `ModelConfig` and `DataCfg` (pixel budget, max_images,
      batch size and buckets).
    max_new_tokens: the completion budget.
    prompt_format: "raw" asks each benchmark's own prompt; a jaxvg format name wraps the bare question in it.
    samples: completions per prompt (k); greedy when 1 unless `greedy=False`.
    temperature: the sampling temperature when not greedy.
    mesh, data_axes: shard each batch over these mesh axes (data.prompts_per_batch must divide by their size).
    predictions_path: a JSONL with one line per scored record (id, prompt, completions, extracted answers, scores).
    limit: read at most this many records per benchmark (a quick look).
    sources: `load_benchmarks(...)` already built (a training run checks the files once, at its start).

  Returns:
    {"benchmarks": {name: {"accuracy", "records", "skipped", "categories", optional "metrics", "mean@k", "pass@k",
    "source"}}, "average": the mean headline accuracy over benchmarks with records, "samples", "greedy",
    "prompt_format"}.
  """
  greedy = samples == 1 if greedy is None else greedy
  fmt = prompts.get_format(prompt_format)
  sources = sources or load_benchmarks(names, data_dir, prompt_format=prompt_format,
                                       allow_images_outside=allow_images_outside, limit=limit)
  sampling = rollout.SamplingConfig(num_samples=samples, max_new_tokens=max_new_tokens,
                                    temperature=0.0 if greedy else temperature,
                                    stop_token_ids=builders.stop_token_ids(tokenizer),
                                    pad_token_id=int(tokenizer.pad_token_id))
  prompt_cfg = dataclasses.replace(builders.prompt_config(data_cfg), prompt_format=prompt_format)
  data = builders.data_config(data_cfg, shuffle=False, num_epochs=1)
  key = jax.random.key(seed)
  if predictions_path:
    os.makedirs(os.path.dirname(os.path.abspath(predictions_path)), exist_ok=True)
  out = open(predictions_path, "w", encoding="utf-8") if predictions_path else None
  results = {}
  try:
    for name, src in sources.items():
      bench = src.benchmark
      it = iter(pipeline.make_dataset(src, tokenizer=tokenizer, prompt=prompt_cfg, data=data,
                                      vision=model_cfg.vision))
      items, scores, n_batches = [], [], 0
      try:
        for batch in it:
          key, sub = jax.random.split(key)
          p = batch.prompts
          rolls = jax.device_get(rollout.rollout(
              graphdef, params, input_ids_BT=p.input_ids_BT, attention_mask_BT=p.attention_mask_BT,
              positions_3BT=p.positions_3BT, deltas_B=p.deltas_B, vision=p.vision, key=sub, config=sampling,
              mesh=mesh, data_axes=data_axes))
          texts = builders.decode_completions(tokenizer, rolls.tokens_BT, rolls.mask_BT, prefill=fmt.prefill)
          n_batches += 1
          for b, valid in enumerate(np.asarray(p.valid_B)):
            if not valid:
              continue
            item = src.items[batch.ids[b]]
            completions = texts[b * samples:(b + 1) * samples]
            scored = [_score(bench, c, item) for c in completions]
            items.append(item)
            scores.append([s for s, _ in scored])
            if out is not None:
              out.write(json.dumps(_prediction(name, item, completions, scored, tokenizer, fmt, src.bare),
                                   ensure_ascii=False) + "\n")
      except ValueError:
        if it.counts.get("ok", 0):  # a fault of the run, not of the records
          raise
      skipped = {reason: n for reason, n in it.counts.items() if reason != "ok"}
      if items:
        report = summarize(bench, items, np.asarray(scores, np.float64))
      else:
        report = {"accuracy": None, "records": 0, "categories": {}}
      report |= {"skipped": skipped, "source": bench.source}
      results[name] = report
      log.info("%s: %s over %d records (%d skipped) in %d batches", name,
               "n/a" if report["accuracy"] is None else f"{report['accuracy']:.4f}", report["records"],
               sum(skipped.values()), n_batches)
  finally:
    if out is not None:
      out.close()
  headlines = [r["accuracy"] for r in results.values() if r["accuracy"] is not None]
  return {"benchmarks": results, "average": float(np.mean(headlines)) if headlines else None, "samples": samples,
          "greedy": greedy, "prompt_format": prompt_format}


def _prediction(name: str, item: Item, completions: list[str], scored: list, tokenizer, fmt, bare: bool) -> dict:
  """One JSONL line: what was asked (the rendered chat prompt), what came back, what was read from it, its score."""
  problem = item.bare if bare else item.prompt
  prompt = processing.render(tokenizer, prompts.build_messages(problem, fmt=fmt, reference=item.answer), fmt.prefill)
  return {"benchmark": name, "id": item.id, "prompt": prompt, "answer": item.answer, "completions": completions,
          "extracted": [e for _, e in scored], "scores": [s for s, _ in scored],
          "score": float(np.mean([s for s, _ in scored])), "categories": item.categories}


def flat_metrics(result: dict, prefix: str = "bench") -> dict[str, float]:
  """{"bench/<name>/accuracy": ..., "bench/<name>/<metric>": ..., "bench/average": ...} for a metrics writer."""
  flat = {}
  for name, report in result["benchmarks"].items():
    if report["accuracy"] is None:
      continue
    flat[f"{prefix}/{name}/accuracy"] = report["accuracy"]
    for metric, value in report.get("metrics", {}).items():
      flat[f"{prefix}/{name}/{metric}"] = value
    for metric in ("mean@k", "pass@k"):
      if metric in report:
        flat[f"{prefix}/{name}/{metric}"] = report[metric]
  if result["average"] is not None:
    flat[f"{prefix}/average"] = result["average"]
  return flat


def write_report(result: dict, path: str):
  """The result as indented JSON (the summary next to the predictions JSONL)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, ensure_ascii=False)
