"""Data pipeline throughput: records/s from encoded PNG bytes to collated PromptBatches, at Geometry3K-like images.

  python bench/data.py [--records 96] [--batch-size 8]

Records hold one synthesized 512x512 geometry diagram (lines, circles, labels; PNG-encoded, as Geometry3K stores
them). With Qwen2.5-VL's default pixel budget a 512x512 image resizes to 504x504: 36x36 = 1,296 patches and 324
image tokens. The same records go through the pipeline inline, with reader threads and with worker processes; the
headline `records_per_s` is the best steady rate of them (named in `best`), counted after the first batch, whose
latency is reported apart (`first_batch_s_by_mode`: worker processes start by importing jax and transformers).
`breakdown_ms` splits one record's processing inline: decode + transformers' image processor, chat template +
tokenization + positions, and collation.

`over_step_rate` (records/s over the trainer's record consumption rate) stays null: the model step time comes from
bench/forward.py, which fills it in.

Prints one JSON line.
"""

import argparse
import io
import json
import logging
import os
import time

import numpy as np
from PIL import Image, ImageDraw


def diagram(seed: int, size: int = 512) -> bytes:
  """A Geometry3K-like line drawing: a triangle, a circle, a few labelled points, encoded as PNG."""
  rng = np.random.default_rng(seed)
  image = Image.new("RGB", (size, size), "white")
  draw = ImageDraw.Draw(image)
  pts = [tuple(int(v) for v in rng.integers(40, size - 40, 2)) for _ in range(3)]
  draw.polygon(pts, outline="black", width=3)
  cx, cy, r = (int(v) for v in rng.integers(150, size - 150, 3) // np.array([1, 1, 2]))
  draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline="black", width=2)
  for name, (x, y) in zip("ABC", pts):
    draw.text((x + 6, y + 6), name, fill="black")
  draw.text((20, 20), f"{int(rng.integers(10, 90))}", fill="black")
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
  from jaxvg import prompts
  from jaxvg.data import processing
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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--records", type=int, default=96)
  parser.add_argument("--batch-size", type=int, default=8)
  args = parser.parse_args()

  from jaxvg.data import processing
  from jaxvg.data.tokenizer import load_tokenizer

  # Qwen's default max_pixels would allow larger images than a record's patch share; the 512x512 records all fit.
  logging.getLogger("jaxvg.data.pipeline").setLevel(logging.ERROR)

  tokenizer = load_tokenizer()
  records = make_records(args.records)
  prompt = processing.PromptConfig(prompt_format="pgpo", max_images=1)  # Qwen2.5-VL's default pixel budget
  parts = breakdown(records[:32], tokenizer, prompt, batch_size=args.batch_size)
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
