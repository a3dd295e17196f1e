r"""A trained checkpoint -> a Hugging Face Qwen2.5-VL directory (transformers and vLLM load it).

  python -m jaxvg.export --config configs/demo.py --params runs/demo/final --out exported/demo
  python -m jaxvg.export --config configs/demo.py --params runs/demo/checkpoints [--step 120] --out exported/demo \
      --dtype bfloat16

`--params` is either a parameter directory written by `checkpoint.save_params` (out_dir/final, out_dir/sft/params)
or a training-state directory of `checkpoint.Checkpointer` (the newest readable step, or `--step`). The config
gives the architecture: a random-init preset with the run's tokenizer, or `model.hf_path`'s config.json. The
parameters are restored into the shapes `nnx.eval_shape` gives, nothing is initialized. The tokenizer and image
processor files travel along, so the directory is complete.

Reading it back with transformers: `Qwen2_5_VLForConditionalGeneration.from_pretrained(out)`, `AutoTokenizer` and
`Qwen2VLImageProcessor(Pil).from_pretrained(out)` need nothing more; `AutoProcessor.from_pretrained(out)` also builds
Qwen2.5-VL's video processor, which needs torchvision installed.
"""

import argparse
import json
import logging
import os
import shutil
import sys

import jax.numpy as jnp
from flax import nnx

from jaxvg.core import config_lib
from jaxvg.data import tokenizer as tokenizer_lib
from jaxvg.models import ModelConfig, Qwen25VL, save_hf
from jaxvg.run import builders, checkpoint

log = logging.getLogger("jaxvg")
# Files of a tokenizer / processor directory that an HF checkpoint directory carries along.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_config(cfg) -> ModelConfig:
  """The architecture a run of `cfg` trains: the checkpoint's config.json, or the preset sized to the tokenizer."""
  if cfg.model.hf_path:
    with open(os.path.join(cfg.model.hf_path, "config.json")) as f:
      return ModelConfig.from_hf(json.load(f))
  tokenizer = tokenizer_lib.load_tokenizer(cfg.data.tokenizer)
  return builders.model_config_for(cfg.model, tokenizer)


def tokenizer_dir(cfg) -> str:
  """Where the run's tokenizer files live."""
  if cfg.data.tokenizer:
    return cfg.data.tokenizer
  return cfg.model.hf_path or str(tokenizer_lib.ASSET_DIR)


def is_state_directory(path: str) -> bool:
  """Whether `path` holds `Checkpointer` steps (integer-named directories with a params item)."""
  return any(name.isdigit() and os.path.isdir(os.path.join(path, name, "params")) for name in os.listdir(path))


def restore_model(cfg, params_path: str, *, step: int | None = None) -> Qwen25VL:
  """The trained model: the architecture of `cfg`, the parameters of `params_path`."""
  if not os.path.isdir(params_path):
    raise FileNotFoundError(f"--params {params_path}: no such directory")
  mcfg = model_config(cfg)
  param_dtype = _DTYPES[cfg.model.param_dtype]
  abstract = nnx.eval_shape(lambda: Qwen25VL(mcfg, rngs=nnx.Rngs(0), dtype=_DTYPES[cfg.model.dtype],
                                             param_dtype=param_dtype))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  if is_state_directory(params_path):
    ckpt = checkpoint.Checkpointer(params_path, read_only=True)
    params = ckpt.restore_params(step, abstract_params)
    ckpt.close()
  elif step is not None:
    raise ValueError(f"--step {step}: {params_path} is a parameter directory, not a directory of training steps")
  else:
    params = checkpoint.restore_params(params_path, abstract_params)
  return nnx.merge(graphdef, params)


def export(cfg, params_path: str, out: str, *, step: int | None = None, dtype: str | None = None,
           max_shard_bytes: int = 2 * 1024**3):
  """Writes config.json, safetensors shards and the tokenizer/processor files of the trained model to `out`."""
  if dtype is not None and dtype not in _DTYPES:
    raise ValueError(f"--dtype {dtype!r}: choose one of {tuple(_DTYPES)}")
  model = restore_model(cfg, params_path, step=step)
  save_hf(model, out, max_shard_bytes=max_shard_bytes, dtype=_DTYPES[dtype] if dtype else None)
  source = tokenizer_dir(cfg)
  copied = []
  for name in _TOKENIZER_FILES:
    if os.path.isfile(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
      copied.append(name)
  log.info("exported %s to %s (tokenizer files from %s: %s)", params_path, out, source, ", ".join(copied))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="the run's config file (configs/*.py)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--params", required=True, help="save_params directory or Checkpointer directory")
  parser.add_argument("--step", type=int, default=None, help="a Checkpointer step (default: newest readable)")
  parser.add_argument("--out", required=True, help="the Hugging Face directory to write")
  parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as trained)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
  cfg = config_lib.apply_overrides(config_lib.load_config(args.config), args.set)
  export(cfg, args.params, args.out, step=args.step, dtype=args.dtype)
  print(json.dumps({"out": os.path.abspath(args.out), "files": sorted(os.listdir(args.out))}))


if __name__ == "__main__":
  main(sys.argv[1:])
