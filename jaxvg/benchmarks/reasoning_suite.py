"""Reasoning and prior benchmarks: LogicVista, We-Math and ViLP (ViLP-F, and ViLP-P without the fact sentence).

Each reads the dataset's own files, asks its own prompt and scores with its reference scorer's rules. LogicVista's
scorers (the authors' eval/extract_accuracy.py, VLMEvalKit's LogicVista_auxeval) ask a judge model which letters a
response chose; the rules used instead are `logicvista_letters`. We-Math and ViLP need no judge: We-Math reads the
letter after "Answer" and ViLP compares one normalized word.
"""

import functools
import math
import os
import re
from collections import defaultdict

import numpy as np

from jaxvg.benchmarks import extract
from jaxvg.benchmarks.spec import Benchmark, categories, Item, need, text_of
from jaxvg.data import prompts
from jaxvg.data.processing import RecordError

IMAGE = prompts.IMAGE_PLACEHOLDER


# ---------------------------------------------------------------- LogicVista


_LETTERS = "ABCDEFGH"
_SEP = r"\s*(?:,\s*and\b|,|;|/|&|\band\b)\s*"
_MARK = r"[\(\[]?[A-H][\)\]]?"
# an uppercase letter list opening a text: "(B)", "A and C", "B, D", "options A, C, and D"; not the "A" of "Apple"
_LEADING = re.compile(rf"\s*(?:(?i:options?|choices?)\s+)?(?P<list>{_MARK}(?:{_SEP}{_MARK})*)(?![A-Za-z0-9])")
_TRAILING = re.compile(rf"(?<![A-Za-z0-9])(?P<list>{_MARK}(?:{_SEP}{_MARK})+)\s*\.?\s*$")
_MARKED_FIRST = re.compile(r"\s*(?:\(([A-H])\)|([A-H])[.:)](?![A-Za-z0-9]))")
_ANSWER_IS = re.compile(r"(?i)\b(?:answers?|options?|choices?)\s*(?:(?:is|are|would be|should be)\s*:?|:)\s*")


def _letters_of(text: str) -> str:
  """The distinct option letters of a matched list, sorted and joined ("B, A" -> "AB"), as the judge's reply is
  compared: VLMEvalKit sorts the letters of both the reply and the gold answer."""
  return "".join(sorted(set(re.findall(r"(?<![A-Za-z])[A-H](?![A-Za-z])", text))))


def _whole_list(span: str) -> str:
  """The letters of a span that is nothing but option letters, any case: "C", "(c)", "A, C", "A and C", "(A) (C)",
  "AC" (two or more capitals in ascending order, as the judge writes them); "" otherwise."""
  text = span.strip().rstrip(".").strip()
  if re.fullmatch(r"[A-H]{2,8}", text) and list(text) == sorted(set(text)):
    return text
  tokens = [t.strip("()[]") for t in re.split(r"\s*(?:,|;|/|&|\band\b|\s)\s*", text)]
  tokens = [t.upper() for t in tokens if t]
  return "".join(sorted(set(tokens))) if tokens and all(len(t) == 1 and t in _LETTERS for t in tokens) else ""


def logicvista_letters(span: str) -> str:
  """The option letters a response chose, as LogicVista's judge is asked to give them (sorted, joined), or "" where
  the judge would answer Z. LogicVista's scorers ask GPT; these rules stand in for it, first that finds letters:

    1. the span is only letters: "C", "A, C", "A and C", "AC";
    2. the letter list that opens the rest of the line after the last answer phrase ("The answers are A and C.",
       "Answer: (B), since ...", "the correct option is D");
    3. letters that open or close the span: a list of two or more ("A and C belong to the green category", "The
       sequence is A, B, C, D, E."), or one letter marked as an option at the start ("(B) because ...", "B. The");
    4. VLMEvalKit's single-letter rule (`extract.lone_letter`): one option letter among the last five words.

  Letters are A-H (LogicVista's answers run to G). Markdown bold is dropped first.
  """
  span = str(span).replace("*", "").strip()
  found = _whole_list(span)
  if found:
    return found
  for phrase in reversed(list(_ANSWER_IS.finditer(span))):
    match = _LEADING.match(span[phrase.end():].split("\n")[0])
    if match:
      return _letters_of(match.group("list"))
  for match in (_LEADING.match(span), _TRAILING.search(span)):
    if match and len(_letters_of(match.group("list"))) >= 2:
      return _letters_of(match.group("list"))
  marked = _MARKED_FIRST.match(span)
  if marked:
    return marked.group(1) or marked.group(2)
  return extract.lone_letter(span, _LETTERS)


def _listed(value) -> list:
  """A category cell as a list: a list cell, its python repr, or one value."""
  if value is None:
    return []
  if isinstance(value, str) and value.strip().startswith("["):
    return extract.option_list(value)
  return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _logicvista_item(row: dict) -> Item:
  question = text_of(need(row, "question"))
  record_id = row.get("id")
  if record_id is None:  # the GitHub dataset.json keys its records by "v1_0", which names the image "v1_0.png"
    name = row.get("imagename")
    record_id = os.path.splitext(str(name))[0] if name else row["_index"]
  return Item(id=text_of(record_id), prompt=f"{IMAGE}{question}", bare=f"{IMAGE}{question}",
              images=(("image|imagename", None),), answer=text_of(need(row, "answer")),
              categories={"skill": _listed(row.get("skill")), "broad_capability": _listed(row.get("broad_capability")),
                          "specific_capability": _listed(row.get("specific_capability"))})


def logicvista_score(completion: str, item: Item) -> tuple[float, str]:
  """Right when the chosen letters are exactly the gold letters (gold "A, C" split at ", "); VLMEvalKit's
  LogicVista_auxeval compares the sorted letters the same way. A gold answer that is not letters ("3") cannot be
  matched, as there: the judge's reply must be capitals."""
  said = logicvista_letters(extract.answer_span(completion))
  gold = "".join(sorted(a.upper() for a in item.answer.split(", ")))
  return float(bool(said) and said == gold), said


LOGICVISTA = Benchmark(
    name="logicvista", folders=("LogicVista",),
    files=("data/test-*.parquet", "test-*.parquet", "data/dataset.json", "dataset.json"),
    required=(("question",), ("answer",)), image_columns=("image",), item=_logicvista_item, score=logicvista_score,
    image_dirs=("", "data/images", "images"),
    source="Yijia-Xiao/LogicVista data/dataset.json, eval/extract_accuracy.py; VLMEvalKit image_vqa.py LogicVista, "
           "utils/logicvista.py (prompt: the question; rule-based stand-in for the letter-extracting judge)")


# ---------------------------------------------------------------- We-Math


# The We-Math authors' response prompt: it asks for "<Answer>: <<option>>", which their scorer reads by string
# matching. The format line is VLMEvalKit's WeMath requirement, verbatim.
_WEMATH_PROMPT = ("Now, we require you to solve a multiple-choice math question.\n"
                  "Please briefly describe your thought process and provide the final answer(option).\n"
                  "Question: {question}\nOption: {option}\n"
                  "Regarding the format, please answer following the template below, and be sure to include two <> "
                  "symbols:\n<Thought process>: <<your thought process>> <Answer>: <<your option>>")
_WEMATH_KEY = re.compile(r"^(\d+)steps_(\d+|multi)$")


def _wemath_item(row: dict) -> Item:
  key = text_of(need(row, "key"))
  parsed = _WEMATH_KEY.match(key)
  if parsed is None:
    raise RecordError("malformed_record", f"key {key!r} is not '<n>steps_<step>' or '<n>steps_multi'")
  problem, question, option = (text_of(need(row, c)) for c in ("ID", "question", "option"))
  return Item(id=f"{problem}#{parsed.group(2)}",
              prompt=IMAGE + _WEMATH_PROMPT.format(question=question, option=option),
              bare=f"{IMAGE}{question}\n{option}", images=(("image_path", None),),
              answer=text_of(need(row, "answer")),
              meta={"problem": problem, "steps": int(parsed.group(1)), "step": parsed.group(2)},
              categories={"knowledge_concept": row.get("knowledge concept"), "key": key}, groups={"problem": problem})


def wemath_letter(response) -> str:
  """We-Math's extraction (evaluation/four_dimensional_metrics.py): the text after the last "Answer" (case-sensitive),
  without the characters < > : . and spaces around it; its first character when that is A-H, else "".

  Example: "<Thought process>: ... <Answer>: <<B>>" -> "B";  "The answer is B" -> "" (no capital "Answer", "T").
  """
  tail = re.sub(r"[<>:.]", "", str(response).split("Answer")[-1].strip()).strip()
  return tail[0] if tail and tail[0] in _LETTERS else ""


def wemath_score(completion: str, item: Item) -> tuple[float, str]:
  said = wemath_letter(extract.answer_span(completion))
  return float(said == item.answer), said


def _ratio(a: float, b: float) -> float:
  return a / b if b else math.nan


def wemath_aggregate(items: list[Item], scores_B: np.ndarray) -> dict:
  """We-Math's four-dimensional metrics over the composite problems whose records were all scored.

  A problem of n steps has n one-step records and the multi-step one ("multi"):

    IK  insufficient knowledge     some step wrong, multi wrong
    IG  inadequate generalization  every step right, multi wrong
    CM  complete mastery           multi right; every step right (strict) or any step right (loose)
    RM  rote memorization          multi right; some step wrong (strict) or every step wrong (loose)

  IK, IG and CM are fractions of the N problems; RM is RM / (CM + RM). The score is (N - 0.5 IG - RM - IK) / N in
  counts, strict or loose; the headline is the strict score (the record accuracy when no problem is complete, as
  with --limit). The reference divides by a fixed 525, testmini's N. one_step / two_step / three_step are
  accuracy.py's S1 (every one-step record), S2 and S3 (the multi-step records of two- and three-step problems).
  """
  marks, steps_of, by_key = defaultdict(dict), {}, defaultdict(list)
  for item, score in zip(items, scores_B):
    m = item.meta
    marks[m["problem"]][m["step"]] = score >= 1.0
    steps_of[m["problem"]] = m["steps"]
    by_key[f"{m['steps']}_multi" if m["step"] == "multi" else "step"].append(score)
  n = defaultdict(int)
  for problem, right in marks.items():
    needed = [str(k) for k in range(1, steps_of[problem] + 1)]
    if any(k not in right for k in needed + ["multi"]):  # a skipped record: the problem cannot be classified
      continue
    steps = [right[k] for k in needed]
    n["problems"] += 1
    if right["multi"]:
      n["CM_strict" if all(steps) else "RM_strict"] += 1
      n["CM_loose" if any(steps) else "RM_loose"] += 1
    else:
      n["IG" if all(steps) else "IK"] += 1
  total = n["problems"]
  metrics = {
      "score_strict": _ratio(total - 0.5 * n["IG"] - n["RM_strict"] - n["IK"], total),
      "score_loose": _ratio(total - 0.5 * n["IG"] - n["RM_loose"] - n["IK"], total),
      "IK": _ratio(n["IK"], total), "IG": _ratio(n["IG"], total),
      "CM_strict": _ratio(n["CM_strict"], total), "CM_loose": _ratio(n["CM_loose"], total),
      "RM_strict": _ratio(n["RM_strict"], n["CM_strict"] + n["RM_strict"]),
      "RM_loose": _ratio(n["RM_loose"], n["CM_loose"] + n["RM_loose"]),
      "one_step": float(np.mean(by_key["step"])) if by_key["step"] else math.nan,
      "two_step": float(np.mean(by_key["2_multi"])) if by_key["2_multi"] else math.nan,
      "three_step": float(np.mean(by_key["3_multi"])) if by_key["3_multi"] else math.nan,
      "record_accuracy": float(np.mean(scores_B)), "problems": float(total)}
  headline = metrics["score_strict"] if total else metrics["record_accuracy"]
  return {"accuracy": headline, "metrics": metrics, "categories": categories(items, scores_B)}


WEMATH = Benchmark(
    name="wemath", folders=("We-Math", "WeMath"),
    files=("data/testmini-*.parquet", "testmini*.parquet", "testmini.json", "data/testmini.json"),
    required=(("ID",), ("key",), ("question",), ("option",), ("answer",)), image_columns=("image_path",),
    item=_wemath_item, score=wemath_score, aggregate=wemath_aggregate, image_dirs=("", "data"),
    source="We-Math/We-Math evaluation/four_dimensional_metrics.py, accuracy.py (extraction, IK/IG/CM/RM, strict and "
           "loose scores; same in VLMEvalKit utils/wemath.py); the authors' response prompt")


# ---------------------------------------------------------------- ViLP


_VILP_PROMPT = "Please answer with one word: "
# ViLP's eval_utils.normalize_output: number words, then synonyms, then plurals, each one exact lookup.
_VILP_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty".split())}
_VILP_SYNONYMS = {  # canonical term: the answers mapped to it
    "fridge": ("refrigerator", "refrigerators"), "oven": ("stove", "fireplace"), "crocodile": ("alligator",),
    "dolphin": ("porpoise",), "car": ("automobile",), "new york city": ("nyc", "new york"), "los angeles": ("la",),
    "united states": ("usa",), "carbon dioxide": ("co2",), "oxygen": ("o2",), "nitrogen": ("n2",), "water": ("h2o",),
    "turtle": ("tortoise",), "motorcycle": ("motorbike",), "phone": ("cellphone", "telephone"), "computer": ("pc",),
    "television": ("tv",), "faucet": ("tap",), "airplane": ("aeroplane", "plane"),
    "cube": ("cubic", "cubical", "cubes", "cuboids", "cuboid", "square", "squares"), "stripes": ("striped",),
    "checkerboard": ("checkered",), "spots": ("polka-dots", "dots"), "dog": ("dalmatian",),
    "triangle": ("triangular", "triangles"),
    "round": ("circular", "circle", "circles", "spherical", "spheres", "sphere", "roundpherical", "roundph"),
    "wood": ("logs",), "curved": ("zigzag",), "hexagon": ("hexagonal", "hexagons"), "flower": ("bud", "blossoms"),
    "hippo": ("hippopotamus",), "rhino": ("rhinoceros",), "bicycle": ("bike",), "bus": ("schoolbus",),
    "ship": ("boat", "boats", "sailboat", "airship"), "torus": ("donut", "donuts"), "kangaroo": ("wallaby",),
    "cup": ("teacup",), "kettle": ("teapot",), "chicken": ("rooster", "roosters"), "crow": ("raven",),
    "vine": ("vineyard",), "bush": ("bushe",), "glass": ("crystal",), "straw": ("hay", "thatch"),
    # "co2" -> "carbon dioxide" while "carbon dioxide" -> "carbondioxide": one lookup each, as in the reference
    "carbondioxide": ("co\u2082", "carbon dioxide"), "bee": ("beesap",),
    "AC": ("aircondition", "airconditioner", "air-conditioner"), "dinosaur": ("t-rex", "trex"),
    "person": ("man", "woman", "people", "men", "women"), "bigben": ("clocktower",), "rainbow": ("multicolored",),
    "glasses": ("goggles", "night-vision", "binoculars"), "eraser": ("brush",), "snake": ("serpent",),
    "shoe": ("slippers", "slipper"), "cushion": ("pillow",), "guitar": ("ukulele",), "violin": ("cello",),
    "metal": ("steel",), "pickle": ("cucumber",), "space": ("galaxy",), "sea": ("underwater", "ocean"),
    "diamond": ("faceted", "jewelry", "jewelries"), "bag": ("backpack",), "octopus": ("squid",), "cat": ("kitten",),
    "octagon": ("octagonal",), "lolipop": ("candy",), "pipe": ("pipeline",), "pitaya": ("dragonfruit",),
    "eye": ("eyesight",), "seismometer": ("seismograph",),
}  # the reference's "America" -> "USA" is left out: its text is lower-cased first, so that entry never applies
_VILP_SYNONYM = {word: canonical for canonical, words in _VILP_SYNONYMS.items() for word in words}
_VILP_PLURAL = {
    **{f"{w}s": w for w in (
        "bee ant wasp kangaroo koala wombat tree book goat squirrel rabbit panda giraffe lion tiger cow horse cat dog "
        "whale shark dolphin flower diamond brick wind wheel chicken beak needle spinner cloud earthquake seal pencil "
        "petal fork seahorse key carrot crayon skyscraper bird bicycle lemon pipe spinneret bubble camel stripe lung "
        "gill feather scale drum rope shoe elephant porcupine clock antelope eye chameleon rocket turbine pumpkin "
        "shrub field").split()},
    **{f"{w}es": w for w in ("watch", "bush", "ostrich")},
    "butterflies": "butterfly", "fireflies": "firefly", "leaves": "leaf", "knives": "knife", "wolves": "wolf",
    "mice": "mouse", "geese": "goose", "children": "child", "teeth": "tooth", "feet": "foot", "fungi": "fungus",
    "stimuli": "stimulus", "media": "medium", "octopi": "octopus", "cacti": "cactus", "flame": "fire",
    "lollipops": "lolipop", "lollipop": "lolipop", "lolipops": "lolipop",
}


def vilp_normalize(text) -> str:
  """ViLP's normalize_output: lower case, stripped, one trailing period dropped, then a number word as digits, a
  synonym as its canonical term, a plural as its singular ("Sphere" -> "round", "four" -> "4", "Cats." -> "cat")."""
  out = str(text).lower().strip()
  if out.endswith("."):
    out = out[:-1]
  out = _VILP_NUMBERS.get(out, out)
  out = _VILP_SYNONYM.get(out, out)
  return _VILP_PLURAL.get(out, out)


def vilp_score(completion: str, item: Item) -> tuple[float, str]:
  """ViLP's test scripts: the answer lower-cased, stripped and without periods, then `vilp_normalize`d on both
  sides; an exact match (and not "none") is right. So "Four." and "4" match; "There are four." does not."""
  said = vilp_normalize(extract.answer_span(completion).lower().strip().replace(".", ""))
  return float(said == vilp_normalize(item.answer) and said != "none"), said


def _vilp_items(row: dict, *, fact: bool) -> list:
  """Three records per row, one per image (image1 is the one the prior agrees with). ViLP-P (`fact=False`) keeps
  the text after the question's first period, as the reference's question.split('.')[1] does."""
  try:
    question = text_of(need(row, "question"))
    if not fact:
      if "." not in question:
        raise RecordError("malformed_record", "no period after a fact sentence (ViLP-P removes the fact)")
      question = question.split(".")[1].strip()
  except RecordError as e:
    return [e] * 3
  qid = text_of(row["question_id"] if row.get("question_id") is not None else row["_index"])
  out = []
  for k in (1, 2, 3):
    answer = row.get(f"answer{k}")
    if answer is None or not text_of(answer):  # the reference skips an image without an answer
      out.append(RecordError("missing_answer", f"no answer{k}"))
      continue
    out.append(Item(id=f"{qid}#{k}", prompt=f"{IMAGE}{_VILP_PROMPT}{question}", bare=f"{IMAGE}{question}",
                    images=((f"image{k}", None),), answer=text_of(answer), categories={"image": str(k)},
                    groups={"question": qid}))
  return out


def vilp_aggregate(items: list[Item], scores_B: np.ndarray) -> dict:
  """ViLP's Score (the headline: the mean of the accuracies on images 2 and 3, which contradict the prior) and Prior
  (the accuracy on image 1, which agrees with it)."""
  cats = categories(items, scores_B)
  by_image = cats.get("image", {})
  conflicting = [by_image[k] for k in ("2", "3") if k in by_image]
  metrics = {"score": float(np.mean(conflicting)) if conflicting else math.nan, "prior": by_image.get("1", math.nan)}
  return {"accuracy": metrics["score"] if conflicting else float(np.mean(scores_B)), "metrics": metrics,
          "categories": cats}


def _vilp(name: str, fact: bool) -> Benchmark:
  return Benchmark(
      name=name, folders=("ViLP",), files=("ViLP.parquet", "data/*.parquet"),
      required=(("question",), ("answer1",), ("answer2",), ("answer3",)), image_columns=("image1", "image2", "image3"),
      item=functools.partial(_vilp_items, fact=fact), score=vilp_score, aggregate=vilp_aggregate,
      source="ViLP-team/ViLP test_gpt.py / test_llava.py (prompt, ViLP-F/-P, Score and Prior), eval_utils.py")


VILP = _vilp("vilp", fact=True)
VILP_P = _vilp("vilp_p", fact=False)
