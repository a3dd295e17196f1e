"""Hugging Face checkpoint directories in and out: config.json + single or sharded safetensors.

Loading never builds the whole model on one device: the model's shapes come from `nnx.eval_shape`, and each parameter
is assembled with `jax.make_array_from_callback`, which reads (memory-mapped) only the layers of the slice a device
holds. Checkpoint dtypes are kept (bf16 stays bf16) unless `dtype` asks otherwise.

Key names: the original checkpoints' (`model.layers.*`, `visual.*`, `lm_head.*`) are written; the transformers-5
in-memory names (`model.language_model.*`, `model.visual.*`) are also read.
"""

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxvg.models.config import ModelConfig
from jaxvg.models.safetensors_io import SafetensorsFile, save_file
from jaxvg.models.vlm import Qwen25VL

_LAYER = "{l}"


def _tables(cfg: ModelConfig):
  """(ours -> HF key and reader, HF key -> writer from ours). `w` is one HF tensor; `p` maps our names to arrays."""
  t, v = cfg.text, cfg.vision
  D, N, K, H = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim
  E, VN, VH = v.hidden_size, v.num_heads, v.head_dim
  lyr, blk = "model.layers.{l}.", "visual.blocks.{l}."
  T = lambda w: w.T
  qkv = lambda i: (lambda w: w.T.reshape(E, 3, VN, VH)[:, i])
  qkv_bias = lambda i: (lambda w: w.reshape(3, VN, VH)[i])
  read = {
      "decoder/embed_VD": ("model.embed_tokens.weight", lambda w: w),
      "decoder/head_DV": ("lm_head.weight", T),
      "decoder/final_norm_D": ("model.norm.weight", lambda w: w),
      "decoder/attn_norm_LD": (lyr + "input_layernorm.weight", lambda w: w),
      "decoder/mlp_norm_LD": (lyr + "post_attention_layernorm.weight", lambda w: w),
      "decoder/q_LDNH": (lyr + "self_attn.q_proj.weight", lambda w: w.T.reshape(D, N, H)),
      "decoder/k_LDKH": (lyr + "self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, H)),
      "decoder/v_LDKH": (lyr + "self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, H)),
      "decoder/q_bias_LNH": (lyr + "self_attn.q_proj.bias", lambda w: w.reshape(N, H)),
      "decoder/k_bias_LKH": (lyr + "self_attn.k_proj.bias", lambda w: w.reshape(K, H)),
      "decoder/v_bias_LKH": (lyr + "self_attn.v_proj.bias", lambda w: w.reshape(K, H)),
      "decoder/o_LNHD": (lyr + "self_attn.o_proj.weight", lambda w: w.T.reshape(N, H, D)),
      "decoder/gate_LDF": (lyr + "mlp.gate_proj.weight", T),
      "decoder/up_LDF": (lyr + "mlp.up_proj.weight", T),
      "decoder/down_LFD": (lyr + "mlp.down_proj.weight", T),
      "vision/patch_XE": ("visual.patch_embed.proj.weight", lambda w: w.reshape(E, -1).T),
      "vision/norm1_LE": (blk + "norm1.weight", lambda w: w),
      "vision/norm2_LE": (blk + "norm2.weight", lambda w: w),
      "vision/q_LENH": (blk + "attn.qkv.weight", qkv(0)),
      "vision/k_LENH": (blk + "attn.qkv.weight", qkv(1)),
      "vision/v_LENH": (blk + "attn.qkv.weight", qkv(2)),
      "vision/q_bias_LNH": (blk + "attn.qkv.bias", qkv_bias(0)),
      "vision/k_bias_LNH": (blk + "attn.qkv.bias", qkv_bias(1)),
      "vision/v_bias_LNH": (blk + "attn.qkv.bias", qkv_bias(2)),
      "vision/o_LNHE": (blk + "attn.proj.weight", lambda w: w.T.reshape(VN, VH, E)),
      "vision/o_bias_LE": (blk + "attn.proj.bias", lambda w: w),
      "vision/gate_LEF": (blk + "mlp.gate_proj.weight", T),
      "vision/gate_bias_LF": (blk + "mlp.gate_proj.bias", lambda w: w),
      "vision/up_LEF": (blk + "mlp.up_proj.weight", T),
      "vision/up_bias_LF": (blk + "mlp.up_proj.bias", lambda w: w),
      "vision/down_LFE": (blk + "mlp.down_proj.weight", T),
      "vision/down_bias_LE": (blk + "mlp.down_proj.bias", lambda w: w),
      "vision/merger_norm_E": ("visual.merger.ln_q.weight", lambda w: w),
      "vision/merger_fc1_MM": ("visual.merger.mlp.0.weight", T),
      "vision/merger_fc1_bias_M": ("visual.merger.mlp.0.bias", lambda w: w),
      "vision/merger_fc2_MD": ("visual.merger.mlp.2.weight", T),
      "vision/merger_fc2_bias_D": ("visual.merger.mlp.2.bias", lambda w: w),
  }
  if t.tie_word_embeddings:
    del read["decoder/head_DV"]
  one = lambda name: (lambda p: p[name])
  write = {
      "model.embed_tokens.weight": one("decoder/embed_VD"),
      "model.norm.weight": one("decoder/final_norm_D"),
      lyr + "input_layernorm.weight": one("decoder/attn_norm_LD"),
      lyr + "post_attention_layernorm.weight": one("decoder/mlp_norm_LD"),
      lyr + "self_attn.q_proj.weight": lambda p: p["decoder/q_LDNH"].reshape(D, N * H).T,
      lyr + "self_attn.k_proj.weight": lambda p: p["decoder/k_LDKH"].reshape(D, K * H).T,
      lyr + "self_attn.v_proj.weight": lambda p: p["decoder/v_LDKH"].reshape(D, K * H).T,
      lyr + "self_attn.q_proj.bias": lambda p: p["decoder/q_bias_LNH"].reshape(-1),
      lyr + "self_attn.k_proj.bias": lambda p: p["decoder/k_bias_LKH"].reshape(-1),
      lyr + "self_attn.v_proj.bias": lambda p: p["decoder/v_bias_LKH"].reshape(-1),
      lyr + "self_attn.o_proj.weight": lambda p: p["decoder/o_LNHD"].reshape(N * H, D).T,
      lyr + "mlp.gate_proj.weight": lambda p: p["decoder/gate_LDF"].T,
      lyr + "mlp.up_proj.weight": lambda p: p["decoder/up_LDF"].T,
      lyr + "mlp.down_proj.weight": lambda p: p["decoder/down_LFD"].T,
      "visual.patch_embed.proj.weight": lambda p: p["vision/patch_XE"].T.reshape(
          E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
      blk + "norm1.weight": one("vision/norm1_LE"),
      blk + "norm2.weight": one("vision/norm2_LE"),
      blk + "attn.qkv.weight": lambda p: np.stack(
          [p["vision/q_LENH"], p["vision/k_LENH"], p["vision/v_LENH"]], axis=1).reshape(E, 3 * E).T,
      blk + "attn.qkv.bias": lambda p: np.stack(
          [p["vision/q_bias_LNH"], p["vision/k_bias_LNH"], p["vision/v_bias_LNH"]]).reshape(-1),
      blk + "attn.proj.weight": lambda p: p["vision/o_LNHE"].reshape(E, E).T,
      blk + "attn.proj.bias": one("vision/o_bias_LE"),
      blk + "mlp.gate_proj.weight": lambda p: p["vision/gate_LEF"].T,
      blk + "mlp.gate_proj.bias": one("vision/gate_bias_LF"),
      blk + "mlp.up_proj.weight": lambda p: p["vision/up_LEF"].T,
      blk + "mlp.up_proj.bias": one("vision/up_bias_LF"),
      blk + "mlp.down_proj.weight": lambda p: p["vision/down_LFE"].T,
      blk + "mlp.down_proj.bias": one("vision/down_bias_LE"),
      "visual.merger.ln_q.weight": one("vision/merger_norm_E"),
      "visual.merger.mlp.0.weight": lambda p: p["vision/merger_fc1_MM"].T,
      "visual.merger.mlp.0.bias": one("vision/merger_fc1_bias_M"),
      "visual.merger.mlp.2.weight": lambda p: p["vision/merger_fc2_MD"].T,
      "visual.merger.mlp.2.bias": one("vision/merger_fc2_bias_D"),
  }
  if not t.tie_word_embeddings:
    write["lm_head.weight"] = lambda p: p["decoder/head_DV"].T
  return read, write


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """The shape of every checkpoint tensor (per-layer keys as templates) that `cfg` implies."""
  t, v = cfg.text, cfg.vision
  D, F, V, NH, KH = t.hidden_size, t.intermediate_size, t.vocab_size, t.num_heads * t.head_dim, \
      t.num_kv_heads * t.head_dim
  E, VF, M = v.hidden_size, v.intermediate_size, v.hidden_size * v.merge_unit
  lyr, blk = "model.layers.{l}.", "visual.blocks.{l}."
  shapes = {
      "model.embed_tokens.weight": (V, D), "lm_head.weight": (V, D), "model.norm.weight": (D,),
      lyr + "input_layernorm.weight": (D,), lyr + "post_attention_layernorm.weight": (D,),
      lyr + "self_attn.q_proj.weight": (NH, D), lyr + "self_attn.q_proj.bias": (NH,),
      lyr + "self_attn.k_proj.weight": (KH, D), lyr + "self_attn.k_proj.bias": (KH,),
      lyr + "self_attn.v_proj.weight": (KH, D), lyr + "self_attn.v_proj.bias": (KH,),
      lyr + "self_attn.o_proj.weight": (D, NH), lyr + "mlp.gate_proj.weight": (F, D),
      lyr + "mlp.up_proj.weight": (F, D), lyr + "mlp.down_proj.weight": (D, F),
      "visual.patch_embed.proj.weight": (E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
      blk + "norm1.weight": (E,), blk + "norm2.weight": (E,), blk + "attn.qkv.weight": (3 * E, E),
      blk + "attn.qkv.bias": (3 * E,), blk + "attn.proj.weight": (E, E), blk + "attn.proj.bias": (E,),
      blk + "mlp.gate_proj.weight": (VF, E), blk + "mlp.gate_proj.bias": (VF,), blk + "mlp.up_proj.weight": (VF, E),
      blk + "mlp.up_proj.bias": (VF,), blk + "mlp.down_proj.weight": (E, VF), blk + "mlp.down_proj.bias": (E,),
      "visual.merger.ln_q.weight": (E,), "visual.merger.mlp.0.weight": (M, M), "visual.merger.mlp.0.bias": (M,),
      "visual.merger.mlp.2.weight": (D, M), "visual.merger.mlp.2.bias": (D,),
  }
  if t.tie_word_embeddings:
    del shapes["lm_head.weight"]
  return shapes


def _canonical(key: str) -> str:
  """transformers-5 in-memory names -> the checkpoint names this module reads and writes."""
  if key.startswith("model.language_model."):
    return "model." + key[len("model.language_model."):]
  if key.startswith("model.visual."):
    return key[len("model."):]
  return key


def _expand(template: str, num_layers: int) -> list[str]:
  return [template.replace(_LAYER, str(l)) for l in range(num_layers)] if _LAYER in template else [template]


class _Checkpoint:
  """All tensors of a checkpoint directory by canonical name, each with the file it lives in."""

  def __init__(self, path: str):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
      if not files:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                                "checkpoints are read)")
      weight_map = None
    self.files, self.where = {}, {}
    for name in files:
      full = os.path.join(path, name)
      if not os.path.exists(full):
        raise FileNotFoundError(f"{path}: shard {name} named in model.safetensors.index.json is missing")
      self.files[name] = SafetensorsFile(full)
      for key in self.files[name].keys():
        self.where[_canonical(key)] = (name, key)
    if weight_map is not None:
      for key, name in weight_map.items():
        if _canonical(key) not in self.where:
          raise KeyError(f"{path}: tensor {key!r} is listed in the index under {name} but that file lacks it")

  def get(self, key: str) -> np.ndarray:
    name, raw = self.where[key]
    return self.files[name].get(raw)

  def shape(self, key: str):
    name, raw = self.where[key]
    return self.files[name].shape(raw)


def _checkpoint_dtype(hf_config: dict, ckpt: _Checkpoint):
  name = hf_config.get("dtype") or hf_config.get("torch_dtype") or (hf_config.get("text_config") or {}).get("dtype")
  table = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
  if name in table:
    return table[name]
  first = ckpt.get("model.embed_tokens.weight")
  return jnp.dtype(first.dtype)


def load_hf(path: str, *, dtype=None, param_dtype=None, sharding: Callable[..., jax.sharding.Sharding]
            | None = None, remat: bool = False, attention_impl: str = "blocked") -> Qwen25VL:
  """Loads a local Hugging Face Qwen2.5-VL directory into a `Qwen25VL`.

  Args:
    path: directory with config.json and model.safetensors (or sharded files with an index).
    dtype: compute dtype; defaults to the checkpoint's.
    param_dtype: storage dtype of the parameters; defaults to `dtype` (bf16 checkpoints load as bf16).
    sharding: optional `fn(param_name, logical_axes, shape) -> Sharding` placing each parameter (see
      `jaxvg.core.sharding.param_sharding`);
      by default parameters go to the default device.
    remat: rematerialize each layer in the backward pass.
    attention_impl: the attention kernel (`ModelConfig.attention_impl`; how the model runs, not what it is).
  """
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{path}: no config.json")
  with open(config_path) as f:
    hf_config = json.load(f)
  cfg = dataclasses.replace(ModelConfig.from_hf(hf_config), attention_impl=attention_impl)
  ckpt = _Checkpoint(path)
  dtype = dtype or _checkpoint_dtype(hf_config, ckpt)
  param_dtype = param_dtype or dtype
  read, _ = _tables(cfg)
  for template, want in _hf_shapes(cfg).items():
    layers = cfg.text.num_layers if template.startswith("model.layers") else cfg.vision.depth
    for key in _expand(template, layers):
      if key not in ckpt.where:
        raise KeyError(f"{path}: tensor {key!r} is missing from the checkpoint")
      if tuple(ckpt.shape(key)) != want:
        name, raw = ckpt.where[key]
        raise ValueError(f"{path}/{name}: tensor {raw!r} has shape {tuple(ckpt.shape(key))}, but config.json "
                         f"implies {want}")

  abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                             remat=remat))
  graphdef, state = nnx.split(abstract)
  expected = set()
  flat = []
  for path_tuple, var in nnx.to_flat_state(state):
    name = "/".join(str(p) for p in path_tuple)
    if name not in read:
      raise KeyError(f"no checkpoint mapping for parameter {name}")
    template, fn = read[name]
    layers = cfg.text.num_layers if name.startswith("decoder/") else cfg.vision.depth
    keys = _expand(template, layers)
    expected.update(keys)
    stacked = _LAYER in template

    def fetch(index, keys=keys, fn=fn, stacked=stacked, target=var.get_value()):
      if stacked:
        rows = range(len(keys))[index[0]]
        block = np.stack([fn(ckpt.get(keys[l]))[index[1:]] for l in rows])
      else:
        block = fn(ckpt.get(keys[0]))[index]
      return np.asarray(block).astype(target.dtype)

    logical = var.get_metadata().get("logical_axes")
    shape = var.get_value().shape
    # The shape lets a placement rule replicate a dimension its mesh axes do not divide.
    target_sharding = (sharding(name, logical, shape) if sharding is not None
                       else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    flat.append((path_tuple, var.replace(jax.make_array_from_callback(shape, target_sharding, fetch))))

  unexpected = set(ckpt.where) - expected
  if cfg.text.tie_word_embeddings:
    unexpected.discard("lm_head.weight")  # Some tied checkpoints store the shared matrix twice.
  if unexpected:
    key = sorted(unexpected)[0]
    raise KeyError(f"{path}/{ckpt.where[key][0]}: unexpected tensor {ckpt.where[key][1]!r} "
                   f"({len(unexpected)} unexpected in all)")
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _to_numpy(x) -> np.ndarray:
  a = np.asarray(jax.device_get(x))
  return a.astype(ml_dtypes.bfloat16) if a.dtype == jnp.bfloat16 else a


def save_hf(model: Qwen25VL, path: str, *, max_shard_bytes: int = 2 * 1024**3, dtype=None):
  """Writes `model` as a Hugging Face directory (config.json + safetensors shards + index) transformers loads."""
  cfg = model.cfg
  os.makedirs(path, exist_ok=True)
  _, write = _tables(cfg)
  params = {"/".join(str(p) for p in k): v.get_value() for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  host = {}  # Each parameter is fetched to the host once, on first use.

  def fetch(name):
    if name not in host:
      host[name] = _to_numpy(params[name])
    return host[name]

  out_dtype = np.dtype(dtype) if dtype is not None else None
  shards, current, size = [], {}, 0
  for template, fn in write.items():
    stacked = _LAYER in template
    n = (cfg.text.num_layers if template.startswith("model.layers") else cfg.vision.depth) if stacked else 1
    for l, key in enumerate(_expand(template, n)):
      view = {k: fetch(k)[l] if stacked else fetch(k) for k in params if _needed(template, k)}
      tensor = np.ascontiguousarray(fn(view))
      if out_dtype is not None:
        tensor = tensor.astype(out_dtype)
      if current and size + tensor.nbytes > max_shard_bytes:
        shards.append(current)
        current, size = {}, 0
      current[key] = tensor
      size += tensor.nbytes
  shards.append(current)
  names = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
           if len(shards) > 1 else ["model.safetensors"])
  for name, shard in zip(names, shards):
    save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s.values())},
             "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  hf_config = cfg.to_hf()
  first = next(iter(shards[0].values()))
  hf_config["dtype"] = {np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}.get(
      first.dtype, "float32")
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)


def _is_layered(name: str) -> bool:
  """Stacked per-layer parameters carry L as the first letter of their shape suffix (q_LDNH)."""
  return name.rsplit("_", 1)[-1].startswith("L")


def _needed(template: str, name: str) -> bool:
  """Whether our parameter `name` feeds the HF tensor `template` (same tower; per-layer or not)."""
  tower = "vision/" if template.startswith("visual.") else "decoder/"
  return name.startswith(tower) and (_is_layered(name) == (_LAYER in template))
