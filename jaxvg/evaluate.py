r"""Accuracy of a policy on a held-out split: avg@k over k samples per prompt, or greedy.

  python -m jaxvg.evaluate --config configs/demo.py --params runs/demo [--k 8 --temperature 1.0]
  python -m jaxvg.evaluate --config configs/demo.py --hf path/to/hf_dir
"""

import argparse
import json
import os
import sys

import jax
import numpy as np

from jaxvg import builders, checkpoint, config_lib, rewards, rollout


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
  args = parser.parse_args(argv)
  cfg = config_lib.apply_overrides(config_lib.load_config(args.config), args.set)
  if args.hf:
    cfg = config_lib.override(cfg, f"model.hf_path={args.hf}")
  tokenizer, model = builders.build_model(cfg.model, cfg.data)
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
  fmt = builders.prompt_format(cfg.data)
  batches = builders.make_eval_data(cfg.data, tokenizer, model.cfg)
  acc = accuracy(graphdef, params, batches, tokenizer=tokenizer, fmt=fmt,
                 reward_fn=rewards.load_reward_fn(cfg.algo.reward_fn), max_new_tokens=cfg.rollout.max_new_tokens,
                 stop_token_ids=builders.stop_token_ids(tokenizer), greedy=args.greedy or args.k == 1, k=args.k,
                 temperature=args.temperature)
  print(json.dumps({"accuracy": acc, "k": args.k, "greedy": args.greedy or args.k == 1,
                    "prompts": sum(int(np.asarray(b.prompts.valid_B).sum()) for b in batches)}))
  return acc


if __name__ == "__main__":
  main(sys.argv[1:])
