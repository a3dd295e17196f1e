"""Bad records: each kind is skipped with a named reason, counted, logged, and the pipeline goes on; a dataset of
bad records only ends with an error naming the counts instead of hanging."""

import logging

import pytest
from PIL import Image

from data_fixtures import png_bytes, qwen25vl_tokenizer, random_image, write_jsonl
from jaxvg.data import processing, prompts, readers
from jaxvg.data.pipeline import DataConfig, make_iterator

RAW = prompts.PromptFormat(name="raw", system=None, user_template="{question}", prefill="", sections=(),
                           images_first=False)
PROMPT = processing.PromptConfig(prompt_format=RAW, max_pixels=56 * 56 * 4, max_images=2)
DATA = DataConfig(batch_size=2, shuffle=False, num_epochs=1, drop_remainder=False, length_buckets=(128, 256),
                  patch_buckets=(64, 128))


@pytest.fixture(scope="module")
def tok():
  return qwen25vl_tokenizer()


def good(i):
  return {"id": f"good{i}", "images": [png_bytes(random_image(56, 56, seed=i))], "problem": f"<image>What is {i}?",
          "answer": str(i), "source": "t"}


def run(tok, bad, *, source=None, data=DATA):
  """Iterates good0, bad..., good1, good2 to the end; returns (ids of the usable records, counts)."""
  records = [good(0), *bad, good(1), good(2)] if source is None else source
  it = make_iterator(records, tokenizer=tok, prompt=PROMPT, data=data, shard_index=0, shard_count=1)
  ids = [i for batch in it for i, v in zip(batch.ids, batch.prompts.valid_B) if v]
  return ids, it.counts


def check(tok, bad, reason, caplog):
  with caplog.at_level(logging.WARNING, logger="jaxvg.data.pipeline"):
    ids, counts = run(tok, bad)
  assert ids == ["good0", "good1", "good2"]
  assert counts == {"ok": 3, reason: len(bad)}
  assert f"({reason}:" in caplog.text


def test_corrupt_image_bytes(tok, caplog):
  truncated = png_bytes(random_image(56, 56, seed=9))[:60]
  check(tok, [{**good(5), "id": "b1", "images": [b"not an image"]},
              {**good(6), "id": "b2", "images": [truncated]},
              {**good(7), "id": "b3", "images": [b""]}], "corrupt_image", caplog)
  assert "skipping record b1" in caplog.text


def test_missing_image_file(tok, tmp_path, caplog):
  check(tok, [{**good(5), "images": [str(tmp_path / "nowhere.png")]}], "missing_image_file", caplog)


def test_zero_size_and_one_pixel_images(tok, caplog):
  check(tok, [{**good(5), "images": [Image.new("RGB", (0, 0))]},
              {**good(6), "images": [png_bytes(Image.new("RGB", (1, 1), "red"))]},
              {**good(7), "images": [png_bytes(Image.new("RGB", (3, 90), "red"))]}], "image_too_small", caplog)


def test_extreme_aspect_ratio(tok, caplog):
  # 4 x 1000 pixels: a ratio of 250, over the processor's limit of 200.
  check(tok, [{**good(5), "images": [png_bytes(Image.new("RGB", (1000, 4), "blue"))]}], "extreme_aspect_ratio",
        caplog)


def test_placeholders_do_not_match_images(tok, caplog):
  check(tok, [{**good(5), "problem": "<image><image>Two?"},
              {**good(6), "problem": "No placeholder?"}], "placeholder_mismatch", caplog)


def test_prompt_over_the_length_limit(tok, caplog):
  # The limit is the largest length bucket, 256 tokens; " word" is one token each.
  check(tok, [{**good(5), "problem": "<image>" + " word" * 300}], "prompt_too_long", caplog)


def test_missing_or_empty_answer(tok, caplog):
  no_answer = good(5)
  del no_answer["answer"]
  check(tok, [no_answer, {**good(6), "answer": ""}, {**good(7), "answer": "  \n"}, {**good(8), "answer": None}],
        "missing_answer", caplog)


def test_non_utf8_text(tok, tmp_path, caplog):
  check(tok, [{**good(5), "problem": b"<image>caf\xe9?"}, {**good(6), "answer": "\ud800"}], "non_utf8_text", caplog)
  # In a JSONL file: the line is skipped, the lines around it are read.
  (tmp_path / "a.png").write_bytes(png_bytes(random_image(56, 56)))
  line = lambda i: {"image": "a.png", "problem": f"<image>Q{i}", "answer": str(i), "id": f"j{i}"}
  path = write_jsonl(tmp_path / "d.jsonl", [line(0), b'{"image": "a.png", "problem": "<image>\xff\xfe", "answer": '
                                            b'"1"}', line(2), b"{not json", line(3)])
  ids, counts = run(tok, None, source=readers.JsonlSource(path))
  assert ids == ["j0", "j2", "j3"] and counts == {"ok": 3, "non_utf8_text": 1, "malformed_record": 1}


def test_reserved_tokens_in_text(tok, caplog):
  check(tok, [{**good(5), "problem": "<image>What is <|image_pad|>?"}], "special_token_in_text", caplog)


def test_too_many_images_or_patches(tok, caplog):
  images = [png_bytes(random_image(56, 56, seed=k)) for k in range(3)]
  check(tok, [{**good(5), "images": images, "problem": "<image>" * 3 + "Three?"}], "too_many_images", caplog)
  # A record may hold max(patch_buckets) // batch_size = 64 patches; two 112x112 images are 2 * 64.
  big = [png_bytes(random_image(112, 112, seed=k)) for k in range(2)]
  caplog.clear()
  check(tok, [{**good(6), "images": big, "problem": "<image><image>Two?"}], "too_many_patches", caplog)


def test_malformed_records(tok, caplog):
  no_problem = good(5)
  del no_problem["problem"]
  ids, counts = run(tok, [no_problem, "just a string", {**good(6), "images": [12345]}])
  assert ids == ["good0", "good1", "good2"]
  assert counts == {"ok": 3, "missing_problem": 1, "malformed_record": 2}


def test_every_record_bad_is_a_clear_error(tok):
  bad = [{**good(k), "answer": ""} for k in range(3)] + [{**good(9), "images": [b"junk"]}]
  with pytest.raises(ValueError, match=r"no usable record.*'missing_answer': 3, 'corrupt_image': 1"):
    run(tok, None, source=bad)
  # Repeating forever: the error comes after two epochs' worth of rejections, not a hang.
  forever = DataConfig(batch_size=2, num_epochs=None, length_buckets=(128,), patch_buckets=(128,))
  with pytest.raises(ValueError, match=r"no usable record in 8 consecutive records.*'missing_answer': 6"):
    run(tok, None, source=bad, data=forever)


def test_mostly_bad_data_still_batches(tok):
  """One usable record among many bad ones, repeated forever: batches keep coming."""
  source = [{**good(k), "answer": ""} for k in range(5)] + [good(7)]
  forever = DataConfig(batch_size=2, seed=1, num_epochs=None, length_buckets=(128,), patch_buckets=(128,))
  it = make_iterator(source, tokenizer=tok, prompt=PROMPT, data=forever, shard_index=0, shard_count=1)
  for _ in range(3):
    assert next(it).ids == ("good7", "good7")
  counts = it.counts
  # Six epochs were opened; the first five were read whole (5 rejections each), the sixth up to its good record.
  assert counts["ok"] == 6 and 25 <= counts["missing_answer"] < 30
  # Every record read is counted once: the counts add up to the records consumed.
  assert counts["ok"] + counts["missing_answer"] == it.get_state()["parent"]["next_index"]
  assert it.get_state()["counts"] == counts


def test_check_record_reasons_directly():
  """The validation alone, without the pipeline: each rule names its reason."""
  cases = {
      "missing_problem": {"answer": "1"},
      "missing_answer": {"problem": "x", "answer": "   "},
      "malformed_record": {"problem": 3, "answer": "1"},
      "placeholder_mismatch": {"problem": "<image>x", "answer": "1", "images": []},
      "special_token_in_text": {"problem": "x", "answer": "1", "system": "<|vision_start|>"},
  }
  for reason, record in cases.items():
    with pytest.raises(processing.RecordError) as e:
      processing.check_record(record)
    assert e.value.reason == reason
  assert processing.check_record({"problem": "x", "answer": 7})[1] == "7"  # numeric answers become text
  single = png_bytes(random_image(8, 8))
  assert processing.check_record({"problem": "<image>x", "answer": "1", "images": single})[2] == [single]
