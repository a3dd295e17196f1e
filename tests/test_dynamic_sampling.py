"""DAPO dynamic sampling: the group filter on hand-built groups and the bounded accumulator."""

import logging

import numpy as np
import pytest

from jaxvg.rl.dynamic_sampling import DynamicBatch, fill, keep_groups, select_groups


def _batch(prompt_ids, group_size):
  """A [B*G] batch whose arrays record which prompt and sample each row came from."""
  prompt = np.repeat(np.asarray(prompt_ids), group_size)
  sample = np.tile(np.arange(group_size), len(prompt_ids))
  return {"prompt": prompt, "tokens_BT": np.stack([prompt, sample], axis=1), "meta": {"sample": sample}}


def test_keep_groups_by_hand():
  score = np.array([1, 1, 1, 1,   # mean 1: all correct, dropped
                    0, 0, 0, 0,   # mean 0: all wrong, dropped
                    1, 0, 0, 0,   # mean 0.25: kept
                    1, 1, 1, 0])  # mean 0.75: kept
  np.testing.assert_array_equal(keep_groups(score, 4), [False, False, True, True])


def test_keep_groups_bounds_are_strict():
  # group means 0.01, 0.99, 0.5 and 0.1 (an "overall" score of all-wrong samples that only earned the format bonus)
  score = np.array([0.01, 0.01, 0.99, 0.99, 0.0, 1.0, 0.1, 0.1])
  np.testing.assert_array_equal(keep_groups(score, 2), [False, False, True, True])
  np.testing.assert_array_equal(keep_groups(score, 2, low=0.2, high=0.6), [False, False, True, False])


def test_keep_groups_single_sample_groups_are_all_dropped_for_binary_scores():
  np.testing.assert_array_equal(keep_groups(np.array([1.0, 0.0, 1.0]), 1), [False, False, False])


def test_select_groups_keeps_whole_groups_in_order():
  batch = _batch([10, 11, 12], group_size=2)
  out = select_groups(batch, np.array([True, False, True]), 2)
  np.testing.assert_array_equal(out["prompt"], [10, 10, 12, 12])
  np.testing.assert_array_equal(out["meta"]["sample"], [0, 1, 0, 1])
  np.testing.assert_array_equal(out["tokens_BT"], [[10, 0], [10, 1], [12, 0], [12, 1]])


def test_accumulator_fills_and_truncates():
  acc = DynamicBatch(target_groups=3, group_size=2, max_tries=5)
  # try 1: prompts 0..3 with group means 1, 0.5, 0, 0.5 -> keeps prompts 1 and 3
  done = acc.add(_batch([0, 1, 2, 3], 2), np.array([1, 1, 1, 0, 0, 0, 0, 1]))
  assert not done
  # try 2: prompts 4..6 with means 0.5, 0.5, 1 -> keeps 4 and 5; 4 kept in all, one more than the target
  done = acc.add(_batch([4, 5, 6], 2), np.array([0, 1, 1, 0, 1, 1]))
  assert done
  batch, stats = acc.result()
  np.testing.assert_array_equal(batch["prompt"], [1, 1, 3, 3, 4, 4])
  assert batch["tokens_BT"].shape == (6, 2)
  assert (stats.tries, stats.groups_seen, stats.groups_kept) == (2, 7, 4)
  assert (stats.dropped_high, stats.dropped_low, stats.groups_returned, stats.filled) == (2, 1, 3, True)
  with pytest.raises(RuntimeError, match="done"):
    acc.add(_batch([7], 2), np.array([0, 1]))


def test_fill_stops_after_max_tries_with_nothing_kept(caplog):
  calls = []

  def sample_fn():
    calls.append(1)
    return _batch([len(calls)], 4), np.ones(4)  # always all correct

  with caplog.at_level(logging.WARNING):
    batch, stats = fill(sample_fn, target_groups=2, group_size=4, max_tries=3)
  assert len(calls) == 3
  assert (stats.tries, stats.groups_seen, stats.groups_kept, stats.dropped_high) == (3, 3, 0, 3)
  assert not stats.filled and stats.groups_returned == 0
  assert batch["prompt"].shape == (0,) and batch["tokens_BT"].shape == (0, 2)
  assert "gave up after 3 tries" in caplog.text


def test_fill_returns_partial_batch_when_tries_run_out(caplog):
  scores = iter([np.array([1, 0, 0, 0]), np.array([0, 0, 0, 0])])
  prompts = iter([[0, 1], [2, 3]])

  def sample_fn():
    return _batch(next(prompts), 2), next(scores)

  with caplog.at_level(logging.WARNING):
    batch, stats = fill(sample_fn, target_groups=5, group_size=2, max_tries=2)
  np.testing.assert_array_equal(batch["prompt"], [0, 0])
  assert (stats.groups_kept, stats.groups_returned, stats.dropped_low, stats.filled) == (1, 1, 3, False)
  assert "1 of 5 groups kept" in caplog.text


def test_fill_stops_early_when_full():
  calls = []

  def sample_fn():
    calls.append(1)
    return _batch([0, 1], 2), np.array([1, 0, 0, 1])

  batch, stats = fill(sample_fn, target_groups=2, group_size=2, max_tries=10)
  assert len(calls) == 1 and stats.filled and batch["prompt"].shape == (4,)


def test_bad_inputs():
  with pytest.raises(ValueError, match="max_tries"):
    DynamicBatch(target_groups=2, group_size=2, max_tries=0)
  with pytest.raises(ValueError, match="low < high"):
    keep_groups(np.zeros(4), 2, low=0.5, high=0.5)
  with pytest.raises(ValueError, match="group_size"):
    keep_groups(np.zeros(5), 2)
  with pytest.raises(ValueError, match="non-finite"):
    keep_groups(np.array([0.0, np.nan]), 2)
  acc = DynamicBatch(target_groups=2, group_size=2, max_tries=2)
  with pytest.raises(ValueError, match="samples"):
    acc.add(_batch([0, 1], 2), np.zeros(6))
  with pytest.raises(ValueError, match="leading"):
    acc.add({"a": np.zeros(4), "b": np.zeros(3)}, np.zeros(4))
  with pytest.raises(RuntimeError, match="before any add"):
    acc.result()
