"""Multi-discipline and perception benchmarks: MMMU, MMMU-Pro (standard and vision settings), HallusionBench,
RealWorldQA, CV-Bench and MMStar. Each reads the dataset's own files, asks its own prompt and scores with its
reference scorer's rules (none of them needs a judge model for that).
"""

import re

import numpy as np

from jaxvg.benchmarks import extract
from jaxvg.benchmarks.spec import accuracy_and_categories, Benchmark, categories, group_all_correct, Item, need, text_of
from jaxvg.data import prompts
from jaxvg.data.processing import RecordError

IMAGE = prompts.IMAGE_PLACEHOLDER
_IMAGE_REF = re.compile(r"<image (\d+)>")


def interleave_images(text: str) -> tuple[str, tuple]:
  """MMMU's "<image i>" references -> one "<image>" placeholder each, and the refs image_i in the order they appear
  (a reference made twice feeds the image twice, as MMMU-Pro's inference does).

  Example: "Compare <image 2> with <image 1>." -> ("Compare <image> with <image>.", (image_2, image_1)).
  """
  refs = []

  def placeholder(match):
    refs.append((f"image_{match.group(1)}", None))
    return IMAGE

  return _IMAGE_REF.sub(placeholder, text), tuple(refs)


# ---------------------------------------------------------------- MMMU


MMMU_DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
_DISCIPLINE_OF = {s: d for d, subjects in MMMU_DISCIPLINES.items() for s in subjects}
_MMMU_MC = "Answer with the option's letter from the given choices directly."
_MMMU_OPEN = "Answer the question using a single word or phrase."


def _mmmu_subject(record_id: str) -> str:
  """"validation_Art_Theory_12" -> "Art_Theory" (MMMU's extract_subset_name)."""
  match = re.match(r"^[a-z]+_(.+?)_\d+$", record_id)
  return match.group(1) if match else ""


def _mmmu_item(row: dict) -> Item:
  record_id, question = text_of(need(row, "id")), text_of(need(row, "question"))
  qtype = text_of(row.get("question_type") or "multiple-choice")
  options = extract.option_list(row.get("options"))
  if qtype == "multiple-choice":
    listed = "".join(f"({c}) {t}\n" for c, t in zip(extract.letters(len(options)), options))
    bare = f"{question}\n\n{listed}"  # MMMU's multi_choice_example_format: "{}\n\n{}\n\n<instruction>"
    prompt = f"{bare}\n\n{_MMMU_MC}"
  else:
    bare, prompt = question, f"{question}\n\n{_MMMU_OPEN}"
  prompt, refs = interleave_images(prompt)
  bare, _ = interleave_images(bare)
  subject = _mmmu_subject(record_id)
  return Item(id=record_id, prompt=prompt, bare=bare, images=refs, answer=text_of(need(row, "answer")),
              meta={"options": options, "question_type": qtype},
              categories={"subject": subject, "discipline": _DISCIPLINE_OF.get(subject),
                          "difficulty": row.get("topic_difficulty")})


def _gold_list(answer: str):
  """An open answer, or its list of accepted answers when it is written as a python list."""
  if answer.startswith("[") and answer.endswith("]"):
    try:
      return extract.option_list(answer)
    except (ValueError, SyntaxError):
      pass
  return answer


def mmmu_score(completion: str, item: Item) -> tuple[float, str]:
  span = extract.answer_span(completion)
  if item.meta["question_type"] == "multiple-choice":
    letter, guessed = extract.mmmu_choice(span, item.meta["options"], seed=item.id)
    return float(letter == item.answer), f"{letter} (random guess)" if guessed else letter
  preds = extract.mmmu_open(span)
  return float(extract.mmmu_open_correct(_gold_list(item.answer), preds)), str(preds)


MMMU = Benchmark(
    name="mmmu", folders=("MMMU",), files=("*/validation-*.parquet", "validation-*.parquet"),
    required=(("id",), ("question",), ("options",), ("answer",)),
    image_columns=tuple(f"image_{i}" for i in range(1, 8)), item=_mmmu_item, score=mmmu_score,
    source="MMMU-Benchmark/MMMU mmmu/configs/llava1.5.yaml prompts, mmmu/utils/eval_utils.py parsing")


# ---------------------------------------------------------------- MMMU-Pro


# MMMU-Pro's mmmu-pro/prompts.yaml, chain-of-thought prompts (the paper's main setting).
MMMU_PRO_STANDARD = ("Answer the preceding multiple choice question. The last line of your response should be of the "
                     "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of options. Think step "
                     "by step before answering.")
MMMU_PRO_VISION = ("Write out the multiple-choice question in the image and then solve it. The last line of your "
                   "response should be of the following format: 'Answer: $LETTER' (without quotes) where LETTER is one "
                   "of options. Think step by step before answering.")


def _mmmu_pro_item(row: dict) -> Item:
  record_id, options = text_of(need(row, "id")), extract.option_list(need(row, "options"))
  if "question" in row:  # the standard settings: the question and its options as text, images where referenced
    listed = "\n".join(f"{c}. {t}" for c, t in zip(extract.letters(len(options)), options))
    bare, refs = interleave_images(f"{text_of(row['question'])}\n{listed}")
    prompt = f"{bare}\n{MMMU_PRO_STANDARD}"
  else:  # the vision setting: the question and options are inside the one image
    refs, bare, prompt = (("image", None),), IMAGE, IMAGE + MMMU_PRO_VISION
  return Item(id=record_id, prompt=prompt, bare=bare, images=refs, answer=text_of(need(row, "answer")),
              meta={"options": options}, categories={"subject": row.get("subject")})


def mmmu_pro_score(completion: str, item: Item) -> tuple[float, str]:
  letter, guessed = extract.mmmu_choice(extract.answer_span(completion), item.meta["options"], answer_line=True,
                                        seed=item.id)
  return float(letter == item.answer), f"{letter} (random guess)" if guessed else letter


def _mmmu_pro(name: str, folder: str) -> Benchmark:
  image_columns = ("image",) if folder == "vision" else tuple(f"image_{i}" for i in range(1, 8))
  return Benchmark(
      name=name, folders=("MMMU_Pro", "MMMU-Pro"), files=(f"{folder}/test-*.parquet",),
      required=(("id",), ("options",), ("answer",)), image_columns=image_columns, item=_mmmu_pro_item,
      score=mmmu_pro_score, source="MMMU-Benchmark/MMMU mmmu-pro/prompts.yaml (cot), mmmu-pro/evaluate.py parsing")


MMMU_PRO_STANDARD10 = _mmmu_pro("mmmu_pro_standard", "standard (10 options)")
MMMU_PRO_STANDARD4 = _mmmu_pro("mmmu_pro_standard4", "standard (4 options)")
MMMU_PRO_VISION_SETTING = _mmmu_pro("mmmu_pro_vision", "vision")


# ---------------------------------------------------------------- HallusionBench


_YORN = " Please answer yes or no."


def _hallusion_item(row: dict) -> Item:
  gold = {"1": "Yes", "0": "No"}.get(text_of(need(row, "gt_answer")))
  if gold is None:
    raise RecordError("malformed_record", f"gt_answer {row['gt_answer']!r} is neither '1' nor '0'")
  keys = [text_of(need(row, k)) for k in ("category", "subcategory", "set_id", "figure_id", "question_id")]
  question = text_of(need(row, "question"))
  return Item(id="_".join(keys), prompt=f"{IMAGE}{question}{_YORN}", bare=f"{IMAGE}{question}",
              images=(("image", None),), answer=gold,
              categories={"category": keys[0], "subcategory": keys[1]},
              groups={"figure": "_".join(keys[:4]), "question": "_".join(keys[:3] + keys[4:])})


def hallusion_score(completion: str, item: Item) -> tuple[float, str]:
  said = extract.yes_no(extract.answer_span(completion))
  return float(said == item.answer), said


def hallusion_aggregate(items: list[Item], scores_B: np.ndarray) -> dict:
  """aAcc (questions), fAcc (figures with every question right), qAcc (questions right on every figure), and their
  mean: the overall score VLMEvalKit reports."""
  a = float(scores_B.mean())
  f, q = group_all_correct(items, scores_B, "figure"), group_all_correct(items, scores_B, "question")
  return {"accuracy": float(np.mean([a, f, q])), "metrics": {"aAcc": a, "fAcc": f, "qAcc": q},
          "categories": categories(items, scores_B)}


HALLUSIONBENCH = Benchmark(
    name="hallusionbench", folders=("HallusionBench",), files=("data/image-*.parquet", "image-*.parquet"),
    required=(("category",), ("subcategory",), ("set_id",), ("figure_id",), ("question_id",), ("question",),
              ("gt_answer",)),
    image_columns=("image",), item=_hallusion_item, score=hallusion_score, aggregate=hallusion_aggregate,
    source="VLMEvalKit vlmeval/vlm/qwen2_vl/prompt.py (yes/no prompt), utils/yorn.py (YOrN_Extraction, "
           "Hallusion_rating); groups as HallusionBench's utils.py")


# ---------------------------------------------------------------- RealWorldQA


_RWQA_INSTRUCTIONS = ("Please answer directly with only the letter of the correct option and nothing else.",
                      "Please answer directly with a single word or number.")


def _realworldqa_item(row: dict) -> Item:
  question = text_of(need(row, "question"))
  bare = question
  for sentence in _RWQA_INSTRUCTIONS:
    bare = bare.replace(sentence, "")
  return Item(id=text_of(row.get("id") if row.get("id") is not None else row["_index"]), prompt=f"{IMAGE}{question}",
              bare=f"{IMAGE}{bare.strip()}", images=(("image", None),), answer=text_of(need(row, "answer")))


def realworldqa_score(completion: str, item: Item) -> tuple[float, str]:
  """lmms-eval realworldqa_process_results: A-D answers by its letter extraction, others by exact lower-case match
  (a trailing period dropped)."""
  span, gold = extract.answer_span(completion), item.answer.strip()
  if gold.upper() in ("A", "B", "C", "D"):
    letter = extract.mcq_letter(span, ["A", "B", "C", "D"])
    return float(letter == gold.upper()), letter
  pred = span.lower().strip().rstrip(".")
  return float(pred == gold.lower()), pred


REALWORLDQA = Benchmark(
    name="realworldqa", folders=("RealworldQA", "RealWorldQA", "realworldqa"),
    files=("data/test-*.parquet", "test*.parquet"), required=(("question",), ("answer",)), image_columns=("image",),
    item=_realworldqa_item, score=realworldqa_score,
    source="xai-org/RealworldQA (prompt in the question); lmms-eval tasks/realworldqa/utils.py scoring")


# ---------------------------------------------------------------- CV-Bench


def _cvbench_item(row: dict) -> Item:
  prompt = text_of(need(row, "prompt"))
  bare = text_of(row.get("question") or prompt)
  choices = extract.option_list(row.get("choices"))
  if choices and row.get("question") is not None:
    bare += "\n" + "\n".join(f"({c}) {t}" for c, t in zip(extract.letters(len(choices)), choices))
  return Item(id=f"{text_of(row.get('type') or '')}:{text_of(need(row, 'idx'))}", prompt=f"{IMAGE}{prompt}",
              bare=f"{IMAGE}{bare}", images=(("image", None),), answer=text_of(need(row, "answer")).strip("()"),
              categories={"type": row.get("type"), "task": row.get("task"), "source": row.get("source")})


def cvbench_score(completion: str, item: Item) -> tuple[float, str]:
  letter = extract.leading_letter(extract.answer_span(completion))
  return float(letter == item.answer), letter


def cvbench_aggregate(items: list[Item], scores_B: np.ndarray) -> dict:
  """CV-Bench's score: the mean of 2D accuracy (the mean of the ADE20K and COCO accuracies) and 3D accuracy
  (Omni3D); with a source missing, the mean over the records."""
  cats = categories(items, scores_B)
  by_source = cats.get("source", {})
  metrics = {}
  if "ADE20K" in by_source and "COCO" in by_source:
    metrics["2d"] = (by_source["ADE20K"] + by_source["COCO"]) / 2
  if "Omni3D" in by_source:
    metrics["3d"] = by_source["Omni3D"]
  headline = (metrics["2d"] + metrics["3d"]) / 2 if len(metrics) == 2 else float(scores_B.mean())
  return {"accuracy": headline, "metrics": metrics, "categories": cats}


CVBENCH = Benchmark(
    name="cvbench", folders=("CV-Bench", "CVBench"), files=("test_[23]d.parquet", "test.parquet"),
    required=(("idx",), ("prompt",), ("answer",)), image_columns=("image",), item=_cvbench_item,
    score=cvbench_score, aggregate=cvbench_aggregate,
    source="nyu-visionx/CV-Bench card (prompt column, combined score); lmms-eval tasks/cv_bench/utils.py extraction")


# ---------------------------------------------------------------- MMStar


_MMSTAR_POST = "\nAnswer with the option's letter from the given choices directly"  # lmms-eval's, as written there
_VLMEVAL_MCQ = "Please select the correct answer from the options above."


def _mmstar_item(row: dict) -> Item:
  question = text_of(need(row, "question"))
  tsv = row["_file"].lower().endswith(".tsv")
  meta = {"convention": "vlmevalkit" if tsv else "lmms-eval", "options": {}}
  if tsv:  # VLMEvalKit's MMStar.tsv: options in columns A-D, the Qwen2-VL MCQ prompt
    meta["options"] = {c: text_of(row[c]) for c in "ABCD" if row.get(c) not in (None, "")}
    listed = "".join(f"{c}. {t}\n" for c, t in meta["options"].items())
    bare = f"Question: {question}\nOptions:\n{listed}".rstrip()
    prompt = f"{bare}\n{_VLMEVAL_MCQ}"
  else:
    bare, prompt = question, question + _MMSTAR_POST
  return Item(id=text_of(need(row, "index")), prompt=f"{IMAGE}{prompt}", bare=f"{IMAGE}{bare}",
              images=(("image", None),), answer=text_of(need(row, "answer")).upper(), meta=meta,
              categories={"category": row.get("category"),
                          "l2_category": row.get("l2_category", row.get("l2-category"))})


def mmstar_score(completion: str, item: Item) -> tuple[float, str]:
  """mmstar.parquet: lmms-eval's letter extraction; MMStar.tsv: VLMEvalKit's can_infer (no judge: unmatched is
  wrong)."""
  span = extract.answer_span(completion)
  if item.meta["convention"] == "vlmevalkit":
    letter = extract.can_infer(span, item.meta["options"]) or ""
  else:
    letter = extract.mcq_letter(span, ["A", "B", "C", "D"])
  return float(letter == item.answer), letter


MMSTAR = Benchmark(
    name="mmstar", folders=("MMStar",), files=("mmstar.parquet", "MMStar.tsv"),
    required=(("index",), ("question",), ("answer",), ("category",)), image_columns=("image",), item=_mmstar_item,
    score=mmstar_score, aggregate=accuracy_and_categories,
    source="lmms-eval tasks/mmstar (parquet) or VLMEvalKit image_mcq + qwen2_vl prompt (TSV)")
