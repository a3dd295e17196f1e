"""Turning a `Config` into the run's parts: tokenizer and model, data sources and pipelines, prompt format."""

import dataclasses
import logging

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvg.data import pipeline, processing, prompts, readers, synthetic
from jaxvg.data import batch as batch_lib
from jaxvg.data.tokenizer import load_tokenizer, special_token_ids
from jaxvg.models import load_hf, ModelConfig, PRESETS, Qwen25VL
from jaxvg.models import config as model_config
from jaxvg.run.experiment import DataCfg, ModelCfg

log = logging.getLogger("jaxvg")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r}; choose one of {tuple(_DTYPES)}")
  return _DTYPES[name]


def model_config_for(cfg: ModelCfg, tokenizer) -> ModelConfig:
  """The architecture of a randomly initialized model, with the tokenizer's vocabulary and special ids."""
  ids = special_token_ids(tokenizer)
  vocab = len(tokenizer)
  if cfg.preset == "tiny":
    base = model_config.tiny(vocab_size=vocab)
    heads = cfg.tiny_heads
    text = dataclasses.replace(base.text, hidden_size=cfg.tiny_width, intermediate_size=2 * cfg.tiny_width,
                               num_layers=cfg.tiny_layers, num_heads=heads, num_kv_heads=max(heads // 2, 1),
                               mrope_section=_mrope_section(cfg.tiny_width // heads))
    vision = dataclasses.replace(base.vision, out_hidden_size=cfg.tiny_width, hidden_size=cfg.tiny_vision_width,
                                 intermediate_size=2 * cfg.tiny_vision_width)
    base = dataclasses.replace(base, text=text, vision=vision)
  elif cfg.preset in PRESETS:
    base = PRESETS[cfg.preset]
    base = dataclasses.replace(base, text=dataclasses.replace(base.text, vocab_size=max(vocab, base.text.vocab_size)))
  else:
    raise ValueError(f"model.preset={cfg.preset!r}: choose tiny or one of {tuple(PRESETS)}")
  eos = ids["<|im_end|>"]
  return dataclasses.replace(base, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                             vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                             bos_token_id=None, eos_token_id=eos, attention_impl=cfg.attention_impl)


def _mrope_section(head_dim: int) -> tuple[int, int, int]:
  """Qwen's 16/24/24 split of the rotary half-dimension, scaled to `head_dim`."""
  half = head_dim // 2
  t = max(half // 4, 1)
  h = (half - t) // 2
  return (t, h, half - t - h)


def build_model(cfg: ModelCfg, data: DataCfg, *, mesh=None):
  """(tokenizer, Qwen25VL): loaded from `cfg.hf_path` (each device reading its shards of `mesh`), or random with the
  shipped (or named) tokenizer."""
  if cfg.hf_path:
    return load_tokenizer(data.tokenizer or cfg.hf_path), load_model(cfg.hf_path, cfg, mesh=mesh)
  tokenizer = load_tokenizer(data.tokenizer)
  mcfg = model_config_for(cfg, tokenizer)
  model = Qwen25VL(mcfg, rngs=nnx.Rngs(cfg.seed), dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype),
                   remat=cfg.remat)
  if mesh is not None:  # the same random weights on every host, each device keeping its shards
    from jaxvg.core import hosts, sharding
    state = nnx.state(model)
    nnx.update(model, hosts.put(state, sharding.state_shardings(mesh, state)))
  return tokenizer, model


def load_model(path: str, cfg: ModelCfg, *, mesh=None) -> Qwen25VL:
  """A Qwen2.5-VL from a local HF directory, with `cfg`'s dtypes and remat, placed on `mesh` when given."""
  kwargs = dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), remat=cfg.remat,
                attention_impl=cfg.attention_impl)
  if mesh is None:
    return load_hf(path, **kwargs)
  from jaxvg.core import sharding  # local: the data side of the package does not need the sharding tables
  return sharding.load_hf_sharded(path, mesh, **kwargs)


def prompt_format(data: DataCfg) -> prompts.PromptFormat:
  return prompts.get_format(data.prompt_format)


def stop_token_ids(tokenizer) -> tuple[int, ...]:
  ids = special_token_ids(tokenizer)
  return tuple(sorted({ids["<|im_end|>"], ids["<|endoftext|>"]}))


def prompt_config(data: DataCfg, *, counterfactuals=(), contexts=()) -> processing.PromptConfig:
  return processing.PromptConfig(prompt_format=data.prompt_format, min_pixels=data.min_pixels,
                                 max_pixels=data.max_pixels, max_prompt_tokens=max(data.length_buckets),
                                 max_images=data.max_images, counterfactuals=tuple(counterfactuals),
                                 contexts=tuple(contexts), image_backend=data.image_backend)


def synthetic_config(data: DataCfg) -> synthetic.SyntheticConfig:
  """The synthetic generator's options from the data section."""
  return synthetic.SyntheticConfig(seed=data.seed, image_size=data.image_size, grid=data.grid,
                                   tasks=tuple(data.tasks), perception=data.perception,
                                   cell_tint=data.cell_tint, teacher_error=data.teacher_error,
                                   teacher_error_kind=data.teacher_error_kind)


def source(data: DataCfg, split: str):
  """A random-access record source for `split` ("train" or "eval")."""
  if data.source == "synthetic":
    n = data.num_train if split == "train" else data.num_eval
    syn_split = "train" if split == "train" else "test"
    return synthetic.SyntheticSource(split=syn_split, num_records=n, cfg=synthetic_config(data))
  path = data.path if split == "train" else (data.eval_path or data.path)
  if path is None:
    raise ValueError(f"data.source={data.source!r} needs data.path")
  outside = data.allow_images_outside
  if data.source == "geo3k":
    return readers.HFParquetSource(path, allow_outside=outside)
  if data.source == "verl":
    return readers.VerlParquetSource(path, allow_outside=outside)
  if data.source == "jsonl":
    return readers.JsonlSource(path, image_dir=data.image_dir, allow_outside=outside)
  raise ValueError(f"data.source={data.source!r}: choose synthetic, geo3k, verl or jsonl")


def data_config(data: DataCfg, *, shuffle: bool = True, num_epochs=None, worker_count: int = 0
                ) -> pipeline.DataConfig:
  return pipeline.DataConfig(batch_size=data.prompts_per_batch, seed=data.seed, shuffle=shuffle,
                             num_epochs=num_epochs, drop_remainder=num_epochs is None,
                             length_buckets=data.length_buckets, patch_buckets=data.patch_buckets,
                             worker_count=worker_count)


def make_train_data(data: DataCfg, tokenizer, model_cfg: ModelConfig, *, counterfactuals=(), contexts=()):
  return pipeline.make_dataset(source(data, "train"), tokenizer=tokenizer,
                               prompt=prompt_config(data, counterfactuals=counterfactuals, contexts=contexts),
                               data=data_config(data, worker_count=data.worker_count), vision=model_cfg.vision)


class WhiteImages:
  """A record source with every image replaced by a white one of its size (`processing.white_image_record`)."""

  def __init__(self, src):
    self.src = src
    self.path = getattr(src, "path", None)  # named in errors about the data

  def __len__(self) -> int:
    return len(self.src)

  def __getitem__(self, index: int) -> dict:
    return processing.white_image_record(self.src[index])


def make_eval_data(data: DataCfg, tokenizer, model_cfg: ModelConfig, *, white_image: bool = False) -> list:
  """The held-out split as a fixed list of batches (one pass, no shuffle); `white_image`: its white-image control."""
  src = source(data, "eval")
  ds = pipeline.make_dataset(WhiteImages(src) if white_image else src, tokenizer=tokenizer, prompt=prompt_config(data),
                             data=data_config(data, shuffle=False, num_epochs=1), vision=model_cfg.vision)
  return list(ds)


def collate_examples(examples, data: DataCfg, tokenizer, model_cfg: ModelConfig, *,
                     batch_size: int | None = None) -> batch_lib.Batch:
  """A batch of `batch_size` rows (default data.prompts_per_batch) in the data section's buckets."""
  v = model_cfg.vision
  return batch_lib.collate(examples, batch_size=batch_size or data.prompts_per_batch,
                           length_buckets=data.length_buckets, patch_buckets=data.patch_buckets,
                           max_images=data.max_images,
                           pad_id=int(tokenizer.pad_token_id), spatial_merge_size=v.spatial_merge_size,
                           window_size=v.window_size, patch_size=v.patch_size)


def decode_completions(tokenizer, tokens_NT, mask_NT, *, prefill: str = "") -> list[str]:
  """Completion texts (the format's prefill prepended: it is part of the answer's layout)."""
  tokens_NT, mask_NT = np.asarray(tokens_NT), np.asarray(mask_NT).astype(bool)
  return [prefill + tokenizer.decode(t[m].tolist(), skip_special_tokens=True) for t, m in zip(tokens_NT, mask_NT)]
