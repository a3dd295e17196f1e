"""DAPO dynamic sampling, host side (numpy): keep informative groups, sample again until the batch is full.

A group (the G samples of one prompt) whose mean score is at either end (all correct or all wrong) has zero
advantage under GRPO/DAPO and only dilutes the batch. DAPO drops such groups and draws more prompts until the batch
holds `target_groups` informative groups; jaxvg bounds the number of draws (`max_tries`) and, when they run out,
returns what it has with a logged warning (methods.md sections 1 and 8: keep mean score in (0.01, 0.99)).

Layout: a batch is any pytree (e.g. a dict) of numpy arrays whose leading axis is the flat [B*G] sample axis, the
G samples of one prompt contiguous, the same layout `advantages.group_advantages` takes. Scores are a separate
[B*G] array; which score to filter on (accuracy, or PGPO's "overall" reward) is the caller's choice.
"""

import dataclasses
import logging
from typing import Any, Callable

import jax
import numpy as np

log = logging.getLogger(__name__)


def keep_groups(score_B: np.ndarray, group_size: int, *, low: float = 0.01, high: float = 0.99) -> np.ndarray:
  """Which groups to keep: low < mean_g score < high, strictly.

  Example, group_size=3, score_B = [1, 1, 1 | 0, 1, 0 | 0, 0, 0] -> group means [1, 1/3, 0] -> [False, True, False].

  Args:
    score_B: [B*G] per-sample scores (e.g. accuracy in {0, 1}), samples of one prompt contiguous.
    group_size: G.
    low, high: the open interval a group mean must lie in.

  Returns:
    [B] bool, one entry per group.
  """
  score_B = np.asarray(score_B, dtype=np.float64)
  if score_B.ndim != 1:
    raise ValueError(f"score_B must be 1-D [B*G], got shape {score_B.shape}")
  if group_size < 1 or score_B.shape[0] % group_size != 0:
    raise ValueError(f"group_size={group_size} must be >= 1 and divide the {score_B.shape[0]} scores")
  if not np.all(np.isfinite(score_B)):
    raise ValueError("score_B has non-finite entries")
  if not low < high:
    raise ValueError(f"need low < high, got low={low}, high={high}")
  mean_B = score_B.reshape(-1, group_size).mean(axis=1)
  return (mean_B > low) & (mean_B < high)


def _num_samples(batch: Any) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("batch has no arrays")
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"every array of batch needs the same leading [B*G] axis, got leading sizes {sizes}")
  return sizes.pop()


def select_groups(batch: Any, keep: np.ndarray, group_size: int) -> Any:
  """The samples of the kept groups, in order: every leaf indexed by np.repeat(keep, group_size) on axis 0."""
  keep_samples = np.repeat(np.asarray(keep, dtype=bool), group_size)
  if _num_samples(batch) != keep_samples.shape[0]:
    raise ValueError(f"batch has {_num_samples(batch)} samples, keep covers {keep_samples.shape[0]}")
  return jax.tree.map(lambda x: np.asarray(x)[keep_samples], batch)


@dataclasses.dataclass(frozen=True)
class DynamicSamplingStats:
  """Counts over all tries. dropped_high: mean >= high (all correct when the score is accuracy); dropped_low: mean
  <= low (all wrong). groups_kept may exceed groups_returned, which is capped at the target."""

  tries: int
  groups_seen: int
  groups_kept: int
  dropped_high: int
  dropped_low: int
  groups_returned: int
  filled: bool


class DynamicBatch:
  """Accumulates kept groups from successive sampled batches until `target_groups` or `max_tries` is reached.

    acc = DynamicBatch(target_groups=128, group_size=5, max_tries=8)
    while not acc.done:
      batch, score_B = sample_more()
      acc.add(batch, score_B)
    batch, stats = acc.result()   # the first 128 kept groups, or fewer (with a warning) if the tries ran out
  """

  def __init__(self, *, target_groups: int, group_size: int, max_tries: int, low: float = 0.01, high: float = 0.99):
    if target_groups < 1:
      raise ValueError(f"target_groups must be >= 1, got {target_groups}")
    if group_size < 1:
      raise ValueError(f"group_size must be >= 1, got {group_size}")
    if max_tries < 1:
      raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    if not low < high:
      raise ValueError(f"need low < high, got low={low}, high={high}")
    self.target_groups, self.group_size, self.max_tries = target_groups, group_size, max_tries
    self.low, self.high = low, high
    self._parts = []  # kept groups of each try, in order
    self._template = None  # the first batch, to return an empty batch of the right structure
    self._tries = self._seen = self._kept = self._dropped_high = self._dropped_low = 0

  @property
  def done(self) -> bool:
    return self._kept >= self.target_groups or self._tries >= self.max_tries

  def add(self, batch: Any, score_B: np.ndarray) -> bool:
    """Filter one sampled batch ([B*G] leading axis) by its [B*G] scores and keep the informative groups.

    Returns:
      `done` after this try.
    """
    if self.done:
      raise RuntimeError(f"DynamicBatch is done ({self._tries} tries, {self._kept} groups kept): call result()")
    keep = keep_groups(score_B, self.group_size, low=self.low, high=self.high)  # validates score_B
    score_B = np.asarray(score_B, dtype=np.float64)
    if _num_samples(batch) != score_B.shape[0]:
      raise ValueError(f"batch has {_num_samples(batch)} samples but score_B has {score_B.shape[0]}")
    if self._template is not None and jax.tree.structure(batch) != jax.tree.structure(self._template):
      raise ValueError("batch structure differs from the first batch added")
    mean_B = score_B.reshape(-1, self.group_size).mean(axis=1)
    self._template = batch if self._template is None else self._template
    self._tries += 1
    self._seen += keep.shape[0]
    self._kept += int(keep.sum())
    self._dropped_high += int(np.sum(mean_B >= self.high))
    self._dropped_low += int(np.sum(mean_B <= self.low))
    if keep.any():
      self._parts.append(select_groups(batch, keep, self.group_size))
    if self._tries >= self.max_tries and self._kept < self.target_groups:
      log.warning("dynamic sampling gave up after %d tries: %d of %d groups kept (%d seen, %d dropped high, "
                  "%d dropped low); training on the partial batch", self._tries, self._kept, self.target_groups,
                  self._seen, self._dropped_high, self._dropped_low)
    return self.done

  @property
  def stats(self) -> DynamicSamplingStats:
    return DynamicSamplingStats(
        tries=self._tries, groups_seen=self._seen, groups_kept=self._kept, dropped_high=self._dropped_high,
        dropped_low=self._dropped_low, groups_returned=min(self._kept, self.target_groups),
        filled=self._kept >= self.target_groups)

  def result(self) -> tuple[Any, DynamicSamplingStats]:
    """The first min(kept, target_groups) kept groups, concatenated on the [B*G] axis, and the counts."""
    if self._template is None:
      raise RuntimeError("DynamicBatch.result() called before any add()")
    if not self._parts:
      return jax.tree.map(lambda x: np.asarray(x)[:0], self._template), self.stats
    n = min(self._kept, self.target_groups) * self.group_size
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0)[:n], *self._parts), self.stats


def fill(
    sample_fn: Callable[[], tuple[Any, np.ndarray]],
    *,
    target_groups: int,
    group_size: int,
    max_tries: int,
    low: float = 0.01,
    high: float = 0.99,
) -> tuple[Any, DynamicSamplingStats]:
  """Call `sample_fn() -> (batch, score_B)` until `target_groups` groups are kept or `max_tries` calls were made."""
  acc = DynamicBatch(target_groups=target_groups, group_size=group_size, max_tries=max_tries, low=low, high=high)
  while not acc.done:
    acc.add(*sample_fn())
  return acc.result()
