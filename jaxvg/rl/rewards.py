"""Verifiable rewards: boxed-answer extraction, answer grading, format checks and named sub-scores.

The default reward (PGPO / EasyR1):  overall = 0.9 * accuracy + 0.1 * format,  accuracy and format in {0, 1}.

Grading never raises and never hangs: the text is coerced to str, exact normalized string match and exact rational
match come first, and math-verify (with its signal-based timeouts disabled, so it works off the main thread) only
sees short expressions that cannot drive sympy into unbounded work (no factorials, sums, products, integrals, and
only small literal exponents). Any exception inside grading counts as a wrong answer.

A reward function has the signature `fn(completion: str, answer: str, *, fmt: PromptFormat) -> dict[str, float]`
and returns at least "overall"; another one is named in a config as "module.path:function" (`load_reward_fn`).
"""

import fractions
import importlib
import logging
import re
import unicodedata
from collections.abc import Callable, Sequence

import numpy as np

from jaxvg.data.prompts import BOX_OPEN, PromptFormat

RewardFn = Callable[..., dict[str, float]]

_MAX_SYMPY_CHARS = 120
_FORBIDDEN_FOR_SYMPY = ("!", "**", "binom", "choose", "gamma", "Gamma", "prod", "sum", "int", "lim", "factorial",
                        "mod", "zeta", "\\\\", "matrix", "cases", "array")
_EXPONENT = re.compile(r"\^\s*(\{[^{}]*\}|[^{\s])")
_SMALL_EXPONENT = re.compile(r"-?\d{1,2}(\.\d+)?|[a-zA-Z]|-?\d{1,2}/\d{1,2}")
_RATIONAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)(/[+-]?\d+)?")
_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_LATEX_SPACES = re.compile(r"\\[,;:! ]|\\q?quad|\\left|\\right")


def _as_text(value) -> str:
  """Any input as a str: bytes are decoded with replacement, None is empty, other objects go through str()."""
  try:
    if value is None:
      return ""
    if isinstance(value, (bytes, bytearray)):
      return bytes(value).decode("utf-8", errors="replace")
    return value if isinstance(value, str) else str(value)
  except Exception:  # a str() that raises
    return ""


def extract_boxed(text) -> str | None:
  """The content of the last `\\boxed{...}`, with nested braces; None when there is none or it is never closed.

  Example: "a \\boxed{1} then \\boxed{\\frac{1}{2}}" -> "\\frac{1}{2}";  "\\boxed{3" -> None.
  """
  text = _as_text(text)
  start = text.rfind(BOX_OPEN)
  if start < 0:
    return None
  depth = 1
  for pos in range(start + len(BOX_OPEN), len(text)):
    char = text[pos]
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
      if depth == 0:
        return text[start + len(BOX_OPEN):pos]
  return None


def normalize_answer(text) -> str:
  """Canonical form for exact matching: NFKC, no $ or \\text{} wrappers or LaTeX spacing, no trailing period,
  case-folded, single spaces, no leading "the "."""
  s = unicodedata.normalize("NFKC", _as_text(text)).strip()
  for _ in range(3):
    s = _WRAPPERS.sub(r"\1", s)
  s = _LATEX_SPACES.sub(" ", s).strip()
  while len(s) >= 2 and s[0] == "$" and s[-1] == "$":
    s = s[1:-1].strip()
  s = " ".join(s.rstrip(".").split()).casefold()
  return s[4:] if s.startswith("the ") and len(s) > 4 else s


def _as_rational(s: str) -> fractions.Fraction | None:
  s = s.replace(" ", "")
  if len(s) > 64 or not _RATIONAL.fullmatch(s):
    return None
  try:
    return fractions.Fraction(s)
  except (ValueError, ZeroDivisionError):
    return None


def _safe_for_sympy(s: str) -> bool:
  if not s or len(s) > _MAX_SYMPY_CHARS or any(bad in s for bad in _FORBIDDEN_FOR_SYMPY):
    return False
  exponents = _EXPONENT.findall(s)
  if s.count("^") != len(exponents) or len(exponents) > 3:
    return False
  return all(_SMALL_EXPONENT.fullmatch(e.strip("{}").strip()) for e in exponents)


class _DisabledTimeoutNotice(logging.Filter):
  """math-verify warns once per process that its timeouts are off; here that is deliberate (see the module
  docstring: inputs are bounded before they reach it), so the notice is dropped."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
  logging.getLogger(_name).addFilter(_DisabledTimeoutNotice())


def _math_verify_equal(pred: str, gold: str) -> bool:
  from math_verify import parse, verify  # a heavy import, paid only when symbolic grading is needed

  gold_parsed = parse(f"${gold}$", parsing_timeout=None)
  pred_parsed = parse(f"${pred}$", parsing_timeout=None)
  if not gold_parsed or not pred_parsed:
    return False
  return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def grade_answer(prediction, gold) -> bool:
  """True when `prediction` equals `gold`: normalized strings, then exact rationals, then math-verify."""
  try:
    if prediction is None or gold is None:
      return False
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if not pred or not ref:
      return False
    if pred == ref:
      return True
    pred_q, ref_q = _as_rational(pred), _as_rational(ref)
    if pred_q is not None and ref_q is not None:
      return pred_q == ref_q
    if not (_safe_for_sympy(pred) and _safe_for_sympy(ref)):
      return False
    return _math_verify_equal(pred, ref)
  except Exception:
    return False


def accuracy_score(completion, answer) -> float:
  """1.0 when the last boxed answer of the completion grades equal to `answer`, else 0.0."""
  return 1.0 if grade_answer(extract_boxed(completion), answer) else 0.0


def format_score(completion, *, fmt: PromptFormat) -> float:
  """1.0 when the completion follows the format, else 0.0.

  The completion is what follows the prompt; the format's prefill is put in front of it (unless the completion
  already starts with it). The text must then be: only whitespace, then every section in order as
  `open` + non-blank content + `close` (each tag exactly once, only whitespace between sections), then a closed,
  non-empty `\\boxed{...}` somewhere after the last closing tag.

  Example (PGPO): "<think> 2 + 2 </think> so \\boxed{4}" -> 1.0;  "\\boxed{4}" -> 0.0;
  "<think> a </think><think> b </think> \\boxed{4}" -> 0.0 (a repeated tag).
  """
  try:
    text = _as_text(completion)
    if fmt.prefill and not text.lstrip().startswith(fmt.prefill):
      text = fmt.prefill + text
    pos = len(text) - len(text.lstrip())
    for i, section in enumerate(fmt.sections):
      if text.count(section.open) != 1 or text.count(section.close) != 1:
        return 0.0
      if i > 0:
        pos += len(text[pos:]) - len(text[pos:].lstrip())
      if not text.startswith(section.open, pos):
        return 0.0
      close = text.find(section.close, pos)
      if close < 0 or not text[pos + len(section.open):close].strip():
        return 0.0
      pos = close + len(section.close)
    boxed = extract_boxed(text[pos:])
    return 1.0 if boxed is not None and boxed.strip() else 0.0
  except Exception:
    return 0.0


def default_reward(completion, answer, *, fmt: PromptFormat, format_weight: float = 0.1) -> dict[str, float]:
  """{"accuracy", "format", "overall"} with overall = (1 - format_weight) * accuracy + format_weight * format."""
  accuracy = accuracy_score(completion, answer)
  fmt_ok = format_score(completion, fmt=fmt)
  return {"accuracy": accuracy, "format": fmt_ok, "overall": (1.0 - format_weight) * accuracy + format_weight * fmt_ok}


# Reward modules of the package under their former paths (configs and run folders written before the layout by stage).
MOVED_MODULES = {"jaxvg.rewards": "jaxvg.rl.rewards"}


def canonical_spec(spec: str) -> str:
  """`spec` with a former module path of the package replaced by today's."""
  module_name, sep, fn_name = spec.partition(":")
  return MOVED_MODULES.get(module_name.strip(), module_name.strip()) + sep + fn_name.strip() if sep else spec


def load_reward_fn(spec: str) -> RewardFn:
  """The function named by "module.path:function", importing that module (and its parent packages) only."""
  if not isinstance(spec, str) or spec.count(":") != 1:
    raise ValueError(f"reward spec must look like 'module.path:function', got {spec!r}")
  module_name, fn_name = (part.strip() for part in canonical_spec(spec).split(":"))
  if not module_name or not fn_name.isidentifier():
    raise ValueError(f"reward spec must look like 'module.path:function', got {spec!r}")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"reward spec {spec!r}: cannot import module {module_name!r} ({e})") from e
  fn = module.__dict__.get(fn_name)
  if not callable(fn):
    raise ValueError(f"reward spec {spec!r}: module {module_name!r} has no function {fn_name!r}")
  return fn


def batch_rewards(completions: Sequence, answers: Sequence, *, fmt: PromptFormat,
                  reward_fn: RewardFn = default_reward) -> dict[str, np.ndarray]:
  """Scores a batch: {name: float32 [B]} for every sub-score the reward function returns (same names for all)."""
  if len(completions) != len(answers):
    raise ValueError(f"got {len(completions)} completions but {len(answers)} answers")
  rows = [reward_fn(c, a, fmt=fmt) for c, a in zip(completions, answers)]
  names = sorted(rows[0]) if rows else ["overall"]
  for i, row in enumerate(rows):
    if "overall" not in row or sorted(row) != names:
      raise ValueError(f"reward row {i} has sub-scores {sorted(row)}; expected {names} including 'overall'")
  return {name: np.asarray([row[name] for row in rows], dtype=np.float32) for name in names}
