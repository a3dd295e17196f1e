r"""RL post-training of a Qwen2.5-VL policy: sample -> reward -> score -> credit -> update.

  python -m jaxvg.train --config configs/demo.py [--set rollout.group_size=8 ...]

The script reads top to bottom like the pipeline; every device stage is a pure function jitted once.

A run folder (train.out_dir) holds one run: run again, the same command resumes it from its newest readable
checkpoint. Another configuration (beyond RESUMABLE fields), or logs without a checkpoint to resume from, is refused
before any work unless train.overwrite is set. Ctrl-C (SIGINT) and SIGTERM save at the end of the step and exit 130 /
143; a second Ctrl-C stops at once. Exit codes: 2 a config or run-folder error, 3 a diverged run, 4 a checkpoint that
could not be written.
"""

import argparse
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from jaxvg import advantages as adv_lib
from jaxvg import builders, checkpoint, config_lib, credit, distill, dynamic_sampling, evaluate, experiment, losses
from jaxvg import hosts, metrics, optim, rollout, sft, sharding, update, validation
from jaxvg import rewards as rewards_lib
from jaxvg.data import pipeline

log = logging.getLogger("jaxvg")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="a python file under configs/ defining get_config()")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
  return parser.parse_args(argv)


def sample_rollouts(tokenizer, drawn, prepared, dep_map, group_size: int, count: int) -> list[dict]:
  """The first rollouts of the step for samples.jsonl; with token dependency maps (PGPO), each sample also lists its
  completion's tokens with their k3 dependency and PGPO weight (the maps' rows follow the scored micro-batches)."""
  rows = {k[len("rows/"):]: v for k, v in dep_map.items() if k.startswith("rows/")}
  draw = prepared[0]["draw"] if rows and prepared else 0
  batch, rolls, texts, scores = drawn[draw]
  tokens_NT, mask_NT = np.asarray(rolls.tokens_BT), np.asarray(rolls.mask_BT) > 0
  samples = []
  for n in range(min(count, len(texts))):
    sample = {"prompt_id": batch.ids[n // group_size], "answer": batch.answers[n // group_size],
              "completion": texts[n], **scores[n]}
    if rows:
      ids = tokens_NT[n][mask_NT[n]]
      sample["tokens"] = [tokenizer.decode([int(i)]) for i in ids]
      sample.update({name: [round(float(x), 5) for x in v[n][:len(ids)]] for name, v in rows.items()})
    samples.append(sample)
  return samples


class TrainingDiverged(RuntimeError):
  """The optimizer guard skipped `train.max_skipped_updates` updates in a row."""


# ================================================================================= The run folder
# Fields a resumed run may change: none of them changes what the steps already taken computed (the checkpoint
# restores onto any mesh). A prefix ending in "." covers a section.
RESUMABLE = ("train.steps", "train.eval_every", "train.samples_logged", "train.keep_checkpoints", "train.save_every",
             "train.resume", "train.overwrite", "train.out_dir", "train.log_every", "train.max_skipped_updates",
             "mesh.", "train.eval_benchmark")
# What train.overwrite deletes; the warm starts (sft/, teacher/) stay, reused while their signatures match.
RUN_FILES = ("checkpoints", "final", "tensorboard", "metrics.jsonl", "samples.jsonl", "config.json")


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def config_changes(before: dict, after: dict) -> dict[str, tuple]:
  """{field: (before, after)} of the dotted fields both config dicts hold that differ, RESUMABLE ones left out."""
  b, a = _flat(before), _flat(json.loads(json.dumps(after)))  # as config.json holds it: tuples are lists
  return {k: (b[k], v) for k, v in a.items() if k in b and b[k] != v and not k.startswith(RESUMABLE)}


def previous_run(out_dir: str) -> tuple[dict | None, list[int], list[int]]:
  """(config.json, the steps metrics.jsonl logs, the complete checkpoint steps) of what `out_dir` holds."""
  config, logged, saved = None, [], []
  path = os.path.join(out_dir, "config.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        config = json.load(f)
    except ValueError as e:
      raise validation.ConfigError(f"train.out_dir={out_dir}: {path} does not read ({e}); move that folder away or "
                                   "set train.overwrite=true") from None
  if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
    with open(os.path.join(out_dir, "metrics.jsonl"), "rb") as f:
      for line in f:
        try:
          logged.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
          pass  # a line cut short by a kill
  if os.path.isdir(os.path.join(out_dir, "checkpoints")):
    saved = sorted(int(n) for n in os.listdir(os.path.join(out_dir, "checkpoints")) if n.isdigit())
  return config, logged, saved


def check_run_folder(cfg: experiment.Config):
  """Raises ConfigError when `train.out_dir` holds another run: one of another configuration, or logs of RL steps
  that no checkpoint lets this run continue. Reads only; train.overwrite lets everything through."""
  t = cfg.train
  if t.overwrite:
    return
  config, logged, saved = previous_run(t.out_dir)
  if not logged and not saved:
    return  # a new folder, or one holding a warm start alone (reused only while its own signature matches)
  changes = config_changes(config, config_lib.to_dict(cfg)) if config is not None else {}
  if changes:
    listed = "; ".join(f"{k}: {json.dumps(b)} -> {json.dumps(a)}" for k, (b, a) in list(changes.items())[:8])
    more = f" and {len(changes) - 8} more" if len(changes) > 8 else ""
    short = [str(a) for _, a in changes.values() if isinstance(a, (str, int, float)) and not isinstance(a, bool)]
    tag = next((a for a in short if re.fullmatch(r"[\w.-]{1,24}", a)), "2")  # grpo -> runs/demo_grpo
    raise validation.ConfigError(
        f"train.out_dir={t.out_dir} holds a run of another configuration ({listed}{more}); choose a new "
        f"train.out_dir (e.g. --set train.out_dir={t.out_dir.rstrip('/')}_{tag}), or set train.overwrite=true to "
        f"replace that run")
  rl_steps = [s for s in logged if s >= 0]
  if saved and not t.resume:
    raise validation.ConfigError(
        f"train.out_dir={t.out_dir} holds a run with checkpoints up to step {saved[-1]} and train.resume=false; choose "
        f"a new train.out_dir, or set train.overwrite=true to start over there")
  if rl_steps and not saved:
    raise validation.ConfigError(
        f"train.out_dir={t.out_dir} holds a previous run's metrics (steps {min(rl_steps)} to {max(rl_steps)}) but no "
        f"checkpoint to resume from; choose a new train.out_dir, or set train.overwrite=true to start over there")


def _start_run_folder(cfg: experiment.Config, lead: bool):
  """train.overwrite: deletes the previous run's files; then writes config.json (atomically), once it was checked."""
  out_dir = cfg.train.out_dir
  if lead:
    if cfg.train.overwrite:
      found = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
      for name in found:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
          shutil.rmtree(path)
        else:
          os.remove(path)
      if found:
        log.warning("train.overwrite: deleted %s of the previous run in %s", ", ".join(found), out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "config.json")
    with open(f"{path}.tmp", "w") as f:
      json.dump(config_lib.to_dict(cfg), f, indent=2)
    os.replace(f"{path}.tmp", path)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("jaxvg: run folder ready")


def main(argv=None) -> dict:
  args = parse_args(argv)
  try:
    cfg = config_lib.apply_overrides(config_lib.load_config(args.config), args.set)
    validation.validate(cfg)
    check_run_folder(cfg)
  except (ValueError, KeyError, FileNotFoundError) as e:  # a mistake in the config or an override: one line, early
    print(f"config error: {e.args[0] if e.args else e}", file=sys.stderr)
    sys.exit(2)
  metrics.setup_logging(sys.stdout)
  sharding.initialize_distributed()
  try:
    return run(cfg)
  except validation.ConfigError as e:  # found out late: every checkpoint of the run folder was unreadable
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  except TrainingDiverged as e:
    log.error("%s", e)
    sys.exit(3)
  except checkpoint.SaveError as e:
    log.error("%s", e)
    sys.exit(4)
  except pipeline.NoUsableRecords as e:  # every record of a split was skipped: the data or its config is wrong
    print(f"data error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:  # Ctrl-C outside the RL loop (warm start, evaluation): nothing to save there
    log.warning("interrupted (SIGINT) outside the training loop; the newest checkpoint, if any, is where a new run "
                "of the same command resumes")
    sys.exit(128 + signal.SIGINT)


def load_benchmark_sources(cfg: experiment.Config) -> dict:
  """train.eval_benchmarks' sources, every file checked before any work; a ConfigError names what is missing."""
  if not cfg.train.eval_benchmarks:
    return {}
  from jaxvg import benchmarks
  try:
    return benchmarks.load_benchmarks(cfg.train.eval_benchmarks, cfg.train.eval_benchmark_dir,
                                      allow_images_outside=cfg.data.allow_images_outside,
                                      limit=cfg.train.eval_benchmark_limit or None)
  except (ValueError, OSError) as e:  # BenchmarkFileError, an unknown name
    raise validation.ConfigError(f"train.eval_benchmarks: {e}") from None


def run(cfg: experiment.Config, *, probe=None) -> dict:
  """Trains per `cfg`; `probe(state, teacher, micro)`, when given, sees each distillation update's inputs first.

  Raises validation.ConfigError before any work for a config that cannot run or a run folder holding another run
  (`check_run_folder`), TrainingDiverged when the optimizer guard skips `train.max_skipped_updates` updates in a row
  (no checkpoint of non-finite weights exists), and checkpoint.SaveError when a checkpoint could not be written.
  """
  validation.validate(cfg)
  check_run_folder(cfg)
  bench_sources = load_benchmark_sources(cfg)
  out_dir = cfg.train.out_dir
  lead = jax.process_index() == 0
  _start_run_folder(cfg, lead)

  # ================================================================================= Mesh, model, tokenizer, data
  mesh = sharding.make_mesh(cfg.mesh)
  batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
  log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
  tokenizer, model = builders.build_model(cfg.model, cfg.data, mesh=mesh)
  model_cfg = model.cfg
  distill.validate(cfg)
  estimator = experiment.advantage_estimator(cfg.algo)  # an inconsistent loss / advantage pair fails before any work
  distilling = cfg.distill.method != "none"
  uses_rl = not distilling or cfg.distill.rl_alpha > 0  # pure distillation needs no old log-probs, no advantages
  distill_cfs, contexts = distill.prompt_variants(cfg.distill)
  variants = tuple(dict.fromkeys(credit.counterfactuals_needed(cfg.credit) + distill_cfs))
  train_data = builders.make_train_data(cfg.data, tokenizer, model_cfg, counterfactuals=variants, contexts=contexts)
  eval_data = builders.make_eval_data(cfg.data, tokenizer, model_cfg)
  white_data = (builders.make_eval_data(cfg.data, tokenizer, model_cfg, white_image=True)
                if cfg.train.eval_white_image else None)
  fmt = builders.prompt_format(cfg.data)
  reward_fn = rewards_lib.load_reward_fn(cfg.algo.reward_fn)
  stop_ids = builders.stop_token_ids(tokenizer)
  sampling = rollout.SamplingConfig(num_samples=cfg.rollout.group_size, max_new_tokens=cfg.rollout.max_new_tokens,
                                    temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                    top_k=cfg.rollout.top_k, stop_token_ids=stop_ids,
                                    pad_token_id=int(tokenizer.pad_token_id))
  writer = metrics.MetricsWriter(out_dir, enabled=lead)

  # ================================================================================= Supervised warm start
  if cfg.sft.steps:
    model = sft.warm_start(cfg, model, tokenizer, writer, mesh=mesh)

  # ================================================================================= Optimizer and state
  tx = optim.make_optimizer(cfg.optim, optim.trainable_params(model))
  state = update.init_state(model, tx)
  # Parameters and optimizer state in their shards (logical-axis tables); batches split over (data, fsdp).
  state_shardings = sharding.state_shardings(mesh, jax.eval_shape(lambda: state))
  state = hosts.put(state, state_shardings)
  # Every host holds the same global batch (jaxvg.hosts); each device takes its slice.
  place = lambda tree: hosts.put(tree, sharding.batch_shardings(mesh, tree))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  G = cfg.rollout.group_size
  loss_cfg = losses.preset(cfg.algo.name, kl_coef=cfg.algo.kl_coef, entropy_coef=cfg.algo.entropy_coef,
                           **({"max_len": cfg.rollout.max_new_tokens} if cfg.algo.name == "drgrpo" else {}))

  # ================================================================================= Jitted stages
  # Each stage logs a line when it compiles (metrics.announce_compiles): minutes on a large model.
  policy_step = metrics.announce_compiles(
      jax.jit(lambda s, m: update.policy_step(s, m, tx=tx, group_size=G, loss_cfg=loss_cfg,
                                              max_update_ratio=cfg.optim.max_update_ratio),
              donate_argnums=(0,), out_shardings=(state_shardings, replicated)), "policy update")
  score = metrics.announce_compiles(jax.jit(update.score_fn, static_argnums=(1, 5)), "old-policy scoring")
  sample = metrics.announce_compiles(rollout.rollout, "sampler")
  # The k3 KL term's reference and the default teacher are the policy at the start of RL: one frozen copy (the live
  # params are donated), shared by both.
  needs_initial = cfg.algo.kl_coef > 0 or (distilling and cfg.distill.teacher == "initial")
  initial = jax.tree.map(jnp.copy, state.params) if needs_initial else None
  ref_params = initial if cfg.algo.kl_coef > 0 else None
  teacher = distill.make_teacher(cfg, model, tokenizer, initial, mesh=mesh)
  if teacher is not None and teacher.params is not initial:  # a teacher of its own: shard it like a policy
    teacher = hosts.put(teacher, sharding.state_shardings(mesh, jax.eval_shape(lambda: teacher)))
  if distilling:
    teacher_pass = metrics.announce_compiles(distill.make_teacher_pass(cfg, G), "teacher pass")
    vigos_spans = distill.vigos_span_fn(tokenizer) if cfg.distill.method == "vigos" else None
    distill_step = metrics.announce_compiles(
        distill.make_step(cfg, tx=tx, group_size=G, loss_cfg=loss_cfg, out_shardings=(state_shardings, replicated)),
        "distillation update")
  credit_fn = credit.make_batch_credit_fn(cfg.credit, model_cfg, tokenizer, G, fmt=fmt)
  if cfg.credit.method != "none":
    credit_fn = metrics.announce_compiles(credit_fn, f"credit ({cfg.credit.method})")

  # ================================================================================= Evaluate before
  @functools.partial(metrics.announce_compiles, name="held-out evaluation")
  def evaluate_now(state, data):
    return evaluate.accuracy(state.graphdef, state.params, data, tokenizer=tokenizer, fmt=fmt,
                             reward_fn=reward_fn, max_new_tokens=cfg.rollout.max_new_tokens,
                             stop_token_ids=stop_ids, greedy=cfg.train.eval_greedy)

  def evaluate_benchmarks(state, step: int) -> dict:
    """The papers' benchmarks (train.eval_benchmarks): flat bench/... metrics; the reports go to out_dir/benchmarks."""
    if not bench_sources:
      return {}
    from jaxvg import benchmarks
    folder = os.path.join(out_dir, "benchmarks")
    result = benchmarks.evaluate_benchmarks(
        state.graphdef, state.params, names=list(bench_sources), data_dir=cfg.train.eval_benchmark_dir,
        tokenizer=tokenizer, model_cfg=model_cfg, data_cfg=cfg.data, max_new_tokens=cfg.rollout.max_new_tokens,
        seed=cfg.data.seed, mesh=mesh if batch_axes else None, data_axes=batch_axes or ("data",),
        predictions_path=os.path.join(folder, f"predictions_{step}.jsonl") if lead else None, sources=bench_sources)
    if lead:
      benchmarks.write_report(result, os.path.join(folder, f"summary_{step}.json"))
    log.info("benchmarks after step %d: average %s", step, result["average"])
    return benchmarks.flat_metrics(result)

  def evaluate_white(state):  # the same split with white images: what the policy gets without looking
    return None if white_data is None else evaluate_now(state, white_data)  # same shapes: no new compile

  # ================================================================================= Resume, or evaluate before
  key = jax.random.key(cfg.train.seed)
  data_iter = iter(train_data)
  ckpt = checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints"), max_to_keep=cfg.train.keep_checkpoints,
                                 save_interval_steps=cfg.train.save_every)
  start, reward_curve = 0, []
  if cfg.train.resume and ckpt.latest_step() is not None:
    try:  # a data state the pipeline refuses makes its step unreadable, like damaged files
      restored = ckpt.restore(None, state, apply_data=data_iter.set_state)
    except FileNotFoundError as e:
      raise validation.ConfigError(f"train.out_dir={out_dir} holds a previous run but {e} (the unreadable steps were "
                                   f"moved aside); set train.overwrite=true to start over there") from None
    state, key, start = restored.state, restored.rng, restored.step + 1
    run_info = ckpt.config(restored.step)
    acc_before, reward_curve = run_info["accuracy_before"], list(run_info["reward_curve"])
    white_before = run_info.get("white_accuracy_before")
    log.info("resumed from step %d of %s", restored.step, ckpt.directory)
  else:
    acc_before, white_before = evaluate_now(state, eval_data), evaluate_white(state)
  writer.drop_previous(after=start - 1)  # what earlier processes logged past the resumed step is logged again

  # ================================================================================= RL loop
  guard = credit.DependencyGuard()
  skipped_in_a_row = 0
  desc = cfg.algo.name if not distilling else cfg.distill.method if not uses_rl else f"{cfg.algo.name}+{cfg.distill.method}"
  progress = metrics.Progress(cfg.train.steps, desc=desc, enabled=lead)
  stop = checkpoint.install_sigterm_handler(signums=(signal.SIGTERM, signal.SIGINT))
  try:
    for step in range(start, cfg.train.steps):
      t0 = time.time()
      times = {"data_wait": 0.0, "sample": 0.0, "reward": 0.0}

      # ---- sample and reward, with DAPO's dynamic sampling: draw prompt batches until enough informative groups
      draws = cfg.algo.minibatches * cfg.algo.micro_batches  # drawn batches per step without dynamic sampling
      target = cfg.data.prompts_per_batch * draws
      low, high = (cfg.algo.ds_low, cfg.algo.ds_high) if cfg.algo.dynamic_sampling else (-1.0, 2.0)
      accumulator = dynamic_sampling.DynamicBatch(
          target_groups=target, group_size=G, low=low, high=high,
          max_tries=max(cfg.algo.ds_max_tries * cfg.algo.micro_batches, draws) if cfg.algo.dynamic_sampling
          else draws)
      drawn = []
      while not accumulator.done:
        ts = time.time()
        batch = next(data_iter)  # with data.worker_count > 0 the records were processed meanwhile
        times["data_wait"] += time.time() - ts
        key, sample_key = jax.random.split(key)
        ts = time.time()
        p = batch.prompts
        rolls = hosts.fetch(sample(state.graphdef, state.params, input_ids_BT=p.input_ids_BT,
                                            attention_mask_BT=p.attention_mask_BT, positions_3BT=p.positions_3BT,
                                            deltas_B=p.deltas_B, vision=p.vision, key=sample_key, config=sampling,
                                            mesh=mesh if batch_axes else None, data_axes=batch_axes))
        times["sample"] += time.time() - ts
        ts = time.time()
        texts = builders.decode_completions(tokenizer, rolls.tokens_BT, rolls.mask_BT, prefill=fmt.prefill)
        scores = [reward_fn(t, batch.answers[n // G], fmt=fmt) for n, t in enumerate(texts)]
        times["reward"] += time.time() - ts
        # Filler rows of a short batch never count as kept groups.
        accuracy_N = (np.asarray([s["accuracy"] for s in scores]) if cfg.algo.dynamic_sampling
                      else np.full(len(scores), .5))
        accuracy_N = np.where(np.repeat(np.asarray(p.valid_B), G), accuracy_N, 0.0)
        accumulator.add({"try": np.full(len(scores), len(drawn)), "row": np.arange(len(scores))}, accuracy_N)
        drawn.append((batch, rolls, texts, scores))
      kept, ds_stats = accumulator.result()
      keep_rows = [np.zeros(len(d[3]), bool) for d in drawn]
      for t, r in zip(kept["try"], kept["row"]):
        keep_rows[t][r] = True

      # ---- score (old policy), advantages, credit: one micro-batch per drawn prompt batch
      ts = time.time()
      prepared, palr_skipped = [], 0
      for draw, ((batch, rolls, texts, scores), keep_N) in enumerate(zip(drawn, keep_rows)):
        if not keep_N.any():
          continue
        prompt = place(credit.as_prompt_inputs(batch.prompts))
        tokens_NT = place(jnp.asarray(rolls.tokens_BT))
        kept_mask_NT = np.asarray(rolls.mask_BT) & keep_N[:, None]
        mask_NT = place(jnp.asarray(kept_mask_NT))
        if uses_rl:
          logp_old, entropy = score(state.params, state.graphdef, prompt, tokens_NT, mask_NT, G)
        else:
          logp_old = entropy = jnp.zeros(mask_NT.shape, jnp.float32)
        logp_ref = (score(ref_params, state.graphdef, prompt, tokens_NT, mask_NT, G)[0] if ref_params is not None
                    else jnp.zeros_like(logp_old))
        rewards_N = jnp.asarray([s["overall"] for s in scores], jnp.float32)
        adv_NT = adv_lib.broadcast_to_tokens(adv_lib.group_advantages(rewards_N, G, estimator=estimator),
                                             mask_NT)
        mb = types.SimpleNamespace(prompts=batch.prompts, tokens_NT=tokens_NT, mask_NT=mask_NT, answers=batch.answers)
        prepared.append(dict(draw=draw, prompt=prompt, tokens=tokens_NT, mask=mask_NT, logp_old=logp_old,
                             logp_ref=logp_ref, entropy=entropy,
                             adv=adv_NT, mb=mb,
                             scores=[s for s, k in zip(scores, keep_N) if k], texts=texts, keep=keep_N,
                             answers=batch.answers))
        if distilling:  # the frozen teachers' pass on these rollouts, once for all epochs
          contexts_in = {"real": prompt, **{v: place(credit.counterfactual_inputs(batch.prompts, v))
                                            for v in distill_cfs + contexts}}
          # PALR swaps images between prompts: only where every prompt holds one image of one grid.
          patches = distill.uniform_image_patches(batch.prompts) if cfg.distill.palr else 0
          palr_skipped += int(cfg.distill.palr and not patches)
          spans = place(vigos_spans(rolls.tokens_BT, kept_mask_NT)) if vigos_spans else None
          prepared[-1].update(contexts=contexts_in, teacher=teacher_pass(teacher, contexts_in, tokens_NT, mask_NT,
                                                                         spans, image_patches=patches))
      credit_metrics, dep_map = {}, None
      if prepared and uses_rl:  # credit over the whole rollout batch: PACR / PDCR pool every micro-batch's steps
        advs, credit_metrics, dep_map = credit_fn(state, [d["mb"] for d in prepared], [d["logp_old"] for d in prepared],
                                                  [d["adv"] for d in prepared])
        for d, adv_NT in zip(prepared, advs):
          d["adv"] = adv_NT
      times["score"] = time.time() - ts

      # ---- update: epochs x minibatches, micro-batches accumulated into each update
      ts = time.time()
      step_metrics = []
      if prepared:
        chunks = np.array_split(np.arange(len(prepared)), min(cfg.algo.minibatches, len(prepared)))
        for _ in range(cfg.algo.epochs):
          for chunk in chunks:
            parts = [prepared[i] for i in chunk]
            weights = update.micro_weights([d["mask"] for d in parts], loss_cfg.aggregation)
            micro = tuple(update.PolicyBatch(d["prompt"], d["tokens"], d["mask"], d["logp_old"], d["adv"],
                                             d["logp_ref"], jnp.asarray(w, jnp.float32))
                          for d, w in zip(parts, weights))
            if distilling:
              norms = distill.step_normalizers(cfg.distill.method, cfg.distill, [d["mask"] for d in parts],
                                               [d["teacher"] for d in parts])
              micro = tuple(distill.DistillBatch(prompt=d["prompt"], prompt_text=d["contexts"].get("no_image"),
                                                 tokens_NT=d["tokens"], mask_NT=d["mask"], teacher=d["teacher"],
                                                 policy=pb if uses_rl else None, **n)
                            for d, pb, n in zip(parts, micro, norms))
              if probe is not None:
                probe(state, teacher, micro)
              state, m = distill_step(state, teacher, micro)
            else:
              state, m = policy_step(state, micro)
            step_metrics.append(hosts.fetch(m))
      else:
        log.warning("step %d: no informative group was sampled; no update", step)
      times["update"] = time.time() - ts
      for m in step_metrics:  # the optimizer guard's verdicts: each skipped update is named, a run of them stops
        reason = int(m["update_skip_reason"])
        skipped_in_a_row = skipped_in_a_row + 1 if reason else 0
        if reason:
          log.warning("step %d: update skipped (%s); %d in a row, the run stops at %d", step,
                      optim.SKIP_REASONS[reason], skipped_in_a_row, cfg.train.max_skipped_updates)

      # ---- metrics
      keys = dict.fromkeys(k for m in step_metrics for k in m)  # PALR parts are missing from skipped updates
      agg = {k: float(np.mean([m[k] for m in step_metrics if k in m])) for k in keys}
      if cfg.distill.palr:  # sum_t S_t A_t / sum_t S_t (A_t + I_t) over the step (vigos.palr, methods.md 4.2)
        agg["palr"] = agg["palr/num"] / max(agg["palr/den"], 1e-12) if "palr/num" in agg else float("nan")
        agg["palr/skipped_batches"] = float(palr_skipped)
      all_scores = [s for d in drawn for s in d[3]]
      for name in all_scores[0]:
        agg[f"reward/{name}"] = float(np.mean([s[name] for s in all_scores]))
      lengths = np.concatenate([np.asarray(d[1].lengths_B) for d in drawn])
      agg["response_length"] = float(lengths.mean())
      if prepared and uses_rl:
        adv_all = np.concatenate([hosts.to_numpy(d["adv"])[hosts.to_numpy(d["mask"]) > 0] for d in prepared])
        agg["adv/mean"], agg["adv/std"] = float(adv_all.mean()), float(adv_all.std())
        agg["adv/abs_max"] = float(np.abs(adv_all).max()) if adv_all.size else 0.0
        agg.update(credit_metrics)
      agg.update({f"dynamic_sampling/{k}": float(v) for k, v in dataclasses.asdict(ds_stats).items()})
      agg.update({f"time/{k}": v for k, v in times.items()})
      agg["time/step"] = time.time() - t0
      agg["tokens_per_s"] = float(lengths.sum()) / max(times["sample"], 1e-9)
      agg["skipped_updates"] = float(hosts.fetch(state.skipped))
      agg.update({f"data/skipped/{reason}": float(n) for reason, n in data_iter.skipped.items()})  # cumulative
      if "dependency/mean_image_prompts" in agg and guard.update(agg["dependency/mean_image_prompts"]):
        agg["dependency/guard_fired"] = 1.0
      reward_curve.append(agg["reward/overall"])
      dep_map = dep_map or {}
      writer.write(step, agg,
                   histograms={f"dependency/{k}": v for k, v in dep_map.items() if not k.startswith("rows/")})
      writer.write_samples(step, sample_rollouts(tokenizer, drawn, prepared, dep_map, G, cfg.train.samples_logged))
      progress.update(step + 1, f"reward {agg['reward/overall']:.3f} acc {agg.get('reward/accuracy', 0.0):.3f}")
      if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.steps:
        writer.write(step, {"eval/accuracy": evaluate_now(state, eval_data), **evaluate_benchmarks(state, step + 1)})

      if skipped_in_a_row >= cfg.train.max_skipped_updates:
        ckpt.close()
        raise TrainingDiverged(
            f"step {step}: {skipped_in_a_row} updates in a row were skipped ({optim.SKIP_REASONS[reason]}); the run "
            f"stops (train.max_skipped_updates={cfg.train.max_skipped_updates}). The last good checkpoint is step "
            f"{ckpt.latest_step()} in {ckpt.directory}; lower optim.lr or check the data")

      # ---- checkpoint (asynchronous; a failed earlier save stops the run here); on SIGTERM (preemption,
      # maintenance) or Ctrl-C save now and leave
      preempted = checkpoint.should_stop(stop)
      run_info = {"config": config_lib.to_dict(cfg), "accuracy_before": acc_before, "reward_curve": reward_curve,
                  "white_accuracy_before": white_before}
      ckpt.save(step, state, rng=key, data_state=data_iter.get_state(), config=run_info, force=preempted)
      if preempted:
        ckpt.close()
        signum = stop.signum or signal.SIGTERM  # another process's signal: SIGTERM (preemption)
        log.warning("stopped by a signal (%s) after step %d; the checkpoint is in %s: run the same command to resume",
                    signal.Signals(signum).name, step, ckpt.directory)
        sys.exit(128 + signum)
  finally:
    stop.uninstall()
  progress.close()
  ckpt.close()

  # ================================================================================= Evaluate after, save
  acc_after, white_after = evaluate_now(state, eval_data), evaluate_white(state)
  summary = {"eval/accuracy_before": acc_before, "eval/accuracy_after": acc_after,
             **evaluate_benchmarks(state, cfg.train.steps)}
  if white_data is not None:
    summary |= {"eval/white_accuracy_before": white_before, "eval/white_accuracy_after": white_after}
  writer.write(cfg.train.steps, summary)
  checkpoint.save_params(os.path.join(out_dir, "final"), state.graphdef, state.params)
  writer.close()
  white = lambda acc: "" if acc is None else f"   (white image: {acc:.4f})"
  print(f"accuracy before: {acc_before:.4f}{white(white_before)}")
  print(f"accuracy after: {acc_after:.4f}{white(white_after)}")
  return {"accuracy_before": acc_before, "accuracy_after": acc_after, "white_accuracy_before": white_before,
          "white_accuracy_after": white_after, "reward_curve": reward_curve}


if __name__ == "__main__":
  main()
