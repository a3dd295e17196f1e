"""Prefill + decode with the KV cache against a full forward, and greedy decoding against transformers' `generate`.

Prompts are left-padded and contain images of different sizes (and one text-only row). The special ids (image pad,
video pad, vision start/end) are excluded from the greedy choice in both implementations, so generated tokens are
always text.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_fixtures import TinyIds, load_torch_model, make_mm_batch, make_tiny_hf_checkpoint, to_torch
from jaxvg.models import forward, KVCache, load_hf, mrope_positions, prepare_inputs, text_positions

IDS = TinyIds(512)
SPECIAL = [IDS.image, IDS.video, IDS.vision_start, IDS.vision_end]
NEW = 6
ROWS = [[2, (56, 84), 1], [3], [(84, 56), 3, (56, 56), 1]]


@nnx.jit
def _step(model, input_ids_BT, positions_3BT, cache, cache_index, kv_mask_BS, vision):
  h_BTD, cache, _ = model.hidden(input_ids_BT, positions_3BT, kv_mask_BS, vision=vision, cache=cache,
                                 cache_index=cache_index, kv_mask_BS=kv_mask_BS)
  return model.decoder.logits(h_BTD), cache


def _greedy(logits_BV):
  logits_BV = np.array(logits_BV, np.float32)
  logits_BV[:, SPECIAL] = -np.inf
  return logits_BV.argmax(-1)


def _decode(model, batch, new):
  """Greedy decoding with the cache: prefill the prompt, then one token per step. Returns tokens [B, new] and the
  logits [B, new, V] that chose them."""
  ids_BT, pos_3BT, mask_BT, vision = prepare_inputs(model.cfg, **batch)
  B, T = ids_BT.shape
  _, deltas_B = mrope_positions(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                batch["attention_mask"], spatial_merge_size=model.cfg.vision.spatial_merge_size)
  S = T + new
  cache = KVCache.zeros(model.cfg.text, B, S)
  kv_mask_BS = np.concatenate([np.asarray(mask_BT), np.zeros((B, new), np.int64)], axis=1)
  logits_BTV, cache = _step(model, ids_BT, pos_3BT, cache, 0, jnp.asarray(kv_mask_BS), vision)
  step_logits, tokens = [logits_BTV[:, -1]], []
  valid_B = np.asarray(mask_BT).sum(1)
  for i in range(new):
    tok_B = _greedy(step_logits[-1])
    tokens.append(tok_B)
    if i == new - 1:
      break
    kv_mask_BS[:, T + i] = 1
    pos = text_positions(np.asarray(pos_3BT), deltas_B, 1, valid_B + i)
    logits_B1V, cache = _step(model, jnp.asarray(tok_B[:, None]), jnp.asarray(pos), cache, T + i,
                              jnp.asarray(kv_mask_BS), None)
    step_logits.append(logits_B1V[:, 0])
  return np.stack(tokens, 1), np.stack([np.asarray(x) for x in step_logits], 1)


def _extend(batch, tokens_BN):
  """The prompt batch with `tokens_BN` appended as text."""
  B, N = tokens_BN.shape
  out = dict(batch)
  out["input_ids"] = np.concatenate([batch["input_ids"], tokens_BN], 1)
  out["attention_mask"] = np.concatenate([batch["attention_mask"], np.ones((B, N), np.int64)], 1)
  out["mm_token_type_ids"] = np.concatenate([batch["mm_token_type_ids"], np.zeros((B, N), np.int64)], 1)
  return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  path = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("kv"), seed=21, tie=False, kv_heads=1)
  model = load_hf(str(path))
  batch = make_mm_batch(ROWS, ids=IDS, seed=22)
  assert not batch["attention_mask"].all()  # left padding present
  tokens, logits = _decode(model, batch, NEW)
  return dict(path=path, model=model, batch=batch, tokens=tokens, logits=logits)


def test_cached_decode_equals_full_forward(setup):
  model, batch, tokens, step_logits = setup["model"], setup["batch"], setup["tokens"], setup["logits"]
  T = batch["input_ids"].shape[1]
  full = np.asarray(forward(model, **_extend(batch, tokens)))
  # Logits predicting generated token i sit at position T - 1 + i of the full sequence.
  full_steps = full[:, T - 1:T - 1 + NEW]
  np.testing.assert_allclose(step_logits, full_steps, atol=1e-5, rtol=0)
  for i in range(NEW):
    np.testing.assert_array_equal(tokens[:, i], _greedy(full_steps[:, i]), err_msg=f"step {i}")


def test_multi_token_step_with_cache(setup):
  # Feeding the generated tokens three at a time into the cache gives the full forward's logits too.
  model, batch, tokens = setup["model"], setup["batch"], setup["tokens"]
  ids_BT, pos_3BT, mask_BT, vision = prepare_inputs(model.cfg, **batch)
  B, T = ids_BT.shape
  _, deltas_B = mrope_positions(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                batch["attention_mask"])
  cache = KVCache.zeros(model.cfg.text, B, T + NEW)
  kv_mask_BS = np.concatenate([np.asarray(mask_BT), np.ones((B, NEW), np.int64)], 1)  # causality hides the future
  _, cache = _step(model, ids_BT, pos_3BT, cache, 0, jnp.asarray(kv_mask_BS), vision)
  valid_B = np.asarray(mask_BT).sum(1)
  full = np.asarray(forward(model, **_extend(batch, tokens)))
  for start in (0, 3):
    pos = text_positions(np.asarray(pos_3BT), deltas_B, 3, valid_B + start)
    logits_B3V, cache = _step(model, jnp.asarray(tokens[:, start:start + 3]), jnp.asarray(pos), cache, T + start,
                              jnp.asarray(kv_mask_BS), None)
    np.testing.assert_allclose(np.asarray(logits_B3V), full[:, T + start:T + start + 3], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_greedy_decode_equals_transformers_generate(setup):
  hf = load_torch_model(setup["path"])
  out = hf.generate(**to_torch(setup["batch"]), max_new_tokens=NEW, do_sample=False, suppress_tokens=SPECIAL,
                    output_logits=True, return_dict_in_generate=True, pad_token_id=IDS.pad)
  np.testing.assert_array_equal(out.sequences[:, -NEW:].numpy(), setup["tokens"])
  hf_logits = torch.stack(out.logits, 1).float().numpy()
  np.testing.assert_allclose(setup["logits"], hf_logits, atol=1e-4, rtol=0)
