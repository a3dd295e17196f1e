"""The perception stage's batches and loss: labels aligned with the merged visual tokens, and the probe's
cross-entropy written out in numpy."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxvg.core import config_lib
from jaxvg.data import synthetic
from jaxvg.run import builders, sft

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
TINY = ["sft.batch_size=3", "model.tiny_width=32", "model.tiny_layers=1", "model.tiny_vision_width=32"]


def _setup():
  cfg = config_lib.apply_overrides(config_lib.load_config(CONFIG), TINY)
  tokenizer, model = builders.build_model(cfg.model, cfg.data)
  return cfg, tokenizer, model


def test_perception_batches_label_each_images_tokens_in_order():
  cfg, tokenizer, model = _setup()
  batch = next(sft.perception_batches(cfg, tokenizer, model.cfg, start=5))
  src = builders.source(cfg.data, "train")
  want = np.concatenate([synthetic.cell_labels(src[i]["solution"], 3, 3) for i in (5, 6, 7)])
  assert batch.mask_Q.sum() == 27 and (batch.mask_Q[:27] == 1).all()
  np.testing.assert_array_equal(batch.labels_QH[:27], want)
  assert (batch.labels_QH[27:] == 0).all()
  # The processor laid out 3 images of 3 x 3 merged tokens: as many as the labels.
  assert batch.vision.window_index_Q.shape[0] >= 27


def test_perception_loss_is_the_probes_cross_entropy():
  cfg, tokenizer, model = _setup()
  batch = jax.tree.map(jnp.asarray, next(sft.perception_batches(cfg, tokenizer, model.cfg)))
  from flax import nnx
  graphdef, params = nnx.split(model.vision, nnx.Param)
  sizes = synthetic.cell_label_sizes(3)
  rng = np.random.default_rng(0)
  D = model.cfg.vision.out_hidden_size
  probe = {"w_DC": jnp.asarray(rng.normal(size=(D, sum(sizes))), jnp.float32),
           "b_C": jnp.asarray(rng.normal(size=sum(sizes)), jnp.float32)}
  loss, m = sft.perception_loss(params, graphdef, probe, batch, sizes=sizes)
  feats = np.asarray(model.vision(batch.vision)[0], np.float64)
  logits = feats @ np.asarray(probe["w_DC"], np.float64) + np.asarray(probe["b_C"], np.float64)
  real = np.asarray(batch.mask_Q) > 0
  labels = np.asarray(batch.labels_QH)
  want, start = 0.0, 0
  for h, n in enumerate(sizes):
    part = logits[real, start:start + n]
    logz = np.log(np.exp(part - part.max(1, keepdims=True)).sum(1)) + part.max(1)
    want += np.mean(logz - part[np.arange(len(part)), labels[real, h]])
    acc = np.mean(part.argmax(1) == labels[real, h])
    np.testing.assert_allclose(m[f"perception_acc_{sft._PROBE_HEADS[h]}"], acc, rtol=1e-6)
    start += n
  np.testing.assert_allclose(loss, want, rtol=1e-4)


def test_reference_batches_imitate_the_fallible_teacher():
  """With `data.teacher_error=1` the warm start's targets end in the teacher's answer (the first item it described),
  not in the graded answer: a `largest` record whose first item is small is learned wrongly."""
  cfg = config_lib.apply_overrides(config_lib.load_config(CONFIG), TINY + ["data.teacher_error=1.0"])
  tokenizer, model = builders.build_model(cfg.model, cfg.data)
  src = builders.source(cfg.data, "train")
  starts = [i for i in range(2, 200, 5) if src[i]["solution"]["scene"][0]["shape"] != src[i]["answer"]][:3]
  assert len(starts) == 3
  for i in starts:
    _, tokens, weight = next(sft.reference_batches(cfg, tokenizer, model.cfg, start=i))
    text = tokenizer.decode(tokens[0][weight[0] > 0])
    first = src[i]["solution"]["scene"][0]
    assert text.rstrip().removesuffix("<|im_end|>").endswith("\\boxed{" + first["shape"] + "}"), text
    assert f"the largest shape is the {first['shape']}." in text
    assert "\\boxed{" + src[i]["answer"] + "}" not in text
