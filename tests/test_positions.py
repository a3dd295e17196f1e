"""Host-side positions against transformers: M-RoPE ids (`get_rope_index`) and the vision tower's layout helpers.

The references are transformers' own functions, called with mm_token_type_ids (without them transformers silently
falls back to 1-D positions), plus hand-worked examples and naive loops for the invariants.
"""

import numpy as np
import pytest
import torch
from transformers import vision_utils

from hf_fixtures import MERGE, PATCH, TinyIds, make_mm_batch, make_tiny_hf_model
from jaxvg.models.positions import mrope_positions, text_positions, vision_layout

IDS = TinyIds(512)


@pytest.fixture(scope="module")
def hf_model():
  return make_tiny_hf_model(seed=0, layers=1, vision_depth=1, fullatt=(0,))


def _hf_rope_index(hf_model, batch, use_mask=True):
  t = {k: torch.from_numpy(v) for k, v in batch.items() if v is not None}
  positions, deltas = hf_model.model.get_rope_index(
      t["input_ids"], t["mm_token_type_ids"], image_grid_thw=t.get("image_grid_thw"),
      attention_mask=t["attention_mask"] if use_mask else None)
  return positions.numpy(), deltas[:, 0].numpy()


def _ours(batch, use_mask=True):
  return mrope_positions(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                         batch["attention_mask"] if use_mask else None, spatial_merge_size=MERGE)


# ---------------------------------------------------------------- M-RoPE ids


ROW_SETS = {
    "several_images_per_row": [[3, (56, 112), 2, (84, 56), 1], [2, (112, 56), 4], [(56, 56), 3, (140, 84)]],
    "text_only_row_and_left_padding": [[4], [2, (84, 168), 3], [1], [(56, 84), 6]],
    "image_at_start_and_end": [[(112, 112), 2], [3, (56, 140)], [(56, 56)]],
    "tall_and_wide": [[1, (28 * 2, 28 * 8), 1], [(28 * 8, 28 * 2)]],
}


@pytest.mark.parametrize("name", sorted(ROW_SETS))
def test_mrope_positions_match_get_rope_index(hf_model, name):
  batch = make_mm_batch(ROW_SETS[name], ids=IDS, seed=3)
  ref_pos, ref_delta = _hf_rope_index(hf_model, batch)
  pos, delta = _ours(batch)
  assert pos.shape == ref_pos.shape
  np.testing.assert_array_equal(pos, ref_pos)  # padding included: both put 0 there
  np.testing.assert_array_equal(delta, ref_delta)


def test_mrope_positions_without_mask_match(hf_model):
  batch = make_mm_batch([[2, (56, 84), 3], [4, (56, 56), 3]], ids=IDS, seed=4)
  assert batch["attention_mask"].all()
  ref_pos, ref_delta = _hf_rope_index(hf_model, batch, use_mask=False)
  pos, delta = _ours(batch, use_mask=False)
  np.testing.assert_array_equal(pos, ref_pos)
  np.testing.assert_array_equal(delta, ref_delta)


def test_mrope_hand_example():
  # One 4x4-patch image (2x2 merged tokens) between 2 and 1 text tokens, after one pad on the left.
  types = np.array([[0, 0, 0, 1, 1, 1, 1, 0]])
  mask = np.array([[0, 1, 1, 1, 1, 1, 1, 1]])
  pos, delta = mrope_positions(np.zeros_like(types), types, np.array([[1, 4, 4]]), mask, spatial_merge_size=2)
  # text 0,1; image starts at 2: t=2, h=2+(0,0,1,1), w=2+(0,1,0,1); text resumes at 2 + max(2,2) = 4.
  np.testing.assert_array_equal(pos[0, 0], [0, 0, 1, 2, 2, 2, 2, 4])
  np.testing.assert_array_equal(pos[1, 0], [0, 0, 1, 2, 2, 3, 3, 4])
  np.testing.assert_array_equal(pos[2, 0], [0, 0, 1, 2, 3, 2, 3, 4])
  assert delta.tolist() == [4 + 1 - 7]  # max position + 1 - valid tokens


def test_mrope_text_only_rows_are_1d():
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  pos, delta = mrope_positions(np.ones((2, 5), np.int64), np.zeros((2, 5), np.int64), None, mask)
  for axis in range(3):
    np.testing.assert_array_equal(pos[axis], [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(delta, [0, 0])


def test_text_positions_continue_after_prompt():
  batch = make_mm_batch([[2, (56, 112), 1], [3], [(84, 56)]], ids=IDS, seed=5)
  pos, delta = _ours(batch)
  valid = batch["attention_mask"].sum(1)
  new = text_positions(pos, delta, 3, valid)
  assert new.shape == (3, 3, 3)
  for b in range(3):
    first = pos[:, b].max() + 1  # the next token follows the largest prompt position on every axis
    np.testing.assert_array_equal(new[:, b], np.broadcast_to(first + np.arange(3), (3, 3)))


def test_mrope_errors():
  types = np.array([[0, 1, 1, 1, 1, 0]])
  with pytest.raises(ValueError, match="image_grid_thw"):  # image run with no grid left
    mrope_positions(np.zeros_like(types), types, np.zeros((0, 3), np.int64))
  with pytest.raises(ValueError, match="does not match grid"):
    mrope_positions(np.zeros_like(types), types, np.array([[1, 4, 6]]))
  with pytest.raises(ValueError, match="more entries"):
    mrope_positions(np.zeros_like(types), types, np.array([[1, 4, 4], [1, 4, 4]]))
  with pytest.raises(ValueError, match="video"):
    mrope_positions(np.zeros_like(types), types * 2, np.array([[1, 4, 4]]))


# ---------------------------------------------------------------- vision layout


def _seg_from_cu(cu, n):
  """Segment id of each of n positions from cumulative boundaries [0, c1, ..., n]."""
  cu = np.asarray(cu)
  assert cu[0] == 0 and cu[-1] == n
  return np.searchsorted(cu, np.arange(n), side="right") - 1


def _canon(labels):
  """Relabels by order of first appearance, so two partitions compare equal regardless of label values."""
  _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
  rank = np.argsort(np.argsort(first))
  return rank[inverse]


def _naive_window_index(grids, window_size, patch_size=PATCH, m=MERGE):
  """Merge groups sorted by (image, frame, window row, window col, row, col): a brute-force reference."""
  keys, q = [], 0
  win = window_size // m // patch_size
  for i, (t, h, w) in enumerate(grids):
    for f in range(t):
      for r in range(h // m):
        for c in range(w // m):
          keys.append(((i, f, r // win, c // win, r, c), q))
          q += 1
  return np.array([q for _, q in sorted(keys)])


GRIDS = {
    "one_window": [[1, 4, 4]],
    "divisible": [[1, 8, 8], [1, 4, 8]],
    "not_divisible": [[1, 10, 6], [1, 6, 14]],
    "mixed_with_frames": [[1, 6, 4], [2, 4, 6], [1, 2, 2]],
    "large_real_window": [[1, 20, 18], [1, 8, 34]],
}


@pytest.mark.parametrize("window_size", [56, 112])
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_vision_layout_matches_transformers(name, window_size):
  grids = np.array(GRIDS[name])
  grid_t = torch.from_numpy(grids)
  layout = vision_layout(grids, spatial_merge_size=MERGE, window_size=window_size, patch_size=PATCH)
  P = int((grids[:, 0] * grids[:, 1] * grids[:, 2]).sum())
  assert layout.num_valid == P

  ref_rope = vision_utils.get_vision_position_ids(grid_t, MERGE).numpy()
  np.testing.assert_array_equal(layout.rope_hw_P2, ref_rope)

  ref_index, ref_cu_win = vision_utils.get_vision_window_index(grid_t, spatial_merge_size=MERGE,
                                                               window_size=window_size, patch_size=PATCH)
  np.testing.assert_array_equal(layout.window_index_Q, ref_index.numpy())
  np.testing.assert_array_equal(layout.window_index_Q, _naive_window_index(grids.tolist(), window_size))
  np.testing.assert_array_equal(_canon(layout.window_seg_P), _seg_from_cu(ref_cu_win.numpy(), P))

  ref_cu = vision_utils.get_vision_cu_seqlens(grid_t).numpy()
  np.testing.assert_array_equal(_canon(layout.image_seg_P), _seg_from_cu(ref_cu, P))


def test_vision_layout_window_counts():
  # 10x6 patches -> 5x3 merge groups; window side 2 groups -> 3x2 windows of sizes 4,2 / 4,2 / 2,1 groups.
  layout = vision_layout(np.array([[1, 10, 6]]), window_size=56)
  _, counts = np.unique(layout.window_seg_P, return_counts=True)
  np.testing.assert_array_equal(counts, 4 * np.array([4, 2, 4, 2, 2, 1]))
  assert sorted(layout.window_index_Q.tolist()) == list(range(15))


def test_vision_layout_padding():
  grids = np.array([[1, 10, 6], [1, 4, 4]])
  base = vision_layout(grids, window_size=56)
  P = base.num_valid
  padded = vision_layout(grids, window_size=56, pad_to=P + 12)
  assert padded.num_valid == P
  assert padded.rope_hw_P2.shape == (P + 12, 2) and padded.window_index_Q.shape == ((P + 12) // 4,)
  np.testing.assert_array_equal(padded.rope_hw_P2[:P], base.rope_hw_P2)
  np.testing.assert_array_equal(padded.window_index_Q[:P // 4], base.window_index_Q)
  np.testing.assert_array_equal(padded.window_seg_P[:P], base.window_seg_P)
  np.testing.assert_array_equal(padded.image_seg_P[:P], base.image_seg_P)
  # The padded tail maps to itself and forms segments of its own, never shared with a real patch.
  np.testing.assert_array_equal(padded.window_index_Q[P // 4:], np.arange(P // 4, (P + 12) // 4))
  assert not set(padded.window_seg_P[P:]) & set(base.window_seg_P)
  assert not set(padded.image_seg_P[P:]) & set(base.image_seg_P)
  assert sorted(padded.window_index_Q.tolist()) == list(range((P + 12) // 4))


def test_vision_layout_errors():
  with pytest.raises(ValueError, match="pad_to"):
    vision_layout(np.array([[1, 4, 4]]), pad_to=8)
  with pytest.raises(ValueError, match="pad_to"):
    vision_layout(np.array([[1, 4, 4]]), pad_to=18)
  with pytest.raises(ValueError, match="spatial_merge_size"):
    vision_layout(np.array([[1, 5, 4]]))


def test_vision_layout_empty():
  layout = vision_layout(np.zeros((0, 3), np.int64), pad_to=8)
  assert layout.num_valid == 0
  assert layout.rope_hw_P2.shape == (8, 2) and layout.window_index_Q.tolist() == [0, 1]
