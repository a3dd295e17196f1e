"""bench/common.py's interleaved timing, on a fake clock: the ratio is then exact and the test cannot be flaky."""

import gc
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import common  # noqa: E402


class FakeClock:
  """A clock that only moves when a fake workload advances it."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def fake_side(clock, name, seconds, log):
  def call():
    log.append(name)
    clock.now += seconds
  return call


def test_interleaved_ratio_is_b_over_a_and_order_alternates():
  clock, log = FakeClock(), []
  out = common.interleaved(fake_side(clock, "a", 0.5, log), fake_side(clock, "b", 1.5, log), pairs=8, warmup=2,
                           min_sample_s=0.2, clock=clock)
  assert out["ratio"] == pytest.approx(3.0)
  assert out["ratio_iqr"] == pytest.approx([3.0, 3.0])
  assert (out["a_s"], out["b_s"]) == pytest.approx((0.5, 1.5))
  assert out["pairs"] == 8 and out["calls"] == [1, 1]
  # 2 warm-up calls of each, sizing calls until 3 x 0.2 s (a: 2, b: 1), then pairs whose first side alternates
  assert log[:7] == ["a", "a", "b", "b", "a", "a", "b"]
  timed = log[7:]
  assert [timed[2 * k:2 * k + 2] for k in range(4)] == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
  assert len(timed) == 16


def test_short_calls_are_repeated_within_a_sample():
  clock, log = FakeClock(), []
  # Binary fractions, so that clock differences and ceil() are exact.
  out = common.interleaved(fake_side(clock, "a", 1 / 64, log), fake_side(clock, "b", 1 / 8, log), pairs=7, warmup=0,
                           min_sample_s=0.25, clock=clock)
  assert out["calls"] == [16, 2]
  assert out["ratio"] == pytest.approx(8.0)  # per call, whatever the number of calls per sample
  assert (out["a_s"], out["b_s"]) == pytest.approx((1 / 64, 1 / 8))


def test_round_robin_rotates_three_sides_and_restores_gc():
  clock, log = FakeClock(), []
  fns = {n: fake_side(clock, n, s, log) for n, s in (("x", 1.0), ("y", 2.0), ("z", 4.0))}
  gc.disable()
  try:
    out = common.round_robin(fns, rounds=7, warmup=0, clock=clock)
    assert not gc.isenabled()
  finally:
    gc.enable()
  firsts = [log[3 + 3 * r] for r in range(7)]  # 1 s per call or more: one sizing call each
  assert firsts == ["x", "y", "z", "x", "y", "z", "x"]
  median, iqr = common.ratio_stats(out["seconds"]["z"], out["seconds"]["x"])
  assert median == pytest.approx(4.0) and iqr == pytest.approx([4.0, 4.0])


def test_a_slow_first_call_does_not_size_the_samples():
  clock, log, costs = FakeClock(), [], iter([0.5] + [1 / 64] * 1000)

  def a():
    log.append("a")
    clock.now += next(costs)
  out = common.interleaved(a, fake_side(clock, "b", 1 / 8, log), pairs=7, warmup=0, min_sample_s=0.25, clock=clock)
  assert out["calls"] == [16, 2]
  assert out["ratio"] == pytest.approx(8.0)


def test_too_few_pairs_are_refused():
  with pytest.raises(ValueError):
    common.interleaved(lambda: None, lambda: None, pairs=5)
