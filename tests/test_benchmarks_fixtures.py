"""Tiny benchmark folders written in each dataset's published layout and schema (HF parquet with {bytes, path} image
structs, a VLMEvalKit TSV with base64 images), a handful of records each, with their images.

  root = write_benchmarks(tmp_path)    # root/MathVista/data/testmini-....parquet, root/MMMU/Accounting/..., ...

The column names and types follow the dataset cards (AI4Math/MathVista, AI4Math/MathVerse, MathLLMs/MathVision,
DynaMath/DynaMath_Sample, hiyouga/geometry3k, MMMU/MMMU, MMMU/MMMU_Pro, lmms-lab/HallusionBench, xai-org/RealworldQA,
nyu-visionx/CV-Bench, Lin-Chen/MMStar) or, where no card lists them, the files and the code that reads them
(LogicVista: its GitHub data/dataset.json and the lscpku/LogicVista columns lmms-eval reads; We-Math: its
testmini.json and the image_path image lmms-eval reads; ViLP: the ViLP.parquet columns its test scripts read).
Each writer also returns what a reader must make of its rows.
"""

import base64
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(color=(200, 30, 30), size=(56, 56)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="PNG")
  return buf.getvalue()


def image_cell(color=(200, 30, 30), name="img.png") -> dict:
  return {"bytes": png(color), "path": name}


def write_parquet(path, columns: dict, schema: pa.Schema):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.table(columns, schema=schema), path)


def mathvista(root):
  meta = pa.struct([("category", pa.string()), ("context", pa.string()), ("grade", pa.string()),
                    ("img_height", pa.int64()), ("img_width", pa.int64()), ("language", pa.string()),
                    ("skills", pa.list_(pa.string())), ("source", pa.string()), ("split", pa.string()),
                    ("task", pa.string())])
  schema = pa.schema([("pid", pa.string()), ("question", pa.string()), ("image", pa.string()),
                      ("decoded_image", IMAGE_STRUCT), ("choices", pa.list_(pa.string())), ("unit", pa.string()),
                      ("precision", pa.float64()), ("answer", pa.string()), ("question_type", pa.string()),
                      ("answer_type", pa.string()), ("metadata", meta), ("query", pa.string())])
  m = lambda task, skills: {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school",
                            "img_height": 56, "img_width": 56, "language": "english", "skills": skills,
                            "source": "Geometry3K", "split": "testmini", "task": task}
  rows = [
      ("1", "What fraction of the shape is blue?", ["3/11", "8/11", "6/11", "3/5"], None, None, "8/11", "multi_choice",
       "text", m("figure question answering", ["arithmetic reasoning"]),
       "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"
       "Question: What fraction of the shape is blue?\nChoices:\n(A) 3/11\n(B) 8/11\n(C) 6/11\n(D) 3/5"),
      ("2", "Which number is missing?", None, None, None, "14", "free_form", "integer",
       m("math word problem", ["logical reasoning", "arithmetic reasoning"]),
       "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at "
       "the end.\nQuestion: Which number is missing?"),
      ("3", "What is the fraction of females facing the camera?", None, None, 1.0, "0.6", "free_form", "float",
       m("figure question answering", ["statistical reasoning"]),
       "Hint: Please answer the question requiring a floating-point number with one decimal place and provide the "
       "final value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: What is the fraction of females facing the camera?"),
      ("4", "Between which two years is the peak?", None, None, None, "[2007, 2008]", "free_form", "list",
       m("figure question answering", ["statistical reasoning"]), None),
  ]
  cols = {k: [] for k in schema.names}
  for pid, q, choices, unit, precision, answer, qt, at, meta_v, query in rows:
    for k, v in zip(("pid", "question", "image", "decoded_image", "choices", "unit", "precision", "answer",
                     "question_type", "answer_type", "metadata", "query"),
                    (pid, q, f"images/{pid}.jpg", image_cell(name=f"{pid}.jpg"), choices, unit, precision, answer,
                     qt, at, meta_v, query)):
      cols[k].append(v)
  write_parquet(os.path.join(root, "MathVista", "data", "testmini-00000-of-00001-725687bf7a18d64b.parquet"), cols,
                schema)
  return {"ids": ["1", "2", "3", "4"]}


def mathverse(root):
  meta = pa.struct([("split", pa.string()), ("source", pa.string()), ("subject", pa.string()),
                    ("subfield", pa.string())])
  schema = pa.schema([("sample_index", pa.string()), ("problem_index", pa.string()),
                      ("problem_version", pa.string()), ("question", pa.string()), ("image", IMAGE_STRUCT),
                      ("answer", pa.string()), ("question_type", pa.string()), ("metadata", meta),
                      ("query_wo", pa.string()), ("query_cot", pa.string())])
  cot = ("Please first conduct reasoning, and then answer the question and provide the correct option letter, e.g., "
         "A, B, C, D, at the end.\nQuestion: ")
  rows = [("1", "1", "Text Dominant", "As shown in the figure, find angle B.\nChoices:\nA:40°\nB:50°", "B",
           "multi-choice"),
          ("2", "1", "Vision Only", "", "B", "multi-choice"),
          ("3", "2", "Vision Dominant", "Find the length of AC.", "\\frac{1}{2}", "free-form"),
          ("4", "2", "Vision Only", "", "5", "free-form")]
  cols = {k: [] for k in schema.names}
  for si, pi, version, q, a, qt in rows:
    query = cot + q if q else "According to the question shown in the image, please first conduct reasoning."
    for k, v in zip(schema.names, (si, pi, version, q, image_cell(), a, qt,
                                   {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry",
                                    "subfield": "Angle"}, query, query)):
      cols[k].append(v)
  write_parquet(os.path.join(root, "MathVerse", "testmini.parquet"), cols, schema)


def mathvision(root):
  schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.list_(pa.string())),
                      ("image", pa.string()), ("decoded_image", IMAGE_STRUCT), ("answer", pa.string()),
                      ("solution", pa.string()), ("level", pa.int64()), ("subject", pa.string())])
  rows = [("1", "<image1>\nWhich shape comes next?", ["A", "B", "C", "D", "E"], "C", 1, "logic"),
          ("2", "<image1>\nWhat is the area of the shaded part?", [], "0.75", 2, "metric geometry - area"),
          ("3", "<image1>\nHow many cubes?", ["6", "7", "8", "9", "10"], "B", 1, "counting")]
  cols = {k: [] for k in schema.names}
  for i, q, opts, a, level, subject in rows:
    for k, v in zip(schema.names, (i, q, opts, f"images/{i}.jpg", image_cell(), a, None, level, subject)):
      cols[k].append(v)
  write_parquet(os.path.join(root, "MathVision", "data", "testmini-00000-of-00001-f8ff70fcb2f29b1d.parquet"), cols,
                schema)


def dynamath(root):
  schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("image", pa.string()),
                      ("decoded_image", IMAGE_STRUCT), ("ground_truth", pa.string()), ("answer_type", pa.string()),
                      ("subject", pa.string()), ("knowledge_level", pa.string())])
  for variant, truths in ((1, ("3.142", "B")), (2, ("6.283", "C"))):
    cols = {k: [] for k in schema.names}
    for qid, truth, atype in (("1", truths[0], "float"), ("2", truths[1], "multiple choice")):
      for k, v in zip(schema.names, (qid, f"Question {qid} of variant {variant}?", f"images/{qid}.png",
                                     image_cell(), truth, atype, "PG", "high school")):
        cols[k].append(v)
    write_parquet(os.path.join(root, "DynaMath_Sample", "data", f"sample_variant{variant}-00000-of-00001.parquet"),
                  cols, schema)


def geometry3k(root):
  schema = pa.schema([("images", pa.list_(IMAGE_STRUCT)), ("problem", pa.string()), ("answer", pa.string())])
  write_parquet(os.path.join(root, "geometry3k", "data", "test-00000-of-00001.parquet"),
                {"images": [[image_cell()], [image_cell()]], "problem": ["<image>Find x.", "<image>Find the area."],
                 "answer": ["3", "\\frac{2}{3}"]}, schema)


def mmmu(root):
  schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.string()),
                      ("explanation", pa.string())] + [(f"image_{i}", IMAGE_STRUCT) for i in range(1, 8)] +
                     [("img_type", pa.string()), ("answer", pa.string()), ("topic_difficulty", pa.string()),
                      ("question_type", pa.string()), ("subfield", pa.string())])
  rows = [
      ("validation_Accounting_1", "Compare <image 2> with <image 1>. Which is larger?", "['<image 1>', 'the second', "
       "'equal']", {1: (255, 0, 0), 2: (0, 0, 255)}, "B", "multiple-choice"),
      ("validation_Accounting_2", "<image 1> What is the total in dollars?", "[]", {1: (0, 255, 0)}, "3.5", "open"),
      ("validation_Accounting_3", "<image 3> refers to a missing image.", "['a', 'b']", {1: (0, 0, 0)}, "A",
       "multiple-choice"),
  ]
  cols = {k: [] for k in schema.names}
  for rid, q, opts, images, a, qt in rows:
    cols["id"].append(rid), cols["question"].append(q), cols["options"].append(opts)
    cols["explanation"].append("")
    for i in range(1, 8):
      cols[f"image_{i}"].append(image_cell(images[i]) if i in images else None)
    for k, v in (("img_type", "['Tables']"), ("answer", a), ("topic_difficulty", "Easy"), ("question_type", qt),
                 ("subfield", "Financial Accounting")):
      cols[k].append(v)
  write_parquet(os.path.join(root, "MMMU", "Accounting", "validation-00000-of-00001.parquet"), cols, schema)


def mmmu_pro(root):
  schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.string()),
                      ("explanation", pa.string())] + [(f"image_{i}", IMAGE_STRUCT) for i in range(1, 8)] +
                     [("img_type", pa.string()), ("answer", pa.string()), ("topic_difficulty", pa.string()),
                      ("subject", pa.string())])
  cols = {k: [] for k in schema.names}
  opts = str([f"option {i}" for i in range(10)])
  for rid, answer in (("test_Art_1", "D"), ("test_Art_2", "J")):
    for k, v in zip(schema.names, [rid, "<image 1> Which one?", opts, ""] + [image_cell()] + [None] * 6 +
                    ["['Paintings']", answer, "Medium", "Art"]):
      cols[k].append(v)
  write_parquet(os.path.join(root, "MMMU_Pro", "standard (10 options)", "test-00000-of-00001.parquet"), cols, schema)
  vschema = pa.schema([("id", pa.string()), ("image", IMAGE_STRUCT), ("options", pa.string()),
                       ("answer", pa.string()), ("subject", pa.string())])
  write_parquet(os.path.join(root, "MMMU_Pro", "vision", "test-00000-of-00001.parquet"),
                {"id": ["test_Art_1"], "image": [image_cell()], "options": [opts], "answer": ["D"],
                 "subject": ["Art"]}, vschema)


def hallusionbench(root):
  names = ("category", "subcategory", "visual_input", "set_id", "figure_id", "sample_note", "question_id", "question",
           "gt_answer_details", "gt_answer", "filename")
  schema = pa.schema([(n, pa.string()) for n in names] + [("image", IMAGE_STRUCT)])
  # set 0 of VD/illusion: question 0 on figures 0 and 1, question 1 on figure 0
  rows = [("VD", "illusion", "1", "0", "0", "0", "Is the left line longer?", "1"),
          ("VD", "illusion", "1", "0", "1", "0", "Is the left line longer?", "0"),
          ("VD", "illusion", "1", "0", "0", "1", "Are the lines equal?", "0"),
          ("VS", "chart", "1", "1", "0", "0", "Is the bar for 2020 the highest?", "1")]
  cols = {k: [] for k in schema.names}
  for cat, sub, vi, sid, fid, qid, q, gt in rows:
    for k, v in zip(schema.names, (cat, sub, vi, sid, fid, "note", qid, q, "details", gt, f"./{cat}/{sid}_{fid}.png",
                                   image_cell())):
      cols[k].append(v)
  write_parquet(os.path.join(root, "HallusionBench", "data", "image-00000-of-00001.parquet"), cols, schema)


def realworldqa(root):
  schema = pa.schema([("image", IMAGE_STRUCT), ("question", pa.string()), ("answer", pa.string())])
  write_parquet(os.path.join(root, "RealworldQA", "data", "test-00000-of-00002.parquet"), {
      "image": [image_cell(), image_cell()],
      "question": ["In which direction is the car going?\nA. left\nB. right\nC. straight\nPlease answer directly "
                   "with only the letter of the correct option and nothing else.",
                   "How many lanes are there? Please answer directly with a single word or number."],
      "answer": ["B", "3"]}, schema)


def cvbench(root):
  schema = pa.schema([("idx", pa.int64()), ("type", pa.string()), ("task", pa.string()), ("image", IMAGE_STRUCT),
                      ("question", pa.string()), ("choices", pa.list_(pa.string())), ("answer", pa.string()),
                      ("prompt", pa.string()), ("filename", pa.string()), ("source", pa.string()),
                      ("source_dataset", pa.string()), ("source_filename", pa.string()),
                      ("target_class", pa.string()), ("target_size", pa.int64()), ("bbox", pa.list_(pa.float64()))])
  for kind, rows in (("2D", ((0, "Count", "ADE20K", "(B)"), (1, "Relation", "COCO", "(A)"))),
                     ("3D", ((0, "Depth", "Omni3D", "(A)"),))):
    cols = {k: [] for k in schema.names}
    for idx, task, source, answer in rows:
      q = f"How many objects are there? ({task})"
      values = {"idx": idx, "type": kind, "task": task, "image": image_cell(), "question": q,
                "choices": ["1", "2", "3"], "answer": answer,
                "prompt": f"{q} Select from the following choices.\n(A) 1\n(B) 2\n(C) 3",
                "filename": f"img/{kind}/{idx}.png", "source": source, "source_dataset": "val",
                "source_filename": "x.png", "target_class": None, "target_size": None, "bbox": None}
      for k in schema.names:
        cols[k].append(values[k])
    write_parquet(os.path.join(root, "CV-Bench", f"test_{kind.lower()}.parquet"), cols, schema)


def mmstar(root):
  meta = pa.struct([("source", pa.string()), ("split", pa.string()), ("image_path", pa.string())])
  schema = pa.schema([("index", pa.int64()), ("question", pa.string()), ("image", IMAGE_STRUCT),
                      ("answer", pa.string()), ("category", pa.string()), ("l2_category", pa.string()),
                      ("meta_info", meta)])
  q = "Which option describes the object?\nOptions: A: a cat, B: a dog, C: a bird, D: a fish"
  write_parquet(os.path.join(root, "MMStar", "mmstar.parquet"), {
      "index": [0, 1], "question": [q, q], "image": [image_cell(), image_cell()], "answer": ["B", "D"],
      "category": ["coarse perception", "math"], "l2_category": ["image scene and topic", "geometry"],
      "meta_info": [{"source": "MMBench", "split": "val", "image_path": "images/0.jpg"}] * 2}, schema)


def mmstar_tsv(root):
  """VLMEvalKit's MMStar.tsv: options in columns A-D, the image as base64 (in its own data folder)."""
  path = os.path.join(root, "MMStar", "MMStar.tsv")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  b64 = base64.b64encode(png()).decode()
  lines = ["index\tquestion\tA\tB\tC\tD\tanswer\tcategory\tl2-category\timage",
           f"0\tWhat is shown?\ta cat\ta dog\ta bird\ta fish\tB\tcoarse perception\timage scene and topic\t{b64}",
           f"1\tWhich shape?\tcircle\tsquare\ttriangle\tline\tC\tmath\tgeometry\tnot-base64!"]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


_LOGICVISTA = [  # (id, question, answer, skill, broad_capability, specific_capability), as data/dataset.json
    ("v1_0", "What choice (A, B, C, or D) should be in place of the question mark that fits the pattern?", "C",
     ["inductive"], ["diagram"], ["sequence pattern"]),
    ("v1_1", "Which choices in the image (A-D) belong to the green category?", "A, C", ["inductive"], ["diagram"],
     ["rule based pattern"]),
    ("v1_2", "How many trains leave before noon? Select from A-E.", "B", ["numerical"], ["diagram and ocr"],
     ["tables"]),
]


def logicvista(root):
  """lscpku/LogicVista's test split as parquet: the dataset.json fields, an id and the image (an HF image struct);
  the list columns are lists as in dataset.json (the card does not state their types)."""
  strings = ("id", "question", "answer", "reasoning", "imagesource", "sourcelink", "liscenced")
  schema = pa.schema([(n, pa.string()) for n in strings[:4]] + [("image", IMAGE_STRUCT)] +
                     [(n, pa.list_(pa.string())) for n in ("skill", "broad_capability", "specific_capability")] +
                     [(n, pa.string()) for n in strings[4:]])
  cols = {k: [] for k in schema.names}
  for rid, q, a, skill, broad, specific in _LOGICVISTA:
    values = {"id": rid, "question": q, "answer": a, "reasoning": "Because.", "image": image_cell(name=f"{rid}.png"),
              "skill": skill, "broad_capability": broad, "specific_capability": specific,
              "imagesource": "aptitudetests", "sourcelink": "https://example.org", "liscenced": "false"}
    for k in schema.names:
      cols[k].append(values[k])
  write_parquet(os.path.join(root, "LogicVista", "data", "test-00000-of-00001.parquet"), cols, schema)


def logicvista_github(root):
  """The LogicVista repository's own layout: data/dataset.json keyed by "v1_<i>", images in data/images/."""
  records = {}
  for rid, q, a, skill, broad, specific in _LOGICVISTA:
    records[rid] = {"imagename": f"{rid}.png", "question": q, "answer": a, "reasoning": "Because.", "skill": skill,
                    "broad_capability": broad, "specific_capability": specific, "imagesource": "aptitudetests",
                    "sourcelink": "https://example.org", "liscenced": "false"}
  os.makedirs(os.path.join(root, "LogicVista", "data", "images"))
  for rid in records:
    with open(os.path.join(root, "LogicVista", "data", "images", f"{rid}.png"), "wb") as f:
      f.write(png())
  with open(os.path.join(root, "LogicVista", "data", "dataset.json"), "w", encoding="utf-8") as f:
    json.dump(records, f, indent=4)


_WEMATH = [  # (ID, key, answer): a two-step problem (two one-step sub-problems and itself) and a three-step one
    ("2steps_1", "2steps_1", "C"), ("2steps_1", "2steps_2", "A"), ("2steps_1", "2steps_multi", "B"),
    ("3steps_1", "3steps_1", "D"), ("3steps_1", "3steps_2", "B"), ("3steps_1", "3steps_3", "B"),
    ("3steps_1", "3steps_multi", "B"),
]


def wemath_rows() -> list[dict]:
  """The testmini.json records of `_WEMATH` (image_path as the JSON has it: a path under data/)."""
  rows = []
  for number, (pid, key, answer) in enumerate(_WEMATH, 1):
    step = key.split("_")[1]
    rows.append({"ID": pid, "split": "testmini", "knowledge concept": "Area of Circles",
                 "question": f"As shown in the figure, what is the area ( ) m\u00b2? ({key})",
                 "option": "A. 200.96;B. 3215.36;C. 6280;D. 32; E. No correct answer", "answer": answer,
                 "image_path": f"{pid.split('_')[0]}/image/{pid.split('_')[1]}-{step}.png", "key": key,
                 "question number": number, "knowledge concept description": "Area of Circles:\n1. ..."})
  return rows


def wemath(root):
  """We-Math/We-Math's data/testmini parquet: testmini.json's columns, with image_path an HF image struct."""
  schema = pa.schema([("ID", pa.string()), ("split", pa.string()), ("knowledge concept", pa.string()),
                      ("question", pa.string()), ("option", pa.string()), ("answer", pa.string()),
                      ("image_path", IMAGE_STRUCT), ("key", pa.string()), ("question number", pa.int64()),
                      ("knowledge concept description", pa.string())])
  rows = wemath_rows()
  cols = {k: [r[k] if k != "image_path" else image_cell(name=r[k]) for r in rows] for k in schema.names}
  write_parquet(os.path.join(root, "We-Math", "data", "testmini-00000-of-00001-adbfe22dcd3558e6.parquet"), cols,
                schema)


def vilp(root):
  """ViLP/ViLP's ViLP.parquet: question_id, the question (a fact, then the question) and three images as raw bytes
  (the test scripts open each cell with BytesIO), each with its one-word answer."""
  schema = pa.schema([("question_id", pa.int64()), ("question", pa.string())] +
                     [(f"{c}{k}", pa.binary() if c == "image" else pa.string()) for k in (1, 2, 3)
                      for c in ("image", "answer")])
  rows = [(0, "A spider has eight legs. How many legs does this spider have?", ("8", "6", "10")),
          (1, "Zebras have black and white stripes. What pattern is on this zebra?", ("Stripes", "Spots", "Checkered"))]
  cols = {k: [] for k in schema.names}
  for qid, question, answers in rows:
    cols["question_id"].append(qid), cols["question"].append(question)
    for k, answer in enumerate(answers, 1):
      cols[f"image{k}"].append(png((40 * k, 80, 120)))
      cols[f"answer{k}"].append(answer)
  write_parquet(os.path.join(root, "ViLP", "ViLP.parquet"), cols, schema)


WRITERS = (mathvista, mathverse, mathvision, dynamath, geometry3k, mmmu, mmmu_pro, hallusionbench, realworldqa, cvbench,
           mmstar, logicvista, wemath, vilp)


def write_benchmarks(root) -> str:
  """Every benchmark's tiny folder under `root` (MMStar as its parquet); returns `root` as a str."""
  root = str(root)
  for writer in WRITERS:
    writer(root)
  return root
