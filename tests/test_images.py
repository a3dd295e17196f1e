"""The fast image path (jaxvg.data.images) against transformers' Qwen2VLImageProcessorPil, the reference: the same
pixel values (asserted bit for bit, stricter than the 1e-5 we need) and grids on sizes, modes and pixel budgets that
the implementation was not tuned on, and the same errors."""

import pickle

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from data_fixtures import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, random_image
from jaxvg.data import images, processing

BUDGETS = {  # (min_pixels, max_pixels)
    "qwen": (QWEN_MIN_PIXELS, QWEN_MAX_PIXELS),
    "small": (3136, 200_000),
    "tight": (28 * 28 * 4, 28 * 28 * 9),
    "high_min": (100 * 28 * 28, 400 * 28 * 28),
}
SIZES = [(113, 57), (5, 7), (29, 2000), (10, 1999), (504, 504), (28, 28), (300, 900), (1, 150), (199, 1), (1, 1),
         (2, 3)]


def reference(image_list, *, min_pixels, max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2):
  proc = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                  merge_size=merge_size, temporal_patch_size=temporal_patch_size)
  out = proc(images=image_list)
  return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def assert_same(image_list, **kwargs):
  want_PX, want_I3 = reference(image_list, **kwargs)
  got_PX, got_I3 = images.preprocess(image_list, **kwargs)
  assert got_PX.dtype == np.float32 and got_I3.dtype == np.int64
  np.testing.assert_array_equal(got_I3, want_I3)
  assert got_PX.shape == want_PX.shape
  np.testing.assert_array_equal(got_PX, want_PX)  # max |difference| = 0


def with_alpha(image: Image.Image, mode: str, seed: int) -> Image.Image:
  """The image in `mode` (RGBA or LA) with a noise alpha band, so the white compositing really matters."""
  alpha = random_image(image.height, image.width, seed=seed + 1, mode="L")
  out = image.convert(mode)
  out.putalpha(alpha)
  return out


def make_image(mode: str, h: int, w: int, seed: int) -> Image.Image:
  rgb = random_image(h, w, seed=seed)
  if mode in ("RGBA", "LA"):
    return with_alpha(rgb, mode, seed)
  if mode == "gray_rgb":  # grayscale content stored as RGB: the one-band resize
    return rgb.convert("L").convert("RGB")
  if mode == "P_transparency":
    image = rgb.convert("P")
    image.info["transparency"] = 7
    return image
  if mode == "L_transparency":
    image = rgb.convert("L")
    image.info["transparency"] = 128
    return image
  if mode == "I;16":  # through jaxvg's loader, as records reach the image processor
    values = np.random.default_rng(seed).integers(0, 65536, (h, w), dtype=np.uint16)
    return processing.load_image(Image.fromarray(values))  # mode "I;16"
  return rgb.convert(mode)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("budget", list(BUDGETS), ids=str)
def test_sizes_and_budgets(size, budget):
  min_pixels, max_pixels = BUDGETS[budget]
  assert_same([random_image(*size, seed=sum(size))], min_pixels=min_pixels, max_pixels=max_pixels)


MODES = ("RGB", "L", "RGBA", "P", "P_transparency", "LA", "L_transparency", "1", "CMYK", "YCbCr", "LAB", "HSV",
         "RGBX", "RGBa", "PA", "gray_rgb", "I;16")


@pytest.mark.parametrize("mode", MODES)
def test_modes(mode):
  image = make_image(mode, 61, 97, seed=3)
  assert_same([image], min_pixels=3136, max_pixels=200_000)


def test_several_images_per_call_and_other_patch_geometry():
  image_list = [make_image(m, h, w, seed=i) for i, (m, (h, w)) in
                enumerate(zip(("RGB", "L", "RGBA", "P", "gray_rgb"), [(113, 57), (40, 300), (90, 90), (7, 9),
                                                                       (220, 160)]))]
  assert_same(image_list, min_pixels=3136, max_pixels=200_000)
  # Another patch, merge and temporal size: the flattening order, not just the defaults' shapes.
  assert_same(image_list, min_pixels=2000, max_pixels=60_000, patch_size=8, merge_size=3, temporal_patch_size=3)


@pytest.mark.parametrize("bands", ["gray", "colour"])
def test_every_level_is_transformers_rescale_then_normalize(bands):
  """All 256 levels in every channel, at a size that needs no resize: the float32 v / 255 step against transformers'
  float64 rescale, and the normalization, for the one-band and the three-band path."""
  levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
  rgb = [levels] * 3 if bands == "gray" else [levels, levels.T, 255 - levels]
  image = Image.fromarray(np.stack(rgb, -1).repeat(28, 0).repeat(28, 1))  # 448x448
  assert (images.resize_source(image).mode == "L") == (bands == "gray")
  assert_same([image], min_pixels=3136, max_pixels=448 * 448)


def test_aspect_ratio_error_is_smart_resizes():
  image = random_image(2, 401, seed=0)
  with pytest.raises(ValueError) as want:
    reference([image], min_pixels=3136, max_pixels=200_000)
  with pytest.raises(ValueError) as got:
    images.preprocess([image], min_pixels=3136, max_pixels=200_000)
  assert str(got.value) == str(want.value) and "aspect ratio" in str(got.value)


def stub_processor(backend: str) -> processing.Processor:
  """process_images reads only the config and the image processor."""
  cfg = processing.PromptConfig(min_pixels=3136, max_pixels=200_000, image_backend=backend)
  return processing.Processor(tokenizer=None, image_processor=Qwen2VLImageProcessorPil(min_pixels=3136,
                              max_pixels=200_000), config=cfg, fmt=None, image_token_id=0)


def test_process_images_backends_agree_and_pickle():
  image_list = [make_image("RGBA", 70, 90, seed=1), make_image("gray_rgb", 120, 45, seed=2)]
  fast = pickle.loads(pickle.dumps(stub_processor("fast")))
  got_PX, got_I3 = processing.process_images(fast, image_list)
  want_PX, want_I3 = processing.process_images(stub_processor("transformers"), image_list)
  np.testing.assert_array_equal(got_I3, want_I3)
  np.testing.assert_array_equal(got_PX, want_PX)
  assert processing.PromptConfig().image_backend == "fast"
  with pytest.raises(ValueError, match="image_backend"):
    processing.PromptConfig(image_backend="torchvision")


@pytest.mark.parametrize("backend", processing.IMAGE_BACKENDS)
def test_failures_are_corrupt_image(backend):
  with pytest.raises(processing.RecordError) as e:
    processing.process_images(stub_processor(backend), [random_image(2, 401, seed=0)])  # ratio > 200
  assert e.value.reason == "corrupt_image"
  with pytest.raises(processing.RecordError) as e:
    processing.process_images(stub_processor(backend), [random_image(30, 30, seed=0).convert("La")])  # no RGB
  assert e.value.reason == "corrupt_image"
