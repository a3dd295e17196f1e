"""Otsu split and segment normalization against hand arithmetic, brute-force search and naive loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvg.credit import clusters

_otsu = jax.jit(clusters.otsu_threshold)
_normalize = jax.jit(clusters.segment_normalize, static_argnames=("num_segments", "mode", "eps"))


def _split_sse(values, threshold):
  """Within-cluster sum of squares of the partition {v < threshold} / {v >= threshold}, in float64."""
  sse = 0.0
  for part in (values[values < threshold], values[values >= threshold]):
    if part.size:
      sse += float(np.sum((part - part.mean()) ** 2))
  return sse


def _brute_force_otsu(values, valid):
  """Try every threshold that leaves both clusters non-empty; keep the smallest SSE (the smallest threshold on ties)."""
  v = values[valid].astype(np.float64)
  candidates = np.unique(v)[1:]
  if candidates.size == 0:
    return None
  sse = [_split_sse(v, c) for c in candidates]
  best = int(np.argmin(sse))
  return float(candidates[best]), sse[best]


def test_otsu_hand_example():
  # [1, 2, 10, 11]: split {1, 2} | {10, 11} has SSE 0.5 + 0.5 = 1; the others {1} | {2, 10, 11} and {1, 2, 10} | {11}
  # have SSE 48.67. So c* = 10 and labels [0, 0, 1, 1]. The masked 100 takes no part and gets -1.
  thr, labels = _otsu(jnp.array([10.0, 1.0, 100.0, 2.0, 11.0]), jnp.array([True, True, False, True, True]))
  assert float(thr) == 10.0
  np.testing.assert_array_equal(labels, [1, 0, -1, 0, 1])


def test_otsu_ties_go_to_visual():
  # [0, 5, 5]: the only realizable splits are {0} | {5, 5} (SSE 0) -> c* = 5, both 5s are visual.
  thr, labels = _otsu(jnp.array([5.0, 0.0, 5.0]), jnp.ones(3, bool))
  assert float(thr) == 5.0
  np.testing.assert_array_equal(labels, [1, 0, 1])
  # [0, 0, 0, 1, 1, 10]: {0,0,0,1,1} | {10}: mean 0.4, SSE = 3 * 0.16 + 2 * 0.36 = 1.2;
  # {0,0,0} | {1,1,10}: mean 4, SSE = 9 + 9 + 36 = 54. So c* = 10; a split inside a run of equal values never occurs.
  thr, labels = _otsu(jnp.array([0.0, 0.0, 0.0, 1.0, 1.0, 10.0]), jnp.ones(6, bool))
  assert float(thr) == 10.0
  np.testing.assert_array_equal(labels, [0, 0, 0, 0, 0, 1])


def test_otsu_degenerate_inputs():
  # No valid value: threshold 0, all labels -1.
  thr, labels = _otsu(jnp.array([3.0, 4.0]), jnp.zeros(2, bool))
  assert float(thr) == 0.0
  np.testing.assert_array_equal(labels, [-1, -1])
  # One valid value: threshold = that value, label 1.
  thr, labels = _otsu(jnp.array([3.0, -7.5]), jnp.array([False, True]))
  assert float(thr) == -7.5
  np.testing.assert_array_equal(labels, [-1, 1])
  # All equal: no split exists, one visual cluster.
  thr, labels = _otsu(jnp.full((4,), 2.5), jnp.array([True, True, True, False]))
  assert float(thr) == 2.5
  np.testing.assert_array_equal(labels, [1, 1, 1, -1])


@pytest.mark.parametrize("seed", range(6))
def test_otsu_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  m = int(rng.integers(2, 60))
  if seed % 2:
    values = rng.integers(-3, 4, size=m).astype(np.float32)  # many ties
  else:
    values = np.concatenate([rng.normal(0, 1, m // 2), rng.normal(2.5, 0.7, m - m // 2)]).astype(np.float32)
  valid = rng.random(m) < 0.8
  valid[:2] = True
  thr, labels = _otsu(jnp.asarray(values), jnp.asarray(valid))
  thr, labels = float(thr), np.asarray(labels)
  np.testing.assert_array_equal(labels, np.where(valid, (values >= thr).astype(int), -1))
  ref = _brute_force_otsu(values, valid)
  v = values[valid].astype(np.float64)
  if ref is None:
    assert thr == v.min()
    return
  ref_thr, ref_sse = ref
  if seed % 2:
    # Integer data can have exact ties in SSE between splits; any optimal split is correct there.
    assert _split_sse(v, thr) <= ref_sse + 1e-4 * max(1.0, ref_sse)
    assert thr in set(v.tolist()) and thr > v.min()
  else:
    assert thr == ref_thr


def test_otsu_offset_invariance():
  # Centering before the prefix sums: a large common offset must not change the split.
  rng = np.random.default_rng(7)
  values = np.concatenate([rng.normal(0, 1, 20), rng.normal(4, 1, 12)]).astype(np.float32)
  valid = np.ones(values.size, bool)
  _, labels = _otsu(jnp.asarray(values), jnp.asarray(valid))
  _, labels_shift = _otsu(jnp.asarray(values + 1000.0), jnp.asarray(valid))
  np.testing.assert_array_equal(labels, labels_shift)


def _naive_normalize(values, ids, valid, num_segments, mode, eps=1e-8):
  out = np.zeros(values.shape, np.float64)
  for s in range(num_segments):
    members = np.flatnonzero(valid & (ids == s))
    if members.size == 0:
      continue
    v = values[members].astype(np.float64)
    if v.max() == v.min():
      continue
    if mode == "minmax":
      out[members] = (v - v.min()) / (v.max() - v.min() + eps)
    elif mode == "zscore":
      out[members] = (v - v.mean()) / (v.std() + eps)
    else:
      out[members] = v - v.mean()
  return out


def test_segment_normalize_hand_example():
  # values [1, 3, 2, 5, 7], ids [0, 0, 0, 1, 2]: segment 0 spans [1, 3] -> [0, 1, 0.5]; singletons -> 0.
  out = _normalize(jnp.array([1.0, 3.0, 2.0, 5.0, 7.0]), jnp.array([0, 0, 0, 1, 2]), jnp.ones(5, bool), 3)
  np.testing.assert_allclose(np.asarray(out), [0.0, 1.0, 0.5, 0.0, 0.0], atol=1e-7)
  # zscore of segment 0: mean 2, std sqrt(2/3) -> [-1.2247, 1.2247, 0]; center: [-1, 1, 0].
  out = _normalize(jnp.array([1.0, 3.0, 2.0, 5.0, 7.0]), jnp.array([0, 0, 0, 1, 2]), jnp.ones(5, bool), 3,
                   mode="zscore")
  np.testing.assert_allclose(np.asarray(out), [-np.sqrt(1.5), np.sqrt(1.5), 0.0, 0.0, 0.0], rtol=1e-6, atol=1e-7)
  out = _normalize(jnp.array([1.0, 3.0, 2.0, 5.0, 7.0]), jnp.array([0, 0, 0, 1, 2]), jnp.ones(5, bool), 3,
                   mode="center")
  np.testing.assert_allclose(np.asarray(out), [-1.0, 1.0, 0.0, 0.0, 0.0], atol=1e-7)


@pytest.mark.parametrize("mode", clusters.NORMALIZE_MODES)
@pytest.mark.parametrize("seed", range(3))
def test_segment_normalize_matches_loop(mode, seed):
  rng = np.random.default_rng(seed)
  m, num_segments = 40, 4
  values = rng.normal(0, 3, m).astype(np.float32)
  ids = rng.integers(-1, num_segments + 1, m).astype(np.int32)  # -1 and num_segments are out of range
  valid = rng.random(m) < 0.85
  values[ids == 2] = 1.25  # a constant (degenerate) segment
  got = _normalize(jnp.asarray(values), jnp.asarray(ids), jnp.asarray(valid), num_segments, mode=mode)
  want = _naive_normalize(values, ids, valid, num_segments, mode)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got)[(ids == 2) | ~valid] == 0.0)


def test_segment_normalize_with_otsu_labels():
  # The PDCR use: normalize within the clusters Otsu found.
  values = jnp.array([0.1, 0.3, 5.0, 6.0, 0.2, 5.5])
  score = jnp.array([4.0, 2.0, 1.0, 3.0, 5.0, 0.0])
  valid = jnp.ones(6, bool)
  _, labels = _otsu(values, valid)
  np.testing.assert_array_equal(labels, [0, 0, 1, 1, 0, 1])
  out = _normalize(score, labels, valid, 2)
  # cluster 0 scores [4, 2, 5] -> [2/3, 0, 1]; cluster 1 scores [1, 3, 0] -> [1/3, 1, 0].
  np.testing.assert_allclose(np.asarray(out), [2 / 3, 0.0, 1 / 3, 1.0, 1.0, 0.0], rtol=1e-6)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="mode"):
    clusters.segment_normalize(jnp.zeros(3), jnp.zeros(3, jnp.int32), jnp.ones(3, bool), 2, mode="robust")
  with pytest.raises(ValueError, match="num_segments"):
    clusters.segment_normalize(jnp.zeros(3), jnp.zeros(3, jnp.int32), jnp.ones(3, bool), 0)
  with pytest.raises(ValueError, match="valid_M"):
    clusters.otsu_threshold(jnp.zeros(3), jnp.ones((3, 1), bool))
  with pytest.raises(ValueError, match="length M"):
    clusters.otsu_threshold(jnp.zeros(3), jnp.ones(4, bool))


def test_eager_equals_jit():
  values = jnp.array([0.5, 2.0, 2.1, -1.0, 7.0])
  valid = jnp.array([True, True, True, False, True])
  thr, labels = clusters.otsu_threshold(values, valid)
  thr_j, labels_j = _otsu(values, valid)
  assert float(thr) == float(thr_j)
  np.testing.assert_array_equal(labels, labels_j)
  norm = functools.partial(clusters.segment_normalize, num_segments=2, mode="zscore")
  np.testing.assert_allclose(norm(values, labels, valid), jax.jit(norm)(values, labels, valid), rtol=1e-6)
