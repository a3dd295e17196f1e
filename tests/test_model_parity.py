"""jaxvg's Qwen2.5-VL against transformers' PyTorch implementation, float32, max abs diff <= 1e-4.

Each config is a tiny random checkpoint written by `save_pretrained` and read back with `load_hf`. The batch holds
several images of different sizes and aspect ratios, a text-only row and left padding; the configs cover more than
one attention window per image, full-attention blocks (none, some, all), tied and untied heads, and GQA ratios
heads/kv = 4/4, 4/2, 4/1. Only valid (non-padding) positions are compared.
"""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from hf_fixtures import TinyIds, hf_reference, make_mm_batch, make_tiny_hf_checkpoint, load_torch_model
from jaxvg.models import forward, load_hf, vision_layout, VisionInputs

pytestmark = pytest.mark.slow  # layer-by-layer parity builds four checkpoints and compiles each

TOL = 1e-4

CONFIGS = {
    # window 56 px = 2x2 merge groups per window: every image below spans several windows.
    "tied_kv2_win56_full1": dict(tie=True, kv_heads=2, window_size=56, fullatt=(1,), vision_depth=3),
    "untied_kv4_win112_full0": dict(tie=False, kv_heads=4, window_size=112, fullatt=(0,)),
    "untied_kv1_win56_nofull": dict(tie=False, kv_heads=1, window_size=56, fullatt=()),
    "tied_kv1_allfull": dict(tie=True, kv_heads=1, window_size=56, fullatt=(0, 1)),
}

# Images (height, width) in pixels: 2x4, 3x2, 5x3 (ragged windows), 4x6 merge groups; row 1 is text only.
ROWS = [[3, (56, 112), 2, (84, 56), 1], [4], [(140, 84), 5], [2, (112, 168), 1]]


def _valid(x_BT_, mask_BT):
  return np.asarray(x_BT_)[np.asarray(mask_BT).astype(bool)]


_RUNS = {}


def _build(name, tmp_path_factory):
  """Checkpoint, both models and both outputs for config `name`, built once per module."""
  if name not in _RUNS:
    path = make_tiny_hf_checkpoint(tmp_path_factory.mktemp(name), seed=11, **CONFIGS[name])
    hf = load_torch_model(path)
    model = load_hf(str(path))
    batch = make_mm_batch(ROWS, ids=TinyIds(512), seed=12)
    ref = hf_reference(hf, batch)
    logits, out = forward(model, **batch, return_hidden=True)
    _RUNS[name] = dict(name=name, model=model, hf=hf, batch=batch, ref=ref, logits=np.asarray(logits),
                       out=jax.tree.map(np.asarray, out))
  return _RUNS[name]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def run(request, tmp_path_factory):
  return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """The first config, for the invariance tests (which do not depend on the config)."""
  return _build("tied_kv2_win56_full1", tmp_path_factory)


def _logits(model, batch):
  """Our logits through the same compiled forward as the fixture (return_hidden=True)."""
  return np.asarray(forward(model, **batch, return_hidden=True)[0])


def test_vision_tower_before_merger(run):
  ours, ref = run["out"]["vision_hidden_PE"], run["ref"]["vision_hidden"]
  assert ours.shape == ref.shape  # both in window order
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_merger_output(run):
  ours, ref = run["out"]["image_features_QD"], run["ref"]["merged"]
  assert ours.shape == ref.shape  # original (processor) order
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_every_decoder_layer(run):
  mask = run["batch"]["attention_mask"]
  hidden = run["out"]["hidden_LBTD"]
  assert len(hidden) == len(run["ref"]["layers"])
  for l, ref in enumerate(run["ref"]["layers"]):
    np.testing.assert_allclose(_valid(hidden[l], mask), _valid(ref, mask), atol=TOL, rtol=0,
                               err_msg=f"decoder layer {l}")


def test_logits(run):
  mask = run["batch"]["attention_mask"]
  assert run["logits"].shape == run["ref"]["logits"].shape
  assert run["logits"].dtype == np.float32
  np.testing.assert_allclose(_valid(run["logits"], mask), _valid(run["ref"]["logits"], mask), atol=TOL, rtol=0)


# ---------------------------------------------------------------- text only, and invariances of our own forward


def test_text_only_batch_matches(base):
  # transformers gives a text-only batch 1-D positions counted from the left edge, padding included; rope is
  # relative, so the logits of valid tokens still agree with ours (counted from the first valid token).
  batch = make_mm_batch([[6], [3], [5]], ids=TinyIds(512), seed=13)
  ref = hf_reference(base["hf"], batch)
  mask = batch["attention_mask"]
  np.testing.assert_allclose(_valid(_logits(base["model"], batch), mask), _valid(ref["logits"], mask), atol=TOL,
                             rtol=0)


def _row_slice(batch, rows, b):
  """Row b's images: a contiguous slice of the batch's patches and grids (images are in row order)."""
  grids = batch["image_grid_thw"]
  first = sum(isinstance(it, tuple) for r in rows[:b] for it in r)
  count = sum(isinstance(it, tuple) for it in rows[b])
  sizes = grids.prod(-1)
  start = int(sizes[:first].sum())
  return slice(start, start + int(sizes[first:first + count].sum())), slice(first, first + count)


def test_reversed_batch_gives_reversed_logits(base):
  # Same shapes (no recompile), rows and their images in the opposite order: rows must not interact.
  batch, order = base["batch"], list(range(len(ROWS)))[::-1]
  pieces = [_row_slice(batch, ROWS, b) for b in order]
  rev = dict(input_ids=batch["input_ids"][order], attention_mask=batch["attention_mask"][order],
             mm_token_type_ids=batch["mm_token_type_ids"][order],
             pixel_values=np.concatenate([batch["pixel_values"][p] for p, _ in pieces]),
             image_grid_thw=np.concatenate([batch["image_grid_thw"][g] for _, g in pieces]))
  np.testing.assert_allclose(_logits(base["model"], rev), base["logits"][order], atol=1e-5, rtol=0)


def test_row_alone_without_padding(base):
  # Row 2 (an image first, 7 left pads in the batch) alone and unpadded gives the same logits.
  batch, b = base["batch"], 2
  patches, grids = _row_slice(batch, ROWS, b)
  mask = batch["attention_mask"][b].astype(bool)
  single = dict(input_ids=batch["input_ids"][b:b + 1, mask], attention_mask=np.ones((1, mask.sum()), np.int64),
                mm_token_type_ids=batch["mm_token_type_ids"][b:b + 1, mask],
                pixel_values=batch["pixel_values"][patches], image_grid_thw=batch["image_grid_thw"][grids])
  assert mask.sum() < mask.size
  np.testing.assert_allclose(_logits(base["model"], single)[0], base["logits"][b, mask], atol=1e-5, rtol=0)


def test_vision_bucket_padding_is_inert(base):
  # Padding the patch sequence (static shapes for jit) leaves the real image features unchanged.
  model, batch = base["model"], base["batch"]
  v = model.cfg.vision
  P = batch["pixel_values"].shape[0]
  padded = vision_layout(batch["image_grid_thw"], spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                         patch_size=v.patch_size, pad_to=P + 40)
  feats_QD, _ = nnx.jit(lambda m, vis: m.vision(vis))(model, VisionInputs.from_layout(batch["pixel_values"], padded))
  Q = P // v.merge_unit
  assert feats_QD.shape[0] == Q + 10
  np.testing.assert_allclose(np.asarray(feats_QD[:Q]), base["out"]["image_features_QD"], atol=1e-5, rtol=0)


def test_mm_token_type_ids_default(base):
  # Without mm_token_type_ids the image-pad ids define the image runs: same logits.
  batch = dict(base["batch"])
  batch.pop("mm_token_type_ids")
  np.testing.assert_allclose(_logits(base["model"], batch), base["logits"], atol=1e-6, rtol=0)


def test_vision_tower_with_frames(base):
  # Grids with t = 2 frames: full-attention blocks attend within each frame, as transformers' cu_seqlens say.
  model, hf = base["model"], base["hf"]
  grids = np.array([[2, 4, 6], [1, 6, 4]])
  pixels = np.random.default_rng(14).normal(size=(int(grids.prod(-1).sum()), model.cfg.vision.patch_dim))
  pixels = pixels.astype(np.float32)
  with torch.no_grad():
    ref = hf.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grids))
  v = model.cfg.vision
  layout = vision_layout(grids, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                         patch_size=v.patch_size)
  feats_QD, out = nnx.jit(lambda m, vis: m.vision(vis))(model, VisionInputs.from_layout(pixels, layout))
  np.testing.assert_allclose(np.asarray(out["vision_hidden_PE"]), ref.last_hidden_state.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(feats_QD), ref.pooler_output.numpy(), atol=TOL, rtol=0)


def test_image_token_count_mismatch_raises(base):
  # One image-pad token too few for its grid: a clear error, as transformers raises, never a silent misplacement.
  batch = dict(base["batch"])
  ids, types, mask = (batch[k].copy() for k in ("input_ids", "mm_token_type_ids", "attention_mask"))
  b, t = np.argwhere(types == 1)[0]
  ids[b, 1:t + 1], types[b, 1:t + 1], mask[b, 1:t + 1] = ids[b, :t], types[b, :t], mask[b, :t]
  ids[b, 0], types[b, 0], mask[b, 0] = 0, 0, 0
  batch.update(input_ids=ids, mm_token_type_ids=types, attention_mask=mask)
  with pytest.raises(ValueError, match="grid"):
    forward(base["model"], **batch)
