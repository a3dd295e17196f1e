"""Records -> model-ready prompts, built exactly as a transformers or vLLM user of Qwen2.5-VL would build them.

A canonical record is a dict {"id", "images", "problem" (one "<image>" per image), "answer", "source"} with optional
"solution" and "system". The prompt is

  messages = jaxvg.data.prompts.build_messages(problem, fmt)   # [system?, user: text and {"type": "image"} entries]
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True) + fmt.prefill
  pixel_values, image_grid_thw = Qwen2VLImageProcessorPil(images)   # or jaxvg.data.images.preprocess: same values
  input_ids = tokenizer(text), each <|image_pad|> expanded to t*h*w / merge^2 pads (as Qwen2_5_VLProcessor does)

followed by the 3-D M-RoPE positions. The pad expansion is done on token ids rather than on the text: <|image_pad|>
is a special token, so both give the same ids, and the ids route skips re-tokenizing thousands of pad strings.

Counterfactual prompts (methods.md section 8), each with its own ids and positions:
  mask_visual  the image pads dropped, every other token keeps its ORIGINAL 3-D position; no pixels.
  no_image     the image entries removed from the message, the template re-applied, positions recomputed.
  white_image  a white image of each image's size: same ids and positions, white pixels.
  image_only   the question text removed, the images kept: a user turn of images only (no system turn of the
               format, no prefill), the context of ViGOS's perception teacher.

A record that cannot be used raises `RecordError` with a named reason; the pipeline counts and skips it.

Images are decoded with PIL. 16-bit and float images, which PIL's RGB conversion would clip, become 8-bit RGB by
their value range (`to_8bit`); a mode that cannot be made RGB is rejected as "unsupported_image". Pixel values come
from `jaxvg.data.images.preprocess`, transformers' values bit for bit in a fraction of its time
(`PromptConfig.image_backend`; "transformers" calls Qwen2VLImageProcessorPil itself).
"""

import dataclasses
import io
import math
import numbers
import os

import numpy as np
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from jaxvg.data import prompts
from jaxvg.data.images import preprocess as preprocess_images
from jaxvg.models.positions import mrope_positions

COUNTERFACTUALS = ("mask_visual", "no_image", "white_image", "image_only")
IMAGE_BACKENDS = ("fast", "transformers")
DECOY = "@decoy_answer"  # a context name ending with it takes the record's "decoy_answer" as its reference
IMAGE_PLACEHOLDER = "<image>"
IMAGE_PAD = "<|image_pad|>"
# Template control tokens that must not appear in user text: they would be read as image slots.
RESERVED_TEXT = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
MAX_ASPECT_RATIO = 200  # smart_resize rejects max(h, w) / min(h, w) > 200
MIN_IMAGE_SIDE = 4  # smaller images are degenerate data (the processor would blow a 1x1 image up to 56x56)
# 8-bit modes that PIL turns into RGB correctly (the image processor converts them); others go through `to_8bit`.
EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV")


class RecordError(ValueError):
  """A record that cannot become a prompt. `reason` is the counter key (e.g. "corrupt_image")."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """How records become prompts.

  Attributes:
    prompt_format: a `jaxvg.data.prompts` format (or its name): system turn, user template, assistant prefill (ViGOS
      prefills "<description>"). A record's own "system" replaces the format's.
    min_pixels, max_pixels: the image processor's pixel budget per image (Qwen2.5-VL's defaults).
    max_prompt_tokens: longer prompts (after pad expansion) are rejected as "prompt_too_long" (the pipeline lowers it
      to its largest length bucket).
    max_images: records with more images are rejected as "too_many_images".
    max_patches: records with more vision patches in all are rejected as "too_many_patches" (None: no limit; the
      pipeline sets max(patch_buckets) // batch_size).
    counterfactuals: which of COUNTERFACTUALS to build next to the real prompt.
    contexts: prompt format names (`jaxvg.data.prompts.FORMATS`) to build next to the real prompt with the same images
      and the record's answer as the reference: the privileged contexts of distillation teachers (OPSD, ViGOS).
      They travel in `Example.counterfactuals` under the format's name. "<format>@decoy_answer" builds the same
      context with the record's "decoy_answer" (another record's answer, set by the pipeline) as the reference:
      the answer-swapped teacher of the PALR diagnostic.
    image_backend: "fast" (`jaxvg.data.images.preprocess`) or "transformers" (Qwen2VLImageProcessorPil). Both give
      the same pixel values and grids; "transformers" is the reference, kept to check against.
  """

  prompt_format: str | prompts.PromptFormat = "pgpo"
  min_pixels: int = 56 * 56
  max_pixels: int = 14 * 14 * 4 * 16384
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  max_prompt_tokens: int = 4096
  max_images: int = 8
  max_patches: int | None = None
  counterfactuals: tuple[str, ...] = ()
  contexts: tuple[str, ...] = ()
  image_backend: str = "fast"

  def __post_init__(self):
    if isinstance(self.prompt_format, str):
      prompts.get_format(self.prompt_format)  # a ValueError naming the unknown format
    unknown = [c for c in self.counterfactuals if c not in COUNTERFACTUALS]
    if unknown:
      raise ValueError(f"unknown counterfactuals {unknown}; choose from {COUNTERFACTUALS}")
    for name in self.contexts:
      prompts.get_format(name.removesuffix(DECOY))  # a ValueError naming the unknown format
    if self.min_pixels > self.max_pixels:
      raise ValueError(f"min_pixels={self.min_pixels} > max_pixels={self.max_pixels}")
    if self.image_backend not in IMAGE_BACKENDS:
      raise ValueError(f"unknown image_backend {self.image_backend!r}; choose from {IMAGE_BACKENDS}")


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One tokenized prompt, unpadded (numpy).

  Attributes:
    input_ids_T: int32 token ids.
    mm_token_type_ids_T: int32, 1 on image pads.
    positions_3T: int32 M-RoPE (temporal, height, width) ids.
    delta: a text token generated after the prompt, at index n (n = number of prompt tokens, counted from 0), has
      position n + delta on all three axes.
    pixel_values_PX: float32 [P, 3 * 2 * 14 * 14] patches of all images in order, or None (no pixels).
    image_grid_thw_I3: int64 [I, 3] patch grids (I = 0 without pixels).
  """

  input_ids_T: np.ndarray
  mm_token_type_ids_T: np.ndarray
  positions_3T: np.ndarray
  delta: int
  pixel_values_PX: np.ndarray | None
  image_grid_thw_I3: np.ndarray


@dataclasses.dataclass(frozen=True)
class Example:
  """A processed record: the real prompt, the configured counterfactual prompts, and host-side strings."""

  id: str
  source: str
  answer: str
  prompt: Prompt
  counterfactuals: dict[str, Prompt]


@dataclasses.dataclass(frozen=True)
class Processor:
  """The tokenizer and transformers' image processor, bundled with the config (picklable for worker processes).

  The image processor is built for either backend: it also counts an image's patches before any resizing.
  """

  tokenizer: object
  image_processor: Qwen2VLImageProcessorPil
  config: PromptConfig
  fmt: prompts.PromptFormat
  image_token_id: int


def make_processor(tokenizer, config: PromptConfig) -> Processor:
  """Builds the `Processor`: Qwen2VLImageProcessorPil with the config's pixel budget and patch sizes."""
  if getattr(tokenizer, "chat_template", None) is None:
    raise ValueError("the tokenizer has no chat_template")
  image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
  if image_token_id is None or image_token_id == tokenizer.unk_token_id:
    raise ValueError(f"the tokenizer has no {IMAGE_PAD} token")
  image_processor = Qwen2VLImageProcessorPil(min_pixels=config.min_pixels, max_pixels=config.max_pixels,
                                             patch_size=config.patch_size, merge_size=config.merge_size,
                                             temporal_patch_size=config.temporal_patch_size)
  fmt = prompts.get_format(config.prompt_format) if isinstance(config.prompt_format, str) else config.prompt_format
  return Processor(tokenizer=tokenizer, image_processor=image_processor, config=config, fmt=fmt,
                   image_token_id=image_token_id)


# ---------------------------------------------------------------- record checks


def _text(value, name: str) -> str:
  """A text field as str: bytes must be UTF-8, str must be encodable (no lone surrogates)."""
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise RecordError("non_utf8_text", f"{name}: {e}") from None
  if not isinstance(value, str):
    raise RecordError("malformed_record", f"{name} is a {type(value).__name__}, not text")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise RecordError("non_utf8_text", f"{name}: {e}") from None
  return value


def check_record(record) -> tuple[str, str, list, str | None]:
  """Validates the text fields of a record; returns (problem, answer, images, system)."""
  if not isinstance(record, dict):
    raise RecordError("malformed_record", f"a {type(record).__name__}, not a dict")
  if record.get("problem") is None:
    raise RecordError("missing_problem")
  problem = _text(record["problem"], "problem")
  if not problem.replace(IMAGE_PLACEHOLDER, "").strip():
    raise RecordError("empty_problem", f"{problem!r} has no text besides its image placeholders")
  answer = record.get("answer")
  if isinstance(answer, numbers.Real) and not isinstance(answer, bool):
    if math.isnan(answer):  # a missing value of a float column, or a JSON NaN
      raise RecordError("missing_answer", "the answer is NaN")
    answer = str(answer)
  if answer is None or (isinstance(answer, (str, bytes)) and not answer.strip()):
    raise RecordError("missing_answer")
  answer = _text(answer, "answer")
  system = record.get("system")
  system = None if system is None else _text(system, "system")
  for text in (problem, system or ""):
    for token in RESERVED_TEXT:
      if token in text:
        raise RecordError("special_token_in_text", f"{token} in the prompt text")
  images = record.get("images")
  if images is None:
    images = []
  elif isinstance(images, (bytes, bytearray, str, os.PathLike, dict, Image.Image)):
    images = [images]  # a single image given without a list
  else:
    images = list(images)
  n = problem.count(IMAGE_PLACEHOLDER)
  if n != len(images):
    raise RecordError("placeholder_mismatch", f"{n} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
  return problem, answer, images, system


def load_image(image) -> Image.Image:
  """PIL image, encoded bytes, a path, or a {"bytes", "path"} dict -> a decoded PIL image (mode kept)."""
  if isinstance(image, dict):
    image = image.get("bytes") if image.get("bytes") is not None else image.get("path")
  try:
    if isinstance(image, Image.Image):
      image.load()
    elif isinstance(image, (bytes, bytearray)):
      image = Image.open(io.BytesIO(image))
      image.load()
    elif isinstance(image, (str, os.PathLike)):
      if not os.path.isfile(image):
        raise RecordError("missing_image_file", str(image))
      with Image.open(image) as f:
        f.load()
        image = f.copy()
    else:
      raise RecordError("malformed_record", f"an image given as {type(image).__name__}")
  except RecordError:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise RecordError("corrupt_image", str(e)) from None
  w, h = image.size
  if min(w, h) < MIN_IMAGE_SIDE:
    raise RecordError("image_too_small", f"{w}x{h} pixels")
  if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
    raise RecordError("extreme_aspect_ratio", f"{w}x{h} pixels")
  return image if image.mode in EIGHT_BIT_MODES else to_8bit(image)


def to_8bit(image: Image.Image) -> Image.Image:
  """An image of a mode outside EIGHT_BIT_MODES -> 8-bit RGB, by the value range (PIL's conversion would clip):

    integers (I;16*, I)  0..65535 -> 0..255 (v * 255 / 65535), the 16-bit range; values outside it: min..max.
    floats (F)           [0, 1] -> 0..255 (v * 255); [0, 255] kept; any other range: min..max -> 0..255.

  Values are rounded to the nearest integer. NaN or infinite floats, and modes PIL cannot make RGB, raise
  "unsupported_image".
  """
  mode = image.mode
  if mode.startswith("I") or mode == "F":
    v = np.asarray(image, np.float64)
    if not np.isfinite(v).all():
      raise RecordError("unsupported_image", f"mode {mode} with {int((~np.isfinite(v)).sum())} NaN or infinite "
                        "values")
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if mode.startswith("I") and lo >= 0 and hi <= 65535:
      v = v * (255 / 65535)
    elif mode == "F" and lo >= 0 and hi <= 1:
      v = v * 255
    elif not (mode == "F" and lo >= 0 and hi <= 255):
      v = (v - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(v)
    return Image.fromarray(np.round(v).clip(0, 255).astype(np.uint8)).convert("RGB")
  try:
    return image.convert("RGB")
  except (ValueError, OSError) as e:
    raise RecordError("unsupported_image", f"mode {mode}: {e}") from None


# ---------------------------------------------------------------- prompt pieces


def white_image_record(record: dict) -> dict:
  """The record with every image replaced by a white one of its size: the white-image control of an accuracy.

  A record whose image cannot be read is returned as it is, so that `process_record` reports (and the pipeline
  counts) it like any other bad record.
  """
  try:
    images = [Image.new("RGB", load_image(im).size, "white") for im in record.get("images") or []]
  except RecordError:
    return record
  return {**record, "images": images}


def render(tokenizer, messages: list[dict], prefill: str) -> str:
  """The chat template with the generation prompt, then the assistant prefill."""
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill


def tokenize(processor: Processor, text: str, image_grid_thw_I3) -> tuple[np.ndarray, np.ndarray]:
  """Token ids with each <|image_pad|> expanded to t*h*w / merge^2 pads; returns (input_ids_T, mm_token_type_ids_T)."""
  ids = np.asarray(processor.tokenizer(text)["input_ids"], np.int64)
  merge = processor.config.merge_size
  counts = [int(np.prod(g)) // merge**2 for g in np.asarray(image_grid_thw_I3).reshape(-1, 3)]
  slots = np.flatnonzero(ids == processor.image_token_id)
  if len(slots) != len(counts):
    raise RecordError("placeholder_mismatch", f"the template produced {len(slots)} image slots for {len(counts)} "
                      "images")
  repeats = np.ones(len(ids), np.int64)
  repeats[slots] = counts
  ids = np.repeat(ids, repeats).astype(np.int32)
  return ids, (ids == processor.image_token_id).astype(np.int32)


def make_prompt(processor: Processor, text: str, pixel_values_PX, image_grid_thw_I3) -> Prompt:
  """Tokenizes `text` for the given images and computes its M-RoPE positions."""
  grid = np.asarray(image_grid_thw_I3, np.int64).reshape(-1, 3)
  ids, types = tokenize(processor, text, grid)
  positions, deltas = mrope_positions(ids[None], types[None], grid if len(grid) else None,
                                      spatial_merge_size=processor.config.merge_size)
  return Prompt(ids, types, positions[:, 0], int(deltas[0]), pixel_values_PX, grid)


def mask_visual(prompt: Prompt) -> Prompt:
  """The compacted text-only prompt: image pads dropped, the other tokens keep their original 3-D positions.

  With n image pads dropped, a token generated after it keeps the position of the full prompt's continuation:
  (len - n) + delta' = len + delta, so delta' = delta + n.
  """
  keep = prompt.mm_token_type_ids_T == 0
  n = int((~keep).sum())
  return Prompt(prompt.input_ids_T[keep], prompt.mm_token_type_ids_T[keep], prompt.positions_3T[:, keep],
                prompt.delta + n, None, np.zeros((0, 3), np.int64))


def process_images(processor: Processor, images: list[Image.Image]) -> tuple[np.ndarray | None, np.ndarray]:
  """The images' (pixel_values_PX float32 or None, image_grid_thw_I3), by the config's `image_backend`: the fast
  path or transformers' Qwen2VLImageProcessorPil, equal value for value. A failure of either is "corrupt_image"."""
  if not images:
    return None, np.zeros((0, 3), np.int64)
  cfg = processor.config
  try:
    if cfg.image_backend == "fast":
      return preprocess_images(images, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                               patch_size=cfg.patch_size, merge_size=cfg.merge_size,
                               temporal_patch_size=cfg.temporal_patch_size)
    out = processor.image_processor(images=images)
  except (OSError, ValueError) as e:
    raise RecordError("corrupt_image", str(e)) from None
  return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)


def process_record(processor: Processor, record: dict) -> Example:
  """One canonical record -> `Example` (real prompt plus the configured counterfactuals); raises `RecordError`.

  The messages come from `jaxvg.data.prompts.build_messages` with the record's answer as the reference (used only by
  formats with a "{reference}" slot). `image_only` uses `prompts.image_only_messages`: a user turn of images only,
  without the format's system turn or prefill (the context of ViGOS's perception teacher).
  """
  cfg = processor.config
  problem, answer, image_specs, system = check_record(record)
  fmt = processor.fmt if system is None else dataclasses.replace(processor.fmt, system=system)
  if len(image_specs) > cfg.max_images:
    raise RecordError("too_many_images", f"{len(image_specs)} images > max_images={cfg.max_images}")
  images = [load_image(im) for im in image_specs]
  # Check the budgets from the image sizes alone before paying for resizing and tokenizing.
  patches = [processor.image_processor.get_number_of_image_patches(im.height, im.width) for im in images]
  if cfg.max_patches is not None and sum(patches) > cfg.max_patches:
    raise RecordError("too_many_patches", f"{sum(patches)} patches > {cfg.max_patches}")
  messages = prompts.build_messages(problem, fmt=fmt, reference=answer)
  text = render(processor.tokenizer, messages, fmt.prefill)
  pixel_values, grid = process_images(processor, images)
  if [int(np.prod(g)) for g in grid] != patches:
    raise RecordError("corrupt_image", f"grids {grid.tolist()} do not match the expected patch counts {patches}")
  prompt = make_prompt(processor, text, pixel_values, grid)
  if len(prompt.input_ids_T) > cfg.max_prompt_tokens:
    raise RecordError("prompt_too_long", f"{len(prompt.input_ids_T)} tokens > {cfg.max_prompt_tokens}")
  no_grid = np.zeros((0, 3), np.int64)
  variants = {}
  for mode in cfg.counterfactuals:
    if mode == "mask_visual":
      variants[mode] = mask_visual(prompt)
    elif mode == "no_image":
      messages = prompts.build_messages(problem, fmt=fmt, reference=answer, include_images=False)
      variants[mode] = make_prompt(processor, render(processor.tokenizer, messages, fmt.prefill), None, no_grid)
    elif mode == "white_image":
      white_pixels, white_grid = process_images(processor, [Image.new("RGB", im.size, "white") for im in images])
      if not np.array_equal(white_grid, grid):
        raise RecordError("corrupt_image", "the white images got different grids")
      variants[mode] = dataclasses.replace(prompt, pixel_values_PX=white_pixels)
    elif mode == "image_only":
      if images:
        text = render(processor.tokenizer, prompts.image_only_messages(len(images)), "")
        variants[mode] = make_prompt(processor, text, pixel_values, grid)
      else:  # nothing to keep: an empty user turn
        text = render(processor.tokenizer, [{"role": "user", "content": []}], "")
        variants[mode] = make_prompt(processor, text, None, no_grid)
  for name in cfg.contexts:
    context_fmt = prompts.get_format(name.removesuffix(DECOY))
    reference = answer
    if name.endswith(DECOY):
      if record.get("decoy_answer") is None:
        raise RecordError("no_decoy_answer", f"the {name} context needs the record's decoy_answer")
      reference = str(record["decoy_answer"])
    text = render(processor.tokenizer, prompts.build_messages(problem, fmt=context_fmt, reference=reference),
                  context_fmt.prefill)
    variants[name] = make_prompt(processor, text, pixel_values, grid)
    if len(variants[name].input_ids_T) > cfg.max_prompt_tokens:
      raise RecordError("prompt_too_long", f"the {name} context has {len(variants[name].input_ids_T)} tokens > "
                        f"{cfg.max_prompt_tokens}")
  return Example(id=str(record.get("id", "")), source=str(record.get("source", "")), answer=answer, prompt=prompt,
                 counterfactuals=variants)


def max_patches_per_image(config: PromptConfig) -> int:
  """The most patches one image can produce under `max_pixels` (smart_resize floors to the patch*merge grid)."""
  factor = config.patch_size * config.merge_size
  return (config.max_pixels // factor**2) * config.merge_size**2
