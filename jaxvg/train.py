r"""RL post-training of a Qwen2.5-VL policy: sample -> reward -> score -> credit -> update.

  python -m jaxvg.train --config configs/demo.py [--set rollout.group_size=8 ...]

`run` reads top to bottom like the pipeline: the run folder, the model and data, the warm start, the step's parts
(optimizer, state and the jitted stages), then evaluate, the RL loop of `jaxvg.run.step.rl_step`, evaluate again and
save. Every device stage is a pure function jitted once.

A run folder (train.out_dir) holds one run: run again, the same command resumes it from its newest readable
checkpoint. Another configuration (beyond RESUMABLE fields, `jaxvg.run.folder`), or logs without a checkpoint to
resume from, is refused before any work unless train.overwrite is set. Ctrl-C (SIGINT) and SIGTERM save at the end of
the step and exit 130 / 143; a second Ctrl-C stops at once. Exit codes: 2 a config or run-folder error, 3 a diverged
run, 4 a checkpoint that could not be written.
"""

import argparse
import dataclasses
import logging
import os
import signal
import sys

import jax
import jax.numpy as jnp

from jaxvg import evaluate
from jaxvg.core import config_lib, hosts, sharding
from jaxvg.credit import assign, dependency
from jaxvg.data import pipeline
from jaxvg.distill import teachers
from jaxvg.rl import losses, optim, rewards, rollout, update
from jaxvg.rl import config as rl_config
from jaxvg.run import builders, checkpoint, experiment, folder, metrics, runlog, sft, step, validation
from jaxvg.run import teachers as run_teachers

log = logging.getLogger("jaxvg")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="a python file under configs/ defining get_config()")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
  return parser.parse_args(argv)


class TrainingDiverged(RuntimeError):
  """The optimizer guard skipped `train.max_skipped_updates` updates in a row."""


def main(argv=None) -> dict:
  args = parse_args(argv)
  try:
    cfg = config_lib.apply_overrides(config_lib.load_config(args.config), args.set)
    validation.validate(cfg)
    folder.check_run_folder(cfg)
  except (ValueError, KeyError, FileNotFoundError) as e:  # a mistake in the config or an override: one line, early
    print(f"config error: {e.args[0] if e.args else e}", file=sys.stderr)
    sys.exit(2)
  metrics.setup_logging(sys.stdout)
  metrics.latch_interrupts()
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


@dataclasses.dataclass
class Evaluator:
  """Greedy held-out accuracy, its white-image control and the papers' benchmarks, on the live state."""
  cfg: experiment.Config
  parts: step.StepParts
  eval_data: list
  white_data: list | None
  bench_sources: dict

  def __post_init__(self):
    self._accuracy = metrics.announce_compiles(self._greedy_accuracy, "held-out evaluation")
    self._tables = None  # the step tables of `dependency`, built on first use

  def _greedy_accuracy(self, state, data) -> float:
    p = self.parts
    return evaluate.accuracy(state.graphdef, state.params, data, tokenizer=p.tokenizer, fmt=p.fmt,
                             reward_fn=p.reward_fn, max_new_tokens=self.cfg.rollout.max_new_tokens,
                             stop_token_ids=p.sampling.stop_token_ids, greedy=self.cfg.train.eval_greedy)

  def held_out(self, state) -> float:
    return self._accuracy(state, self.eval_data)

  def white(self, state) -> float | None:  # the same split with white images: what the policy gets without looking
    return None if self.white_data is None else self._accuracy(state, self.white_data)  # same shapes: no compile

  def dependency(self, state) -> dict:
    """runlog.DEPENDENCY_FIGURES on `train.eval_dependency` held-out records ({} when 0): how much the live policy's
    reading of the reference solutions moves when the image turns white, against the generator's labels."""
    num = self.cfg.train.eval_dependency
    if not num:
      return {}
    from jaxvg import analysis
    p = self.parts
    if self._tables is None:
      self._tables = jax.tree.map(jnp.asarray, assign.step_tables(p.tokenizer, p.model_cfg.text.vocab_size))
    policy = analysis.Policy(tokenizer=p.tokenizer, graphdef=state.graphdef, params=state.params,
                             model_cfg=p.model_cfg, fmt=p.fmt, config=self.cfg, tables=self._tables)
    out = analysis.evaluate_groundtruth(policy, num=num, batch_size=self.cfg.data.prompts_per_batch,
                                        counterfactual="white_image")
    return {name: float(out[key]) for name, key in runlog.DEPENDENCY_FIGURES.items()}

  def benchmarks(self, state, at_step: int) -> dict:
    """The papers' benchmarks (train.eval_benchmarks): flat bench/... metrics; the reports go to out_dir/benchmarks."""
    if not self.bench_sources:
      return {}
    from jaxvg import benchmarks
    cfg, p = self.cfg, self.parts
    out = os.path.join(cfg.train.out_dir, "benchmarks")
    lead = jax.process_index() == 0
    result = benchmarks.evaluate_benchmarks(
        state.graphdef, state.params, names=list(self.bench_sources), data_dir=cfg.train.eval_benchmark_dir,
        tokenizer=p.tokenizer, model_cfg=p.model_cfg,
        data_cfg=cfg.data, max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.data.seed,
        mesh=p.mesh if p.batch_axes else None, data_axes=p.batch_axes or ("data",),
        predictions_path=os.path.join(out, f"predictions_{at_step}.jsonl") if lead else None,
        sources=self.bench_sources)
    if lead:
      benchmarks.write_report(result, os.path.join(out, f"summary_{at_step}.json"))
    log.info("benchmarks after step %d: average %s", at_step, result["average"])
    return benchmarks.flat_metrics(result)


def build_step_parts(cfg: experiment.Config, model, tokenizer, mesh):
  """(train state in its shards, StepParts): the optimizer, the state and every jitted stage of the RL step."""
  tx = optim.make_optimizer(cfg.optim, optim.trainable_params(model))
  state = update.init_state(model, tx)
  # Parameters and optimizer state in their shards (logical-axis tables); batches split over (data, fsdp).
  state_shardings = sharding.state_shardings(mesh, jax.eval_shape(lambda: state))
  state = hosts.put(state, state_shardings)
  batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  G, distilling = cfg.rollout.group_size, cfg.distill.method != "none"
  loss_cfg = losses.preset(cfg.algo.name, kl_coef=cfg.algo.kl_coef, entropy_coef=cfg.algo.entropy_coef,
                           **({"max_len": cfg.rollout.max_new_tokens} if cfg.algo.name == "drgrpo" else {}))
  # Each stage logs a line when it compiles (metrics.announce_compiles): minutes on a large model.
  policy_step = metrics.announce_compiles(
      jax.jit(lambda s, m: update.policy_step(s, m, tx=tx, group_size=G, loss_cfg=loss_cfg,
                                              max_update_ratio=cfg.optim.max_update_ratio),
              donate_argnums=(0,), out_shardings=(state_shardings, replicated)), "policy update")
  # The k3 KL term's reference and the default teacher are the policy at the start of RL: one frozen copy (the live
  # params are donated), shared by both.
  needs_initial = cfg.algo.kl_coef > 0 or (distilling and cfg.distill.teacher == "initial")
  initial = jax.tree.map(jnp.copy, state.params) if needs_initial else None
  teacher = run_teachers.make_teacher(cfg, model, tokenizer, initial, mesh=mesh)
  if teacher is not None and teacher.params is not initial:  # a teacher of its own: shard it like a policy
    teacher = hosts.put(teacher, sharding.state_shardings(mesh, jax.eval_shape(lambda: teacher)))
  distill = {}
  if distilling:
    distill = dict(
        teacher_pass=metrics.announce_compiles(teachers.make_teacher_pass(cfg.distill, G), "teacher pass"),
        vigos_spans=teachers.vigos_span_fn(tokenizer) if cfg.distill.method == "vigos" else None,
        distill_step=metrics.announce_compiles(
            teachers.make_step(cfg.distill, tx=tx, group_size=G, loss_cfg=loss_cfg,
                               max_update_ratio=cfg.optim.max_update_ratio,
                               out_shardings=(state_shardings, replicated)), "distillation update"),
        gradient_probe=(teachers.make_gradient_probe(cfg.distill, G) if cfg.distill.gradient_stats_every else None))
  fmt = builders.prompt_format(cfg.data)
  credit_fn = assign.make_batch_credit_fn(cfg.credit, model.cfg, tokenizer, G, fmt=fmt)
  if cfg.credit.method != "none":
    credit_fn = metrics.announce_compiles(credit_fn, f"credit ({cfg.credit.method})")
  sampling = rollout.SamplingConfig(num_samples=G, max_new_tokens=cfg.rollout.max_new_tokens,
                                    temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                    top_k=cfg.rollout.top_k, stop_token_ids=builders.stop_token_ids(tokenizer),
                                    pad_token_id=int(tokenizer.pad_token_id))
  distill_cfs, contexts = teachers.prompt_variants(cfg.distill)
  parts = step.StepParts(
      cfg=cfg, tokenizer=tokenizer, fmt=fmt, reward_fn=rewards.load_reward_fn(cfg.algo.reward_fn), sampling=sampling,
      loss_cfg=loss_cfg, estimator=rl_config.advantage_estimator(cfg.algo), model_cfg=model.cfg,
      place=lambda tree: hosts.put(tree, sharding.batch_shardings(mesh, tree)), mesh=mesh, batch_axes=batch_axes,
      sample=metrics.announce_compiles(rollout.rollout, "sampler"),
      score=metrics.announce_compiles(jax.jit(update.score_fn, static_argnums=(1, 5)), "old-policy scoring"),
      policy_step=policy_step, credit_fn=credit_fn, ref_params=initial if cfg.algo.kl_coef > 0 else None,
      teacher=teacher, distill_cfs=distill_cfs, contexts=contexts, **distill)
  return state, parts


def resume_or_evaluate(cfg: experiment.Config, state, ckpt: checkpoint.Checkpointer, data_iter,
                       evaluator: Evaluator):
  """(state, key, first step, run info): restored from the newest readable checkpoint, or fresh and evaluated."""
  if cfg.train.resume and ckpt.latest_step() is not None:
    try:  # a data state the pipeline refuses makes its step unreadable, like damaged files
      restored = ckpt.restore(None, state, apply_data=data_iter.set_state)
    except FileNotFoundError as e:
      raise validation.ConfigError(f"train.out_dir={cfg.train.out_dir} holds a previous run but {e} (the unreadable "
                                   "steps were moved aside); set train.overwrite=true to start over there") from None
    saved = ckpt.config(restored.step)
    info = {"accuracy_before": saved["accuracy_before"], "reward_curve": list(saved["reward_curve"]),
            "white_accuracy_before": saved.get("white_accuracy_before"),
            "dependency_before": saved.get("dependency_before", {})}
    log.info("resumed from step %d of %s", restored.step, ckpt.directory)
    return restored.state, restored.rng, restored.step + 1, info
  info = {"accuracy_before": evaluator.held_out(state), "reward_curve": [],
          "white_accuracy_before": evaluator.white(state), "dependency_before": evaluator.dependency(state)}
  return state, jax.random.key(cfg.train.seed), 0, info


def train_loop(parts: step.StepParts, state, key, start: int, data_iter, info: dict, *, ckpt, writer, evaluator,
               probe=None):
  """The RL steps from `start`: each step logged and checkpointed; a signal saves and exits, and a run of skipped
  updates raises TrainingDiverged. Returns the state after the last step."""
  cfg = parts.cfg
  guard, skipped_in_a_row = dependency.DependencyGuard(), 0
  method = cfg.distill.method
  desc = cfg.algo.name if not parts.distilling else method if not parts.uses_rl else f"{cfg.algo.name}+{method}"
  progress = metrics.Progress(cfg.train.steps, desc=desc, enabled=jax.process_index() == 0)
  stop = checkpoint.install_sigterm_handler(signums=(signal.SIGTERM, signal.SIGINT))
  try:
    for i in range(start, cfg.train.steps):
      state, key, result = step.rl_step(parts, state, data_iter, key, step=i, probe=probe)
      skipped_in_a_row, reason = step.count_skips(i, result.updates, skipped_in_a_row, cfg.train.max_skipped_updates)
      agg = result.metrics
      agg.update({f"data/skipped/{why}": float(n) for why, n in data_iter.skipped.items()})  # cumulative
      if "dependency/mean_image_prompts" in agg and guard.update(agg["dependency/mean_image_prompts"]):
        agg["dependency/guard_fired"] = 1.0
      info["reward_curve"].append(agg["reward/overall"])
      writer.write(i, agg, histograms={f"dependency/{k}": v for k, v in result.dep_map.items()
                                       if not k.startswith("rows/")})
      writer.write_samples(i, step.sample_rollouts(parts.tokenizer, result.drawn, result.prepared, result.dep_map,
                                                   parts.group_size, cfg.train.samples_logged))
      progress.update(i + 1, f"reward {agg['reward/overall']:.3f} acc {agg.get('reward/accuracy', 0.0):.3f}")
      if cfg.train.eval_every and (i + 1) % cfg.train.eval_every == 0 and i + 1 < cfg.train.steps:
        writer.write(i, {"eval/accuracy": evaluator.held_out(state), **evaluator.benchmarks(state, i + 1),
                         **{f"eval/{k}": v for k, v in evaluator.dependency(state).items()}})
      if skipped_in_a_row >= cfg.train.max_skipped_updates:
        ckpt.close()
        raise TrainingDiverged(
            f"step {i}: {skipped_in_a_row} updates in a row were skipped ({optim.SKIP_REASONS[reason]}); the run "
            f"stops (train.max_skipped_updates={cfg.train.max_skipped_updates}). The last good checkpoint is step "
            f"{ckpt.latest_step()} in {ckpt.directory}; lower optim.lr or check the data")
      save_or_stop(cfg, i, state, key, data_iter, info, ckpt=ckpt, stop=stop)
  finally:
    stop.uninstall()
  progress.close()
  ckpt.close()
  return state


def save_or_stop(cfg: experiment.Config, i: int, state, key, data_iter, info: dict, *, ckpt, stop):
  """The step's checkpoint (asynchronous; a failed earlier save stops the run here); after SIGTERM (preemption,
  maintenance) or Ctrl-C it saves now and exits 128 + the signal."""
  preempted = checkpoint.should_stop(stop)
  ckpt.save(i, state, rng=key, data_state=data_iter.get_state(), config={"config": config_lib.to_dict(cfg), **info},
            force=preempted)
  if preempted:
    ckpt.close()
    signum = stop.signum or signal.SIGTERM  # another process's signal: SIGTERM (preemption)
    log.warning("stopped by a signal (%s) after step %d; the checkpoint is in %s: run the same command to resume",
                signal.Signals(signum).name, i, ckpt.directory)
    sys.exit(128 + signum)


def run(cfg: experiment.Config, *, probe=None) -> dict:
  """Trains per `cfg`; `probe(state, teacher, micro)`, when given, sees each distillation update's inputs first.

  Raises validation.ConfigError before any work for a config that cannot run or a run folder holding another run
  (`folder.check_run_folder`), TrainingDiverged when the optimizer guard skips `train.max_skipped_updates` updates in a
  row (no checkpoint of non-finite weights exists), and checkpoint.SaveError when a checkpoint could not be written.
  """
  validation.validate(cfg)
  folder.check_run_folder(cfg)
  bench_sources = load_benchmark_sources(cfg)
  out_dir, lead = cfg.train.out_dir, jax.process_index() == 0
  folder.start_run_folder(cfg, lead)

  mesh = sharding.make_mesh(cfg.mesh)
  log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
  tokenizer, model = builders.build_model(cfg.model, cfg.data, mesh=mesh)
  distill_cfs, contexts = teachers.prompt_variants(cfg.distill)
  variants = tuple(dict.fromkeys(assign.counterfactuals_needed(cfg.credit) + distill_cfs))
  train_data = builders.make_train_data(cfg.data, tokenizer, model.cfg, counterfactuals=variants, contexts=contexts)
  eval_data = builders.make_eval_data(cfg.data, tokenizer, model.cfg)
  white_data = (builders.make_eval_data(cfg.data, tokenizer, model.cfg, white_image=True)
                if cfg.train.eval_white_image else None)
  writer = metrics.MetricsWriter(out_dir, enabled=lead)
  if cfg.sft.steps:
    model = sft.warm_start(cfg, model, tokenizer, writer, mesh=mesh)
  state, parts = build_step_parts(cfg, model, tokenizer, mesh)
  evaluator = Evaluator(cfg, parts, eval_data, white_data, bench_sources)

  data_iter = iter(train_data)
  ckpt = checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints"), max_to_keep=cfg.train.keep_checkpoints,
                                 save_interval_steps=cfg.train.save_every)
  state, key, start, info = resume_or_evaluate(cfg, state, ckpt, data_iter, evaluator)
  writer.drop_previous(after=start - 1)  # what earlier processes logged past the resumed step is logged again
  state = train_loop(parts, state, key, start, data_iter, info, ckpt=ckpt, writer=writer, evaluator=evaluator,
                     probe=probe)

  out = evaluate_after(cfg, state, info, evaluator)
  writer.write(cfg.train.steps, out.pop("summary"))
  checkpoint.save_params(os.path.join(out_dir, "final"), state.graphdef, state.params)
  writer.close()
  white = lambda acc: "" if acc is None else f"   (white image: {acc:.4f})"
  print(f"accuracy before: {out['accuracy_before']:.4f}{white(out['white_accuracy_before'])}")
  print(f"accuracy after: {out['accuracy_after']:.4f}{white(out['white_accuracy_after'])}")
  return out


def evaluate_after(cfg: experiment.Config, state, info: dict, evaluator: Evaluator) -> dict:
  """The run's result: its evaluations before (from `info`) and after the last step, and under "summary" what
  metrics.jsonl logs of them at the last step."""
  out = {"accuracy_before": info["accuracy_before"], "accuracy_after": evaluator.held_out(state),
         "white_accuracy_before": info["white_accuracy_before"], "white_accuracy_after": evaluator.white(state),
         "reward_curve": info["reward_curve"], "dependency_before": info["dependency_before"],
         "dependency_after": evaluator.dependency(state)}
  summary = {"eval/accuracy_before": out["accuracy_before"], "eval/accuracy_after": out["accuracy_after"],
             **evaluator.benchmarks(state, cfg.train.steps)}
  if out["white_accuracy_after"] is not None:
    summary |= {"eval/white_accuracy_before": out["white_accuracy_before"],
                "eval/white_accuracy_after": out["white_accuracy_after"]}
  for when in ("before", "after"):
    summary |= {f"eval/{k}_{when}": v for k, v in out[f"dependency_{when}"].items()}
  return {**out, "summary": summary}

if __name__ == "__main__":
  main()
