r"""Visual-dependency analysis of a policy: where in a completion, and where in the image, the policy uses the image.

  python -m jaxvg.analysis --run runs/demo [--num 256] [--params final|sft|teacher] [--counterfactual white_image]
  python -m jaxvg.analysis --run runs/opsd_demo --params teacher --prompt-format vigos_reference_teacher
  python -m jaxvg.analysis --hf path/to/hf_dir --config configs/demo.py
  python -m jaxvg.analysis --run runs/taught/pgpo_dapo/seed0 --params sft --task largest --num 48 --no-greedy

For given completions (the synthetic reference solutions of held-out prompts, or sampled rollouts), teacher-forced:
  token   k3_t = (r - 1) - log r, r = pi_0(y_t) / pi_I(y_t) (PGPO's estimator) and the exact full-vocabulary
          KL_t = KL(pi_I(. | s_t) || pi_0(. | s_t)), pi_0 under the counterfactual prompt (mask_visual by default);
  step    V_k = sum_{t in step k} log pi_I(y_t) - log pi_0(y_t) (PDCR's step score), the step sums of KL, and the
          Otsu split of V over all steps (visual / textual);
  PGPO    token weights from k3 and the advantages A_i before and after reweighting (A_i * w_t).
On the synthetic benchmark the generator knows which words state an image fact and which steps are perception or
reasoning (`groundtruth`): `evaluate_groundtruth` gives the AUROC of both token scores (visual words vs reasoning
words) and the accuracy of the Otsu step split, the KL by word class (visual, reasoning, answer), the teacher-forced
argmax accuracy of each class with the real image and under the counterfactual, PGPO's mean token weight on each
class (its weights average 1 per completion; DAPO's are all 1), and (unless --no-greedy) greedy
held-out accuracy with the real and with a white image: a policy that reads the image scores well above its white-image
figure. `occlusion_map` projects the dependency onto the image's patch grid.
"""

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import types
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvg import evaluate
from jaxvg.core import config_lib
from jaxvg.credit import assign, clusters, dependency, groundtruth, pgpo, steps
from jaxvg.data import processing, prompts, synthetic
from jaxvg.data import batch as batch_lib
from jaxvg.data.tokenizer import load_tokenizer
from jaxvg.distill import divergences
from jaxvg.rl import advantages, rewards, rollout, scoring
from jaxvg.rl import config as rl_config
from jaxvg.run import builders, checkpoint, experiment

# A run's RL result, its warm start and its distillation teacher, by where they lie in the run folder.
PARAMS_PATHS = {"final": ("final",), "sft": ("sft", "params"), "teacher": ("teacher", "params")}
PARAMS = tuple(PARAMS_PATHS)
SCORED_COUNTERFACTUALS = ("mask_visual", "white_image")  # the counterfactuals that keep the completion's positions
TRAIN_HINT = "train one with `python -m jaxvg.train --config configs/demo.py`"

# ----------------------------------------------------------------------------------------------- the policy


def _from_json(typ, value, key: str):
  """A JSON value as the declared field type (dataclasses recursively, lists as tuples)."""
  origin = typing.get_origin(typ)
  if dataclasses.is_dataclass(typ):
    if not isinstance(value, dict):
      raise ValueError(f"config.json: {key} must be an object, got {value!r}")
    hints = typing.get_type_hints(typ)
    unknown = set(value) - set(hints)
    if unknown:
      raise ValueError(f"config.json: unknown keys {sorted(unknown)} in {key or 'the top level'}")
    return typ(**{k: _from_json(hints[k], v, f"{key}.{k}".strip(".")) for k, v in value.items()})
  if origin in (typing.Union, types.UnionType):
    options = [t for t in typing.get_args(typ) if t is not type(None)]
    return None if value is None else _from_json(options[0], value, key)
  if origin is tuple:
    args = typing.get_args(typ)
    elem = lambda i: args[0] if len(args) == 2 and args[1] is Ellipsis else args[i]
    return tuple(_from_json(elem(i), v, key) for i, v in enumerate(value))
  return value


def load_config_json(path: str) -> experiment.Config:
  """The `Config` a training run wrote to `out_dir/config.json`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no run config at {path}: {TRAIN_HINT}")
  with open(path) as f:
    return _from_json(experiment.Config, json.load(f), "")


@dataclasses.dataclass(frozen=True)
class Policy:
  """Everything the analysis needs of one policy (the model as graphdef + params, as the jitted stages take it)."""

  tokenizer: object
  graphdef: object
  params: object
  model_cfg: object  # jaxvg.models.ModelConfig
  fmt: object  # jaxvg.data.prompts.PromptFormat
  config: experiment.Config
  tables: steps.StepTables  # the step tables over the vocabulary, as device arrays


def load_policy(*, run_dir: str | None = None, params: str = "final", hf_dir: str | None = None,
                config_path: str | None = None, prompt_format: str | None = None) -> Policy:
  """A policy from a run directory (config.json + final/ or sft/params) or from an HF directory (+ a config file).

  `params="final"` reads `run_dir/final` (the end of RL), `"sft"` the warm start `run_dir/sft/params`, `"teacher"`
  the distillation teacher `distill.teacher_sft_steps` trained (`run_dir/teacher/params`). `prompt_format` reads the
  policy in another prompt format than the run's, e.g. a teacher in the privileged context it is read in. A run of a
  preset model is restored onto the abstract model (`nnx.eval_shape`): no random initialization is run first.
  """
  if (run_dir is None) == (hf_dir is None):
    raise ValueError("give exactly one of run_dir and hf_dir")
  if params not in PARAMS:
    raise ValueError(f"params={params!r}: choose one of {PARAMS}")
  if run_dir is not None:
    if not os.path.isdir(run_dir):
      raise FileNotFoundError(f"run directory {run_dir} does not exist: {TRAIN_HINT}")
    cfg = load_config_json(os.path.join(run_dir, "config.json"))
    path = os.path.join(run_dir, *PARAMS_PATHS[params])
    if not os.path.isdir(path):
      hint = "a run with distill.teacher_sft_steps > 0 writes it" if params == "teacher" else TRAIN_HINT
      raise FileNotFoundError(f"no {params} parameters at {path}: {hint}")
  else:
    cfg = config_lib.load_config(config_path) if config_path else experiment.Config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_path=hf_dir))
  if prompt_format is not None:
    prompts.get_format(prompt_format)  # a ValueError that names the known formats
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prompt_format=prompt_format))
  if run_dir is not None and not cfg.model.hf_path:
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = nnx.eval_shape(lambda: builders.build_model(cfg.model, cfg.data)[1])
  else:
    tokenizer, model = builders.build_model(cfg.model, cfg.data)
  graphdef, state = nnx.split(model, nnx.Param)
  if run_dir is not None:
    state = checkpoint.restore_params(path, state)
  return make_policy(cfg, tokenizer, nnx.merge(graphdef, state))


def make_policy(config: experiment.Config, tokenizer, model) -> Policy:
  """The policy of a model in memory (e.g. one just trained by `sft.warm_start`) under the run's config."""
  graphdef, params = nnx.split(model, nnx.Param)
  tables = jax.tree.map(jnp.asarray, assign.step_tables(tokenizer, model.cfg.text.vocab_size))
  return Policy(tokenizer=tokenizer, graphdef=graphdef, params=params, model_cfg=model.cfg,
                fmt=builders.prompt_format(config.data), config=config, tables=tables)


# ----------------------------------------------------------------------------------------- prompts, rollouts


def heldout_records(config: experiment.Config, num: int, *, split: str = "test", task: str | None = None) -> list[dict]:
  """The first `num` records of a held-out synthetic split, drawn with the run's data seed and image size; with `task`,
  the first `num` of that task family (record i is of family data.tasks[i % len(data.tasks)])."""
  cfg = builders.synthetic_config(config.data)
  indices = list(range(num))
  if task is not None:
    if task not in cfg.tasks:
      raise ValueError(f"task={task!r} is not one of the run's data.tasks {cfg.tasks}")
    indices = [cfg.tasks.index(task) + len(cfg.tasks) * j for j in range(num)]
  src = synthetic.SyntheticSource(split=split, num_records=indices[-1] + 1 if indices else 0, cfg=cfg)
  return [src[i] for i in indices]


def user_record(image, question: str, answer: str, *, record_id: str = "user") -> dict:
  """A canonical record for one image and a question about it (the answer grades sampled rollouts)."""
  return {"id": record_id, "images": [image], "problem": processing.IMAGE_PLACEHOLDER + question,
          "answer": str(answer), "source": "user"}


def prepare_prompts(policy: Policy, records: list[dict], *,
                    counterfactual: str = "mask_visual") -> batch_lib.Batch:
  """One batch of exactly len(records) prompts, with the counterfactual variant the dependency is measured against."""
  if counterfactual not in SCORED_COUNTERFACTUALS:
    raise ValueError(f"counterfactual={counterfactual!r}: choose one of {SCORED_COUNTERFACTUALS}")
  data = policy.config.data
  processor = processing.make_processor(policy.tokenizer,
                                        builders.prompt_config(data, counterfactuals=(counterfactual,)))
  examples = [processing.process_record(processor, r) for r in records]
  v = policy.model_cfg.vision
  return batch_lib.collate(examples, batch_size=len(examples), length_buckets=data.length_buckets,
                           patch_buckets=data.patch_buckets, max_images=data.max_images,
                           pad_id=int(policy.tokenizer.pad_token_id), spatial_merge_size=v.spatial_merge_size,
                           window_size=v.window_size, patch_size=v.patch_size)


@dataclasses.dataclass(frozen=True)
class Samples:
  tokens_NT: np.ndarray  # int32 [B * G, T] sampled completions, row b * G + g
  mask_NT: np.ndarray  # bool, the stop token included
  texts: list  # decoded completions (the format's prefill prepended)
  rewards_N: np.ndarray  # float32 overall reward
  accuracy_N: np.ndarray  # float32
  adv_N: np.ndarray  # float32 group advantage (the config's estimator)


def sample_rollouts(policy: Policy, batch: batch_lib.Batch, *, num_samples: int, max_new_tokens: int,
                    temperature: float = 1.0, seed: int = 0) -> Samples:
  """G rollouts per prompt, their rewards and group advantages, as the training loop computes them."""
  cfg = policy.config
  stop = builders.stop_token_ids(policy.tokenizer)
  sampling = rollout.SamplingConfig(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                                    stop_token_ids=stop, pad_token_id=int(policy.tokenizer.pad_token_id))
  p = batch.prompts
  rolls = jax.device_get(rollout.rollout(policy.graphdef, policy.params, input_ids_BT=p.input_ids_BT,
                                         attention_mask_BT=p.attention_mask_BT, positions_3BT=p.positions_3BT,
                                         deltas_B=p.deltas_B, vision=p.vision, key=jax.random.key(seed),
                                         config=sampling))
  texts = builders.decode_completions(policy.tokenizer, rolls.tokens_BT, rolls.mask_BT, prefill=policy.fmt.prefill)
  reward_fn = rewards.load_reward_fn(cfg.algo.reward_fn)
  scores = [reward_fn(t, batch.answers[n // num_samples], fmt=policy.fmt) for n, t in enumerate(texts)]
  rewards_N = np.asarray([s["overall"] for s in scores], np.float32)
  adv_N = advantages.group_advantages(rewards_N, num_samples, estimator=rl_config.advantage_estimator(cfg.algo))
  return Samples(tokens_NT=np.asarray(rolls.tokens_BT), mask_NT=np.asarray(rolls.mask_BT, bool), texts=texts,
                 rewards_N=rewards_N, accuracy_N=np.asarray([s["accuracy"] for s in scores], np.float32),
                 adv_N=np.asarray(adv_N))


# --------------------------------------------------------------------------------- teacher-forced dependency


@dataclasses.dataclass(frozen=True)
class DependencyMaps:
  """Dependency of N completions, host-side numpy. C = max_steps step slots; step values are 0 past K_n."""

  tokens_NT: np.ndarray  # int32 completion tokens
  mask_NT: np.ndarray  # bool response tokens
  logp_real_NT: np.ndarray  # log pi_I(y_t)
  logp_cf_NT: np.ndarray  # log pi_0(y_t), the counterfactual prompt
  k3_NT: np.ndarray  # PGPO's sampled-token estimate, in [0, 10]
  kl_NT: np.ndarray  # exact KL(pi_I || pi_0) per token
  top1_real_NT: np.ndarray  # bool: y_t is the argmax of pi_I (teacher-forced accuracy with the image)
  top1_cf_NT: np.ndarray  # bool: y_t is the argmax of pi_0
  step_ids_NT: np.ndarray  # int32 step of each token, -1 on padding
  num_steps_N: np.ndarray  # int32 K_n
  step_v_NC: np.ndarray  # V_k = sum over the step of log pi_I - log pi_0 (PDCR)
  step_kl_NC: np.ndarray  # sum over the step of KL_t
  step_len_NC: np.ndarray  # tokens per step
  step_visual_NC: np.ndarray  # int32 Otsu cluster of V over all steps: 1 visual, 0 textual, -1 no step
  threshold: float  # the Otsu threshold c* (visual: V >= c*)
  weights_NT: np.ndarray  # PGPO token weights from k3 (sum to the response length)
  adv_before_NT: np.ndarray | None  # A_i on every response token (None when no advantages were given)
  adv_after_NT: np.ndarray | None  # A_i * w_t


def dual_pass(model, prompt: scoring.PromptInputs, counterfactual: scoring.PromptInputs, tokens_NT, mask_NT, *,
              group_size: int, chunk: int = 256, with_top1: bool = False):
  """(log pi_I(y), log pi_0(y), KL(pi_I || pi_0)) per completion token [N, T], one forward per side, no gradient.

  with_top1 adds (argmax pi_I == y, argmax pi_0 == y) [N, T]: teacher-forced accuracy with and without the image.
  """
  h_real_NTD, _ = scoring.completion_hidden(model, prompt, tokens_NT, mask_NT, group_size)
  h_cf_NTD, _ = scoring.completion_hidden(model, counterfactual, tokens_NT, mask_NT, group_size)
  w_DV = model.decoder.head_weight_DV()
  m_NT = mask_NT.astype(jnp.float32)
  logp_real_NT = scoring.token_logps(h_real_NTD, w_DV, tokens_NT, chunk=chunk) * m_NT
  logp_cf_NT = scoring.token_logps(h_cf_NTD, w_DV, tokens_NT, chunk=chunk) * m_NT
  kl_NT = divergences.chunked_kl(divergences.Logits(h_real_NTD, w_DV), divergences.Logits(h_cf_NTD, w_DV),
                                 chunk_size=chunk) * m_NT
  if not with_top1:
    return jax.lax.stop_gradient((logp_real_NT, logp_cf_NT, kl_NT))
  top1 = lambda h: scoring.token_top1(h, w_DV, tokens_NT, chunk=chunk) & mask_NT.astype(bool)
  return jax.lax.stop_gradient((logp_real_NT, logp_cf_NT, kl_NT, top1(h_real_NTD), top1(h_cf_NTD)))


@functools.partial(jax.jit, static_argnames=("graphdef", "group_size", "max_steps", "pgpo_cfg"))
def _maps_stage(params, graphdef, prompt, counterfactual, tokens_NT, mask_NT, tables, adv_N, *, group_size: int,
                max_steps: int, pgpo_cfg: pgpo.PGPOConfig) -> dict:
  """The device side of `dependency_maps`, one compiled program."""
  C = max_steps
  logp_real_NT, logp_cf_NT, kl_NT, top1_real_NT, top1_cf_NT = dual_pass(
      nnx.merge(graphdef, params), prompt, counterfactual, tokens_NT, mask_NT, group_size=group_size, with_top1=True)
  seg = steps.segment_steps(tokens_NT, mask_NT, **vars(tables), max_steps=C)
  step_v_NC = dependency.step_scores(logp_real_NT - logp_cf_NT, seg.step_ids_BT, C)
  valid_NC = jnp.arange(C)[None, :] < seg.num_steps_B[:, None]
  threshold, labels_M = clusters.otsu_threshold(step_v_NC.reshape(-1), valid_NC.reshape(-1))
  k3_NT = pgpo.k3_dependency(logp_real_NT, logp_cf_NT, mask_NT)
  weights_NT = pgpo.pgpo_weights(k3_NT, mask_NT, tau=pgpo_cfg.tau, beta=pgpo_cfg.beta, eps=pgpo_cfg.eps,
                                 threshold_mode=pgpo_cfg.threshold_mode, low_weight_floor=pgpo_cfg.low_weight_floor,
                                 mass_normalize=pgpo_cfg.mass_normalize)
  out = dict(tokens_NT=tokens_NT, mask_NT=mask_NT, logp_real_NT=logp_real_NT, logp_cf_NT=logp_cf_NT, k3_NT=k3_NT,
             kl_NT=kl_NT, top1_real_NT=top1_real_NT, top1_cf_NT=top1_cf_NT, step_ids_NT=seg.step_ids_BT,
             num_steps_N=seg.num_steps_B, step_v_NC=step_v_NC,
             step_kl_NC=dependency.step_scores(kl_NT, seg.step_ids_BT, C),
             step_len_NC=dependency.step_scores(mask_NT.astype(jnp.float32), seg.step_ids_BT, C),
             step_visual_NC=labels_M.reshape(-1, C), threshold=threshold, weights_NT=weights_NT,
             adv_before_NT=advantages.broadcast_to_tokens(adv_N, mask_NT))
  out["adv_after_NT"] = pgpo.pgpo_advantages(out["adv_before_NT"], weights_NT)
  return out


def dependency_maps(policy: Policy, batch: batch_lib.Batch, tokens_NT, mask_NT, *, group_size: int, adv_N=None,
                    counterfactual: str = "mask_visual", max_steps: int | None = None) -> DependencyMaps:
  """Token, step and PGPO views of the dependency of B * G completions on their prompts' images (teacher-forced).

  Steps are segmented on the token ids ("\n\n", methods.md section 8); the Otsu split pools every step of the N
  rows, as PDCR pools a rollout batch. PGPO weights use the run's credit settings (tau, beta, ...).
  """
  tokens_NT, mask_NT = jnp.asarray(tokens_NT, jnp.int32), jnp.asarray(mask_NT, bool)
  if tokens_NT.ndim != 2 or tokens_NT.shape != mask_NT.shape:
    raise ValueError(f"tokens_NT {tokens_NT.shape} and mask_NT {mask_NT.shape} must be one [N, T] shape")
  B = np.shape(batch.prompts.input_ids_BT)[0]
  if tokens_NT.shape[0] != B * group_size:
    raise ValueError(f"{tokens_NT.shape[0]} completions for {B} prompts x group_size={group_size}")
  c = policy.config.credit
  pgpo_cfg = pgpo.PGPOConfig(tau=c.tau, beta=c.beta, threshold_mode=c.threshold_mode,
                             low_weight_floor=c.low_weight_floor, mass_normalize=c.mass_normalize)
  cf = assign.counterfactual_inputs(batch.prompts, counterfactual)
  # Zero advantages when none are given: one compiled program either way.
  adv = jnp.zeros(tokens_NT.shape[0], jnp.float32) if adv_N is None else jnp.asarray(adv_N, jnp.float32)
  out = _maps_stage(policy.params, policy.graphdef, assign.as_prompt_inputs(batch.prompts), cf, tokens_NT, mask_NT,
                    policy.tables, adv, group_size=group_size,
                    max_steps=c.max_steps if max_steps is None else max_steps, pgpo_cfg=pgpo_cfg)
  out = {k: np.asarray(v) for k, v in jax.device_get(out).items()}
  out["threshold"] = float(out["threshold"])
  if adv_N is None:
    out["adv_before_NT"] = out["adv_after_NT"] = None
  return DependencyMaps(**out)


# -------------------------------------------------------------------------------------------- ground truth


def groundtruth_metrics(*, k3_M, kl_M, is_visual_M, is_reasoning_M, step_v_K, step_kl_K, step_len_K,
                        step_is_perception_K, weight_M=None) -> dict:
  """Token AUROCs (visual words above reasoning-step words) and Otsu step-split accuracies, from flat arrays.

  With `weight_M` (PGPO's token weights): `pgpo_visual_mass`, the share of the weight mass on visual words, beside
  `visual_share`, their share of the tokens. PGPO does what its paper says when the first exceeds the second.

  Tokens that are neither visual nor reasoning count in `tokens` only. Steps are the labelled perception / reasoning
  steps (the answer segment excluded). Besides the two dependency step scores (V, the KL sum) the split is also run
  on the per-token mean KL and on the step length alone, a control (in its better orientation, long or short steps
  as perception): a score is informative only when it beats it, and `majority_baseline` (always the larger class).
  """
  visual, reasoning = np.asarray(is_visual_M, bool), np.asarray(is_reasoning_M, bool)
  perception = np.asarray(step_is_perception_K, bool)
  length = np.asarray(step_len_K, np.float64)
  if perception.size == 0:
    raise ValueError("no labelled perception / reasoning step to split")
  out = {"tokens": int(visual.size), "visual_tokens": int(visual.sum()), "reasoning_tokens": int(reasoning.sum()),
         "auroc_k3": groundtruth.token_auroc(k3_M, visual, reasoning),
         "auroc_kl": groundtruth.token_auroc(kl_M, visual, reasoning),
         "steps": int(perception.size), "perception_steps": int(perception.sum())}
  for name, score in (("v", step_v_K), ("kl", step_kl_K),
                      ("kl_mean", np.asarray(step_kl_K) / np.maximum(length, 1.0))):
    out[f"split_accuracy_{name}"] = groundtruth.step_split_accuracy(score, perception)[0]
  # The control takes either orientation: length gives the steps away whether perception is the long or the short side.
  by_length = groundtruth.step_split_accuracy(length, perception)[0]
  out["split_accuracy_length"] = max(by_length, 1.0 - by_length)
  out["majority_baseline"] = float(max(perception.mean(), 1.0 - perception.mean()))
  out["visual_share"] = float(visual.mean()) if visual.size else float("nan")
  if weight_M is not None:
    weight = np.asarray(weight_M, np.float64)
    out["pgpo_visual_mass"] = float(weight[visual].sum() / weight.sum()) if weight.sum() > 0 else float("nan")
  return out


def evaluate_groundtruth(policy: Policy, *, num: int = 64, batch_size: int = 8, split: str = "test",
                         counterfactual: str = "mask_visual", task: str | None = None) -> dict:
  """`groundtruth_metrics` of the policy's dependency on the reference solutions of `num` held-out records (of one
  task family with `task`), with the KL, teacher-forced accuracy and mean PGPO weight of each word class (visual,
  reasoning, answer; PGPO's weights average 1 over a completion's tokens, where DAPO gives every token 1)."""
  if num < 1 or batch_size < 1:
    raise ValueError(f"num={num} and batch_size={batch_size} must be positive")
  records = heldout_records(policy.config, num, split=split, task=task)
  tok = policy.tokenizer
  refs = [groundtruth.reference_tokens(tok, synthetic.render_solution(r["solution"], r["answer"], fmt=policy.fmt))
          for r in records]
  width = -(-(max(len(r.token_ids) for r in refs) + 1) // 32) * 32  # + EOS, one compiled width for every batch
  eos = tok.convert_tokens_to_ids("<|im_end|>")
  acc = {k: [] for k in ("k3", "kl", "w", "vis", "rea", "ans", "top1", "top1_cf", "v", "skl", "len", "per")}
  for start in range(0, num, batch_size):
    part = refs[start:start + batch_size]
    arrays = groundtruth.reference_arrays(part, width=width, pad_id=int(tok.pad_token_id), eos_id=eos)
    batch = prepare_prompts(policy, records[start:start + batch_size], counterfactual=counterfactual)
    maps = dependency_maps(policy, batch, arrays["tokens_NT"], arrays["mask_NT"], group_size=1,
                           counterfactual=counterfactual)
    m = arrays["mask_NT"]
    acc["k3"].append(maps.k3_NT[m])
    acc["kl"].append(maps.kl_NT[m])
    acc["w"].append(maps.weights_NT[m])
    acc["vis"].append(arrays["is_visual_NT"][m])
    acc["rea"].append(arrays["is_reasoning_NT"][m])
    acc["ans"].append(arrays["is_answer_NT"][m])
    acc["top1"].append(maps.top1_real_NT[m])
    acc["top1_cf"].append(maps.top1_cf_NT[m])
    for n, ref in enumerate(part):
      labels = groundtruth.segment_labels(maps.step_ids_NT[n, :len(ref.token_ids)], ref.step_id, ref.step_labels)
      for k, label in enumerate(labels):
        if label in (groundtruth.PERCEPTION, groundtruth.REASONING):
          acc["v"].append(maps.step_v_NC[n, k])
          acc["skl"].append(maps.step_kl_NC[n, k])
          acc["len"].append(maps.step_len_NC[n, k])
          acc["per"].append(label == groundtruth.PERCEPTION)
  cat = lambda key: np.concatenate(acc[key])
  out = groundtruth_metrics(k3_M=cat("k3"), kl_M=cat("kl"), is_visual_M=cat("vis"), is_reasoning_M=cat("rea"),
                            step_v_K=acc["v"], step_kl_K=acc["skl"], step_len_K=acc["len"],
                            step_is_perception_K=acc["per"], weight_M=cat("w"))
  out["mean_kl"] = float(cat("kl").mean())
  kl, top1, top1_cf, weight = cat("kl"), cat("top1"), cat("top1_cf"), cat("w")
  for name, key in (("visual", "vis"), ("reasoning", "rea"), ("answer", "ans")):
    where = cat(key)
    out[f"mean_kl_{name}"] = float(kl[where].mean()) if where.any() else float("nan")
    out[f"tf_accuracy_{name}"] = float(top1[where].mean()) if where.any() else float("nan")
    out[f"tf_accuracy_{name}_cf"] = float(top1_cf[where].mean()) if where.any() else float("nan")
    out[f"pgpo_weight_{name}"] = float(weight[where].mean()) if where.any() else float("nan")
  return {"records": num, **out}


def white_image_records(records: list[dict]) -> list[dict]:
  """The records with every image replaced by a white one of the same size (the white-image control)."""
  return [{**processing.white_image_record(r), "id": f"{r['id']}-white"} for r in records]


def greedy_accuracy(policy: Policy, records: list[dict], *, batch_size: int = 8, max_new_tokens: int | None = None,
                    params=None) -> float:
  """Greedy accuracy of the policy (or of `params`) on `records`, scored by the run's reward function
  (`evaluate.accuracy` over batches of `batch_size`, the last one padded with rows it does not score)."""
  cfg, tok = policy.config, policy.tokenizer
  processor = processing.make_processor(tok, builders.prompt_config(cfg.data))
  examples = [processing.process_record(processor, r) for r in records]
  batches = [builders.collate_examples(examples[i:i + batch_size], cfg.data, tok, policy.model_cfg,
                                       batch_size=batch_size) for i in range(0, len(examples), batch_size)]
  return evaluate.accuracy(policy.graphdef, policy.params if params is None else params, batches, tokenizer=tok,
                           fmt=policy.fmt, reward_fn=rewards.load_reward_fn(cfg.algo.reward_fn),
                           max_new_tokens=max_new_tokens or cfg.rollout.max_new_tokens,
                           stop_token_ids=builders.stop_token_ids(tok), greedy=True)


# ----------------------------------------------------------------------------------------- image projection


class _WithFeatures:
  """The model with given merged image features (the tower is not run), laid out row-major over the batch's pads."""

  def __init__(self, model, image_features_QD):
    self.model, self.image_features_QD, self.decoder = model, image_features_QD, model.decoder

  def embed(self, input_ids_BT, vision=None):
    del vision
    return self.model.embed(input_ids_BT, None, self.image_features_QD)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _image_features(params, graphdef, vision):
  return nnx.merge(graphdef, params).vision(vision)[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "group_size", "chunk"))
def _occluded_kl(params, graphdef, prompt, feats_QD, white_QD, pad_pos_Q, rows_R, tokens_NT, mask_NT, *,
                 group_size: int, chunk: int):
  """sum_{n, t} KL(pi_I || pi_{I without token q}) for q in rows_R: [R]."""
  model = nnx.merge(graphdef, params)
  Q, R = feats_QD.shape[0], rows_R.shape[0]
  h_real_NTD, _ = scoring.completion_hidden(_WithFeatures(model, feats_QD), prompt, tokens_NT, mask_NT, group_size)
  keep_RT = jnp.repeat(prompt.attention_mask_BT.astype(bool), R, axis=0)
  if white_QD is None:  # mask_visual: the token's key is masked, as the counterfactual masks every image key
    keep_RT = keep_RT & (jnp.arange(keep_RT.shape[1])[None, :] != pad_pos_Q[rows_R][:, None])
    feats_RQD = jnp.broadcast_to(feats_QD[None], (R, Q, feats_QD.shape[1]))
  else:  # white_image: the token's features are those of the white image
    feats_RQD = jnp.where((jnp.arange(Q)[None, :] == rows_R[:, None])[..., None], white_QD[None], feats_QD[None])
  occluded = scoring.PromptInputs(jnp.repeat(prompt.input_ids_BT, R, axis=0), keep_RT,
                                  jnp.repeat(prompt.positions_3BT, R, axis=1), jnp.repeat(prompt.next_position_B, R))
  tile = lambda x: jnp.tile(x, (R,) + (1,) * (x.ndim - 1))
  h_occ_NTD, _ = scoring.completion_hidden(_WithFeatures(model, feats_RQD.reshape(R * Q, -1)), occluded,
                                           tile(tokens_NT), tile(mask_NT), group_size)
  w_DV = model.decoder.head_weight_DV()
  kl_NT = divergences.chunked_kl(divergences.Logits(tile(h_real_NTD), w_DV), divergences.Logits(h_occ_NTD, w_DV),
                                 chunk_size=chunk) * tile(mask_NT).astype(jnp.float32)
  return kl_NT.reshape(R, -1).sum(-1)


def occlusion_map(policy: Policy, batch: batch_lib.Batch, tokens_NT, mask_NT, *, counterfactual: str = "mask_visual",
                  rows_per_call: int = 16, chunk: int = 256) -> np.ndarray:
  """Dependency of one prompt's G completions on each merged visual token: [Q], in the order of its image pads.

    o_q = sum_{n, t} KL(pi(. | s_t, I) || pi(. | s_t, I with token q occluded))

  Occlusion rather than gradient x input: it applies the counterfactual that defines the dependency itself, to one
  merged token (mask_visual: that token's key is masked, exactly as the text-only pass masks all of them;
  white_image: its features become the white image's), so o_q >= 0 is an exact KL of the model, with no linearization
  and no baseline to choose. Gradient x input measures the change against an all-zero embedding, an input the model
  never sees, and its sign flips freely. The cost is one forward per merged token, `rows_per_call` at a time (16
  for a 112-pixel image, a few hundred for a large one). The o_q do not add up to the total dependency (tokens are
  redundant), which is why they are reported as a map, not a decomposition. `patch_grids` puts them on the image.
  """
  B = np.shape(batch.prompts.input_ids_BT)[0]
  if B != 1 or batch.prompts.vision is None:
    raise ValueError(f"occlusion_map takes a batch of one prompt with an image, got {B} prompts")
  if counterfactual not in SCORED_COUNTERFACTUALS:
    raise ValueError(f"counterfactual={counterfactual!r}: choose one of {SCORED_COUNTERFACTUALS}")
  if rows_per_call < 1:
    raise ValueError(f"rows_per_call={rows_per_call} must be positive")
  ids_T = np.asarray(batch.prompts.input_ids_BT)[0]
  pad_pos_Q = np.flatnonzero(ids_T == policy.model_cfg.image_token_id)
  Q = len(pad_pos_Q)
  feats_QD = _image_features(policy.params, policy.graphdef, batch.prompts.vision)[:Q]
  white_QD = None
  if counterfactual == "white_image":
    white = assign.counterfactual_inputs(batch.prompts, "white_image").vision
    white_QD = _image_features(policy.params, policy.graphdef, white)[:Q]
  prompt = dataclasses.replace(assign.as_prompt_inputs(batch.prompts), vision=None)
  R = min(rows_per_call, Q)
  out = []
  for start in range(0, Q, R):
    rows = np.minimum(np.arange(start, start + R), Q - 1)  # the last call repeats a row to keep one shape
    out.append(np.asarray(_occluded_kl(policy.params, policy.graphdef, prompt, feats_QD, white_QD,
                                       jnp.asarray(pad_pos_Q), jnp.asarray(rows), jnp.asarray(tokens_NT, jnp.int32),
                                       jnp.asarray(mask_NT, bool), group_size=np.shape(tokens_NT)[0],
                                       chunk=chunk))[:Q - start])
  return np.concatenate(out).astype(np.float64)


def window_to_processor_order(values_window_Q, window_index_Q) -> np.ndarray:
  """Undo the tower's window reordering: the tower's merge group j (window order) is processor group window_index[j].

  Example: window_index [0, 1, 4, 5, 2, 3, 6, 7] (4x2 groups, 2x2 windows) and values in window order v ->
    out[window_index[j]] = v[j].
  """
  values = np.asarray(values_window_Q)
  index = np.asarray(window_index_Q)
  if values.shape[0] != index.shape[0]:
    raise ValueError(f"values_window_Q has {values.shape[0]} entries, window_index_Q {index.shape[0]}")
  out = np.empty_like(values)
  out[index] = values
  return out


def patch_grids(values_Q, image_grid_thw_I3, *, merge_size: int = 2) -> list[np.ndarray]:
  """Per-merged-token values (processor order, all images of a prompt in turn) -> one [h, w] patch grid per image.

  Merged token q of an image with a (1, h, w) patch grid covers the merge_size x merge_size patches at rows
  m * (q // (w / m)) + (0..m-1) and columns m * (q % (w / m)) + (0..m-1); each of them gets its value. Patch (r, c)
  covers pixels [14 r, 14 r + 14) x [14 c, 14 c + 14) of the resized image.
  """
  values = np.asarray(values_Q)
  grids = np.asarray(image_grid_thw_I3).reshape(-1, 3)
  sizes = [int(t * h * w) // merge_size**2 for t, h, w in grids]
  if values.ndim != 1 or values.shape[0] != sum(sizes):
    raise ValueError(f"values_Q has shape {values.shape}; the grids {grids.tolist()} hold {sum(sizes)} merged tokens")
  out, offset = [], 0
  for (t, h, w), n in zip(grids.tolist(), sizes):
    if t != 1:
      raise ValueError(f"image grid (t={t}, h={h}, w={w}): only single-frame images are supported")
    block = values[offset:offset + n].reshape(h // merge_size, w // merge_size)
    out.append(np.kron(block, np.ones((merge_size, merge_size), values.dtype)))
    offset += n
  return out


# ------------------------------------------------------------------------------------------------------ CLI


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--run", help="a run directory written by jaxvg.train")
  parser.add_argument("--params", default="final", choices=PARAMS,
                      help="the run's final/, its warm start sft/params, or its distillation teacher teacher/params")
  parser.add_argument("--prompt-format", help="read the policy in this prompt format instead of the run's "
                      "(jaxvg.data.prompts.FORMATS), e.g. a teacher's privileged context")
  parser.add_argument("--hf", help="a Hugging Face Qwen2.5-VL directory (instead of --run)")
  parser.add_argument("--config", help="the config file for --hf (data and prompt format)")
  parser.add_argument("--num", type=int, default=256, help="held-out synthetic records")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--counterfactual", default="mask_visual", choices=SCORED_COUNTERFACTUALS)
  parser.add_argument("--split", default="test", choices=("test", "prior_conflict"), help="held-out synthetic split")
  parser.add_argument("--task", default=None, choices=synthetic.TASKS,
                      help="only the records of this task family (the first --num of it)")
  parser.add_argument("--no-greedy", dest="greedy", action="store_false",
                      help="skip greedy accuracy with the real and the white image (the slowest part)")
  args = parser.parse_args(argv)
  t0 = time.time()
  policy = load_policy(run_dir=args.run, params=args.params, hf_dir=args.hf, config_path=args.config,
                       prompt_format=args.prompt_format)
  out = evaluate_groundtruth(policy, num=args.num, batch_size=args.batch_size, split=args.split,
                             counterfactual=args.counterfactual, task=args.task)
  if args.greedy:
    records = heldout_records(policy.config, args.num, split=args.split, task=args.task)
    out["greedy_accuracy"] = greedy_accuracy(policy, records, batch_size=args.batch_size)
    out["greedy_accuracy_white"] = greedy_accuracy(policy, white_image_records(records), batch_size=args.batch_size)
  out = {"run": args.run or args.hf, "params": args.params if args.run else "hf", "prompt_format": policy.fmt.name,
         "counterfactual": args.counterfactual, "split": args.split, "task": args.task, **out,
         "seconds": round(time.time() - t0, 1)}
  # An AUROC without positives or negatives is NaN: JSON null.
  out = {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in out.items()}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
