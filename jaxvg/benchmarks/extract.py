"""Answer extraction as the benchmarks' reference scorers do it, rewritten from their published rules.

Every function takes the completion's answer span (`answer_span`) or a whole response, never raises on odd text,
and returns what the reference returns (a letter, a list of candidates, "Yes" / "No" / "Unknown", ...). Sources:

  mmmu_choice        MMMU eval_utils.parse_multi_choice_response (MMMU-Benchmark/MMMU mmmu/utils/eval_utils.py);
                     with answer_line=True the MMMU-Pro variant (mmmu-pro/evaluate.py): "Answer: X" first, then
                     "A." as well as "(A)" and "A ".
  mmmu_open          MMMU eval_utils.parse_open_response + eval_open (key sub-responses, numbers, 2-decimal floats).
  can_infer          VLMEvalKit vlmeval/utils/matching_util.py (can_infer_option, then can_infer_text);
                     lone_letter is its letter rule alone.
  mcq_letter         lmms-eval lmms_eval/tasks/_task_utils/mcq_extract.py (extract_mcq_answer, format priorities).
  leading_letter     lmms-eval lmms_eval/tasks/cv_bench/utils.py (_extract_answer_letter).
  yes_no             VLMEvalKit vlmeval/dataset/utils/yorn.py (YOrN_Extraction over process_punctuation).
  most_similar       MathVista evaluation/calculate_score.py (get_most_similar: Levenshtein distance).
"""

import ast
import random
import re

from jaxvg.rl import rewards

_THINK_CLOSE = ("</think>", "</reason>")


def answer_span(completion) -> str:
  """The part of a completion that holds the answer: the last non-empty `\\boxed{...}`, else the text after the last
  `</think>` / `</reason>`, else the whole completion (stripped).

  Example: "<think> 2 + 2 </think> so \\boxed{4}" -> "4";  "<think> hmm </think> (C) 12" -> "(C) 12".
  """
  text = "" if completion is None else str(completion)
  boxed = rewards.extract_boxed(text)
  if boxed is not None and boxed.strip():
    return boxed.strip()
  for tag in _THINK_CLOSE:
    if tag in text:
      return text.rsplit(tag, 1)[1].strip()
  return text.strip()


def option_list(value) -> list[str]:
  """A list of options from a list cell or from its python repr (MMMU stores "['a', 'b']" as a string)."""
  if value is None:
    return []
  if isinstance(value, (list, tuple)):
    return [str(v) for v in value]
  if isinstance(value, str):
    text = value.strip()
    if not text:
      return []
    parsed = ast.literal_eval(text)  # a malformed cell raises: the reader turns it into a counted skip
    if not isinstance(parsed, (list, tuple)):
      raise ValueError(f"options {text[:60]!r} is not a list")
    return [str(v) for v in parsed]
  raise ValueError(f"options is a {type(value).__name__}")


def letters(n: int) -> list[str]:
  return [chr(ord("A") + i) for i in range(n)]


# ---------------------------------------------------------------- MMMU / MMMU-Pro


def mmmu_choice(response: str, options: list[str], *, answer_line: bool = False, seed: str = "") -> tuple[str, bool]:
  """(letter, guessed): MMMU's multiple-choice parse. With no candidate at all the reference picks a random option;
  here the draw is seeded by `seed` (the record id), so a run is repeatable; `guessed` says it happened.

  Candidates, first kind that finds any: "(A)"; " A " (MMMU) or "A " / "A." (MMMU-Pro); then, for responses of more
  than 5 words, option texts contained in the response. Several candidates: the one whose mark comes last.
  """
  choices = letters(len(options))
  index2ans = dict(zip(choices, options))
  response = str(response)
  if answer_line:
    pos = response.rfind("Answer:")
    if pos != -1:
      tail = response[pos + len("Answer:"):].strip()
      found = [c for c in choices if c in tail]
      if len(found) == 1:
        return found[0], False
  for char in (",", ".", "!", "?", ";", ":", "'"):
    response = response.strip(char)
  response = f" {response} "
  candidates, by = [], None
  if any(f"({c})" in response for c in choices):
    candidates, by = [c for c in choices if f"({c})" in response], "({})"
  elif not answer_line and any(f" {c} " in response for c in choices):
    candidates, by = [c for c in choices if f" {c} " in response], " {} "
  elif answer_line and any(f"{c} " in response for c in choices):
    candidates, by = [c for c in choices if f"{c} " in response], " {} "
  elif answer_line and any(f"{c}." in response for c in choices):
    candidates, by = [c for c in choices if f"{c}." in response], " {} "
  elif len(response.split()) > 5:
    candidates = [c for c in choices if index2ans[c].lower() in response.lower()]
  if not candidates:
    return random.Random(f"mmmu:{seed}").choice(choices), True
  if len(candidates) == 1:
    return candidates[0], False
  if by is None:  # content answers: the option text that appears last
    starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
  else:
    starts = [response.rfind(by.format(c)) for c in candidates]
  return candidates[starts.index(max(starts))], False  # np.argmax: the first of equal maxima


_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def _is_number(text: str) -> bool:
  try:
    float(text.replace(",", ""))
    return True
  except ValueError:
    return False


def _normalize_open(text: str) -> list:
  """MMMU normalize_str: a number -> [its float rounded to 2 decimals]; a 1-char string padded on each side."""
  text = text.strip()
  if _is_number(text):
    return [round(float(text.replace(",", "")), 2)]
  text = text.lower()
  return [" " + text, text + " "] if len(text) == 1 else [text]


def mmmu_open(response: str) -> list:
  """MMMU parse_open_response: the shortest tail after a key phrase of each sentence (and "=" in the last), plus
  every number in those tails, normalized (`_normalize_open`) and de-duplicated."""
  response = str(response).strip().strip(".").lower()
  sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
  keys = []
  for i, sentence in enumerate(sentences):
    indicators = _KEY_INDICATORS + (("=",) if i == len(sentences) - 1 else ())
    tails = [sentence.split(ind)[-1].strip() for ind in indicators if ind in sentence]
    if tails:
      shortest = min(tails, key=len)
      if shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
        keys.append(shortest)
  keys = keys or [response]
  preds = list(keys)
  for key in keys:
    preds += _NUM_COMMAS.findall(key) + _NUM_SCIENTIFIC.findall(key) + _NUM_SIMPLE.findall(key)
  out = []
  for p in preds:
    for v in _normalize_open(p):
      if v not in out:
        out.append(v)
  return out


def mmmu_open_correct(answer, preds: list) -> bool:
  """MMMU eval_open: a string prediction is right when it contains a normalized gold string; a number when it equals
  a gold number. `answer` is one gold string or a list of them."""
  golds = []
  for a in (answer if isinstance(answer, list) else [answer]):
    golds += _normalize_open(str(a))
  for pred in preds:
    if isinstance(pred, str):
      if any(isinstance(g, str) and g in pred for g in golds):
        return True
    elif pred in golds:
      return True
  return False


# ---------------------------------------------------------------- VLMEvalKit / lmms-eval multiple choice


_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")


def option_words(answer: str) -> list[str]:
  """The words of an answer as VLMEvalKit's can_infer_option splits them (each of .()[],:;!*#{} is a space)."""
  for c in ".()[],:;!*#{}":
    answer = answer.replace(c, " ")
  return answer.split()


def lone_letter(answer, letters) -> str:
  """VLMEvalKit's letter rule alone: the one option letter among the words, when it is among the last five words;
  "" when there is none, several, or it comes earlier ("B because the square moves right" -> "")."""
  words = option_words(str(answer))
  hits = [c for c in letters if c in words]
  return hits[0] if len(hits) == 1 and words.index(hits[0]) > len(words) - 5 else ""


def can_infer(answer, choices: dict[str, str]):
  """VLMEvalKit's rule-based option matching: a letter (or "Z" for a refusal), or False when it cannot tell.

  Option letters: exactly one choice letter among the words (punctuation .()[],:;!*#{} split words) and within the
  last 5 words; else "answer is X"; else the one option whose text the answer contains (answers at most twice as long
  as all options together).
  """
  answer = str(answer)
  if any(r in answer for r in _REFUSALS):
    return "Z"
  words = option_words(answer)
  hits = [c for c in choices if c in words]
  if len(hits) == 1:
    if words.index(hits[0]) > len(words) - 5:
      return hits[0]
  elif not hits and ("Z" in words) + ("" in words) == 1:
    return "Z"
  match = _VERBOSE_ANSWER.search(answer)
  if match and match.group(1).upper() in choices:
    return match.group(1).upper()
  lower = answer.lower()
  if len(lower) > 2 * sum(len(str(v)) for v in choices.values()):
    return False
  texts = [k for k, v in choices.items() if str(v).lower() in lower]
  return texts[0] if len(texts) == 1 else False


_ANSWER_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                   "best answer is", "the correct option is", "correct option is", "the best option is",
                   "best option is", "the choice is", "choice is", "the correct choice is", "correct choice is",
                   "i choose", "i select", "i pick", "my answer is", "my choice is")
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
             "space": 2, "fallback": 0}


def mcq_letter(response, choices: list[str]) -> str:
  """lmms-eval's extract_mcq_answer: every mark of a choice letter, ranked by kind (a leading or trailing lone
  letter first, then an answer phrase, "(A)", "A.", "A:", "A)", "A "), the last one of the best kind; "" if none."""
  if not response or not str(response).strip():
    return ""
  text = str(response).strip()
  for char in (",", ".", "!", "?", ";", ":", "'", '"'):
    text = text.strip(char)
  text = f" {text} "
  found = []
  for kind, mark in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                     ("space", "{} ")):
    found += [(c, text.rfind(mark.format(c)), kind) for c in choices if mark.format(c) in text]
  lower = text.lower()
  for phrase in _ANSWER_PHRASES:
    at = lower.find(phrase)
    if at != -1:
      found += [(c, text.find(c, at + len(phrase)), "phrase") for c in choices if text.find(c, at + len(phrase)) != -1]
  bare = text.strip()
  found += [(c, 0, "start") for c in choices if bare.startswith(c) and (len(bare) == 1 or not bare[1].isalpha())]
  found += [(c, len(text) - 1, "end") for c in choices if bare.endswith(c) and (len(bare) == 1 or
                                                                                 not bare[-2].isalpha())]
  if not found:
    found = [(c, text.rfind(c), "fallback") for c in choices if c in text]
  if not found:
    return ""
  return max(found, key=lambda f: (_PRIORITY[f[2]], f[1]))[0]


_LEADING_LETTER = re.compile(r"[\(\s]*([A-Z])[\)\.\s]*", flags=re.IGNORECASE)


def leading_letter(text) -> str:
  """lmms-eval CV-Bench: the first letter of the text, after any "(" or spaces ("(B) two" -> "B"); "" if none."""
  match = _LEADING_LETTER.match(str(text).strip())
  return match.group(1).upper() if match else ""


# ---------------------------------------------------------------- yes / no


_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def process_punctuation(text: str) -> str:
  """VLMEvalKit's (VQA-eval) punctuation handling: a mark next to a space is dropped, one inside a word becomes a
  space (both are dropped when the text has a 1,000-style number); periods not between digits are dropped."""
  out = text
  for p in _PUNCT:
    if (p + " " in text or " " + p in text) or _COMMA_DIGITS.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out)


def yes_no(response) -> str:
  """"Yes" when "yes" is a word of the answer and "no" is not, "No" for the reverse, else "Unknown"."""
  words = process_punctuation(str(response).lower()).split()
  if "yes" in words and "no" not in words:
    return "Yes"
  if "no" in words and "yes" not in words:
    return "No"
  return "Unknown"


# ---------------------------------------------------------------- numbers and similarity


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(text) -> str | None:
  """The last number written in the text, thousands commas removed ("a total of 1,250.5 m" -> "1250.5")."""
  found = _NUMBER.findall(str(text))
  return found[-1].replace(",", "") if found else None


def levenshtein(a: str, b: str) -> int:
  """Edit distance (insertions, deletions and substitutions of one character each cost 1)."""
  if len(a) < len(b):
    a, b = b, a
  previous = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    current = [i]
    for j, cb in enumerate(b, 1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
    previous = current
  return previous[-1]


def most_similar(prediction: str, choices: list[str]) -> str:
  """The choice nearest to the prediction in edit distance (the first of ties), as MathVista does."""
  distances = [levenshtein(str(prediction), str(c)) for c in choices]
  return choices[distances.index(min(distances))]


def punctuation_free(text: str) -> str:
  """Letters, digits and spaces only, single-spaced (lmms-eval's RealWorldQA filter removes [^\\w\\s])."""
  return " ".join(re.sub(r"[^\w\s]", "", str(text)).split())

