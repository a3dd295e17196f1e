"""Small processor-like inputs for model tests: random images through transformers' image processor."""

import numpy as np
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


def images_to_pixels(sizes, seed=0):
  """Random RGB images of the given (height, width) sizes -> (pixel_values, image_grid_thw) via the real processor."""
  rng = np.random.default_rng(seed)
  images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
  out = Qwen2VLImageProcessorPil()(images=images, return_tensors="np")
  return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"])


def left_padded_prompts(cfg, rows_images, image_grid_thw, seed=0, text_len=(3, 2)):
  """Token rows of the form [text, <vision_start>, image pads..., <vision_end>, text], left-padded.

  rows_images[b] is the number of images in row b; images are taken from image_grid_thw in order.
  Returns (input_ids, attention_mask, mm_token_type_ids) as numpy arrays.
  """
  rng = np.random.default_rng(seed)
  vocab_text = cfg.text.vocab_size - 8
  grids = iter(np.asarray(image_grid_thw).tolist())
  rows = []
  for n in rows_images:
    row = list(rng.integers(1, vocab_text, text_len[0]))
    for _ in range(n):
      t, h, w = next(grids)
      row += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // 4) + [cfg.vision_end_token_id]
      row += list(rng.integers(1, vocab_text, text_len[1]))
    rows.append(row)
  T = max(map(len, rows))
  ids = np.zeros((len(rows), T), np.int64)
  mask = np.zeros((len(rows), T), np.int64)
  for b, row in enumerate(rows):
    ids[b, T - len(row):] = row
    mask[b, T - len(row):] = 1
  return ids, mask, (ids == cfg.image_token_id).astype(np.int64)
