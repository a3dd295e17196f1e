"""Supervised warm start on reference solutions (the synthetic dataset ships one per record).

A tiny random model cannot earn any reward, so the demo first teaches it the answer format and the tasks with a
short supervised stage; RL then improves on that. The result is saved under `out_dir/sft` and reused by later runs
with the same config (the stage is skipped when its checkpoint exists).
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvg import builders, checkpoint, hosts, metrics, optim, sharding, update
from jaxvg.data import processing, synthetic
from jaxvg.scoring import PromptInputs

log = logging.getLogger("jaxvg")


def reference_batches(cfg, tokenizer, model_cfg, *, start: int = 0):
  """Yields (Batch, solution tokens [B, L], mask [B, L]) over the synthetic train split, forever."""
  if cfg.data.source != "synthetic":
    raise ValueError("the supervised warm start needs reference solutions: only data.source='synthetic' has them")
  fmt = builders.prompt_format(cfg.data)
  processor = processing.make_processor(tokenizer, builders.prompt_config(cfg.data))
  src = builders.source(cfg.data, "train")
  eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
  B = cfg.data.prompts_per_batch
  index = start
  while True:
    examples, solutions = [], []
    while len(examples) < B:
      record = src[index % len(src)]
      index += 1
      try:
        example = processing.process_record(processor, record)
      except processing.RecordError as e:
        log.warning("warm start: skipped record %s (%s)", record.get("id"), e.reason)
        continue
      text = synthetic.render_solution(record["solution"], record["answer"], fmt=fmt).text
      examples.append(example)
      solutions.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
    L = _bucket(max(map(len, solutions)))
    tokens = np.full((B, L), int(tokenizer.pad_token_id), np.int32)
    mask = np.zeros((B, L), np.int32)
    for b, s in enumerate(solutions):
      s = s[:L]
      tokens[b, :len(s)], mask[b, :len(s)] = s, 1
    yield builders.collate_examples(examples, cfg.data, tokenizer, model_cfg), tokens, mask


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
  signature = {"model": repr(cfg.model), "data": repr(cfg.data), "sft": repr(cfg.sft), "optim": repr(cfg.sft_optim),
               **({} if origin == "init" else {"origin": origin})}
  if cfg.sft.reuse and os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == signature:
        log.info("warm start: reusing %s", path)
        return nnx.merge(graphdef, checkpoint.restore_params(os.path.join(path, "params"), params))
  tx = optim.make_optimizer(cfg.sft_optim, params)
  state = update.init_state(model, tx)
  step_fn = jax.jit(lambda s, b: update.sft_step(s, b, tx=tx), donate_argnums=(0,))
  progress = metrics.Progress(cfg.sft.steps, desc=f"warm start ({name})")
  batches = reference_batches(cfg, tokenizer, model.cfg)
  for step in range(cfg.sft.steps):
    batch, tokens, mask = next(batches)
    sft_batch = update.SFTBatch(_prompt(batch.prompts), tokens, mask)
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
