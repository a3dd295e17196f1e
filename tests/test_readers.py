"""Readers: each dataset format yields the canonical records it was written from, and the same data read as
Geometry3K parquet, as verl parquet and as JSONL with an image folder gives identical batches."""

import os
import pickle

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_fixtures import (make_records, png_bytes, qwen25vl_tokenizer, random_image, write_geometry3k_parquet,
                           write_jsonl, write_verl_parquet)
from jaxvg.data import processing, prompts, readers
from jaxvg.data.pipeline import DataConfig, make_dataset
from jaxvg.data.processing import RecordError

RAW = prompts.PromptFormat(name="raw", system=None, user_template="{question}", prefill="", sections=(),
                           images_first=False)
SIZES = [[(100, 150)], [(60, 90), (40, 40)], [(84, 56)], [(70, 70)], [(90, 40)], [(50, 120)]]


@pytest.fixture(scope="module")
def records():
  return make_records(SIZES, seed=11)


@pytest.fixture(scope="module")
def tok():
  return qwen25vl_tokenizer()


def test_geometry3k_parquet(tmp_path, records):
  src = readers.HFParquetSource(write_geometry3k_parquet(tmp_path / "train-00000.parquet", records))
  assert len(src) == len(records)
  for i, r in enumerate(records):
    got = src[i]
    assert got["id"] == f"train-00000:{i}" and got["source"] == "train-00000"
    assert got["images"] == r["images"] and got["problem"] == r["problem"] and got["answer"] == r["answer"]
  with pytest.raises(IndexError):
    src[len(records)]


def test_verl_parquet(tmp_path, records):
  path = write_verl_parquet(tmp_path / "geo3k.parquet", records, system="Think first.")
  src = readers.VerlParquetSource(path)
  assert len(src) == len(records)
  for i, r in enumerate(records):
    got = src[i]
    assert got["images"] == r["images"] and got["problem"] == r["problem"] and got["answer"] == r["answer"]
    assert got["system"] == "Think first." and got["source"] == "hiyouga/geometry3k" and got["id"] == f"geo3k:{i}"


def test_verl_list_content_and_bad_prompt(tmp_path):
  image = png_bytes(random_image(40, 40))
  rows = [
      {"prompt": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Area?"}]}],
       "images": [{"bytes": image, "path": None}], "reward_model": {"ground_truth": "4"}},
      {"prompt": [{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}],
       "images": [], "reward_model": {"ground_truth": "4"}},
  ]
  path = tmp_path / "v.parquet"
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  src = readers.VerlParquetSource(path, source="mine")
  assert src[0]["problem"] == "<image>Area?" and src[0]["source"] == "mine" and "system" not in src[0]
  with pytest.raises(RecordError, match="malformed_record"):
    src[1]


def test_jsonl_with_image_folder(tmp_path, records):
  image_dir = tmp_path / "images"
  image_dir.mkdir()
  lines = []
  for i, r in enumerate(records):
    names = []
    for j, data in enumerate(r["images"]):
      (image_dir / f"{i}_{j}.png").write_bytes(data)
      names.append(f"{i}_{j}.png")
    key = {"problem": r["problem"]} if i % 2 else {"question": r["problem"]}  # both spellings
    row = {**key, "answer": r["answer"], **({"image": names[0]} if len(names) == 1 else {"images": names})}
    lines.append(row)
  lines.insert(2, b"   ")  # blank lines are skipped, not records
  src = readers.JsonlSource(write_jsonl(tmp_path / "data.jsonl", lines), image_dir=image_dir)
  assert len(src) == len(records)
  for i, r in enumerate(records):
    got = src[i]
    assert [open(p, "rb").read() for p in got["images"]] == r["images"]
    assert got["problem"] == r["problem"] and got["answer"] == r["answer"] and got["source"] == "data"
  assert src[3]["id"] == "data:5"  # 1-based line number, counting the blank line


def test_parquet_directory_single_image_column_and_relative_paths(tmp_path):
  image = random_image(30, 50, seed=3)
  (tmp_path / "pics").mkdir()
  image.save(tmp_path / "pics" / "a.png")
  struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  for k in range(2):
    table = pa.table({"image": pa.array([{"bytes": None, "path": "pics/a.png"}], type=struct),
                      "question": [f"<image>Q{k}"], "answer": [str(k)], "id": [f"row{k}"]})
    pq.write_table(table, str(tmp_path / f"part-{k}.parquet"))
  src = readers.HFParquetSource(tmp_path, source="set")
  assert len(src) == 2
  assert src[1] == {"id": "row1", "images": [str(tmp_path / "pics" / "a.png")], "problem": "<image>Q1",
                    "answer": "1", "source": "set"}


def test_local_paths_only(tmp_path):
  with pytest.raises(ValueError, match="only local paths"):
    readers.HFParquetSource("hf://datasets/hiyouga/geometry3k")
  with pytest.raises(FileNotFoundError):
    readers.JsonlSource(tmp_path / "missing.jsonl")
  with pytest.raises(ValueError, match="no .parquet"):
    readers.VerlParquetSource(tmp_path)


def test_sources_pickle_without_open_tables(tmp_path, records):
  src = readers.HFParquetSource(write_geometry3k_parquet(tmp_path / "g.parquet", records))
  first = src[0]
  clone = pickle.loads(pickle.dumps(src))
  assert clone._rows._tables is None and clone[0] == first


def test_synthetic_adapter(tok):
  src = readers.synthetic_source(split="train", num_records=3)
  record = src[1]
  assert set(record) >= {"id", "images", "problem", "answer", "source"}
  proc = processing.make_processor(tok, processing.PromptConfig(prompt_format="pgpo", max_pixels=224 * 224))
  ex = processing.process_record(proc, record)
  assert ex.prompt.image_grid_thw_I3.shape == (1, 3) and ex.answer == record["answer"]


def _batches(source, tok, n):
  ds = make_dataset(source, tokenizer=tok, shard_index=0, shard_count=1,
                    prompt=processing.PromptConfig(prompt_format=RAW, max_pixels=200_000, max_images=2),
                    data=DataConfig(batch_size=3, seed=3, length_buckets=(128, 256), patch_buckets=(256, 1024)))
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_same_data_in_three_formats_gives_identical_batches(tmp_path, records, tok):
  g3k = readers.HFParquetSource(write_geometry3k_parquet(tmp_path / "g.parquet", records))
  verl = readers.VerlParquetSource(write_verl_parquet(tmp_path / "v.parquet", records))
  os.makedirs(tmp_path / "img")
  lines = []
  for i, r in enumerate(records):
    names = [f"{i}_{j}.png" for j in range(len(r["images"]))]
    for name, data in zip(names, r["images"]):
      (tmp_path / "img" / name).write_bytes(data)
    lines.append({"problem": r["problem"], "answer": r["answer"], "images": names})
  jsonl = readers.JsonlSource(write_jsonl(tmp_path / "d.jsonl", lines), image_dir=tmp_path / "img")
  reference = _batches(g3k, tok, 3)  # 3 batches of 3 from 6 records: two epochs, reshuffled
  for other in (_batches(verl, tok, 3), _batches(jsonl, tok, 3)):
    for a, b in zip(reference, other):
      assert a.answers == b.answers
      leaves_a, tree_a = jax.tree_util.tree_flatten(a.prompts)
      leaves_b, tree_b = jax.tree_util.tree_flatten(b.prompts)
      assert tree_a == tree_b
      for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)
  answers = [ans for batch in reference[:2] for ans in batch.answers]
  assert sorted(answers) == sorted(r["answer"] for r in records)  # the first epoch holds every record once
