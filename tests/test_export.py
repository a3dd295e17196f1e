"""Export: a trained checkpoint becomes an HF directory that transformers loads, with logits equal to jaxvg's on an
image prompt; the Checkpointer's steps export too (newest readable, or the one asked for), in bf16 if asked, with the
tokenizer and processor files alongside.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLForConditionalGeneration

from jaxvg import export
from jaxvg.models import forward, load_hf, Qwen25VL
from jaxvg.rl import update
from jaxvg.run import checkpoint
from model_inputs import images_to_pixels
from test_rollout import unit_scale

CONFIG = '''
from jaxvg.run.experiment import Config, ModelCfg


def get_config():
  return Config(model=ModelCfg(preset="tiny", tiny_width=64, tiny_layers=2, seed=0))
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A config file and a unit-scale random model of its architecture (as if trained)."""
  tmp = tmp_path_factory.mktemp("run")
  config_path = tmp / "tiny_config.py"
  config_path.write_text(CONFIG)
  from jaxvg.core import config_lib
  cfg = config_lib.load_config(str(config_path))
  mcfg = export.model_config(cfg)
  model = unit_scale(nnx.eval_shape(lambda: Qwen25VL(mcfg, rngs=nnx.Rngs(0))), seed=4)
  return cfg, str(config_path), model, tmp


def image_prompt(mcfg):
  """Two left-padded rows: text, one 56x56 image (4 merged tokens), text; and a text-only row."""
  pixels, grid = images_to_pixels([(56, 56)], seed=1)
  rng = np.random.default_rng(1)
  text = lambda n: rng.integers(1, 100, n).tolist()  # plain BPE ids, clear of the special tokens at the end
  rows = [text(5) + [mcfg.vision_start_token_id] + [mcfg.image_token_id] * 4 + [mcfg.vision_end_token_id] + text(3),
          text(7)]
  T = max(map(len, rows))
  ids = np.zeros((2, T), np.int64)
  mask = np.zeros((2, T), np.int64)
  for b, r in enumerate(rows):
    ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
  return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == mcfg.image_token_id).astype(np.int64),
              pixel_values=pixels, image_grid_thw=grid)


def test_exported_directory_loads_in_transformers_with_equal_logits(run):
  cfg, config_path, model, tmp = run
  graphdef, params = nnx.split(model, nnx.Param)
  checkpoint.save_params(str(tmp / "final"), graphdef, params)
  out = str(tmp / "hf")
  export.main(["--config", config_path, "--params", str(tmp / "final"), "--out", out])

  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "preprocessor_config.json"):
    assert os.path.isfile(os.path.join(out, name)), name
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "float32"

  batch = image_prompt(model.cfg)
  ours = np.asarray(forward(model, **batch))
  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
  with torch.no_grad():
    theirs = hf(**{k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}).logits.numpy()
  real = batch["attention_mask"].astype(bool)
  assert np.abs(ours[real]).max() > 1.0  # unit-scale weights: logits far from zero, so the match means something
  np.testing.assert_allclose(ours[real], theirs[real], atol=2e-4, rtol=2e-4)


def _params_of(path):
  return {"/".join(map(str, k)): np.asarray(v.get_value(), np.float32)
          for k, v in nnx.to_flat_state(nnx.state(load_hf(path), nnx.Param))}


def test_checkpointer_steps_export_newest_or_asked_for(run):
  cfg, config_path, model, tmp = run
  import optax
  state = update.init_state(model, optax.sgd(1.0))
  shifted = state.replace(params=jax.tree.map(lambda x: x + 1.0, state.params), step=state.step + 1)
  ckpt = checkpoint.Checkpointer(str(tmp / "ckpts"))
  ckpt.save(1, state)
  ckpt.save(2, shifted)
  ckpt.close()
  want = lambda st: {"/".join(map(str, k)): np.asarray(v.get_value())
                     for k, v in nnx.to_flat_state(st.params)}

  export.main(["--config", config_path, "--params", str(tmp / "ckpts"), "--out", str(tmp / "newest")])
  got = _params_of(str(tmp / "newest"))
  assert got.keys() == want(shifted).keys()
  for name, value in want(shifted).items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)

  export.main(["--config", config_path, "--params", str(tmp / "ckpts"), "--step", "1", "--out", str(tmp / "first"),
               "--dtype", "bfloat16"])
  with open(tmp / "first" / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  got = _params_of(str(tmp / "first"))
  for name, value in want(state).items():
    np.testing.assert_array_equal(got[name], np.asarray(jnp.asarray(value).astype(jnp.bfloat16), np.float32),
                                  err_msg=name)


def test_export_errors_name_the_problem(run):
  cfg, _, model, tmp = run
  with pytest.raises(FileNotFoundError, match="no such directory"):
    export.export(cfg, str(tmp / "missing"), str(tmp / "x"))
  graphdef, params = nnx.split(model, nnx.Param)
  checkpoint.save_params(str(tmp / "p"), graphdef, params)
  with pytest.raises(ValueError, match="not a directory of training steps"):
    export.export(cfg, str(tmp / "p"), str(tmp / "x"), step=3)
  with pytest.raises(ValueError, match="--dtype 'int8'"):
    export.export(cfg, str(tmp / "p"), str(tmp / "x"), dtype="int8")
