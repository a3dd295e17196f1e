"""ModelConfig against transformers' Qwen2_5_VLConfig: both config.json layouts, round trips, errors, presets.

The reference for every field is transformers' own reading of the same dict; the preset parameter counts are
checked against transformers' model built on the meta device (no weights materialized) and against the published
sizes of the released checkpoints (3.75B, 8.29B, 33.5B, 73.4B).
"""

import copy
import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from hf_fixtures import tiny_hf_config
from jaxvg.models import ModelConfig, PRESETS, Qwen25VL, QWEN25VL_3B, QWEN25VL_7B, tiny

# The flat layout of the original Qwen2.5-VL-7B-Instruct config.json (text fields at the top level, rope_scaling
# with type "mrope", rope_theta at the top, in_chans and spatial_patch_size in the vision config).
FLAT_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}


def _assert_matches_hf(cfg: ModelConfig, hf: Qwen2_5_VLConfig):
  """Every field of `cfg` equals transformers' reading of the same config."""
  t, v, ht, hv = cfg.text, cfg.vision, hf.text_config, hf.vision_config
  assert (t.vocab_size, t.hidden_size, t.intermediate_size) == (ht.vocab_size, ht.hidden_size, ht.intermediate_size)
  assert (t.num_layers, t.num_heads, t.num_kv_heads) == (ht.num_hidden_layers, ht.num_attention_heads,
                                                         ht.num_key_value_heads)
  assert t.rms_norm_eps == ht.rms_norm_eps
  assert t.rope_theta == ht.rope_parameters["rope_theta"]
  assert list(t.mrope_section) == list(ht.rope_parameters["mrope_section"])
  assert t.tie_word_embeddings == hf.tie_word_embeddings
  assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size) == (
      hv.depth, hv.hidden_size, hv.intermediate_size, hv.num_heads, hv.out_hidden_size)
  assert list(v.fullatt_block_indexes) == list(hv.fullatt_block_indexes)
  assert (v.in_channels, v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.window_size) == (
      hv.in_channels, hv.patch_size, hv.temporal_patch_size, hv.spatial_merge_size, hv.window_size)
  assert v.rope_theta == hv.rope_parameters["rope_theta"]
  assert v.tokens_per_second == hv.tokens_per_second
  assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (
      hf.image_token_id, hf.video_token_id, hf.vision_start_token_id, hf.vision_end_token_id)


def test_from_hf_flat_original_7b():
  cfg = ModelConfig.from_hf(copy.deepcopy(FLAT_7B))
  _assert_matches_hf(cfg, Qwen2_5_VLConfig(**copy.deepcopy(FLAT_7B)))
  assert cfg.text.mrope_section == (16, 24, 24) and cfg.text.rope_theta == 1e6 and cfg.text.head_dim == 128
  assert cfg.bos_token_id == 151643 and cfg.eos_token_id == 151645
  # The 7B preset is the released checkpoint's config, 2 video tokens per second included.
  assert cfg.text == QWEN25VL_7B.text and cfg.vision == QWEN25VL_7B.vision and cfg.vision.tokens_per_second == 2


def test_from_hf_flat_reads_old_vision_names():
  flat = copy.deepcopy(FLAT_7B)
  vision = flat["vision_config"]
  del vision["patch_size"]
  vision["in_chans"], vision["spatial_patch_size"] = 1, 16
  cfg = ModelConfig.from_hf(flat)
  assert (cfg.vision.in_channels, cfg.vision.patch_size) == (1, 16)
  assert cfg.vision.patch_dim == 1 * 2 * 16 * 16


@pytest.mark.parametrize("kwargs", [dict(tie=True, kv_heads=2), dict(tie=False, kv_heads=1, window_size=112,
                                                                      fullatt=(0,), rms_norm_eps=1e-5)])
def test_from_hf_nested_transformers5(tmp_path, kwargs):
  hf = tiny_hf_config(**kwargs)
  hf.save_pretrained(tmp_path)  # the config.json transformers 5 writes: text_config / vision_config / rope_parameters
  with open(tmp_path / "config.json") as f:
    raw = json.load(f)
  assert "text_config" in raw and "rope_parameters" in raw["text_config"]
  cfg = ModelConfig.from_hf(raw)
  _assert_matches_hf(cfg, hf)
  assert cfg.text.head_dim == 16 and cfg.text.num_kv_heads == kwargs["kv_heads"]


@pytest.mark.parametrize("name", ["tiny"] + sorted(PRESETS))
def test_to_hf_round_trip_through_transformers(name):
  cfg = tiny() if name == "tiny" else PRESETS[name]
  as_dict = cfg.to_hf()
  json.dumps(as_dict)  # serializable as config.json
  hf = Qwen2_5_VLConfig(**copy.deepcopy(as_dict))
  _assert_matches_hf(cfg, hf)
  assert ModelConfig.from_hf(hf.to_dict()) == cfg
  assert ModelConfig.from_hf(as_dict) == cfg


@pytest.mark.parametrize("top,text", [(None, True), (True, None), (False, True), (True, False), (None, None)])
def test_tie_word_embeddings_read_like_transformers(top, text):
  # Pre-v5 saves put tie_word_embeddings in text_config; transformers ties when either level says so.
  raw = tiny().to_hf()
  raw.pop("tie_word_embeddings")
  raw["text_config"].pop("tie_word_embeddings")
  if top is not None:
    raw["tie_word_embeddings"] = top
  if text is not None:
    raw["text_config"]["tie_word_embeddings"] = text
  hf = Qwen2_5_VLConfig(**copy.deepcopy(raw))
  assert ModelConfig.from_hf(raw).text.tie_word_embeddings == hf.tie_word_embeddings


@pytest.mark.parametrize("drop", ["rms_norm_eps", "vision.fullatt_block_indexes", "vision.window_size", "rope_theta"])
def test_missing_keys_default_like_transformers(drop):
  # A config.json without a key means transformers' default; reading it otherwise changes the computation.
  raw = copy.deepcopy(FLAT_7B)
  if drop.startswith("vision."):
    del raw["vision_config"][drop[len("vision."):]]
  else:
    del raw[drop]
  _assert_matches_hf(ModelConfig.from_hf(copy.deepcopy(raw)), Qwen2_5_VLConfig(**raw))


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl_text", "llama", None])
def test_non_qwen25vl_config_raises_naming_model_type(model_type):
  raw = copy.deepcopy(FLAT_7B)
  raw["model_type"] = model_type
  if model_type is None:
    del raw["model_type"]
  with pytest.raises(ValueError, match=repr(model_type).replace("'", ".")):
    ModelConfig.from_hf(raw)


def test_missing_mrope_section_raises():
  raw = copy.deepcopy(FLAT_7B)
  del raw["rope_scaling"]
  with pytest.raises(ValueError, match="mrope_section"):
    ModelConfig.from_hf(raw)


@pytest.mark.parametrize("change,field", [
    (dict(text=dict(mrope_section=(16, 24, 16))), "mrope_section"),
    (dict(text=dict(num_kv_heads=3)), "num_kv_heads"),
    (dict(text=dict(num_heads=5)), "num_heads"),
    (dict(vision=dict(out_hidden_size=1000)), "out_hidden_size"),
    (dict(vision=dict(fullatt_block_indexes=(7, 32))), "fullatt_block_indexes"),
])
def test_invalid_config_raises_naming_field(change, field):
  base = QWEN25VL_3B
  text = dataclasses.replace(base.text, **change.get("text", {}))
  vision = dataclasses.replace(base.vision, **change.get("vision", {}))
  with pytest.raises(ValueError, match=field):
    ModelConfig(text=text, vision=vision)


# ---------------------------------------------------------------- presets: parameter counts without weights


def _our_param_count(cfg: ModelConfig) -> int:
  abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _torch_param_count(cfg: ModelConfig) -> int:
  with torch.device("meta"):
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg.to_hf()))
  return sum(p.numel() for p in model.parameters())  # a tied head is the embedding tensor, counted once


PUBLISHED_BILLIONS = {"qwen2.5-vl-3b": 3.75, "qwen2.5-vl-7b": 8.29, "qwen2.5-vl-32b": 33.5, "qwen2.5-vl-72b": 73.4}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_equals_transformers(name):
  cfg = PRESETS[name]
  ours, theirs = _our_param_count(cfg), _torch_param_count(cfg)
  assert ours == theirs
  digits = 2 if PUBLISHED_BILLIONS[name] < 10 else 1
  assert round(ours / 1e9, digits) == PUBLISHED_BILLIONS[name]


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_parameter_count_equals_transformers(tie):
  cfg = tiny(tie_word_embeddings=tie)
  assert _our_param_count(cfg) == _torch_param_count(cfg)
  # The untied head adds exactly V x D parameters.
  if not tie:
    assert _our_param_count(cfg) - _our_param_count(tiny()) == cfg.text.vocab_size * cfg.text.hidden_size
