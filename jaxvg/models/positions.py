"""Host-side (numpy) position bookkeeping for Qwen2.5-VL: M-RoPE ids for the decoder and the vision tower's layout.

Everything here depends only on token ids, masks and `image_grid_thw`, so it runs in the data pipeline, once per
batch, and the jitted model receives plain integer arrays of static shape.
"""

import dataclasses

import numpy as np


def mrope_positions(input_ids_BT, mm_token_type_ids_BT, image_grid_thw_I3, attention_mask_BT=None, *,
                    spatial_merge_size: int = 2):
  """3-D M-RoPE position ids, equal to transformers' `Qwen2_5_VLModel.get_rope_index` for images.

  Text tokens advance all three components together by one. An image of grid (t, h, w) patches occupies
  t * (h/m) * (w/m) tokens (m = spatial_merge_size) whose (temporal, height, width) ids are
  (start + i_t, start + i_h, start + i_w); the text after it starts at start + max(h, w) / m.
  Images are consumed from `image_grid_thw_I3` in order, row by row. Padding positions (attention_mask == 0) get 0.

  Example (one 4x4-patch image, m = 2, so 2x2 = 4 image tokens between 2 and 1 text tokens):
    types:    0 0 1 1 1 1 0
    temporal: 0 1 2 2 2 2 4
    height:   0 1 2 2 3 3 4
    width:    0 1 2 3 2 3 4

  Returns:
    positions_3BT: int32 [3, B, T].
    deltas_B: int32 [B], max position + 1 - number of valid tokens: the offset from a token's index (counted among
      valid tokens) to its position id, which continues for generated text tokens.
  """
  input_ids_BT = np.asarray(input_ids_BT)
  types_BT = np.asarray(mm_token_type_ids_BT)
  B, T = input_ids_BT.shape
  mask_BT = np.ones((B, T), bool) if attention_mask_BT is None else np.asarray(attention_mask_BT).astype(bool)
  grids = iter(np.asarray(image_grid_thw_I3).reshape(-1, 3).tolist() if image_grid_thw_I3 is not None else [])
  positions_3BT = np.zeros((3, B, T), np.int32)
  deltas_B = np.zeros((B,), np.int32)
  for b in range(B):
    types = types_BT[b][mask_BT[b]]
    pieces, start, i = [], 0, 0
    while i < len(types):
      j = i
      while j < len(types) and types[j] == types[i]:
        j += 1
      if types[i] == 0:
        pieces.append(np.broadcast_to(np.arange(start, start + j - i), (3, j - i)))
        start += j - i
      elif types[i] == 1:
        try:
          t, h, w = next(grids)
        except StopIteration:
          raise ValueError(f"row {b}: more image token runs than entries in image_grid_thw") from None
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        if t * gh * gw != j - i:
          raise ValueError(f"row {b}: an image run of {j - i} tokens does not match grid (t={t}, h={h}, w={w}) "
                           f"-> {t * gh * gw} tokens")
        it, ih, iw = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        pieces.append(np.stack([it.ravel(), ih.ravel(), iw.ravel()]) + start)
        start += max(gh, gw)
      else:
        raise ValueError(f"row {b}: mm_token_type_ids value {types[i]} (video) is not supported")
      i = j
    row = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
    positions_3BT[:, b, mask_BT[b]] = row
    deltas_B[b] = (row.max() + 1 if row.size else 0) - len(types)
  if next(grids, None) is not None:
    raise ValueError("image_grid_thw has more entries than image token runs in input_ids")
  return positions_3BT, deltas_B


def text_positions(positions_3BT, deltas_B, num_new: int, start_B):
  """Positions of `num_new` generated text tokens following `start_B` valid tokens: index + delta on all 3 axes."""
  pos_BT = np.asarray(start_B)[:, None] + np.arange(num_new)[None, :] + np.asarray(deltas_B)[:, None]
  return np.broadcast_to(pos_BT[None], (3,) + pos_BT.shape).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class VisionLayout:
  """Index arrays that drive the vision tower for one batch of images (all numpy, static shapes once padded).

  The tower reorders patches so that each attention window is contiguous (in units of 2x2 merge groups), runs
  window attention in most blocks and per-image attention in `fullatt_block_indexes`, then undoes the order.

  Attributes:
    rope_hw_P2: (row, col) patch coordinates for the 2-D rotary embedding, in the original patch order.
    window_index_Q: merge-group permutation into window order (Q = P / merge_unit).
    window_seg_P: window id of each patch in window order (attention stays inside a window).
    image_seg_P: image (frame) id of each patch in window order (attention in the full-attention blocks).
    num_valid: real patches; patches past it are padding (their own segment, their outputs unused).
  """

  rope_hw_P2: np.ndarray
  window_index_Q: np.ndarray
  window_seg_P: np.ndarray
  image_seg_P: np.ndarray
  num_valid: int


def vision_layout(image_grid_thw_I3, *, spatial_merge_size: int = 2, window_size: int = 112, patch_size: int = 14,
                  pad_to: int | None = None) -> VisionLayout:
  """Builds the `VisionLayout` for `image_grid_thw_I3` (as transformers' vision helpers do), padded to `pad_to`."""
  m = spatial_merge_size
  unit = m * m
  win = window_size // m // patch_size  # window side, in merge groups
  rope, window_index, window_seg, image_seg = [], [], [], []
  q_offset = seg_offset = frame_offset = 0
  for t, h, w in np.asarray(image_grid_thw_I3).reshape(-1, 3).tolist():
    if h % m or w % m:
      raise ValueError(f"image grid (t={t}, h={h}, w={w}) is not divisible by spatial_merge_size={m}")
    # 2-D rope ids, block-major over m x m merge groups.
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()
    rope.append(np.tile(np.stack([block(hh), block(ww)], -1), (t, 1)))
    # Window order: merge groups grouped by (frame, window row, window col), row-major inside a window.
    gh, gw = h // m, w // m
    nh, nw = -(-gh // win), -(-gw // win)
    grid = np.full((t, nh * win, nw * win), -1)
    grid[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
    grid = grid.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
    for window in grid:
      ids = window[window >= 0]
      if ids.size:
        window_index.append(ids + q_offset)
        window_seg.append(np.full(ids.size * unit, seg_offset))
        seg_offset += 1
    q_offset += t * gh * gw
    # Window reordering never crosses a frame, so frame ids keep their runs in window order.
    image_seg.append(np.repeat(frame_offset + np.arange(t), h * w))
    frame_offset += t
  if not rope:
    rope_hw = np.zeros((0, 2), np.int32)
    window_index_Q = window_seg_P = image_seg_P = np.zeros((0,), np.int32)
  else:
    rope_hw = np.concatenate(rope)
    window_index_Q = np.concatenate(window_index)
    window_seg_P = np.concatenate(window_seg)
    image_seg_P = np.concatenate(image_seg)
  num_valid = len(rope_hw)
  pad_to = num_valid if pad_to is None else pad_to
  if pad_to < num_valid or pad_to % unit:
    raise ValueError(f"pad_to={pad_to} must be >= {num_valid} patches and a multiple of {unit}")
  extra = pad_to - num_valid
  pad_seg, pad_img = seg_offset, frame_offset
  return VisionLayout(
      rope_hw_P2=np.concatenate([rope_hw, np.zeros((extra, 2), np.int64)]).astype(np.int32),
      window_index_Q=np.concatenate([window_index_Q, np.arange(num_valid // unit, pad_to // unit)]).astype(np.int32),
      window_seg_P=np.concatenate([window_seg_P, np.full(extra, pad_seg)]).astype(np.int32),
      image_seg_P=np.concatenate([image_seg_P, np.full(extra, pad_img)]).astype(np.int32),
      num_valid=num_valid,
  )
