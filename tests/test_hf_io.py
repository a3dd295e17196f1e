"""Hugging Face checkpoint directories: load_hf (single file, sharded, bf16), save_hf -> transformers, clear errors.

Checkpoints are written by transformers' `save_pretrained`; the broken ones are edited copies of a good one.
"""

import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from hf_fixtures import TinyIds, load_torch_model, make_mm_batch, make_tiny_hf_checkpoint, to_torch
from jaxvg.models import forward, load_hf, safetensors_io, save_hf

ROWS = [[2, (56, 84), 1], [(84, 56), 3]]


def _params(model) -> dict[str, np.ndarray]:
  return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _torch_logits(hf, batch):
  t = to_torch(batch)
  with torch.no_grad():
    return hf(**t, use_cache=False).logits.float().numpy()


def _valid(x, batch):
  return np.asarray(x)[batch["attention_mask"].astype(bool)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """One random model written three ways (same seed): single file, sharded, bf16; plus an untied one."""
  root = tmp_path_factory.mktemp("ckpts")
  paths = dict(
      single=make_tiny_hf_checkpoint(root / "single", seed=5),
      sharded=make_tiny_hf_checkpoint(root / "sharded", seed=5, max_shard_size="20KB"),
      bf16=make_tiny_hf_checkpoint(root / "bf16", seed=5, dtype=torch.bfloat16),
      untied=make_tiny_hf_checkpoint(root / "untied", seed=6, tie=False, kv_heads=1, max_shard_size="30KB"),
  )
  return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def batch():
  return make_mm_batch(ROWS, ids=TinyIds(512), seed=7)


# ---------------------------------------------------------------- loading


def test_load_single_file_matches_transformers(ckpts, batch):
  assert sorted(f for f in os.listdir(ckpts["single"]) if f.endswith(".safetensors")) == ["model.safetensors"]
  model = load_hf(ckpts["single"])
  assert all(v.dtype == np.float32 for v in _params(model).values())
  hf = load_torch_model(ckpts["single"])
  np.testing.assert_allclose(_valid(forward(model, **batch), batch), _valid(_torch_logits(hf, batch), batch),
                             atol=1e-4, rtol=0)


def test_load_sharded_equals_single(ckpts):
  files = os.listdir(ckpts["sharded"])
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 2
  single, sharded = _params(load_hf(ckpts["single"])), _params(load_hf(ckpts["sharded"]))
  assert single.keys() == sharded.keys()
  for name in single:
    np.testing.assert_array_equal(sharded[name], single[name], err_msg=name)


def test_load_untied_sharded_matches_transformers(ckpts, batch):
  model = load_hf(ckpts["untied"])
  hf = load_torch_model(ckpts["untied"])
  np.testing.assert_allclose(_valid(forward(model, **batch), batch), _valid(_torch_logits(hf, batch), batch),
                             atol=1e-4, rtol=0)
  head = _params(model)["decoder/head_DV"]
  np.testing.assert_array_equal(head, hf.lm_head.weight.detach().numpy().T)


def test_bf16_checkpoint_loads_as_bf16_without_float32_detour(ckpts, monkeypatch):
  read_dtypes = []
  original_get = safetensors_io.SafetensorsFile.get

  def spy(self, key):
    out = original_get(self, key)
    read_dtypes.append(out.dtype)
    return out

  monkeypatch.setattr(safetensors_io.SafetensorsFile, "get", spy)
  model = load_hf(ckpts["bf16"])
  assert read_dtypes and set(read_dtypes) == {np.dtype(ml_dtypes.bfloat16)}  # the reader hands out bf16 as is
  params = _params(model)
  assert {v.dtype for v in params.values()} == {np.dtype(jnp.bfloat16)}
  # Bit-exact against the stored tensors (uint16 views): no rounding happened on the way.
  stored = load_torch_model(ckpts["bf16"], dtype=torch.bfloat16).state_dict()
  ours = params["decoder/q_LDNH"][1].reshape(64, -1).T
  theirs = stored["model.language_model.layers.1.self_attn.q_proj.weight"]
  np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(torch.int16).numpy().view(np.uint16))
  embed = stored["model.language_model.embed_tokens.weight"]
  np.testing.assert_array_equal(params["decoder/embed_VD"].view(np.uint16),
                                embed.view(torch.int16).numpy().view(np.uint16))


def test_bf16_checkpoint_with_float32_request(ckpts):
  params32 = _params(load_hf(ckpts["bf16"], dtype=jnp.float32))
  params16 = _params(load_hf(ckpts["bf16"]))
  for name, p in params32.items():
    assert p.dtype == np.float32
    np.testing.assert_array_equal(p, params16[name].astype(np.float32), err_msg=name)


def test_load_transformers5_in_memory_names(ckpts, tmp_path):
  # A file written straight from a transformers-5 state_dict uses model.language_model.* / model.visual.* names,
  # and a tied model's state_dict also lists lm_head.weight (the shared matrix).
  hf = load_torch_model(ckpts["single"])
  state = {k: v.detach().contiguous().numpy() for k, v in hf.state_dict().items()}
  assert "model.language_model.layers.0.self_attn.q_proj.weight" in state and "lm_head.weight" in state
  shutil.copy(os.path.join(ckpts["single"], "config.json"), tmp_path / "config.json")
  save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  renamed, original = _params(load_hf(str(tmp_path))), _params(load_hf(ckpts["single"]))
  assert renamed.keys() == original.keys()
  for name in original:
    np.testing.assert_array_equal(renamed[name], original[name], err_msg=name)


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("which,shard_bytes", [("single", 2**30), ("untied", 40_000)])
def test_export_round_trip_through_transformers(ckpts, batch, tmp_path, which, shard_bytes):
  model = load_hf(ckpts[which])
  ours = np.asarray(forward(model, **batch))
  save_hf(model, str(tmp_path), max_shard_bytes=shard_bytes)
  files = os.listdir(tmp_path)
  assert ("model.safetensors.index.json" in files) == (shard_bytes < 2**30)
  exported, info = type(load_torch_model(ckpts[which])).from_pretrained(
      str(tmp_path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  exported.eval()
  # Every tensor equals the original checkpoint's, and the logits match ours.
  original = load_torch_model(ckpts[which]).state_dict()
  for key, value in exported.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), original[key].numpy(), err_msg=key)
  np.testing.assert_allclose(_valid(_torch_logits(exported, batch), batch), _valid(ours, batch), atol=1e-4, rtol=0)
  # And our loader reads the export back to the same parameters.
  again = _params(load_hf(str(tmp_path)))
  for name, p in _params(model).items():
    np.testing.assert_array_equal(again[name], p, err_msg=name)


def test_export_bf16_keeps_dtype(ckpts, tmp_path):
  save_hf(load_hf(ckpts["bf16"]), str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  tensors = safetensors_io.SafetensorsFile(str(tmp_path / "model.safetensors"))
  assert {tensors.get(k).dtype for k in tensors.keys()} == {np.dtype(ml_dtypes.bfloat16)}
  exported = load_torch_model(str(tmp_path), dtype=torch.bfloat16).state_dict()
  original = load_torch_model(ckpts["bf16"], dtype=torch.bfloat16).state_dict()
  for key in original:
    assert torch.equal(exported[key], original[key]), key


# ---------------------------------------------------------------- clear errors on broken directories


def _copy(src, tmp_path):
  dst = tmp_path / "broken"
  shutil.copytree(src, dst)
  return dst


def _edit_single(path, fn):
  tensors = load_file(str(path / "model.safetensors"))
  fn(tensors)
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_error_missing_shard(ckpts, tmp_path):
  path = _copy(ckpts["sharded"], tmp_path)
  victim = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[3]
  os.remove(path / victim)
  with pytest.raises(FileNotFoundError, match=victim):
    load_hf(str(path))


def test_error_missing_key(ckpts, tmp_path):
  path = _copy(ckpts["single"], tmp_path)
  key = "model.layers.1.mlp.up_proj.weight"
  _edit_single(path, lambda t: t.pop(key))
  with pytest.raises(KeyError, match=key) as info:
    load_hf(str(path))
  assert str(path) in str(info.value)


def test_error_missing_key_listed_in_index(ckpts, tmp_path):
  path = _copy(ckpts["sharded"], tmp_path)
  with open(path / "model.safetensors.index.json") as f:
    index = json.load(f)
  key = "visual.blocks.0.attn.qkv.bias"
  shard = index["weight_map"][key]
  tensors = load_file(str(path / shard))
  tensors.pop(key)
  if not tensors:
    tensors["visual.dummy"] = np.zeros(1, np.float32)
  save_file(tensors, str(path / shard), metadata={"format": "pt"})
  with pytest.raises(KeyError, match=key):
    load_hf(str(path))


def test_error_unexpected_key(ckpts, tmp_path):
  path = _copy(ckpts["single"], tmp_path)
  key = "model.layers.0.self_attn.extra.weight"
  _edit_single(path, lambda t: t.__setitem__(key, np.zeros((2, 2), np.float32)))
  with pytest.raises(KeyError, match=key) as info:
    load_hf(str(path))
  assert "model.safetensors" in str(info.value)


@pytest.mark.parametrize("key,shape", [
    ("model.layers.0.input_layernorm.weight", (65,)),  # maps through unchanged
    ("model.layers.0.self_attn.k_proj.weight", (48, 64)),  # [K*H, D] = [32, 64]: does not split into heads
    ("model.layers.1.mlp.up_proj.weight", (100, 64)),  # [F, D] = [128, 64], in a layer other than the first
    ("visual.blocks.1.attn.qkv.weight", (96, 30)),  # [3E, E] = [96, 32]
])
def test_error_shape_mismatch(ckpts, tmp_path, key, shape):
  path = _copy(ckpts["single"], tmp_path)
  _edit_single(path, lambda t: t.__setitem__(key, np.zeros(shape, np.float32)))
  with pytest.raises(ValueError, match=key.replace(".", "[.]")) as info:
    load_hf(str(path))
  assert "model.safetensors" in str(info.value) and str(shape[0]) in str(info.value)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava"])
def test_error_not_qwen25vl(ckpts, tmp_path, model_type):
  path = _copy(ckpts["single"], tmp_path)
  with open(path / "config.json") as f:
    raw = json.load(f)
  raw["model_type"] = model_type
  with open(path / "config.json", "w") as f:
    json.dump(raw, f)
  with pytest.raises(ValueError, match=model_type):
    load_hf(str(path))


def test_error_no_config_or_weights(ckpts, tmp_path):
  path = _copy(ckpts["single"], tmp_path)
  os.remove(path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="safetensors"):
    load_hf(str(path))
  os.remove(path / "config.json")
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_hf(str(path))
