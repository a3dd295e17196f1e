"""Math benchmarks: MathVista, MathVerse (and its vision-dominant / vision-only subsets), MathVision, DynaMath and
Geometry3K. Each reads the dataset's own files, asks its own prompt, and scores as its reference scorer does; where
that scorer asks a judge model (MathVista's and MathVerse's GPT extraction, DynaMath's fallback), the rules used
instead are said per benchmark here and in docs/benchmarks_eval.md.
"""

import json
import math
import os
import re

from jaxvg.benchmarks import extract
from jaxvg.benchmarks.spec import accuracy_and_categories, Benchmark, categories, group_all_correct, Item, need, text_of
from jaxvg.data import prompts
from jaxvg.data.processing import RecordError
from jaxvg.rl import rewards

IMAGE = prompts.IMAGE_PLACEHOLDER
_ANSWER_IS = re.compile(r"answer is[:\s]*(.+)", flags=re.IGNORECASE)


def final_expression(span: str) -> str:
  """The answer expression of a free-form span: what follows the last "answer is", else what follows the last "="
  of the last line, without $ signs or a trailing period ("so x = 3." -> "3")."""
  text = span.strip()
  found = _ANSWER_IS.findall(text)
  last_line = text.splitlines()[-1] if text else ""
  if found:
    text = found[-1].split("\n")[0]
  elif "=" in last_line:
    text = last_line.rsplit("=", 1)[1]
  return text.strip().strip("$").strip().rstrip(".").strip()


def free_form_correct(span: str, gold: str) -> bool:
  """A free-form answer graded by `rewards.grade_answer` (normalized strings, exact rationals, math-verify): the span
  itself, its final expression, or its last number."""
  candidates = [span, final_expression(span), extract.last_number(final_expression(span))]
  return any(c and rewards.grade_answer(c, gold) for c in dict.fromkeys(candidates))


# ---------------------------------------------------------------- MathVista


def _mathvista_hint(question_type: str, answer_type: str, precision) -> str:
  """MathVista's zero-shot hint (evaluation/build_query.py), used when a file lacks the `query` column."""
  if question_type == "multi_choice":
    return "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
  if answer_type == "integer":
    return ("Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the "
            "end.")
  if answer_type == "float" and precision == 1:
    return ("Please answer the question requiring a floating-point number with one decimal place and provide the "
            "final value, e.g., 1.2, 1.3, 1.4, at the end.")
  if answer_type == "float":
    return ("Please answer the question requiring a floating-point number with two decimal places and provide the "
            "final value, e.g., 1.23, 1.34, 1.45, at the end.")
  return ("Please answer the question requiring a Python list as an answer and provide the final list, e.g., "
          "[1, 2, 3], [1.2, 1.3, 1.4], at the end.")


def _mathvista_item(row: dict) -> Item:
  choices = extract.option_list(row.get("choices"))
  qtype, atype = text_of(need(row, "question_type")), text_of(need(row, "answer_type"))
  precision = row.get("precision")
  precision = None if precision is None or (isinstance(precision, float) and math.isnan(precision)) else int(precision)
  question = f"Question: {need(row, 'question')}"
  if row.get("unit"):
    question += f" (Unit: {row['unit']})"
  if choices:
    question += "\nChoices:\n" + "\n".join(f"({c}) {t}" for c, t in zip(extract.letters(len(choices)), choices))
  query = row.get("query") or f"Hint: {_mathvista_hint(qtype, atype, precision)}\n{question}"
  meta = row.get("metadata") or {}
  return Item(id=text_of(need(row, "pid")), prompt=f"{IMAGE}{query}", bare=f"{IMAGE}{question}",
              images=(("decoded_image|image", None),), answer=text_of(need(row, "answer")),
              meta={"choices": choices, "question_type": qtype, "answer_type": atype, "precision": precision},
              categories={"task": meta.get("task"), "skills": meta.get("skills") or [], "question_type": qtype})


def mathvista_extract(span: str, item: Item) -> str:
  """MathVista's extract_answer without its GPT step: the span when it already is an option, an integer or a float;
  'The answer is "X".'; else, standing in for the judge, VLMEvalKit's option inference (multiple choice), the last
  number (integer / float) or the last [...] list."""
  m = item.meta
  if not span:
    return ""
  if m["question_type"] == "multi_choice" and span in m["choices"]:
    return span
  for kind, cast in (("integer", int), ("float", float)):
    if m["answer_type"] == kind:
      try:
        return str(cast(span))
      except ValueError:
        pass
  quoted = re.search(r'The answer is "(.*)"\.', span)
  if quoted:
    return quoted.group(1)
  if m["question_type"] == "multi_choice":
    letter = extract.can_infer(span, dict(zip(extract.letters(len(m["choices"])), m["choices"])))
    return letter if letter and letter != "Z" else span
  if m["answer_type"] in ("integer", "float"):
    return extract.last_number(span) or span
  if m["answer_type"] == "list":
    lists = re.findall(r"\[[^\[\]]*\]", span)
    return lists[-1] if lists else span
  return span


def mathvista_normalize(extraction: str, item: Item) -> str | None:
  """MathVista's normalize_extracted_answer: "(B)" -> B; a letter -> its option text, anything else -> the most
  similar option; integers as int(float(x)); floats rounded to `precision`; lists as text."""
  m = item.meta
  if m["question_type"] == "multi_choice":
    extraction = extraction.strip()
    letter = re.findall(r"\(([a-zA-Z])\)", extraction)
    if letter:
      extraction = letter[0].upper()
    options = extract.letters(len(m["choices"]))
    if extraction in options:
      return m["choices"][options.index(extraction)]
    return extract.most_similar(extraction, m["choices"]) if m["choices"] else extraction
  try:
    if m["answer_type"] == "integer":
      return str(int(float(extraction)))
    if m["answer_type"] == "float":
      return str(round(float(extraction), m["precision"] or 0))
  except (ValueError, OverflowError):
    return None
  return str(extraction)


def mathvista_score(completion: str, item: Item) -> tuple[float, str]:
  prediction = mathvista_normalize(mathvista_extract(extract.answer_span(completion), item), item)
  return float(prediction is not None and prediction.strip() == item.answer.strip()), str(prediction)


MATHVISTA = Benchmark(
    name="mathvista", folders=("MathVista",), files=("data/testmini-*.parquet", "testmini*.parquet"),
    required=(("pid",), ("question",), ("answer",), ("question_type",), ("answer_type",)),
    image_columns=("decoded_image",), item=_mathvista_item, score=mathvista_score,
    source="lupantech/MathVista evaluation/{extract_answer,calculate_score}.py; VLMEvalKit utils/mathvista.py")


# ---------------------------------------------------------------- MathVerse


def _mathverse_item(row: dict) -> Item:
  qtype = text_of(need(row, "question_type"))
  prompt = row.get("query_cot") or row.get("query_wo")
  if not prompt:
    raise RecordError("missing_field", "no 'query_cot' or 'query_wo' in this row")
  question = text_of(row.get("question") or "") or prompt
  meta = row.get("metadata") or {}
  return Item(id=text_of(need(row, "sample_index")), prompt=f"{IMAGE}{prompt}", bare=f"{IMAGE}{question}",
              images=(("image", None),),
              answer=text_of(need(row, "answer")), meta={"question_type": qtype},
              categories={"problem_version": row.get("problem_version"), "subject": meta.get("subject")})


def mathverse_score(completion: str, item: Item) -> tuple[float, str]:
  """Multiple choice: lmms-eval's letter extraction against the gold letter; free form: `free_form_correct`
  (MathVerse itself asks GPT-4 to extract and judge; this is the rule-based stand-in)."""
  span = extract.answer_span(completion)
  if item.meta["question_type"] == "multi-choice":
    letter = extract.mcq_letter(span, list("ABCDEFGH"))
    return float(letter == item.answer.strip().upper()), letter
  return float(free_form_correct(span, item.answer)), final_expression(span)


def _mathverse(name: str, version: str | None) -> Benchmark:
  keep = None if version is None else (lambda row: row.get("problem_version") == version)
  return Benchmark(
      name=name, folders=("MathVerse",), files=("testmini.parquet", "data/testmini-*.parquet", "testmini.json"),
      required=(("sample_index",), ("problem_version",), ("answer",), ("question_type",), ("query_cot", "query_wo")),
      image_columns=("image",), item=_mathverse_item, score=mathverse_score, keep=keep,
      source="ZrrSkywalker/MathVerse query_cot prompt; rule-based stand-in for its GPT-4 extraction and judge")


MATHVERSE = _mathverse("mathverse", None)
MATHVERSE_VISION_DOMINANT = _mathverse("mathverse_vision_dominant", "Vision Dominant")
MATHVERSE_VISION_ONLY = _mathverse("mathverse_vision_only", "Vision Only")


# ---------------------------------------------------------------- MathVision


_MATHVISION_PROMPT = 'Please solve the problem step by step and put your answer in one "\\boxed{}".'
_MATHVISION_MC = "Answer the question with the option's letter from the given choices directly."


def _mathvision_item(row: dict) -> Item:
  question, options = text_of(need(row, "question")), extract.option_list(row.get("options"))
  choices = "\n".join(f"{c}. {t}" for c, t in zip(extract.letters(len(options)), options))
  body = f"{question}\nChoices: {choices}" if options else question
  prompt = _MATHVISION_PROMPT + body + (f"\n{_MATHVISION_MC}" if options else "")
  return Item(id=text_of(need(row, "id")), prompt=f"{IMAGE}{prompt}", bare=f"{IMAGE}{body}",
              images=(("decoded_image|image", None),), answer=text_of(need(row, "answer")), meta={"options": options},
              categories={"subject": row.get("subject"), "level": row.get("level")})


def _mathvision_clean(answer: str) -> str:
  """MATH-V's find_math_answer, in short: lower case, what follows the last "=" / "\\approx", no spaces, \\text,
  degrees or units, "(a)" -> "a", no trailing period or leading colon."""
  s = answer.lower().replace("{}", "")
  s = s.split("=")[-1].split("\\approx")[-1]
  for old, new in ((" ", ""), ("\\,", ""), ("\\text", ""), ("\\mbox", ""), ("\\left", ""), ("\\right", ""),
                   ("^{\\circ}", ""), ("^\\circ", ""), ("{units}", ""), ("units", ""), ("\\!", ""), ("$", "")):
    s = s.replace(old, new)
  for c in "abcde":
    s = s.replace(f"({c})", c).replace(f"{{{c}}}", c)
  return s.rstrip(".").lstrip(":").strip()


def _mathvision_equal(answer: str, gold: str) -> bool:
  """MATH-V's is_equal: equal lower-cased text, or equal to 2 decimals as numbers; latex2sympy's symbolic step is
  replaced by `rewards.grade_answer` (math-verify)."""
  answer, gold = answer.strip().lower(), gold.strip().lower()
  if not answer.replace(" ", "") or not gold.replace(" ", ""):
    return False
  if answer == gold:
    return True
  try:
    return round(float(answer), 2) == round(float(gold), 2)
  except ValueError:
    return rewards.grade_answer(answer, gold)


def mathvision_score(completion: str, item: Item) -> tuple[float, str]:
  span = extract.answer_span(completion)
  for c in "ABCDE":  # the letter patterns MATH-V's evaluate.py recognizes
    if span.endswith((f" {c}.", f" ({c}).")) or span.startswith((f"{c}\n", f"({c})\n")) or span in (c, f"({c})"):
      span = c
  if "answer is" in span.lower() and "boxed" not in span:
    span = re.split(r"answer is", span, flags=re.IGNORECASE)[-1].split("\n")[0].split(". ")[0]
  answer = _mathvision_clean(span)
  gold_value = ""
  if item.meta["options"] and len(item.answer) == 1 and "A" <= item.answer.upper() <= "Z":
    k = ord(item.answer.upper()) - ord("A")
    gold_value = item.meta["options"][k] if k < len(item.meta["options"]) else ""
  right = _mathvision_equal(answer, item.answer) or (gold_value and _mathvision_equal(answer, gold_value))
  return float(bool(right)), answer


def _mathvision(name: str, split: str) -> Benchmark:
  return Benchmark(
      name=name, folders=("MathVision", "MATH-V"), files=(f"data/{split}-*.parquet", f"{split}*.parquet"),
      required=(("id",), ("question",), ("answer",)), image_columns=("decoded_image",), item=_mathvision_item,
      score=mathvision_score, source="mathllm/MATH-V evaluation (via lmms-eval tasks/mathvision/utils.py)")


MATHVISION = _mathvision("mathvision", "test")
MATHVISION_MINI = _mathvision("mathvision_mini", "testmini")


# ---------------------------------------------------------------- DynaMath


_DYNAMATH_GUIDE = (
    "\n## Answer Instruction Please provide an answer to the question outlined above. Your response should adhere "
    "to the following JSON format, which includes two keys: 'solution' and 'short answer'. The 'solution' key can "
    "contain detailed steps needed to solve the question, and the 'short answer' key should provide a concise "
    "response. {inst}\n\nExample of expected JSON response format:\n\n")
_DYNAMATH_INST = {
    # "corresponing" as DynaMath's prompt spells it
    "multiple choice": ("Provide the corresponing choice option in the 'short answer' key, such as 'A', 'B', 'C', or "
                        "'D'."),
    "float": "Format the answer as a three-digit floating-point number and provide it in the 'short answer' key.",
}
_DYNAMATH_FREE = "Float numbers in the answer should be formatted as three-digit floating-point numbers."
_DYNAMATH_EXAMPLE = json.dumps({"solution": "[Detailed step-by-step explanation]", "short answer": "[Concise Answer]"},
                               indent=4)


def _dynamath_item(row: dict) -> Item:
  atype = text_of(need(row, "answer_type"))
  question = text_of(need(row, "question"))
  variant = re.search(r"sample_?(?:variant)?(\d+)", os.path.basename(row["_file"]))
  variant = variant.group(1) if variant else "1"
  prompt = f"## Question\n {question}" + _DYNAMATH_GUIDE.format(inst=_DYNAMATH_INST.get(atype, _DYNAMATH_FREE))
  return Item(id=f"{text_of(need(row, 'id'))}#{variant}", prompt=f"{IMAGE}{prompt}{_DYNAMATH_EXAMPLE}",
              bare=f"{IMAGE}{question}", images=(("decoded_image|image", None),),
              answer=text_of(need(row, "ground_truth")), meta={"answer_type": atype},
              categories={"subject": row.get("subject"), "knowledge_level": row.get("knowledge_level")},
              groups={"question": text_of(row["id"])})


def _dynamath_parse(answer: str, answer_type: str):
  """DynaMath's parse_answer: (parsed, value); floats may be written as "k π" (times pi)."""
  if answer_type == "float":
    try:
      head = answer.split(" ")[0]
      return True, float(head.split("\u03c0")[0]) * math.pi if "\u03c0" in head else float(head)
    except ValueError:
      return False, None
  if answer_type == "multiple choice":
    if len(answer) == 1:
      return True, answer.upper()
    hits = [ch for ch in "ABCDE" if ch in answer.upper()]
    return (True, hits[0]) if len(hits) == 1 else (False, None)
  return True, answer


def dynamath_score(completion: str, item: Item) -> tuple[float, str]:
  """VLMEvalKit's DynaMath_auxeval without its judge: the JSON's "short answer", else the span itself; floats within
  0.001, options exactly, free form by containment in the gold answer."""
  span, atype, gold = extract.answer_span(completion), item.meta["answer_type"], item.answer
  text = span[span.find("{"):span.rfind("}") + 1] if 0 <= span.find("{") < span.rfind("}") else span
  text = text.replace("\\", "").replace("\\n", "\n")
  ok, short = False, None
  try:
    short = json.loads(text, strict=False).get("short answer")
    ok, short = _dynamath_parse(str(short), atype) if short is not None else (False, None)
  except (ValueError, AttributeError):
    pass
  if not ok:
    ok, short = _dynamath_parse(span, atype)
  if atype == "float":
    try:
      return float(ok and abs(float(short) - float(gold)) <= 1e-3), str(short)
    except (TypeError, ValueError):
      return 0.0, str(short)
  if atype == "multiple choice":
    return float(short == gold if ok else gold in span[:3].upper()), str(short)
  return float(ok and str(short).lower() in gold.lower()), str(short)


def dynamath_aggregate(items: list[Item], scores_B) -> dict:
  """Average-case accuracy (the headline), and worst-case accuracy: a question counts when all its variants do."""
  return {"accuracy": float(scores_B.mean()),
          "metrics": {"worst_case": group_all_correct(items, scores_B, "question")},
          "categories": categories(items, scores_B)}


DYNAMATH = Benchmark(
    name="dynamath", folders=("DynaMath_Sample", "DynaMath"),
    files=("data/sample_variant*-*.parquet", "data/sample*-*.parquet", "*.parquet"),
    required=(("id",), ("question",), ("ground_truth",), ("answer_type",)), image_columns=("decoded_image",),
    item=_dynamath_item, score=dynamath_score, aggregate=dynamath_aggregate,
    source="VLMEvalKit vlmeval/dataset/dynamath.py (prompt, parse_answer, average and worst-case accuracy)")


# ---------------------------------------------------------------- Geometry3K


def _geometry3k_item(row: dict) -> Item:
  problem = text_of(need(row, "problem"))
  n = problem.count(IMAGE)
  if n == 0:  # one image, no placeholder: it goes first
    problem, n = IMAGE + problem, 1
  instruction = prompts.user_text("", fmt=prompts.PGPO).strip()
  return Item(id=text_of(row.get("id") if row.get("id") is not None else row["_index"]),
              prompt=f"{problem} {instruction}", bare=problem, images=tuple(("images", k) for k in range(n)),
              answer=text_of(need(row, "answer")))


def geometry3k_score(completion: str, item: Item) -> tuple[float, str]:
  """EasyR1's math reward: the last \\boxed{} graded against the answer (here `rewards.grade_answer`)."""
  boxed = rewards.extract_boxed(completion)
  return float(rewards.grade_answer(boxed, item.answer)), "" if boxed is None else boxed


GEOMETRY3K = Benchmark(
    name="geometry3k", folders=("geometry3k", "Geometry3K"), files=("data/test-*.parquet", "test*.parquet"),
    required=(("problem",), ("answer",), ("images",)), image_columns=("images",), item=_geometry3k_item,
    score=geometry3k_score, aggregate=accuracy_and_categories,
    source="hiyouga/geometry3k test split; EasyR1 / PGPO prompt and boxed-answer reward (jaxvg.rl.rewards)")
