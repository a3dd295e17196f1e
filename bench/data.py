"""Data pipeline throughput: records/s from encoded PNG bytes to collated PromptBatches, at Geometry3K-like images.

  python bench/data.py [--records 96] [--batch-size 8] [--pairs 15] [--compare-images 16] [--pipeline-pairs 7]

Records hold one synthesized 512x512 geometry diagram (lines, circles, labels; PNG-encoded, as Geometry3K stores
them). With Qwen2.5-VL's default pixel budget a 512x512 image resizes to 504x504: 36x36 = 1,296 patches and 324
image tokens. The same records go through the pipeline inline, with reader threads and with worker processes; the
headline `records_per_s` is the best steady rate of them (named in `best`), counted after the first batch, whose
latency is reported apart (`first_batch_s_by_mode`: worker processes start by importing jax and transformers).
`breakdown_ms` splits one record's processing inline: decode + the image processor (the fast path, the default),
chat template + tokenization + positions, and collation.

`fast_vs_transformers` times image processing alone (decoded image -> pixel_values and image_grid_thw), in this one
thread: transformers' Qwen2VLImageProcessorPil (A) and `jaxvg.data.images.preprocess` (B) alternate, A B A B ..., on
the same decoded images, and each pair gives a ratio (A's time / B's time: the speedup). Reported are the median and
interquartile range of those ratios on the thread's CPU time (per core; `wall_ratio_*` on wall time), and each side's
records per CPU second (one image a record). The diagrams are black on white, so the fast path resizes one band
(`jaxvg.data.images.resize_source`); `colour` repeats the comparison on the same diagrams drawn in colour, where it
resizes three. `fast_breakdown_ms` splits the fast path (CPU milliseconds): conversion and band check, PIL's resize,
patch transpose and normalization. `outputs_kept` repeats the gray comparison holding every output to the end of its
side, as a batch holds its records'. `end_to_end_inline` alternates whole inline pipeline passes over the records,
image_backend "transformers" (A) and "fast" (B): the ratio is B's records/s over A's (wall time).

`over_step_rate` (records/s over the trainer's record consumption rate) stays null: the model step time comes from
bench/forward.py, which fills it in.

Prints one JSON line.
"""

import argparse
import dataclasses
import io
import json
import logging
import os
import time

import numpy as np
from PIL import Image, ImageDraw


def diagram(seed: int, size: int = 512, colour: bool = False) -> bytes:
  """A Geometry3K-like line drawing: a triangle, a circle, a few labelled points, encoded as PNG (black on white, or
  blue, red and green with `colour`)."""
  rng = np.random.default_rng(seed)
  line, circle, text = ("navy", "firebrick", "darkgreen") if colour else ("black",) * 3
  image = Image.new("RGB", (size, size), "white")
  draw = ImageDraw.Draw(image)
  pts = [tuple(int(v) for v in rng.integers(40, size - 40, 2)) for _ in range(3)]
  draw.polygon(pts, outline=line, width=3)
  cx, cy, r = (int(v) for v in rng.integers(150, size - 150, 3) // np.array([1, 1, 2]))
  draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=circle, width=2)
  for name, (x, y) in zip("ABC", pts):
    draw.text((x + 6, y + 6), name, fill=text)
  draw.text((20, 20), f"{int(rng.integers(10, 90))}", fill=text)
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


def make_records(n: int) -> list[dict]:
  return [{"id": f"g{i}", "images": [diagram(i)], "answer": str(i), "source": "bench",
           "problem": f"<image>In the figure, triangle ABC has an angle of {20 + i % 60} degrees at A. Find the "
                      f"measure of angle x. Round to the nearest tenth."} for i in range(n)]


def run_pipeline(records, tokenizer, prompt, *, batch_size, **data_kwargs) -> tuple[float, float]:
  """(steady records/s, seconds to the first batch) over one pass: the rate counts the batches after the first, so
  worker start-up (spawned processes import jax and transformers) is reported apart."""
  from jaxvg.data.pipeline import DataConfig, make_iterator

  data = DataConfig(batch_size=batch_size, num_epochs=1, seed=0, length_buckets=(512, 1024),
                    patch_buckets=(batch_size * 1296 // 2, batch_size * 1296), **data_kwargs)
  start = time.perf_counter()
  it = make_iterator(records, tokenizer=tokenizer, prompt=prompt, data=data, shard_index=0, shard_count=1)
  try:
    next(it)
    first = time.perf_counter()
    n = sum(int(batch.prompts.valid_B.sum()) for batch in it)
  finally:
    it.close()
  return n / (time.perf_counter() - first), first - start


def breakdown(records, tokenizer, prompt, *, batch_size) -> dict:
  """Per-record milliseconds of each processing stage, inline."""
  from jaxvg.data import processing, prompts
  from jaxvg.data.batch import collate

  proc = processing.make_processor(tokenizer, prompt)
  t_image = t_text = 0.0
  examples = []
  for r in records:
    t0 = time.perf_counter()
    images = [processing.load_image(im) for im in r["images"]]
    pixels, grid = processing.process_images(proc, images)
    t1 = time.perf_counter()
    text = processing.render(tokenizer, prompts.build_messages(r["problem"], fmt=proc.fmt), proc.fmt.prefill)
    prompt_ = processing.make_prompt(proc, text, pixels, grid)
    t2 = time.perf_counter()
    t_image, t_text = t_image + t1 - t0, t_text + t2 - t1
    examples.append(processing.Example(id=r["id"], source="bench", answer=r["answer"], prompt=prompt_,
                                       counterfactuals={}))
  t0 = time.perf_counter()
  for k in range(0, len(examples) - batch_size + 1, batch_size):
    collate(examples[k:k + batch_size], batch_size=batch_size, length_buckets=(512, 1024),
            patch_buckets=(batch_size * 1296,), max_images=1, pad_id=tokenizer.pad_token_id)
  t_collate = time.perf_counter() - t0
  n = len(records)
  return {"decode_and_image_processor": 1e3 * t_image / n, "template_tokenize_positions": 1e3 * t_text / n,
          "collate": 1e3 * t_collate / (n // batch_size * batch_size), "patches_per_record": int(np.prod(grid))}


def alternate(a, b, *, pairs: int) -> dict:
  """Times a() and b() alternately, A B A B ..., after one untimed call of each; per-pair ratios A / B.

  Both clocks are read: the thread's CPU time (per core: what the work costs the core it runs on, whatever else the
  shared host runs) and wall time.
  """
  a(), b()
  times = []  # per pair: (A cpu, B cpu, A wall, B wall)
  for _ in range(pairs):
    c0, t0 = time.thread_time(), time.perf_counter()
    a()
    c1, t1 = time.thread_time(), time.perf_counter()
    b()
    times.append((c1 - c0, time.thread_time() - c1, t1 - t0, time.perf_counter() - t1))
  times = np.asarray(times)
  q1, median, q3 = np.percentile(times[:, 0] / times[:, 1], [25, 50, 75])
  wall_q1, wall_median, wall_q3 = np.percentile(times[:, 2] / times[:, 3], [25, 50, 75])
  r = lambda v: round(float(v), 2)
  return {"ratio_median": r(median), "ratio_iqr": [r(q1), r(q3)], "wall_ratio_median": r(wall_median),
          "wall_ratio_iqr": [r(wall_q1), r(wall_q3)], "cpu_seconds_median": np.median(times[:, :2], axis=0)}


def fast_vs_transformers(images, tokenizer, prompt, *, pairs: int, keep: bool = False) -> dict:
  """Image processing alone, one thread: transformers' processor (A) against the fast path (B) on decoded images.

  Each image's output is dropped before the next (the allocator hands the same memory back), or with `keep` all of
  them are held to the end, as a batch is, so that every output lands in memory the process touches for the first
  time (page faults, about 3 ms per 6 MB output on the 2-core VM, the same for both paths).
  """
  from jaxvg.data import processing

  fast = processing.make_processor(tokenizer, prompt)
  reference = processing.make_processor(tokenizer, dataclasses.replace(prompt, image_backend="transformers"))

  def run(proc):
    def side():
      kept = []
      for im in images:
        out = processing.process_images(proc, [im])
        if keep:
          kept.append(out)
    return side

  out = alternate(run(reference), run(fast), pairs=pairs)
  t_ref, t_fast = out.pop("cpu_seconds_median")
  return {**out, "transformers_records_per_cpu_s": round(len(images) / t_ref, 1),
          "fast_records_per_cpu_s": round(len(images) / t_fast, 1)}


def end_to_end(records, tokenizer, prompt, *, pairs: int, batch_size: int) -> dict:
  """The inline pipeline, transformers' image processor (A) against the fast path (B), alternated like above."""
  reference = dataclasses.replace(prompt, image_backend="transformers")
  rates = []
  for _ in range(pairs):
    rates.append((run_pipeline(records, tokenizer, reference, batch_size=batch_size)[0],
                  run_pipeline(records, tokenizer, prompt, batch_size=batch_size)[0]))
  rates = np.asarray(rates)
  q1, median, q3 = np.percentile(rates[:, 1] / rates[:, 0], [25, 50, 75])
  return {"ratio_median": round(float(median), 2), "ratio_iqr": [round(float(q1), 2), round(float(q3), 2)],
          "transformers_records_per_s": round(float(np.median(rates[:, 0])), 2),
          "fast_records_per_s": round(float(np.median(rates[:, 1])), 2), "pairs": pairs}


def fast_breakdown(images, prompt) -> dict:
  """Per-image CPU milliseconds of the fast path's steps (medians over the images)."""
  from jaxvg.data import images as fast

  steps = []
  for im in images:
    t0 = time.thread_time()
    source = fast.resize_source(im)
    t1 = time.thread_time()
    h, w, _, _ = fast.patches_grid(im.height, im.width, min_pixels=prompt.min_pixels, max_pixels=prompt.max_pixels,
                                   patch_size=prompt.patch_size, merge_size=prompt.merge_size)
    resized = source.resize((w, h), Image.Resampling.BICUBIC)
    t2 = time.thread_time()
    out_PX = np.empty((h * w // prompt.patch_size**2, 3 * prompt.temporal_patch_size * prompt.patch_size**2),
                      np.float32)
    fast.patchify(np.asarray(resized), out_PX, patch_size=prompt.patch_size, merge_size=prompt.merge_size,
                  temporal_patch_size=prompt.temporal_patch_size)
    t3 = time.thread_time()
    steps.append((t1 - t0, t2 - t1, t3 - t2))
  convert, resize, patchify = (round(1e3 * float(v), 3) for v in np.median(steps, axis=0))
  return {"convert_and_band_check": convert, "pil_resize": resize, "patchify_and_normalize": patchify,
          "resized_mode": source.mode}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--records", type=int, default=96)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--pairs", type=int, default=15)
  parser.add_argument("--compare-images", type=int, default=16, help="decoded images per side of each pair")
  parser.add_argument("--pipeline-pairs", type=int, default=7, help="alternated inline pipeline runs per backend")
  args = parser.parse_args()

  from jaxvg.data import processing
  from jaxvg.data.tokenizer import load_tokenizer

  # Qwen's default max_pixels would allow larger images than a record's patch share; the 512x512 records all fit.
  logging.getLogger("jaxvg.data.pipeline").setLevel(logging.ERROR)

  tokenizer = load_tokenizer()
  records = make_records(args.records)
  prompt = processing.PromptConfig(prompt_format="pgpo", max_images=1)  # Qwen2.5-VL's default pixel budget
  n = args.compare_images
  gray = [processing.load_image(diagram(i)) for i in range(n)]
  colour = [processing.load_image(diagram(i, colour=True)) for i in range(n)]
  compare = {**fast_vs_transformers(gray, tokenizer, prompt, pairs=args.pairs),
             "colour": fast_vs_transformers(colour, tokenizer, prompt, pairs=args.pairs),
             "outputs_kept": fast_vs_transformers(gray, tokenizer, prompt, pairs=args.pairs, keep=True),
             "fast_breakdown_ms": fast_breakdown(gray, prompt),
             "fast_breakdown_ms_colour": fast_breakdown(colour, prompt),
             "pairs": args.pairs, "images_per_side": n, "threads": 1}
  parts = breakdown(records[:32], tokenizer, prompt, batch_size=args.batch_size)
  compare["end_to_end_inline"] = end_to_end(records, tokenizer, prompt, pairs=args.pipeline_pairs,
                                            batch_size=args.batch_size)
  modes = {"inline": {}, "threads2": dict(read_threads=2, prefetch=16), "workers2": dict(worker_count=2)}
  runs = {name: run_pipeline(records, tokenizer, prompt, batch_size=args.batch_size, **kw)
          for name, kw in modes.items()}
  rates = {name: rate for name, (rate, _) in runs.items()}
  best = max(rates, key=rates.get)
  print(json.dumps({
      "bench": "data",
      "records_per_s": round(rates[best], 2),
      "best": best,
      "records_per_s_by_mode": {k: round(v, 2) for k, v in rates.items()},
      "first_batch_s_by_mode": {k: round(first, 2) for k, (_, first) in runs.items()},
      "breakdown_ms": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in parts.items()},
      "image_backend": prompt.image_backend,
      "fast_vs_transformers": compare,
      "image": "512x512 PNG diagram -> 504x504",
      "batch_size": args.batch_size,
      "records": args.records,
      "cpus": os.cpu_count(),
      "load_average_1min": round(os.getloadavg()[0], 2),
      "over_step_rate": None,
      "over_step_rate_note": "records/s divided by the trainer's records/s; the step time comes from bench/forward.py",
  }))


if __name__ == "__main__":
  main()
