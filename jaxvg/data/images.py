"""Qwen2-VL's image preprocessing with the outputs of transformers' `Qwen2VLImageProcessorPil`, bit for bit, faster.

transformers does, per image (image_processing_pil_qwen2_vl.py and image_processing_backends.PilBackend, 5.23):

  1. `convert_to_rgb`: an image with an alpha band or a "transparency" entry is composited onto white, any other
     mode goes through PIL's `convert("RGB")`; the result becomes a uint8 [C, H, W] array.
  2. `resize`: to `smart_resize(h, w, factor=patch_size * merge_size, min_pixels, max_pixels)`, by turning the uint8
     array back into a PIL image and calling PIL's BICUBIC resize (8-bit fixed point, so the output is uint8).
  3. `rescale`: uint8 -> float64 * (1 / 255) -> float32.
  4. `normalize`: (x - mean) / std in float32, OPENAI_CLIP mean and std.
  5. `patchify`: [C, H, W] -> [gh/m, gw/m, m, m, C, tps, ps, ps] (gh = H / ps, m = merge_size, the single frame
     repeated temporal_patch_size times) flattened to [gh * gw, C * tps * ps * ps]; image_grid_thw gets [1, gh, gw].

About two thirds of its time is not the resize: array round trips between PIL and numpy, float64 rescaling, a transposed
normalization and a float32 patch transpose. Here the conversion and the resize are PIL's own calls on uint8, and steps
3-5 become one uint8 transpose (a quarter of the bytes of float32) followed by (v / 255 - mean) / std in float32 per
channel, written once into the output and copied for the temporal repeat. Every value is the float32 transformers
computes: the float32 quotient v / 255 is the float32 rounding of float64 v * (1 / 255) for all 256 levels (checked in
tests/test_images.py), and subtract and divide are transformers' own float32 operations. A fused affine
v * (1 / (255 * std)) - mean / std would save a pass but differs in 554 of the 768 (channel, level) values, by up to
4.8e-7, and jaxvg's tests compare pixels with transformers' bit for bit.

The resize is left as the main cost (CPU time of a 512x512 image, bench/data.py: 1.5 ms of a gray diagram's 2.9 ms,
3.8 ms of a colour one's 5.5 ms). It can be made cheaper only where the output stays identical: PIL resizes every
band with the same coefficients and the same integer arithmetic, so an image whose three bands are equal (grayscale
content stored as RGB, as most geometry diagrams are, or an "L" image) is resized as one "L" band, a third of the
work, and that band's levels are normalized with each channel's mean and std.
"""

from collections.abc import Sequence

import numpy as np
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

MAX_LEVEL = 255  # Qwen2VLImageProcessorPil.rescale_factor is 1 / MAX_LEVEL


def to_rgb(image: Image.Image) -> Image.Image:
  """transformers' `convert_to_rgb`: transparency (an alpha band or a "transparency" entry) composited onto white."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    image = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
  return image if image.mode == "RGB" else image.convert("RGB")


def resize_source(image: Image.Image) -> Image.Image:
  """What to resize: the image as RGB (`to_rgb`), or its single band ("L") when its three RGB bands are equal.

  PIL resamples each band with the same coefficients and integer arithmetic, so resizing the one band of gray
  content (an "L" image, or grayscale stored as RGB, as most geometry diagrams are) gives each band of the RGB resize,
  at a third of the cost. Checking the bands costs about 0.25 ms of a 512x512 image, 5% of a colour one's processing.
  """
  if image.mode == "L" and image.info.get("transparency") is None:
    return image  # convert("RGB") of "L" copies the band three times
  rgb = to_rgb(image)
  red, green, blue = rgb.split()
  red_bytes = red.tobytes()
  if red_bytes == green.tobytes() and red_bytes == blue.tobytes():
    return red
  return rgb


def patches_grid(height: int, width: int, *, min_pixels: int, max_pixels: int, patch_size: int,
                 merge_size: int) -> tuple[int, int, int, int]:
  """(resized height, resized width, grid height, grid width) of an image; smart_resize's ValueError for an aspect
  ratio above 200."""
  h, w = smart_resize(height, width, factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels)
  return h, w, h // patch_size, w // patch_size


def patchify(levels: np.ndarray, out_PX: np.ndarray, *, patch_size: int, merge_size: int, temporal_patch_size: int,
             mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
  """Resized uint8 levels [H, W] (one band: gray) or [H, W, C] -> their normalized patches, written into out_PX
  [gh * gw, C * tps * ps * ps] in transformers' order: [gh/m, gw/m, m, m] rows of [C, tps, ps, ps] values, the
  frame repeated tps times."""
  ps, m, tps = patch_size, merge_size, temporal_patch_size
  h, w = levels.shape[:2]
  levels_HWc = levels.reshape(h, w, -1)
  c = levels_HWc.shape[-1]
  mean_C, std_C = np.asarray(mean, np.float32), np.asarray(std, np.float32)  # as transformers casts them
  # [gh/m, m, ps, gw/m, m, ps, c] -> [gh/m, gw/m, m, m, c, ps, ps], transposed while still uint8.
  levels_Pcq = np.ascontiguousarray(levels_HWc.reshape(h // (m * ps), m, ps, w // (m * ps), m, ps, c)
                                    .transpose(0, 3, 1, 4, 6, 2, 5)).reshape(-1, c, ps * ps)
  out_PCtq = out_PX.reshape(-1, len(mean_C), tps, ps * ps)
  values_Pq = np.empty(levels_Pcq[:, 0].shape, np.float32)  # contiguous: faster arithmetic than in the strided out
  for ch in range(len(mean_C)):
    np.divide(levels_Pcq[:, min(ch, c - 1)], np.float32(MAX_LEVEL), out=values_Pq, dtype=np.float32)
    np.subtract(values_Pq, mean_C[ch], out=values_Pq)
    np.divide(values_Pq, std_C[ch], out=values_Pq)
    for t in range(tps):
      out_PCtq[:, ch, t] = values_Pq


def preprocess(images: Sequence[Image.Image], *, min_pixels: int, max_pixels: int, patch_size: int = 14,
               merge_size: int = 2, temporal_patch_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """Decoded PIL images -> (pixel_values_PX float32 [P, 3 * tps * ps * ps], image_grid_thw_I3 int64 [I, 3]).

  Equal, value for value, to `Qwen2VLImageProcessorPil(min_pixels=..., max_pixels=..., patch_size=...,
  merge_size=..., temporal_patch_size=...)(images=images)`; the same errors (PIL's for a mode it cannot make RGB,
  smart_resize's ValueError for an aspect ratio above 200). The output is allocated once for all images.
  """
  sizes = [patches_grid(im.height, im.width, min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                        merge_size=merge_size) for im in images]
  grid_I3 = np.array([[1, gh, gw] for _, _, gh, gw in sizes], np.int64).reshape(-1, 3)
  starts = np.concatenate([[0], np.cumsum(grid_I3[:, 1] * grid_I3[:, 2])])
  pixels_PX = np.empty((int(starts[-1]), len(OPENAI_CLIP_MEAN) * temporal_patch_size * patch_size**2), np.float32)
  for image, (h, w, _, _), start, stop in zip(images, sizes, starts[:-1], starts[1:]):
    source = resize_source(image)
    if source.size != (w, h):
      source = source.resize((w, h), Image.Resampling.BICUBIC)
    patchify(np.asarray(source), pixels_PX[start:stop], patch_size=patch_size, merge_size=merge_size,
             temporal_patch_size=temporal_patch_size)
  return pixels_PX, grid_I3
