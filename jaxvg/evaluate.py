r"""Accuracy of a policy on a held-out split: avg@k over k samples per prompt, or greedy; or on the papers'
benchmarks, read from local files (jaxvg.benchmarks, docs/benchmarks_eval.md).

  python -m jaxvg.evaluate --config configs/demo.py --params runs/demo [--k 8 --temperature 1.0]
  python -m jaxvg.evaluate --config configs/demo.py --hf path/to/hf_dir
  python -m jaxvg.evaluate --config configs/vigos_3b.py --hf path/to/hf_dir --benchmarks mathvista,mmmu \
      --data-dir path/to/benchmarks [--samples 8 --temperature 1.0] [--out results/]
"""

import argparse
import json
import os
import sys

import jax
import numpy as np

from jaxvg.core import config_lib
from jaxvg.rl import rewards, rollout
from jaxvg.run import builders, checkpoint


def scores(graphdef, params, batches, *, tokenizer, fmt, reward_fn, max_new_tokens: int, stop_token_ids,
           greedy: bool = True, k: int = 1, temperature: float = 1.0, seed: int = 0) -> np.ndarray:
  """scores_P: each valid prompt's accuracy (0/1 greedy; avg@k: the mean over its k samples), in batch order."""
  sampling = rollout.SamplingConfig(num_samples=1 if greedy else k, max_new_tokens=max_new_tokens,
                                    temperature=0.0 if greedy else temperature, stop_token_ids=tuple(stop_token_ids),
                                    pad_token_id=int(tokenizer.pad_token_id))
  key = jax.random.key(seed)
  out = []
  for batch in batches:
    key, sub = jax.random.split(key)
    p = batch.prompts
    rolls = jax.device_get(rollout.rollout(graphdef, params, input_ids_BT=p.input_ids_BT,
                                           attention_mask_BT=p.attention_mask_BT, positions_3BT=p.positions_3BT,
                                           deltas_B=p.deltas_B, vision=p.vision, key=sub, config=sampling))
    texts = builders.decode_completions(tokenizer, rolls.tokens_BT, rolls.mask_BT, prefill=fmt.prefill)
    G = sampling.num_samples
    valid_B = np.asarray(p.valid_B)
    for b in range(len(valid_B)):
      if valid_B[b]:  # rows are prompt-major: prompt b's samples are rows b G ... b G + G - 1
        out.append(np.mean([reward_fn(t, batch.answers[b], fmt=fmt)["accuracy"] for t in texts[b * G:(b + 1) * G]]))
  if not out:
    raise ValueError("the evaluation split yielded no valid prompt")
  return np.asarray(out, np.float64)


def accuracy(graphdef, params, batches, *, tokenizer, fmt, reward_fn, max_new_tokens: int, stop_token_ids,
             greedy: bool = True, k: int = 1, temperature: float = 1.0, seed: int = 0) -> float:
  """Mean accuracy over the valid prompts of `batches` (avg@k: the mean over k samples of each prompt)."""
  return float(np.mean(scores(graphdef, params, batches, tokenizer=tokenizer, fmt=fmt, reward_fn=reward_fn,
                              max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids, greedy=greedy, k=k,
                              temperature=temperature, seed=seed)))


def load_params(path: str, like):
  """The parameters `--params` names, in the structure of `like`: a parameter checkpoint (out_dir/final,
  out_dir/sft/params), or a run folder: its final/, else its newest readable training checkpoint's parameters."""
  is_params = lambda p: os.path.exists(os.path.join(p, "_METADATA"))  # what orbax writes for a pytree
  if not is_params(path) and os.path.isdir(os.path.join(path, "final")):
    path = os.path.join(path, "final")
  elif not is_params(path) and os.path.isdir(os.path.join(path, "checkpoints")):
    ckpt = checkpoint.Checkpointer(os.path.join(path, "checkpoints"), read_only=True)
    try:
      if ckpt.latest_step() is not None:
        print(f"parameters of the newest readable checkpoint in {ckpt.directory} (no final/ yet)", file=sys.stderr)
        return ckpt.restore_params(None, like)
    finally:
      ckpt.close()
  if not is_params(path):
    raise FileNotFoundError(f"--params {path}: expected a parameter checkpoint (out_dir/final, out_dir/sft/params) "
                            "or a run folder holding final/ or checkpoints/")
  return checkpoint.restore_params(path, like)


def _model_differences(params_path: str, cfg) -> str:
  """" (the run was trained with model.x=...)" when the run folder holding `params_path` says how, else ""."""
  for folder in (params_path, os.path.dirname(os.path.normpath(params_path))):
    path = os.path.join(folder, "config.json")
    if os.path.exists(path):
      with open(path) as f:
        trained = json.load(f).get("model", {})
      now = json.loads(json.dumps(config_lib.to_dict(cfg)["model"]))
      diff = [f"model.{k}={v!r}" for k, v in trained.items() if now.get(k) != v]
      return f" (the run was trained with {', '.join(diff)})" if diff else ""
  return ""


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True)
  parser.add_argument("--set", action="append", default=[])
  parser.add_argument("--params", help="a params checkpoint written by jaxvg.train (out_dir/final, out_dir/sft/"
                      "params), or a run folder (out_dir: its final/, else its newest readable checkpoint)")
  parser.add_argument("--hf", help="a Hugging Face Qwen2.5-VL directory")
  parser.add_argument("--k", type=int, default=1)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--greedy", action="store_true")
  bench = parser.add_argument_group("benchmarks (docs/benchmarks_eval.md)")
  bench.add_argument("--benchmarks", help="comma-separated benchmark names, e.g. mathvista,mathverse,mmmu "
                     "(jaxvg.benchmarks.BENCHMARKS); evaluates on them instead of the config's held-out split")
  bench.add_argument("--data-dir", help="the folder holding one folder per benchmark, as downloaded (MathVista/, ...)")
  bench.add_argument("--samples", type=int, default=1, help="completions per prompt: 1 is greedy; k > 1 samples at "
                     "--temperature and reports mean@k and pass@k")
  bench.add_argument("--prompt-format", default="raw", help="raw: each benchmark's own prompt; a jaxvg prompt format "
                     "(pgpo, vgs, vigos, ...) wraps the bare question in it")
  bench.add_argument("--out", default="benchmark_results", help="where summary.json and predictions.jsonl go")
  bench.add_argument("--limit", type=int, help="at most this many records per benchmark")
  bench.add_argument("--allow-images-outside", action="store_true",
                     help="accept image paths that resolve outside the benchmark's folder")
  args = parser.parse_args(argv)
  cfg = config_lib.apply_overrides(config_lib.load_config(args.config), args.set)
  if args.hf:
    cfg = config_lib.override(cfg, f"model.hf_path={args.hf}")
  mesh, sources = None, None
  if args.benchmarks:
    sources = _check_benchmarks(args, parser)  # every benchmark's files, before the model is built
    from jaxvg.core import sharding
    mesh = sharding.make_mesh(cfg.mesh)
  tokenizer, model = builders.build_model(cfg.model, cfg.data, mesh=mesh)
  from flax import nnx
  graphdef, params = nnx.split(model, nnx.Param)
  if args.params:
    try:
      params = load_params(args.params, params)
    except FileNotFoundError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except ValueError as e:  # orbax: a stored array of another shape
      print(f"error: --params {args.params} does not fit the model that --config and --set describe"
            f"{_model_differences(args.params, cfg)}: {e}", file=sys.stderr)
      sys.exit(2)
  if args.benchmarks:
    return _run_benchmarks(args, cfg, graphdef, params, tokenizer, model.cfg, mesh, sources)
  fmt = builders.prompt_format(cfg.data)
  batches = builders.make_eval_data(cfg.data, tokenizer, model.cfg)
  acc = accuracy(graphdef, params, batches, tokenizer=tokenizer, fmt=fmt,
                 reward_fn=rewards.load_reward_fn(cfg.algo.reward_fn), max_new_tokens=cfg.rollout.max_new_tokens,
                 stop_token_ids=builders.stop_token_ids(tokenizer), greedy=args.greedy or args.k == 1, k=args.k,
                 temperature=args.temperature)
  print(json.dumps({"accuracy": acc, "k": args.k, "greedy": args.greedy or args.k == 1,
                    "prompts": sum(int(np.asarray(b.prompts.valid_B).sum()) for b in batches)}))
  return acc


def _check_benchmarks(args, parser):
  """The benchmarks' sources (jaxvg.benchmarks.load_benchmarks), or one line naming what is wrong and exit 2."""
  from jaxvg import benchmarks
  if not args.data_dir:
    parser.error("--benchmarks needs --data-dir (the folder holding the benchmarks' files)")
  if args.samples < 1:
    parser.error(f"--samples must be >= 1, got {args.samples}")
  try:
    return benchmarks.load_benchmarks(args.benchmarks, args.data_dir, prompt_format=args.prompt_format,
                                      allow_images_outside=args.allow_images_outside, limit=args.limit)
  except (ValueError, OSError) as e:  # BenchmarkFileError, an unknown name or prompt format
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _run_benchmarks(args, cfg, graphdef, params, tokenizer, model_cfg, mesh, sources) -> dict:
  """Evaluates on the benchmarks, writes OUT/summary.json and OUT/predictions.jsonl, prints one JSON line."""
  from jaxvg import benchmarks
  os.makedirs(args.out, exist_ok=True)
  batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
  predictions = os.path.join(args.out, "predictions.jsonl")
  result = benchmarks.evaluate_benchmarks(
      graphdef, params, names=args.benchmarks, data_dir=args.data_dir, tokenizer=tokenizer, model_cfg=model_cfg,
      data_cfg=cfg.data, max_new_tokens=cfg.rollout.max_new_tokens, prompt_format=args.prompt_format,
      samples=args.samples, temperature=args.temperature, greedy=True if args.greedy else None, seed=cfg.data.seed,
      mesh=mesh if batch_axes else None, data_axes=batch_axes or ("data",), predictions_path=predictions,
      sources=sources)
  summary = os.path.join(args.out, "summary.json")
  benchmarks.write_report(result, summary)
  brief = {name: {k: v for k, v in r.items() if k not in ("categories", "source")}
           for name, r in result["benchmarks"].items()}
  print(json.dumps({"average": result["average"], "benchmarks": brief, "samples": result["samples"],
                    "greedy": result["greedy"], "prompt_format": result["prompt_format"], "summary": summary,
                    "predictions": predictions}))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
