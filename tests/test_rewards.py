"""Rewards on hand-written completions: extraction, grading, format checks, weighting, robustness, loading."""

import logging
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from jaxvg.data import prompts
from jaxvg.rl import rewards


def _run_with_deadline(fn, seconds):
  """Runs fn in a worker thread (where signal-based timeouts would fail) and returns (finished, result)."""
  out = {}
  thread = threading.Thread(target=lambda: out.update(result=fn()), daemon=True)
  thread.start()
  thread.join(seconds)
  return not thread.is_alive(), out.get("result")


# --------------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{2}.", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{{a}{b{c}}}", "{a}{b{c}}"),
    ("first \\boxed{1}, then \\boxed{7}", "7"),  # the last box wins
    ("\\boxed{1} and finally \\boxed{3", None),  # the last box is never closed
    ("no box at all: 2", None),
    ("\\boxed{}", ""),
    ("", None),
])
def test_extract_boxed(text, expected):
  assert rewards.extract_boxed(text) == expected


# ------------------------------------------------------------------------------------------------------ grading


@pytest.mark.parametrize("pred, gold", [
    ("2", "2"), (" Red ", "red"), ("$2$", "2"), ("2.0", "2"), ("0.5", "1/2"), ("\\text{blue}", "blue"),
    ("The square", "square"), ("3.", "3"),
    ("\\frac{4}{2}", "2"), ("2^{10}", "1024"), ("\\sqrt{9}", "3"),  # symbolic: math-verify
])
def test_grade_correct(pred, gold):
  assert rewards.grade_answer(pred, gold)


@pytest.mark.parametrize("pred, gold", [
    ("3", "2"), ("circles", "circle"), ("blue", "red"), ("", "2"), (None, "2"), ("2", None), ("\\frac{1}{3}", "0.33"),
])
def test_grade_wrong(pred, gold):
  assert not rewards.grade_answer(pred, gold)


def test_grading_works_off_the_main_thread():
  finished, result = _run_with_deadline(lambda: rewards.grade_answer("\\frac{4}{2}", "2"), 60)
  assert finished and result is True


@pytest.mark.parametrize("pred", ["9^{9^{9^{9}}}", "10^{10^{10}}", "1000000!", "(10^{100})!", "9^{999999999}",
                                  "\\binom{100000000}{50000000}", "10**10**10"])
def test_grading_never_hangs_on_huge_expressions(pred):
  start = time.monotonic()
  finished, result = _run_with_deadline(lambda: rewards.grade_answer(pred, "2"), 30)
  assert finished and result is False
  assert time.monotonic() - start < 30


# ------------------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize("completion, expected", [
    ("<think>\nThere are two.\n</think>\n\\boxed{2}", 1.0),
    ("  <think>two</think>\\boxed{2} done", 1.0),             # leading whitespace and trailing text are fine
    ("<think>two</think> so the answer is \\boxed{2}", 1.0),  # text between the tag and the box is fine
    ("\\boxed{2}", 0.0),                                      # no think block
    ("<think>two</think>", 0.0),                              # no box
    ("<think>two</think>\\boxed{2", 0.0),                     # box never closed
    ("<think>two</think>\\boxed{ }", 0.0),                    # empty box
    ("<think>  </think>\\boxed{2}", 0.0),                     # empty think
    ("Sure! <think>two</think>\\boxed{2}", 0.0),              # text before the first tag
    ("<think>a</think><think>b</think>\\boxed{2}", 0.0),      # repeated tags
    ("<think>two\\boxed{2}", 0.0),                            # never closed
    ("\\boxed{2}<think>two</think>", 0.0),                    # box before the block only
])
def test_format_pgpo(completion, expected):
  assert rewards.format_score(completion, fmt=prompts.PGPO) == expected


def test_format_vgs():
  assert rewards.format_score("<reason>two</reason>\n\\boxed{2}", fmt=prompts.VGS) == 1.0
  assert rewards.format_score("<think>two</think>\n\\boxed{2}", fmt=prompts.VGS) == 0.0


@pytest.mark.parametrize("completion, expected", [
    ("\nTwo stars.\n</description>\n<think>\nSo 2.\n</think>\n\\boxed{2}", 1.0),  # prefill is part of the prompt
    ("<description>Two stars.</description><think>So 2.</think>\\boxed{2}", 1.0),  # prefill repeated: tolerated
    ("Two stars.</description>\n<think>So 2.</think>", 0.0),                      # no box
    ("Two stars.</description> and <think>So 2.</think>\\boxed{2}", 0.0),          # text between the sections
    ("</description><think>So 2.</think>\\boxed{2}", 0.0),                         # empty description
    ("Two stars.<think>So 2.</think></description>\\boxed{2}", 0.0),               # wrong order
    ("Two stars.</description>\\boxed{2}", 0.0),                                   # no think block
])
def test_format_vigos(completion, expected):
  assert rewards.format_score(completion, fmt=prompts.VIGOS) == expected


# ------------------------------------------------------------------------------------------------------ rewards


@pytest.mark.parametrize("completion, answer, accuracy, fmt_ok", [
    ("<think>two</think>\\boxed{2}", "2", 1.0, 1.0),
    ("The answer is \\boxed{2}", "2", 1.0, 0.0),
    ("<think>three</think>\\boxed{3}", "2", 0.0, 1.0),
    ("I do not know", "2", 0.0, 0.0),
])
def test_default_reward_weighting(completion, answer, accuracy, fmt_ok):
  out = rewards.default_reward(completion, answer, fmt=prompts.PGPO)
  assert out["accuracy"] == accuracy and out["format"] == fmt_ok
  assert out["overall"] == pytest.approx(0.9 * accuracy + 0.1 * fmt_ok)  # methods: R = 0.9 acc + 0.1 format


def test_format_weight_is_a_keyword():
  out = rewards.default_reward("\\boxed{2}", "2", fmt=prompts.PGPO, format_weight=0.5)
  assert out == {"accuracy": 1.0, "format": 0.0, "overall": 0.5}


@pytest.mark.parametrize("completion", [
    b"\xff\xfe\x00\\boxed{2}",                      # undecodable bytes
    "\ud800\x00\x7f<think>\x1b[31m</think>\\boxed{\udfff}",  # lone surrogates, control characters
    None,
    12345,
    "}" * 1000 + "{" * 1000 + "\\boxed{" * 1000,   # brace soup
])
def test_garbage_never_raises(completion):
  out = rewards.default_reward(completion, "2", fmt=prompts.PGPO)
  assert set(out) == {"accuracy", "format", "overall"}
  assert all(0.0 <= v <= 1.0 for v in out.values())


def test_garbage_bytes_with_a_correct_box_still_grade():
  assert rewards.default_reward(b"\xff<think>x</think>\\boxed{2}", "2", fmt=prompts.PGPO)["accuracy"] == 1.0


def test_extremely_long_text_is_fast():
  long_think = "<think>" + "a" * 2_000_000 + "</think>\\boxed{2}"
  long_box = "<think>x</think>\\boxed{" + "9" * 1_000_000 + "}"
  start = time.monotonic()
  assert rewards.default_reward(long_think, "2", fmt=prompts.PGPO)["overall"] == pytest.approx(1.0)
  assert rewards.default_reward(long_box, "2", fmt=prompts.PGPO) == {"accuracy": 0.0, "format": 1.0, "overall": 0.1}
  assert time.monotonic() - start < 20


# --------------------------------------------------------------------------------------------------- batch, load


def test_batch_rewards():
  out = rewards.batch_rewards(["<think>a</think>\\boxed{2}", "\\boxed{2}", "\\boxed{5}"], ["2", "2", "2"],
                              fmt=prompts.PGPO)
  assert sorted(out) == ["accuracy", "format", "overall"]
  assert all(v.dtype == np.float32 and v.shape == (3,) for v in out.values())
  np.testing.assert_allclose(out["overall"], [1.0, 0.9, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(out["format"], [1.0, 0.0, 0.0])


def test_batch_rewards_errors():
  with pytest.raises(ValueError, match="2 completions but 1 answers"):
    rewards.batch_rewards(["a", "b"], ["1"], fmt=prompts.PGPO)
  with pytest.raises(ValueError, match="overall"):
    rewards.batch_rewards(["a"], ["1"], fmt=prompts.PGPO, reward_fn=lambda c, a, *, fmt: {"accuracy": 1.0})


def test_load_reward_fn_imports_only_that_module(tmp_path, monkeypatch):
  package = tmp_path / "myrewards_pkg"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "scorer.py").write_text(textwrap.dedent("""
      def reward(completion, answer, *, fmt):
        return {"overall": float(completion == answer)}
      NOT_A_FUNCTION = 3
  """))
  (package / "other.py").write_text("raise RuntimeError('must not be imported')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  fn = rewards.load_reward_fn("myrewards_pkg.scorer:reward")
  assert fn("a", "a", fmt=prompts.PGPO) == {"overall": 1.0}
  assert "myrewards_pkg.other" not in sys.modules
  assert rewards.batch_rewards(["a", "b"], ["a", "a"], fmt=prompts.PGPO, reward_fn=fn)["overall"].tolist() == [1, 0]
  with pytest.raises(ValueError, match="no function 'NOT_A_FUNCTION'"):
    rewards.load_reward_fn("myrewards_pkg.scorer:NOT_A_FUNCTION")


def test_load_reward_fn_default_and_errors():
  assert rewards.load_reward_fn("jaxvg.rl.rewards:default_reward") is rewards.default_reward
  for spec in ["jaxvg.rl.rewards", "a:b:c", ":f", "jaxvg.rl.rewards:", 3]:
    with pytest.raises(ValueError, match="module.path:function"):
      rewards.load_reward_fn(spec)
  with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
    rewards.load_reward_fn("no_such_module_xyz:f")
  with pytest.raises(ValueError, match="no function 'nope'"):
    rewards.load_reward_fn("jaxvg.rl.rewards:nope")


def test_symbolic_grading_does_not_warn_about_its_disabled_timeouts(monkeypatch, caplog):
  # math-verify warns once per process that timeouts are off; grading disables them on purpose, so the notice must
  # not reach a run's log (reset the once-per-process flags, so the warning would be emitted again).
  import math_verify.grader
  import math_verify.parser
  monkeypatch.setattr(math_verify.parser, "TIMEOUT_WARNING_SHOWN", False, raising=False)
  monkeypatch.setattr(math_verify.grader, "TIMEOUT_WARNING_SHOWN", False, raising=False)
  with caplog.at_level(logging.WARNING):
    assert rewards.grade_answer("\\sqrt{4}", "2")
  assert "Timeout is disabled" not in caplog.text


def test_a_reward_named_by_its_former_module_path_loads_the_same_function():
  """Configs and run folders written before the layout by stage name jaxvg.rewards; it is jaxvg.rl.rewards now."""
  assert rewards.load_reward_fn("jaxvg.rewards:default_reward") is rewards.default_reward
  assert rewards.canonical_spec(" jaxvg.rewards : grade ") == "jaxvg.rl.rewards:grade"
  assert rewards.canonical_spec("mypkg.scorer:reward") == "mypkg.scorer:reward"
