"""Records -> prompts and batches against transformers: the real Qwen2_5_VLProcessor (tokenizer + chat template +
Qwen2VLImageProcessorPil + pad expansion) and Qwen2_5_VLModel.get_rope_index, on the real Qwen2.5 vocabulary.

The references never go through jaxvg's message builder: their chat messages are written out by hand here.
"""

import io

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import (IMAGE_PAD_ID, VISION_END_ID, VISION_START_ID, make_records, qwen25vl_tokenizer,
                           random_image, reference_processor)
from hf_fixtures import make_tiny_hf_model
from jaxvg.data import processing, prompts
from jaxvg.data.batch import collate, collate_prompts, pick_bucket, rollout_sequence, rollout_sequences
from jaxvg.models.positions import vision_layout

MIN_PIXELS, MAX_PIXELS = 3136, 200_000
RAW = prompts.PromptFormat(name="raw", system=None, user_template="{question}", prefill="", sections=(),
                           images_first=False)
SIZES = {
    "one_image_resized": [[(100, 150)]],
    "tiny_image_upscaled": [[(33, 47)]],
    "large_image_downscaled": [[(500, 700)]],
    "two_images_one_record": [[(60, 300), (200, 90)]],
    "text_only_and_images": [[], [(84, 56)], [(150, 100), (40, 40)]],
}
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def tok():
  return qwen25vl_tokenizer()


@pytest.fixture(scope="module")
def ref(tok):
  return reference_processor(tok, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def rope_model():
  return make_tiny_hf_model(seed=0, layers=1, vision_depth=1, fullatt=(0,))


def make_proc(tok, fmt=RAW, counterfactuals=processing.COUNTERFACTUALS, **kwargs):
  cfg = processing.PromptConfig(prompt_format=fmt, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                counterfactuals=counterfactuals, **kwargs)
  return processing.make_processor(tok, cfg)


def hand_messages(problem, *, system=None, with_images=True, with_text=True):
  """The chat messages written out by hand: text and image entries in the order of the placeholders."""
  content = []
  for i, piece in enumerate(problem.split("<image>")):
    if i and with_images:
      content.append({"type": "image"})
    if piece and with_text:
      content.append({"type": "text", "text": piece})
  return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


def decoded(record):
  return [Image.open(io.BytesIO(b)) for b in record["images"]]


def reference(ref, tok, messages, images, prefill=""):
  text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill
  return ref(text=[text], images=images or None, return_tensors="np")


def hf_rope(model, input_ids, types, grid, mask):
  t = lambda x: torch.from_numpy(np.asarray(x, np.int64))
  pos, deltas = model.model.get_rope_index(t(input_ids), t(types), image_grid_thw=None if grid is None else t(grid),
                                           attention_mask=t(mask))
  return pos.numpy(), deltas[:, 0].numpy()


# ---------------------------------------------------------------- one prompt against the real processor


@pytest.mark.parametrize("name", sorted(SIZES))
def test_prompt_equals_transformers_processor(tok, ref, name):
  proc = make_proc(tok, counterfactuals=())
  for record in make_records(SIZES[name], seed=1):
    ex = processing.process_record(proc, record)
    out = reference(ref, tok, hand_messages(record["problem"]), decoded(record))
    np.testing.assert_array_equal(ex.prompt.input_ids_T, out["input_ids"][0])
    np.testing.assert_array_equal(ex.prompt.mm_token_type_ids_T, out["mm_token_type_ids"][0])
    if record["images"]:
      np.testing.assert_array_equal(ex.prompt.pixel_values_PX, out["pixel_values"])
      np.testing.assert_array_equal(ex.prompt.image_grid_thw_I3, out["image_grid_thw"])
      assert ex.prompt.pixel_values_PX.shape[1] == 3 * 2 * 14 * 14
    else:
      assert ex.prompt.pixel_values_PX is None and ex.prompt.image_grid_thw_I3.shape == (0, 3)
    assert ex.answer == record["answer"] and ex.id == record["id"]
    # Each image becomes vision_start, (h*w)/4 pads, vision_end (counted by hand from the grids).
    ids = ex.prompt.input_ids_T.tolist()
    assert ids.count(IMAGE_PAD_ID) == sum(h * w // 4 for _, h, w in ex.prompt.image_grid_thw_I3.tolist())
    assert ids.count(VISION_START_ID) == ids.count(VISION_END_ID) == len(record["images"])


def test_format_system_and_prefill(tok, ref):
  """The ViGOS format: images first, its instruction, no system turn, and "<description>" prefilled."""
  proc = make_proc(tok, fmt="vigos", counterfactuals=())
  record = make_records([[(100, 150)]], seed=2)[0]
  ex = processing.process_record(proc, record)
  question = record["problem"].replace("<image>", "").strip()
  user = prompts.VIGOS.user_template.replace("{question}", question)
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]}]
  out = reference(ref, tok, messages, decoded(record), prefill="<description>")
  np.testing.assert_array_equal(ex.prompt.input_ids_T, out["input_ids"][0])
  assert tok.decode(ex.prompt.input_ids_T).endswith("<|im_start|>assistant\n<description>")
  # A record's own system turn replaces the format's.
  ex2 = processing.process_record(proc, {**record, "system": "Be brief."})
  assert tok.decode(ex2.prompt.input_ids_T).startswith("<|im_start|>system\nBe brief.<|im_end|>")


# ---------------------------------------------------------------- batches: left padding and positions


def test_batch_positions_equal_get_rope_index_with_left_padding(tok, ref, rope_model):
  proc = make_proc(tok, counterfactuals=())
  records = make_records([[(100, 150)], [(60, 300), (200, 90)], [], [(84, 56)]], seed=3)
  examples = [processing.process_record(proc, r) for r in records]
  batch = collate(examples, batch_size=4, length_buckets=(64, 512, 1024), patch_buckets=(1024, 2048),
                  max_images=2, pad_id=tok.pad_token_id).prompts
  longest = max(len(e.prompt.input_ids_T) for e in examples)
  assert batch.input_ids_BT.shape == (4, 512) and 64 < longest <= 512
  # transformers' processor on the same texts with left padding.
  texts = [tok.apply_chat_template(hand_messages(r["problem"]), tokenize=False, add_generation_prompt=True)
           for r in records]
  tok.padding_side = "left"
  out = ref(text=texts, images=[im for r in records for im in decoded(r)], padding=True, return_tensors="np")
  L = out["input_ids"].shape[1]
  assert L == longest
  np.testing.assert_array_equal(batch.input_ids_BT[:, -L:], out["input_ids"])
  np.testing.assert_array_equal(batch.attention_mask_BT[:, -L:], out["attention_mask"])
  np.testing.assert_array_equal(batch.mm_token_type_ids_BT[:, -L:], out["mm_token_type_ids"])
  assert (batch.input_ids_BT[:, :-L] == tok.pad_token_id).all() and (batch.attention_mask_BT[:, :-L] == 0).all()
  n_img = int(batch.num_images_B.sum())
  np.testing.assert_array_equal(batch.image_grid_thw_I3[:n_img], out["image_grid_thw"])
  assert (batch.image_grid_thw_I3[n_img:] == 0).all() and batch.image_grid_thw_I3.shape == (8, 3)
  np.testing.assert_array_equal(batch.num_images_B, [1, 2, 0, 1])
  n_patch = len(out["pixel_values"])
  np.testing.assert_array_equal(batch.vision.pixel_values_PX[:n_patch], out["pixel_values"])
  assert (batch.vision.pixel_values_PX[n_patch:] == 0).all()
  assert batch.vision.pixel_values_PX.shape[0] == pick_bucket(n_patch, (1024, 2048), "patches")
  # Positions and deltas: get_rope_index on the padded batch (with the real grids only).
  pos, deltas = hf_rope(rope_model, batch.input_ids_BT, batch.mm_token_type_ids_BT, out["image_grid_thw"],
                        batch.attention_mask_BT)
  np.testing.assert_array_equal(batch.positions_3BT, pos)
  np.testing.assert_array_equal(batch.deltas_B, deltas)
  # The vision layout is the model's own helper on the real grids, padded to the bucket.
  layout = vision_layout(out["image_grid_thw"], spatial_merge_size=2, window_size=112, patch_size=14,
                         pad_to=batch.vision.pixel_values_PX.shape[0])
  np.testing.assert_array_equal(batch.vision.window_index_Q, layout.window_index_Q)
  np.testing.assert_array_equal(batch.vision.window_seg_P, layout.window_seg_P)


def test_short_batch_is_filled_and_marked(tok):
  proc = make_proc(tok, counterfactuals=("mask_visual",))
  examples = [processing.process_record(proc, r) for r in make_records([[(100, 150)], [(40, 80)]], seed=4)]
  batch = collate(examples, batch_size=4, length_buckets=(512,), patch_buckets=(512,), max_images=1, pad_id=0)
  np.testing.assert_array_equal(batch.prompts.valid_B, [True, True, False, False])
  np.testing.assert_array_equal(batch.prompts.input_ids_BT[3], batch.prompts.input_ids_BT[1])
  np.testing.assert_array_equal(batch.prompts.counterfactuals["mask_visual"].valid_B, [True, True, False, False])
  assert batch.answers == ("10", "11", "11", "11")
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    collate(examples, batch_size=2, length_buckets=(16,), patch_buckets=(512,), max_images=1, pad_id=0)
  with pytest.raises(ValueError, match="collate needs"):
    collate([], batch_size=2, length_buckets=(16,), patch_buckets=(512,), max_images=1, pad_id=0)


def test_prompt_batch_is_a_pytree_that_jits_once_per_bucket(tok):
  proc = make_proc(tok, counterfactuals=("mask_visual", "white_image"))
  records = make_records([[(100, 150)], [(60, 90)], [(40, 40)], [(90, 120)]], seed=5)
  examples = [processing.process_record(proc, r) for r in records]
  kw = dict(batch_size=2, length_buckets=(512,), patch_buckets=(512,), max_images=1, pad_id=tok.pad_token_id)
  b1, b2 = collate(examples[:2], **kw), collate(examples[2:], **kw)
  f = jax.jit(lambda p: (p.input_ids_BT.sum() + p.counterfactuals["mask_visual"].positions_3BT.sum()
                         + p.counterfactuals["white_image"].vision.pixel_values_PX.sum()))
  f(b1.prompts), f(b2.prompts)
  assert f._cache_size() == 1  # same buckets: one program, whatever the answers and ids
  on_device = jax.device_put(b1.prompts)
  assert jax.tree_util.tree_structure(on_device) == jax.tree_util.tree_structure(b1.prompts)
  assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(b1.prompts))


# ---------------------------------------------------------------- counterfactual prompts


def test_counterfactual_prompts(tok, ref, rope_model):
  proc = make_proc(tok)
  record = make_records([[(100, 150), (60, 90)]], seed=6)[0]
  ex = processing.process_record(proc, record)
  real, cf = ex.prompt, ex.counterfactuals
  # mask_visual: a naive loop keeps every non-pad token with its original position; delta shifts by the pad count.
  keep = [i for i, t in enumerate(real.input_ids_T.tolist()) if t != IMAGE_PAD_ID]
  np.testing.assert_array_equal(cf["mask_visual"].input_ids_T, real.input_ids_T[keep])
  np.testing.assert_array_equal(cf["mask_visual"].positions_3T, real.positions_3T[:, keep])
  n_pad = len(real.input_ids_T) - len(keep)
  assert cf["mask_visual"].delta == real.delta + n_pad and cf["mask_visual"].pixel_values_PX is None
  assert n_pad == 8 * 10 // 4 + 4 * 6 // 4  # the grids of test_image_grids_by_hand
  # no_image: the template re-applied without image entries; text-only positions 0..n-1 on all axes.
  out = reference(ref, tok, hand_messages(record["problem"], with_images=False), [])
  np.testing.assert_array_equal(cf["no_image"].input_ids_T, out["input_ids"][0])
  n = len(out["input_ids"][0])
  np.testing.assert_array_equal(cf["no_image"].positions_3T, np.tile(np.arange(n), (3, 1)))
  assert cf["no_image"].delta == 0 and cf["no_image"].pixel_values_PX is None
  # white_image: same ids and positions; every patch is the normalized white pixel (1 - mean) / std per channel.
  np.testing.assert_array_equal(cf["white_image"].input_ids_T, real.input_ids_T)
  np.testing.assert_array_equal(cf["white_image"].positions_3T, real.positions_3T)
  white = np.repeat((1.0 - CLIP_MEAN) / CLIP_STD, 2 * 14 * 14)  # channel-major within a patch
  np.testing.assert_allclose(cf["white_image"].pixel_values_PX, np.broadcast_to(white, real.pixel_values_PX.shape),
                             rtol=1e-6)
  # image_only: a user turn of the two images only (the template's default system turn), no prefill.
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]
  out = reference(ref, tok, messages, decoded(record))
  np.testing.assert_array_equal(cf["image_only"].input_ids_T, out["input_ids"][0])
  np.testing.assert_array_equal(cf["image_only"].pixel_values_PX, real.pixel_values_PX)
  pos, deltas = hf_rope(rope_model, out["input_ids"], out["mm_token_type_ids"], out["image_grid_thw"],
                        np.ones_like(out["input_ids"]))
  np.testing.assert_array_equal(cf["image_only"].positions_3T, pos[:, 0])
  assert cf["image_only"].delta == deltas[0]


def test_image_grids_by_hand(tok):
  """smart_resize by hand: each side rounds to a multiple of 28 within [3136, 200000] pixels.

  h x w = 100 x 150 -> round(3.57) * 28 x round(5.36) * 28 = 112 x 140 -> grid 8 x 10 patches of 14;
  60 x 90 -> round(2.14) * 28 x round(3.21) * 28 = 56 x 84 (4704 >= 3136 pixels) -> grid 4 x 6.
  """
  proc = make_proc(tok, counterfactuals=())
  record = make_records([[(100, 150), (60, 90)]], seed=6)[0]
  grid = processing.process_record(proc, record).prompt.image_grid_thw_I3
  np.testing.assert_array_equal(grid, [[1, 8, 10], [1, 4, 6]])


# ---------------------------------------------------------------- prompt + completion


def test_rollout_sequence_positions(tok, rope_model):
  proc = make_proc(tok)
  records = make_records([[(100, 150)], [(60, 90), (40, 40)]], seed=7)
  examples = [processing.process_record(proc, r) for r in records]
  batch = collate(examples, batch_size=2, length_buckets=(512,), patch_buckets=(1024,), max_images=2,
                  pad_id=tok.pad_token_id).prompts
  G, L = 2, 5
  completion = np.arange(1, 1 + 2 * G * L).reshape(2 * G, L) + 1000
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
  seqs = rollout_sequences(batch, completion, mask, group_size=G)
  assert set(seqs) == {"real", *processing.COUNTERFACTUALS}
  real = seqs["real"]
  # Reference: get_rope_index on the full prompt + completion rows (grids repeated per sample, in row order).
  grids = [e.prompt.image_grid_thw_I3 for e in examples for _ in range(G)]
  pos, _ = hf_rope(rope_model, real.input_ids_NS, real.mm_token_type_ids_NS, np.concatenate(grids),
                   real.attention_mask_NS)
  valid = np.asarray(real.attention_mask_NS, bool)
  np.testing.assert_array_equal(np.asarray(real.positions_3NS)[:, valid], pos[:, valid])
  for mode in ("no_image", "image_only", "white_image"):
    s = seqs[mode]
    variant_grids = [e.counterfactuals[mode].image_grid_thw_I3 for e in examples for _ in range(G)]
    grid = np.concatenate(variant_grids) if mode != "no_image" else None
    pos_v, _ = hf_rope(rope_model, s.input_ids_NS, s.mm_token_type_ids_NS, grid, s.attention_mask_NS)
    valid_v = np.asarray(s.attention_mask_NS, bool)
    np.testing.assert_array_equal(np.asarray(s.positions_3NS)[:, valid_v], pos_v[:, valid_v])
  # mask_visual: every kept token (prompt text and completion) has the position it has in the full real sequence.
  mv = seqs["mask_visual"]
  for n in range(2 * G):
    full = np.asarray(real.positions_3NS)[:, n][:, valid[n] & (np.asarray(real.mm_token_type_ids_NS)[n] == 0)]
    compact = np.asarray(mv.positions_3NS)[:, n][:, np.asarray(mv.attention_mask_NS[n], bool)]
    np.testing.assert_array_equal(compact, full)
  # Completion padding: mask 0, position 0.
  assert (np.asarray(real.positions_3NS)[:, 1, -3:] == 0).all()
  with pytest.raises(ValueError, match="completion rows"):
    rollout_sequence(batch, completion[:3], mask[:3], group_size=G)


def test_rollout_sequence_inside_jit(tok):
  proc = make_proc(tok, counterfactuals=())
  examples = [processing.process_record(proc, r) for r in make_records([[(60, 90)]], seed=8)]
  batch = collate(examples, batch_size=1, length_buckets=(256,), patch_buckets=(256,), max_images=1, pad_id=0)
  completion, mask = np.array([[7, 8, 9]]), np.array([[1, 1, 1]])
  eager = rollout_sequence(batch.prompts, completion, mask, group_size=1)
  jitted = jax.jit(lambda p, c, m: rollout_sequence(p, c, m, group_size=1))(batch.prompts, completion, mask)
  np.testing.assert_array_equal(eager.positions_3NS, jitted.positions_3NS)
  start = len(examples[0].prompt.input_ids_T) + examples[0].prompt.delta
  np.testing.assert_array_equal(np.asarray(eager.positions_3NS)[:, 0, -3:], np.tile(start + np.arange(3), (3, 1)))


# ---------------------------------------------------------------- configs and helpers


def test_config_errors(tok):
  with pytest.raises(ValueError, match="unknown counterfactuals"):
    processing.PromptConfig(counterfactuals=("no_text",))
  with pytest.raises(ValueError, match="unknown prompt format"):
    processing.PromptConfig(prompt_format="nope")
  with pytest.raises(ValueError, match="min_pixels"):
    processing.PromptConfig(min_pixels=10, max_pixels=5)


def test_collate_prompts_without_images_keeps_static_vision(tok):
  proc = make_proc(tok, counterfactuals=())
  ex = processing.process_record(proc, make_records([[]], seed=9)[0])
  pb = collate_prompts([ex.prompt], with_vision=True, length_buckets=(256,), patch_buckets=(64,), image_rows=2,
                       pad_id=0, valid_B=[True])
  assert pb.vision.pixel_values_PX.shape == (64, 1176) and (pb.vision.pixel_values_PX == 0).all()
  np.testing.assert_array_equal(pb.vision.window_index_Q, np.arange(16))  # padding groups keep their order
  assert (pb.image_grid_thw_I3 == 0).all() and pb.num_images_B.tolist() == [0]


def test_max_patches_per_image_bound(tok):
  cfg = processing.PromptConfig(max_pixels=200_000)
  proc = processing.make_processor(tok, cfg)
  bound = processing.max_patches_per_image(cfg)
  assert bound == (200_000 // 784) * 4
  for h, w in [(1000, 1000), (447, 447), (300, 900), (2000, 31)]:
    assert proc.image_processor.get_number_of_image_patches(h, w) <= bound


def test_image_modes(tok, ref):
  """Palette, grayscale and RGBA images go through the processor's own RGB conversion."""
  proc = make_proc(tok, counterfactuals=())
  for mode in ("P", "L", "RGBA"):
    image = random_image(70, 90, seed=10, mode=mode)
    ex = processing.process_record(proc, {"id": "x", "images": [image], "problem": "<image>What?", "answer": "1"})
    out = reference(ref, tok, hand_messages("<image>What?"), [image])
    np.testing.assert_array_equal(ex.prompt.pixel_values_PX, out["pixel_values"])
