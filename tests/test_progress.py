"""What the terminal shows during a run: ETAs from steady-state step times, compile lines, and log lines that never
land glued to the progress bar."""

import io
import logging
import types

import pytest

from jaxvg.run import metrics


class Terminal(io.StringIO):
  """One terminal that both stdout (the log) and stderr (the bar) write to."""

  def isatty(self):
    return True

  def screen(self) -> list[str]:
    """The lines as the terminal shows them. Every carriage return this output holds is followed by ESC[K (clear
    the line), so a line shows what follows its last carriage return."""
    return [raw.split("\r")[-1].replace("\033[K", "") for raw in self.getvalue().split("\n")]


class Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


@pytest.fixture
def clock(monkeypatch):
  c = Clock()
  monkeypatch.setattr(metrics.time, "time", c)
  return c


def test_eta_leaves_out_compilation(clock):
  # A first step that compiles for 100 s, then 1 s per step: after 10 of 100 steps (110 s elapsed), 90 steps are
  # left at 1 s each. Counting the compile time would say 90 x 11 s = 16:30.
  term = Terminal()
  progress = metrics.Progress(100, desc="rl", stream=term)

  def step():
    clock.now += 1.0

  def compiling_step():
    clock.now += 100.0

  first = metrics.announce_compiles(compiling_step, "policy update", logger=logging.getLogger("test.quiet"))
  first()
  for done in range(1, 11):
    step() if done > 1 else None
    progress.update(done)
  assert clock.now - progress.start == 109.0  # the first call (100 s) and 9 more steps
  # 9 steady seconds for 10 steps: 0.9 s each, 90 left -> 81 s.
  assert progress.eta(10, 109.0) == pytest.approx(81.0)
  assert "ETA 1:21" in term.screen()[-1]
  progress.close()


def test_compile_lines_once_per_shape(clock, caplog):
  import numpy as np
  calls = []

  def fn(x):
    calls.append(x.shape)
    clock.now += {8: 5.0, 16: 5.0, 32: 0.0}[x.shape[1]]
    return x

  wrapped = metrics.announce_compiles(fn, "sampler", logger=logging.getLogger("test.compiles"))
  with caplog.at_level(logging.INFO, logger="test.compiles"):
    wrapped(np.zeros((2, 8)))
    wrapped(np.zeros((2, 8)))   # known shapes: no line
    wrapped(np.zeros((2, 16)))  # a new bucket that compiles for 5 s: one line after
    wrapped(np.zeros((2, 32)))  # a new bucket that takes no time: no line
  assert [r.getMessage() for r in caplog.records] == [
      "compiling sampler ...", "sampler compiled and ran in 5.0 s", "sampler compiled for new shapes and ran in 5.0 s"]
  assert len(calls) == 4


def test_a_log_line_never_lands_on_the_bar():
  term = Terminal()
  root = logging.getLogger()
  handlers, level = root.handlers[:], root.level
  try:
    metrics.setup_logging(term)
    progress = metrics.Progress(10, desc="dapo", stream=term)
    progress.update(3, "reward 0.500")
    logging.getLogger("jaxvg.train").warning("step 3: no informative group was sampled; no update")
    progress.update(4, "reward 0.600")
    progress.close()
  finally:
    root.handlers[:] = handlers
    root.setLevel(level)
  screen = [line for line in term.screen() if line]
  assert len(screen) == 2, screen
  assert screen[0].endswith("WARNING step 3: no informative group was sampled; no update")
  assert "[" not in screen[0] and screen[1].startswith("dapo [") and "4/10" in screen[1]


def test_a_log_line_to_a_closed_stream_never_raises_into_the_caller(capsys):
  # A handler left on a closed stream (an in-process run whose captured stdout is gone), while a bar is drawn.
  term, gone = Terminal(), io.StringIO()
  handler = metrics._BarAwareHandler(gone)
  gone.close()
  progress = metrics.Progress(2, desc="rl", stream=term)
  progress.update(1)
  logger = logging.getLogger("test.closed")
  logger.addHandler(handler)
  try:
    logger.warning("after the stream closed")  # logging reports the error on stderr; nothing is raised here
  finally:
    logger.removeHandler(handler)
    progress.close()
  assert "Logging error" in capsys.readouterr().err


def test_a_ctrl_c_that_a_callback_swallowed_is_raised_at_the_next_safe_point(monkeypatch, capfd):
  """Python ignores an exception raised inside __del__ or a gc callback (XLA's runs during compilation): the latch
  raises the KeyboardInterrupt again at the next progress update and after the next announced call, and Python's
  "Exception ignored" report of it stays off the terminal."""
  import os
  import signal
  import sys
  previous, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
  reports = []
  sys.unraisablehook = reports.append  # what Python would report: here, nothing
  monkeypatch.setattr(metrics, "_INTERRUPTED", [False])

  class Swallows:
    def __del__(self):
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(1000):  # the handler runs on one of these bytecodes, inside __del__
        pass

  try:
    metrics.latch_interrupts()
    Swallows()  # collected at once: the KeyboardInterrupt is printed as ignored, and nothing else happens
    with pytest.raises(KeyboardInterrupt):
      metrics.Progress(3, desc="x", enabled=False).update(1)
    with pytest.raises(KeyboardInterrupt):
      metrics.announce_compiles(lambda x: x, "identity")(1)
    assert reports == [] and "Exception ignored" not in capfd.readouterr().err
    sys.unraisablehook(types.SimpleNamespace(exc_value=ValueError("other")))  # anything else is still reported
    assert len(reports) == 1
  finally:
    signal.signal(signal.SIGINT, previous)
    sys.unraisablehook = hook
