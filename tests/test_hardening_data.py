"""Hardening of the data path (issue 17): each adversarial input ends as a named, counted skip or as an error naming
the file, and high-bit images are converted by their value range instead of being clipped."""

import codecs
import io
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_fixtures import png_bytes, qwen25vl_tokenizer, random_image, write_geometry3k_parquet, write_jsonl
from jaxvg.data import processing, prompts, readers
from jaxvg.data.pipeline import DataConfig, make_iterator
from jaxvg.data.processing import RecordError

RAW = prompts.PromptFormat(name="raw", system=None, user_template="{question}", prefill="", sections=(),
                           images_first=False)
PROMPT = processing.PromptConfig(prompt_format=RAW, max_pixels=56 * 56 * 4, max_images=2)
DATA = DataConfig(batch_size=2, shuffle=False, num_epochs=1, drop_remainder=False, length_buckets=(128, 256),
                  patch_buckets=(64, 128))
IMAGE_BYTES = png_bytes(random_image(56, 56, seed=1))


@pytest.fixture(scope="module")
def tok():
  return qwen25vl_tokenizer()


def run(tok, source):
  """Iterates `source` to the end; returns (ids of the usable records, counts)."""
  it = make_iterator(source, tokenizer=tok, prompt=PROMPT, data=DATA, shard_index=0, shard_count=1)
  ids = [i for batch in it for i, v in zip(batch.ids, batch.prompts.valid_B) if v]
  return ids, it.counts


def reason_of(source, index) -> RecordError:
  with pytest.raises(RecordError) as e:
    source[index]
  return e.value


def verl_row(i, **overrides):
  row = {"data_source": "geo", "prompt": [{"role": "user", "content": f"<image>Q{i}?"}],
         "images": [{"bytes": IMAGE_BYTES, "path": None}], "reward_model": {"ground_truth": str(i)},
         "extra_info": {"index": i}}
  return {**row, **overrides}


def write_rows(path, rows) -> str:
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


# ---------------------------------------------------------------- item 1: wrong-typed verl fields, guarded parsing


def test_verl_wrong_typed_fields_are_named_skips(tmp_path, tok, caplog):
  # A parquet column has one type, so the wrong-typed rows live in their own files next to the good ones.
  write_rows(tmp_path / "a_good.parquet", [verl_row(0), verl_row(1)])
  write_rows(tmp_path / "b_prompt.parquet", [verl_row(2, prompt="<image>Q2?")])
  write_rows(tmp_path / "c_reward.parquet", [verl_row(3, reward_model="3")])
  write_rows(tmp_path / "d_extra.parquet", [verl_row(4, extra_info="{'index': 4}")])
  write_rows(tmp_path / "e_good.parquet", [verl_row(5)])
  with caplog.at_level(logging.WARNING):
    src = readers.VerlParquetSource(tmp_path)
  for k, field in [(2, "prompt"), (3, "reward_model"), (4, "extra_info")]:
    e = reason_of(src, k)
    assert e.reason == "malformed_record" and f"{field} is a str" in e.detail
    assert "parquet row 0" in e.detail and str(tmp_path) in e.detail  # the file and the row are named
  assert "record b_prompt:2 " in reason_of(src, 2).detail  # the record's id (extra_info.index)
  with caplog.at_level(logging.WARNING, logger="jaxvg.data.pipeline"):
    ids, counts = run(tok, src)
  assert ids == ["a_good:0", "a_good:1", "e_good:5"] and counts == {"ok": 3, "malformed_record": 3}
  assert "prompt is a str" in caplog.text and "b_prompt.parquet" in caplog.text


def test_unexpected_exceptions_in_readers_are_named_skips(tmp_path, monkeypatch):
  # verl content given as a list of strings: the parser meets a str where it expects a dict.
  src = readers.VerlParquetSource(write_rows(tmp_path / "v.parquet", [
      verl_row(0, prompt=[{"role": "user", "content": ["<image>", "Q?"]}])]))
  e = reason_of(src, 0)
  assert e.reason == "malformed_record" and "AttributeError" in e.detail and "v.parquet row 0" in e.detail

  def boom(*args, **kwargs):
    raise RuntimeError("boom")

  (tmp_path / "a.png").write_bytes(IMAGE_BYTES)
  hf = readers.HFParquetSource(write_rows(tmp_path / "h.parquet", [{"images": [{"bytes": None, "path": "a.png"}],
                                                                   "problem": "<image>Q?", "answer": "1"}]))
  jsonl = readers.JsonlSource(write_jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "problem": "<image>Q?",
                                                                  "answer": "1"}]))
  monkeypatch.setattr(readers, "image_path", boom)
  for source, where in [(hf, "h.parquet row 0"), (jsonl, "d.jsonl line 1")]:
    e = reason_of(source, 0)
    assert e.reason == "malformed_record" and "RuntimeError: boom" in e.detail and where in e.detail


# ---------------------------------------------------------------- item 3: 16-bit and float images


def tiled(values, dtype):
  """A 12 x 16 image of four 12 x 4 bands, one per value (big enough for the size checks)."""
  return np.repeat(np.asarray(values, dtype)[None, :], 4, axis=1).repeat(12, axis=0)


def tiff_bytes(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="TIFF")
  return buf.getvalue()


def rgb_bands(image: Image.Image) -> list[int]:
  pixels = np.asarray(image)
  assert image.mode == "RGB" and pixels.dtype == np.uint8
  assert (pixels == pixels[..., :1]).all()  # gray
  return pixels[0, ::4, 0].tolist()


def test_16_bit_images_scale_by_their_bit_depth():
  # 0 -> 0, 65535 -> 255, 32768 -> 127.5 rounds to 128, 100 * 257 -> 100.
  png = png_bytes(Image.fromarray(tiled([0, 65535, 32768, 25700], np.uint16)))
  assert Image.open(io.BytesIO(png)).mode == "I;16"
  assert rgb_bands(processing.load_image(png)) == [0, 255, 128, 100]
  # 32-bit integer images ("I", e.g. a 16-bit TIFF): the same rule when they hold 16-bit values ...
  assert rgb_bands(processing.load_image(tiff_bytes(Image.fromarray(tiled([0, 65535, 32768, 25700], np.int32))))) \
      == [0, 255, 128, 100]
  # ... and their min..max otherwise: -100 -> 0, 100000 -> 255, 49950 -> 127.5 -> 128, 0 -> 0.25 -> 0.
  assert rgb_bands(processing.load_image(Image.fromarray(tiled([-100, 100000, 49950, 0], np.int32)))) \
      == [0, 255, 128, 0]


def test_float_images_scale_by_their_value_range():
  # In [0, 1]: times 255.
  f01 = Image.fromarray(tiled([0.0, 1.0, 0.5, 0.2], np.float32))
  assert rgb_bands(processing.load_image(tiff_bytes(f01))) == [0, 255, 128, 51]
  # In [0, 255]: kept.
  assert rgb_bands(processing.load_image(Image.fromarray(tiled([0.0, 255.0, 12.4, 200.0], np.float32)))) \
      == [0, 255, 12, 200]
  # Anything else: min..max. -1 -> 0, 3 -> 255, 1 -> 127.5 -> 128, 0 -> 63.75 -> 64.
  assert rgb_bands(processing.load_image(Image.fromarray(tiled([-1.0, 3.0, 1.0, 0.0], np.float32)))) \
      == [0, 255, 128, 64]
  with pytest.raises(RecordError) as e:
    processing.load_image(Image.fromarray(tiled([0.0, np.nan, 0.5, 1.0], np.float32)))
  assert e.value.reason == "unsupported_image"


def test_high_bit_image_gives_the_pixels_of_its_8_bit_twin(tok):
  proc = processing.make_processor(tok, PROMPT)
  values_u16 = np.random.default_rng(0).integers(0, 256, size=(56, 56)).astype(np.uint16) * 257
  record = {"id": "x", "problem": "<image>What?", "answer": "1"}
  ex16 = processing.process_record(proc, {**record, "images": [png_bytes(Image.fromarray(values_u16))]})
  twin = Image.fromarray((values_u16 // 257).astype(np.uint8)).convert("RGB")
  ex8 = processing.process_record(proc, {**record, "images": [twin]})
  np.testing.assert_array_equal(ex16.prompt.pixel_values_PX, ex8.prompt.pixel_values_PX)


def test_unconvertible_image_mode_is_a_named_skip():
  with pytest.raises(RecordError) as e:
    processing.load_image(Image.new("La", (8, 8)))
  assert e.value.reason == "unsupported_image" and "La" in e.value.detail


# ---------------------------------------------------------------- item 4: NaN answers


def test_nan_answers_are_missing(tmp_path, tok):
  with pytest.raises(RecordError, match="missing_answer"):
    processing.check_record({"problem": "x", "answer": float("nan")})
  with pytest.raises(RecordError, match="missing_answer"):
    processing.check_record({"problem": "x", "answer": np.float32("nan")})
  assert processing.check_record({"problem": "x", "answer": np.float32(2.5)})[1] == "2.5"
  # A float answer column of a parquet file, and a JSON NaN.
  images = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
  table = pa.table({"images": pa.array([[{"bytes": IMAGE_BYTES, "path": None}]] * 3, type=images),
                    "problem": ["<image>A?", "<image>B?", "<image>C?"],
                    "answer": pa.array([1.5, float("nan"), 2.0], pa.float64()), "id": ["p0", "p1", "p2"]})
  pq.write_table(table, str(tmp_path / "f.parquet"))
  ids, counts = run(tok, readers.HFParquetSource(tmp_path / "f.parquet"))
  assert ids == ["p0", "p2"] and counts == {"ok": 2, "missing_answer": 1}
  (tmp_path / "a.png").write_bytes(IMAGE_BYTES)
  path = tmp_path / "d.jsonl"
  path.write_text('{"id": "j0", "image": "a.png", "problem": "<image>Q?", "answer": NaN}\n'
                  '{"id": "j1", "image": "a.png", "problem": "<image>Q?", "answer": "4"}\n')
  ids, counts = run(tok, readers.JsonlSource(path))
  assert ids == ["j1"] and counts == {"ok": 1, "missing_answer": 1}


# ---------------------------------------------------------------- item 7: image paths outside the image folder


def outside_layout(tmp_path):
  """images/ (in.png, link.png -> ../outside/x.png) and outside/x.png."""
  (tmp_path / "images").mkdir()
  (tmp_path / "outside").mkdir()
  (tmp_path / "images" / "in.png").write_bytes(IMAGE_BYTES)
  (tmp_path / "outside" / "x.png").write_bytes(IMAGE_BYTES)
  os.symlink(tmp_path / "outside" / "x.png", tmp_path / "images" / "link.png")
  return ["../outside/x.png", str(tmp_path / "outside" / "x.png"), "link.png"]


def test_jsonl_image_outside_the_image_dir_is_refused(tmp_path, tok):
  bad = outside_layout(tmp_path)
  inside_abs = str(tmp_path / "images" / "in.png")
  lines = [{"id": f"ok{k}", "image": name, "problem": "<image>Q?", "answer": "1"}
           for k, name in enumerate(["in.png", inside_abs])]
  lines += [{"id": f"bad{k}", "image": name, "problem": "<image>Q?", "answer": "1"} for k, name in enumerate(bad)]
  path = write_jsonl(tmp_path / "d.jsonl", lines)
  src = readers.JsonlSource(path, image_dir=tmp_path / "images")
  e = reason_of(src, 2)
  assert e.reason == "image_outside_dir" and "../outside/x.png" in e.detail
  ids, counts = run(tok, src)
  assert ids == ["ok0", "ok1"] and counts == {"ok": 2, "image_outside_dir": 3}
  ids, counts = run(tok, readers.JsonlSource(path, image_dir=tmp_path / "images", allow_outside=True))
  assert ids == ["ok0", "ok1", "bad0", "bad1", "bad2"]


def test_parquet_image_outside_its_folder_is_refused(tmp_path):
  bad = outside_layout(tmp_path)
  cells = [[{"bytes": None, "path": name}] for name in ["in.png", *bad]]  # paths relative to the parquet's folder
  hf_path = write_rows(tmp_path / "images" / "h.parquet",
                       [{"images": cell, "problem": "<image>Q?", "answer": "1"} for cell in cells])
  verl_path = write_rows(tmp_path / "images" / "v.parquet", [verl_row(k, images=cell) for k, cell in enumerate(cells)])
  for make, path in [(readers.HFParquetSource, hf_path), (readers.VerlParquetSource, verl_path)]:
    src = make(path)
    assert src[0]["images"] == [str(tmp_path / "images" / "in.png")]
    assert [reason_of(src, k).reason for k in (1, 2, 3)] == ["image_outside_dir"] * 3
    assert make(path, allow_outside=True)[3]["images"] == [str(tmp_path / "images" / "link.png")]


# ---------------------------------------------------------------- item 8: empty problems


def test_empty_problems_are_skipped(tok):
  good = {"id": "good", "images": [IMAGE_BYTES], "problem": "<image>Q?", "answer": "1"}
  bad = [{"id": "e0", "images": [], "problem": "", "answer": "1"},
         {"id": "e1", "images": [], "problem": " \n\t", "answer": "1"},
         {"id": "e2", "images": [IMAGE_BYTES], "problem": "<image>", "answer": "1"},
         {"id": "e3", "images": [IMAGE_BYTES] * 2, "problem": " <image>\n<image> ", "answer": "1"},
         {"id": "e4", "images": [IMAGE_BYTES], "problem": "", "answer": "1"}]  # empty, not a placeholder mismatch
  ids, counts = run(tok, [good, *bad])
  assert ids == ["good"] and counts == {"ok": 1, "empty_problem": 5}


# ---------------------------------------------------------------- item 10: whole-file faults


def test_unreadable_parquet_files_are_named(tmp_path):
  (tmp_path / "empty.parquet").write_bytes(b"")
  with pytest.raises(ValueError, match=r"empty\.parquet.*not a readable parquet file"):
    readers.HFParquetSource(tmp_path / "empty.parquet")
  write_rows(tmp_path / "full.parquet", [verl_row(i) for i in range(4)])
  data = (tmp_path / "full.parquet").read_bytes()
  (tmp_path / "cut.parquet").write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"cut\.parquet.*not a readable parquet file"):
    readers.VerlParquetSource(tmp_path / "cut.parquet")
  pq.write_table(pa.table({"problem": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                 str(tmp_path / "none.parquet"))
  with pytest.raises(ValueError, match=r"none\.parquet.*no rows"):
    readers.HFParquetSource(tmp_path / "none.parquet")


def test_missing_columns_are_named_against_the_columns_found(tmp_path):
  path = write_rows(tmp_path / "caps.parquet", [{"Question": "<image>Q?", "Answer": "1", "images": [IMAGE_BYTES]}])
  with pytest.raises(ValueError, match=r"caps\.parquet has no column 'problem' or 'question'.*columns found: "
                                       r"Question: string, Answer: string"):
    readers.HFParquetSource(path)
  path = write_rows(tmp_path / "v.parquet", [{"prompt": [{"role": "user", "content": "Q?"}], "answer": "1"}])
  with pytest.raises(ValueError, match=r"v\.parquet has no column 'reward_model'.*columns found: prompt: list"):
    readers.VerlParquetSource(path)
  (tmp_path / "empty.jsonl").write_text("\n  \n")
  with pytest.raises(ValueError, match=r"empty\.jsonl holds no record"):
    readers.JsonlSource(tmp_path / "empty.jsonl")


def test_jsonl_missing_keys_are_named(tmp_path):
  src = readers.JsonlSource(write_jsonl(tmp_path / "d.jsonl", [{"Question": "Q?", "answer": "1"}]))
  e = reason_of(src, 0)
  assert e.reason == "missing_problem" and "keys found: ['Question', 'answer']" in e.detail


def test_a_string_images_value_is_a_named_skip(tmp_path, tok, caplog):
  (tmp_path / "in.png").write_bytes(IMAGE_BYTES)
  rows = [{"images": "in.png", "problem": "<image>Q?", "answer": "1"}]
  with caplog.at_level(logging.WARNING, logger="jaxvg.data.readers"):
    hf = readers.HFParquetSource(write_rows(tmp_path / "h.parquet", rows))
  assert "h.parquet: column 'images' is string" in caplog.text  # named once when the file is opened
  verl = readers.VerlParquetSource(write_rows(tmp_path / "v.parquet", [verl_row(0, images="in.png")]))
  jsonl = readers.JsonlSource(write_jsonl(tmp_path / "d.jsonl", rows))
  for src in (hf, verl, jsonl):
    e = reason_of(src, 0)
    assert e.reason == "bad_images_field" and "a str" in e.detail
  good = write_geometry3k_parquet(tmp_path / "good.parquet", [
      {"images": [IMAGE_BYTES], "problem": "<image>Q?", "answer": "2"}])
  ids, counts = run(tok, readers.HFParquetSource([good, str(tmp_path / "h.parquet")]))
  assert ids == ["good:0"] and counts == {"ok": 1, "bad_images_field": 1}


# ---------------------------------------------------------------- item 13: a UTF-8 byte-order mark


def test_jsonl_with_a_byte_order_mark_keeps_its_first_record(tmp_path, tok):
  (tmp_path / "a.png").write_bytes(IMAGE_BYTES)
  lines = [{"id": f"j{i}", "image": "a.png", "problem": f"<image>Q{i}?", "answer": str(i)} for i in range(3)]
  path = tmp_path / "d.jsonl"
  write_jsonl(path, lines)
  path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
  src = readers.JsonlSource(path)
  assert len(src) == 3 and src[0]["id"] == "j0" and src[0]["problem"] == "<image>Q0?"
  ids, counts = run(tok, src)
  assert ids == ["j0", "j1", "j2"] and counts == {"ok": 3}
