"""Benchmark readers on tiny folders in each dataset's published layout, the faults they name, and the
`python -m jaxvg.evaluate --benchmarks` command on the tiny random model."""

import base64
import json
import os

import pyarrow as pa
import pytest

from jaxvg import benchmarks, evaluate
from jaxvg.benchmarks import run
from jaxvg.data.processing import RecordError
from test_benchmarks_fixtures import (IMAGE_STRUCT, image_cell, logicvista_github, mmstar_tsv, png, wemath_rows,
                                      write_benchmarks, write_parquet)

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "..", "configs", "demo.py")
# Every benchmark the fixtures hold (MathVision's test split and MMMU-Pro's 4-option setting are not written).
WRITTEN = [n for n in benchmarks.BENCHMARKS if n not in ("mathvision", "mmmu_pro_standard4")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_benchmarks(tmp_path_factory.mktemp("benchmarks"))


def records(source):
  """(records, {index: RecordError reason}) of a source."""
  good, bad = [], {}
  for i in range(len(source)):
    try:
      good.append(source[i])
    except RecordError as e:
      bad[i] = e.reason
  return good, bad


def test_every_benchmark_reads_its_published_layout(data_dir):
  sources = benchmarks.load_benchmarks(WRITTEN, data_dir)
  expected_ids = {
      "mathvista": ["1", "2", "3", "4"], "mathverse": ["1", "2", "3", "4"], "mathverse_vision_dominant": ["3"],
      "mathverse_vision_only": ["2", "4"], "mathvision_mini": ["1", "2", "3"],
      "dynamath": ["1#1", "2#1", "1#2", "2#2"], "geometry3k": ["0", "1"],
      "mmmu": ["validation_Accounting_1", "validation_Accounting_2"],
      "mmmu_pro_standard": ["test_Art_1", "test_Art_2"], "mmmu_pro_vision": ["test_Art_1"],
      "hallusionbench": ["VD_illusion_0_0_0", "VD_illusion_0_1_0", "VD_illusion_0_0_1", "VS_chart_1_0_0"],
      "realworldqa": ["0", "1"], "cvbench": ["2D:0", "2D:1", "3D:0"], "mmstar": ["0", "1"],
      "logicvista": ["v1_0", "v1_1", "v1_2"],
      "wemath": ["2steps_1#1", "2steps_1#2", "2steps_1#multi", "3steps_1#1", "3steps_1#2", "3steps_1#3",
                 "3steps_1#multi"],
      "vilp": ["0#1", "0#2", "0#3", "1#1", "1#2", "1#3"], "vilp_p": ["0#1", "0#2", "0#3", "1#1", "1#2", "1#3"]}
  for name, source in sources.items():
    good, bad = records(source)
    assert [r["id"] for r in good] == expected_ids[name], name
    for r in good:  # one placeholder per image, each image as encoded bytes
      assert r["problem"].count("<image>") == len(r["images"]) >= 1, (name, r["id"])
      assert all(isinstance(im, bytes) and im.startswith(b"\x89PNG") for im in r["images"]), name
      assert r["source"] == name and r["answer"]
  assert records(sources["mmmu"])[1] == {2: "missing_image"}  # row 3 refers to <image 3>, which it lacks
  mmmu = records(sources["mmmu"])[0][0]
  # "Compare <image 2> with <image 1>" and option (A) <image 1>: images 2, 1, 1 in that order (red is image 1)
  assert [im == png((255, 0, 0)) for im in mmmu["images"]] == [False, True, True]


def test_bare_questions_go_under_a_jaxvg_prompt_format(data_dir):
  source = benchmarks.load_benchmarks("mathvista", data_dir, prompt_format="pgpo")["mathvista"]
  assert source[0]["problem"] == ("<image>Question: What fraction of the shape is blue?\nChoices:\n(A) 3/11\n(B) 8/11"
                                  "\n(C) 6/11\n(D) 3/5")
  with pytest.raises(ValueError, match="unknown prompt format"):
    benchmarks.load_benchmarks("mathvista", data_dir, prompt_format="nope")


def test_unknown_names_and_missing_files_name_the_benchmark(data_dir, tmp_path):
  with pytest.raises(ValueError, match="unknown benchmark 'mathvistaa'; choose from mathvista, "):
    benchmarks.resolve("mathvista,mathvistaa")
  with pytest.raises(benchmarks.BenchmarkFileError, match=r"mmstar: no folder 'MMStar' under .*nothing is fetched"):
    benchmarks.load_benchmarks("mmstar", str(tmp_path))
  os.makedirs(tmp_path / "MMStar")
  with pytest.raises(benchmarks.BenchmarkFileError, match="mmstar: no file matching 'mmstar.parquet' or "
                                                          "'MMStar.tsv' in"):
    benchmarks.load_benchmarks("mmstar", str(tmp_path))
  with pytest.raises(benchmarks.BenchmarkFileError, match="only local folders"):
    benchmarks.load_benchmarks("mmstar", "hf://datasets/Lin-Chen")


def test_a_missing_column_names_the_file_and_the_columns_found(tmp_path):
  path = tmp_path / "RealworldQA" / "data" / "test-00000-of-00002.parquet"
  write_parquet(str(path), {"image": [image_cell()], "question": ["How many?"]},
                pa.schema([("image", IMAGE_STRUCT), ("question", pa.string())]))
  with pytest.raises(benchmarks.BenchmarkFileError) as e:
    benchmarks.load_benchmarks("realworldqa", str(tmp_path))
  assert str(e.value) == (f"realworldqa: {path} has no column 'answer'; columns found: image, question")
  path.write_bytes(b"not parquet")
  with pytest.raises(benchmarks.BenchmarkFileError, match=f"realworldqa: {path} cannot be read"):
    benchmarks.load_benchmarks("realworldqa", str(tmp_path))


def test_bad_rows_are_counted_skips_with_reasons(tmp_path):
  # MathVista rows: a malformed choices cell, an image path leaving the folder, a missing image file, a good row
  schema = pa.schema([("pid", pa.string()), ("question", pa.string()), ("image", pa.string()),
                      ("decoded_image", IMAGE_STRUCT), ("choices", pa.string()), ("answer", pa.string()),
                      ("question_type", pa.string()), ("answer_type", pa.string()), ("query", pa.string())])
  root = tmp_path / "MathVista"
  os.makedirs(root / "images")
  (root / "images" / "4.png").write_bytes(png())
  (tmp_path / "outside.png").write_bytes(png())
  write_parquet(str(root / "data" / "testmini-00000-of-00001.parquet"), {
      "pid": ["1", "2", "3", "4"], "question": ["q"] * 4,
      "image": ["images/1.png", "../outside.png", "images/missing.png", "images/4.png"],
      "decoded_image": [None] * 4, "choices": ["['a', 'b'", None, None, None], "answer": ["a", "1", "1", "1"],
      "question_type": ["multi_choice", "free_form", "free_form", "free_form"],
      "answer_type": ["text", "integer", "integer", "integer"], "query": ["Q"] * 4}, schema)
  source = benchmarks.load_benchmarks("mathvista", str(tmp_path))["mathvista"]
  good, bad = records(source)
  assert [r["id"] for r in good] == ["4"] and isinstance(good[0]["images"][0], str)
  assert bad == {0: "malformed_record", 1: "image_outside_dir", 2: "missing_image_file"}
  with pytest.raises(RecordError, match=r"mathvista .*testmini-00000-of-00001.parquet row 1 \(2\)"):
    source[1]
  source = benchmarks.load_benchmarks("mathvista", str(tmp_path), allow_images_outside=True)["mathvista"]
  assert records(source)[1] == {0: "malformed_record", 2: "missing_image_file"}


def test_vlmevalkit_tsv_with_base64_images(tmp_path):
  mmstar_tsv(str(tmp_path))
  source = benchmarks.load_benchmarks("mmstar", str(tmp_path))["mmstar"]
  good, bad = records(source)
  assert [r["id"] for r in good] == ["0"] and good[0]["images"] == [png()]
  assert bad == {1: "corrupt_image"}  # its image cell is not base64
  assert good[0]["problem"].startswith("<image>Question: What is shown?\nOptions:\nA. a cat\nB. a dog\n")
  assert base64.b64decode(base64.b64encode(png())) == good[0]["images"][0]


def test_mathverse_json_with_an_image_folder(tmp_path):
  root = tmp_path / "MathVerse"
  os.makedirs(root / "images")
  (root / "images" / "a.png").write_bytes(png())
  rows = [{"sample_index": "1", "problem_index": "1", "problem_version": "Vision Only", "question": "",
           "image": "images/a.png", "answer": "A", "question_type": "multi-choice", "metadata": {"subject": "x"},
           "query_wo": "Answer.", "query_cot": "Reason, then answer."}]
  (root / "testmini.json").write_text(json.dumps(rows))
  source = benchmarks.load_benchmarks("mathverse_vision_only", str(tmp_path))["mathverse_vision_only"]
  assert source[0]["problem"] == "<image>Reason, then answer." and source[0]["images"] == [str(root / "images/a.png")]


def test_one_row_of_vilp_is_three_records_with_and_without_the_fact(data_dir):
  sources = benchmarks.load_benchmarks("vilp,vilp_p", data_dir)
  f, p = records(sources["vilp"])[0], records(sources["vilp_p"])[0]
  assert f[0]["problem"] == "<image>Please answer with one word: A spider has eight legs. How many legs does this " \
                            "spider have?"
  assert p[0]["problem"] == "<image>Please answer with one word: How many legs does this spider have?"
  assert [r["answer"] for r in f[:3]] == ["8", "6", "10"] and len({r["images"][0] for r in f[:3]}) == 3
  limited = benchmarks.load_benchmarks("vilp", data_dir, limit=4)["vilp"]
  assert [e.id for _, e in limited.entries] == ["0#1", "0#2", "0#3", "1#1"]  # the limit counts records, not rows


def test_logicvista_and_wemath_json_with_their_image_folders(tmp_path):
  """The repositories' own layouts: LogicVista's data/dataset.json names "v1_0.png" for data/images/v1_0.png;
  We-Math's data/testmini.json names "2steps/image/1-1.png" for data/2steps/image/1-1.png."""
  logicvista_github(str(tmp_path))
  source = benchmarks.load_benchmarks("logicvista", str(tmp_path))["logicvista"]
  good, bad = records(source)
  assert [r["id"] for r in good] == ["v1_0", "v1_1", "v1_2"] and not bad
  assert good[1]["images"] == [str(tmp_path / "LogicVista" / "data" / "images" / "v1_1.png")]
  assert good[1]["answer"] == "A, C" and source.items["v1_2"].categories["skill"] == ["numerical"]
  root = tmp_path / "We-Math" / "data"
  rows = wemath_rows()
  for r in rows[:-1]:  # the last image is missing: a counted skip
    os.makedirs(root / os.path.dirname(r["image_path"]), exist_ok=True)
    (root / r["image_path"]).write_bytes(png())
  (root / "testmini.json").write_text(json.dumps(rows))
  good, bad = records(benchmarks.load_benchmarks("wemath", str(tmp_path))["wemath"])
  assert len(good) == 6 and bad == {6: "missing_image_file"}
  assert good[0]["images"] == [str(root / "2steps" / "image" / "1-1.png")]
  assert good[0]["problem"].startswith("<image>Now, we require you to solve a multiple-choice math question.\n")
  assert good[0]["problem"].endswith("Option: A. 200.96;B. 3215.36;C. 6280;D. 32; E. No correct answer\nRegarding "
                                     "the format, please answer following the template below, and be sure to "
                                     "include two <> symbols:\n<Thought process>: <<your thought process>> "
                                     "<Answer>: <<your option>>")


def test_summaries_average_the_draws_and_report_pass_at_k():
  import numpy as np
  bench = benchmarks.BENCHMARKS["cvbench"]
  items = [bench.item({"idx": i, "type": "2D", "source": s, "prompt": "p", "answer": "(A)", "_file": "f",
                       "_row": i, "_index": i}) for i, s in enumerate(("ADE20K", "COCO"))]
  scores_BG = np.asarray([[1.0, 0.0], [0.0, 0.0]])  # draw 0: ADE20K right; draw 1: nothing right
  report = run.summarize(bench, items, scores_BG)
  assert report["accuracy"] == pytest.approx(0.25)  # the mean over records and draws (no 3D: the record mean)
  assert report["mean@k"] == 0.25 and report["pass@k"] == 0.5 and report["records"] == 2
  assert report["categories"]["source"] == {"ADE20K": 0.5, "COCO": 0.0}
  flat = run.flat_metrics({"benchmarks": {"cvbench": report | {"skipped": {}}}, "average": 0.25})
  assert flat == {"bench/cvbench/accuracy": 0.25, "bench/cvbench/2d": 0.25, "bench/cvbench/mean@k": 0.25,
                  "bench/cvbench/pass@k": 0.5, "bench/average": 0.25}


TINY = ["model.tiny_width=32", "model.tiny_layers=1", "model.tiny_vision_width=32", "rollout.max_new_tokens=8",
        "data.prompts_per_batch=4", "data.max_images=3", "data.length_buckets=(512)", "data.patch_buckets=(256)"]


@pytest.mark.slow
def test_evaluate_benchmarks_command(data_dir, tmp_path, capsys):
  """The tiny random model on six benchmarks: one JSON line, summary.json with categories, and one prediction line
  per usable record (MMMU's third record lacks its image: a counted skip; a ViLP row is three records)."""
  out = tmp_path / "results"
  argv = ["--config", CONFIG, *(a for o in TINY for a in ("--set", o)), "--benchmarks",
          "mathvista,mmmu,hallusionbench,cvbench,wemath,vilp", "--data-dir", data_dir, "--out", str(out)]
  result = evaluate.main(argv)
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(printed) == {"average", "benchmarks", "samples", "greedy", "prompt_format", "summary", "predictions"}
  assert printed["greedy"] is True and printed["samples"] == 1 and printed["prompt_format"] == "raw"
  reports = printed["benchmarks"]
  assert {n: r["records"] for n, r in reports.items()} == {"mathvista": 4, "mmmu": 2, "hallusionbench": 4,
                                                          "cvbench": 3, "wemath": 7, "vilp": 6}
  assert reports["mmmu"]["skipped"] == {"missing_image": 1} and reports["mathvista"]["skipped"] == {}
  assert set(reports["hallusionbench"]["metrics"]) == {"aAcc", "fAcc", "qAcc"}
  assert set(reports["vilp"]["metrics"]) == {"score", "prior"} and reports["wemath"]["metrics"]["problems"] == 2
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in reports.values())
  assert printed["average"] == pytest.approx(sum(r["accuracy"] for r in reports.values()) / 6)
  summary = json.loads((out / "summary.json").read_text())
  assert summary == json.loads(json.dumps(result)) and "task" in summary["benchmarks"]["mathvista"]["categories"]
  lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
  assert len(lines) == 13 + 7 + 6
  assert set(lines[0]) == {"benchmark", "id", "prompt", "answer", "completions", "extracted", "scores", "score",
                           "categories"}
  assert [(x["benchmark"], x["id"]) for x in lines if x["benchmark"] == "mmmu"] == [
      ("mmmu", "validation_Accounting_1"), ("mmmu", "validation_Accounting_2")]
  assert lines[0]["prompt"].count("<|image_pad|>") == 1 and "Hint:" in lines[0]["prompt"]
  assert all(len(x["completions"]) == 1 and x["score"] in (0.0, 1.0) for x in lines)


def test_benchmark_command_refuses_bad_input_before_any_work(data_dir, capsys):
  base = ["--config", CONFIG, *(a for o in TINY for a in ("--set", o))]
  with pytest.raises(SystemExit) as e:
    evaluate.main([*base, "--benchmarks", "mathvista"])
  assert e.value.code == 2 and "--benchmarks needs --data-dir" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    evaluate.main([*base, "--benchmarks", "mathvista,mmmu_pro_standard4", "--data-dir", data_dir])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1
  assert err[0].startswith("error: mmmu_pro_standard4: no file matching 'standard (4 options)/test-*.parquet'")


def test_a_benchmark_without_a_usable_record_reports_its_skips(tmp_path):
  """No record survives: no sampling happens, the report says so (accuracy null) and counts the reasons."""
  from jaxvg.data.tokenizer import load_tokenizer
  from jaxvg.run import builders
  from jaxvg.run.experiment import DataCfg, ModelCfg
  path = tmp_path / "MMStar" / "MMStar.tsv"
  os.makedirs(path.parent)
  path.write_text("index\tquestion\tA\tB\tanswer\tcategory\tl2-category\timage\n"
                  "0\tWhich?\tcat\tdog\tA\tmath\tgeometry\tnot-base64!\n")
  tokenizer, data = load_tokenizer(None), DataCfg()
  result = benchmarks.evaluate_benchmarks(None, None, names="mmstar", data_dir=str(tmp_path), tokenizer=tokenizer,
                                          model_cfg=builders.model_config_for(ModelCfg(), tokenizer), data_cfg=data,
                                          max_new_tokens=4)
  report = result["benchmarks"]["mmstar"]
  assert (report["accuracy"], report["records"], report["skipped"]) == (None, 0, {"corrupt_image": 1})
  assert result["average"] is None
