"""Supervised warm start on reference solutions (the synthetic dataset ships one per record).

A tiny random model cannot earn any reward, so the demo first teaches it the answer format and the tasks with a
short supervised stage; RL then improves on that. The result is saved under `out_dir/sft` and reused by later runs
with the same config (the stage is skipped when its checkpoint exists).

A model trained from scratch on solutions alone learns the text prior first and never learns to look: within a few
dozen steps the merged image features turn into a constant slot the decoder ignores (white-image KL ~1e-7, see
docs/analysis.md). So the warm start opens with a *perception stage* (`sft.perception_steps`): the vision tower
and a linear probe on its merged tokens learn, per board cell, the item's kind, color, size and digit and the cell's
row and column (`synthetic.cell_labels`). Every token gets a direct label, so this takes a few hundred cheap steps
(no decoder pass); the probe is then dropped, and with the tower frozen (`sft_optim.freeze_vision`) the decoder
learns from the solutions to look up the cells it names.
"""

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxvg.core import hosts, sharding
from jaxvg.credit import groundtruth
from jaxvg.data import processing, synthetic
from jaxvg.models.vision import VisionInputs
from jaxvg.rl import optim, update
from jaxvg.rl.scoring import PromptInputs
from jaxvg.run import builders, checkpoint, metrics

log = logging.getLogger("jaxvg")


def _train_examples(cfg, tokenizer, need: str, start: int):
  """Yields (record, processed example) over the synthetic train split from `start` on, forever; a record that does
  not process is logged and skipped."""
  if cfg.data.source != "synthetic":
    raise ValueError(f"{need}: only data.source='synthetic' has them")
  processor = processing.make_processor(tokenizer, builders.prompt_config(cfg.data))
  src = builders.source(cfg.data, "train")
  index = start
  while True:
    record = src[index % len(src)]
    index += 1
    try:
      yield record, processing.process_record(processor, record)
    except processing.RecordError as e:
      log.warning("warm start: skipped record %s (%s)", record.get("id"), e.reason)


def reference_batches(cfg, tokenizer, model_cfg, *, start: int = 0):
  """Yields (Batch, solution tokens [B, L], loss weights [B, L]) over the synthetic train split, forever.

  A token's weight is 0 on padding, `cfg.sft.visual_weight` on the words that state an image fact, 1 elsewhere.
  """
  fmt = builders.prompt_format(cfg.data)
  eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
  B = cfg.sft.batch_size
  records = _train_examples(cfg, tokenizer, "the supervised warm start needs reference solutions", start)
  while True:
    examples, solutions, visual = [], [], []
    while len(examples) < B:
      record, example = next(records)
      ref = groundtruth.reference_tokens(
          tokenizer, synthetic.render_solution(record["solution"], record["solution"]["reference_answer"], fmt=fmt))
      examples.append(example)
      solutions.append(list(ref.token_ids) + [eos])
      visual.append(list(ref.is_visual) + [False])
    L = _bucket(max(map(len, solutions)))
    tokens = np.full((B, L), int(tokenizer.pad_token_id), np.int32)
    weight = np.zeros((B, L), np.float32)
    for b, (s, v) in enumerate(zip(solutions, visual)):
      tokens[b, :len(s)] = s
      weight[b, :len(s)] = np.where(v, cfg.sft.visual_weight, 1.0)
    yield builders.collate_examples(examples, cfg.data, tokenizer, model_cfg, batch_size=B), tokens, weight


_PROBE_HEADS = tuple(synthetic.CELL_CLASSES) + ("row", "col")  # the columns of synthetic.cell_labels


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PerceptionBatch:
  vision: VisionInputs
  labels_QH: jax.Array  # int32 synthetic.cell_labels per merged token (Q: every image's tokens, then padding)
  mask_Q: jax.Array     # float32, 1 on the tokens of real images


def perception_batches(cfg, tokenizer, model_cfg, *, start: int = 0):
  """Yields PerceptionBatch over the synthetic train split, forever (records from `start` on)."""
  merge = model_cfg.vision.spatial_merge_size
  records = _train_examples(cfg, tokenizer, "the perception stage needs scene labels", start)
  while True:
    examples, labels = [], []
    while len(examples) < cfg.sft.batch_size:
      record, example = next(records)
      _, h, w = (int(x) // merge for x in example.prompt.image_grid_thw_I3[0])
      examples.append(example)
      labels.append(synthetic.cell_labels(record["solution"], h, w))
    batch = builders.collate_examples(examples, cfg.data, tokenizer, model_cfg, batch_size=cfg.sft.batch_size)
    vision = batch.prompts.vision
    Q = vision.window_index_Q.shape[0]
    labels = np.concatenate(labels)
    labels_QH = np.zeros((Q, labels.shape[1]), np.int32)
    labels_QH[:len(labels)] = labels
    mask_Q = (np.arange(Q) < len(labels)).astype(np.float32)
    yield PerceptionBatch(vision, labels_QH, mask_Q)


def perception_loss(params, graphdef, probe, batch: PerceptionBatch, *, sizes: tuple[int, ...]):
  """Sum over the label columns of the token-mean cross-entropy of a linear probe on the merged image features."""
  feats_QD, _ = nnx.merge(graphdef, params)(batch.vision)
  logits_QC = feats_QD @ probe["w_DC"] + probe["b_C"]
  mask_Q = batch.mask_Q
  count = jnp.maximum(jnp.sum(mask_Q), 1.0)
  loss, metrics_ = 0.0, {}
  offsets = np.cumsum((0,) + sizes)
  for h, name in enumerate(_PROBE_HEADS):
    logits = logits_QC[:, offsets[h]:offsets[h + 1]]
    ce_Q = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels_QH[:, h])
    loss += jnp.sum(ce_Q * mask_Q) / count
    metrics_[f"perception_acc_{name}"] = jnp.sum((jnp.argmax(logits, -1) == batch.labels_QH[:, h]) * mask_Q) / count
  return loss, {"perception_loss": loss, **metrics_}


def perception_stage(cfg, model, tokenizer, writer: metrics.MetricsWriter | None = None, *, mesh=None):
  """Trains `model.vision` in place for `cfg.sft.perception_steps` steps; returns the last step's metrics."""
  graphdef, params = nnx.split(model.vision, nnx.Param)
  sizes = synthetic.cell_label_sizes(cfg.data.grid)
  D, C = model.cfg.vision.out_hidden_size, sum(sizes)
  probe = {"w_DC": jax.random.normal(jax.random.key(cfg.model.seed), (D, C), jnp.float32) * D**-0.5,
           "b_C": jnp.zeros((C,), jnp.float32)}
  tx = optax.adam(cfg.sft.perception_lr)
  opt_state = tx.init((params, probe))

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step_fn(params, probe, opt_state, batch):
    grad_fn = jax.value_and_grad(perception_loss, argnums=(0, 2), has_aux=True)
    (_, m), grads = grad_fn(params, graphdef, probe, batch, sizes=sizes)
    updates, opt_state = tx.update(grads, opt_state, (params, probe))
    params, probe = optax.apply_updates((params, probe), updates)
    return params, probe, opt_state, m

  step_fn = metrics.announce_compiles(step_fn, "perception step")
  progress = metrics.Progress(cfg.sft.perception_steps, desc="perception stage")
  batches = perception_batches(cfg, tokenizer, model.cfg)
  m = {}
  for step in range(cfg.sft.perception_steps):
    batch = next(batches)
    batch = (jax.tree.map(jnp.asarray, batch) if mesh is None
             else hosts.put(batch, sharding.batch_shardings(mesh, batch)))
    params, probe, opt_state, m = step_fn(params, probe, opt_state, batch)
    if (step + 1) % 10 == 0 or step + 1 == cfg.sft.perception_steps:
      m = jax.device_get(m)
      progress.update(step + 1, f"loss {float(m['perception_loss']):.3f}")
      if writer is not None:
        writer.write(step - cfg.sft.perception_steps - cfg.sft.steps, {f"sft/{k}": v for k, v in m.items()})
  progress.close()
  nnx.update(model.vision, params)
  return {k: float(v) for k, v in jax.device_get(m).items()}


def _bucket(n: int) -> int:
  """Solution lengths padded to a multiple of 32: a handful of compiled shapes, little padding."""
  return max(32, -(-n // 32) * 32)


def _prompt(p) -> PromptInputs:
  return PromptInputs(p.input_ids_BT, p.attention_mask_BT, p.positions_3BT, p.next_position_B, p.vision)


def warm_start(cfg, model, tokenizer, writer: metrics.MetricsWriter | None = None, *, name: str = "sft",
               origin: str = "init", mesh=None):
  """Runs (or reuses) `cfg.sft.steps` supervised steps from `model` and returns the trained model.

  The result is saved in out_dir/<name> and reused while the config and `origin` (what `model` holds) are unchanged.
  The model's arrays are donated to the first step: pass a copy to keep them. With `mesh` (the model's), batches
  are split over its batch axes; every host builds the same global batch.
  """
  graphdef, params = nnx.split(model, nnx.Param)
  path = os.path.join(cfg.train.out_dir, name)
  marker = os.path.join(path, "done.json")
  signature = {"model": cfg.model.identity(), "data": cfg.data.identity(), "sft": repr(cfg.sft), "optim": repr(cfg.sft_optim),
               **({} if origin == "init" else {"origin": origin})}
  if cfg.sft.reuse and os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == signature:
        log.info("warm start: reusing %s", path)
        return nnx.merge(graphdef, checkpoint.restore_params(os.path.join(path, "params"), params))
  if cfg.sft.perception_steps:
    m = perception_stage(cfg, model, tokenizer, writer, mesh=mesh)
    log.info("perception stage: %s", ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
    graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.make_optimizer(cfg.sft_optim, params)
  state = update.init_state(model, tx)
  step_fn = metrics.announce_compiles(
      jax.jit(lambda s, b: update.sft_step(s, b, tx=tx, max_update_ratio=cfg.sft_optim.max_update_ratio),
              donate_argnums=(0,)), f"warm-start step ({name})")
  progress = metrics.Progress(cfg.sft.steps, desc=f"warm start ({name})")
  batches = reference_batches(cfg, tokenizer, model.cfg)
  for step in range(cfg.sft.steps):
    batch, tokens, weight = next(batches)
    sft_batch = update.SFTBatch(_prompt(batch.prompts), tokens, (weight > 0).astype(np.int32), weight)
    sft_batch = (jax.tree.map(jnp.asarray, sft_batch) if mesh is None
                 else hosts.put(sft_batch, sharding.batch_shardings(mesh, sft_batch)))
    state, m = step_fn(state, sft_batch)
    if (step + 1) % 10 == 0 or step + 1 == cfg.sft.steps:
      m = jax.device_get(m)
      progress.update(step + 1, f"loss {float(m['sft_loss']):.3f}")
      if writer is not None:
        writer.write(step - cfg.sft.steps, {f"sft/{k}": v for k, v in m.items()})
  progress.close()
  checkpoint.save_params(os.path.join(path, "params"), state.graphdef, state.params)
  if jax.process_index() == 0:
    with open(marker, "w") as f:
      json.dump(signature, f)
  return nnx.merge(state.graphdef, state.params)
