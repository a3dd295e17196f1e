"""Dependency analysis: teacher-forced maps against a naive full forward, zero dependency for an image-blind model,
ground-truth metrics by hand, the patch projection and occlusion map against naive loops, and the CLI on a tiny run
directory (saved params and config.json, no training)."""

import dataclasses
import functools
import html
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image, ImageDraw

from jaxvg import analysis, views
from jaxvg.core import config_lib
from jaxvg.credit import groundtruth
from jaxvg.data import synthetic
from jaxvg.data import batch as batch_lib
from jaxvg.models.positions import vision_layout
from jaxvg.rl.optim import OptimConfig
from jaxvg.run import builders, checkpoint, experiment

G = 2


def _tiny_config(out_dir: str) -> experiment.Config:
  return experiment.Config(
      model=experiment.ModelCfg(preset="tiny", tiny_width=32, tiny_layers=2, tiny_heads=2, tiny_vision_width=16,
                                seed=3),
      data=experiment.DataCfg(source="synthetic", image_size=84, max_pixels=112 * 112, length_buckets=(128, 256),
                              patch_buckets=(64, 128, 256, 512)),
      credit=experiment.CreditCfg(max_steps=8),
      optim=OptimConfig(lr=1e-3, rules=(("decoder/.*", 0.5),)),
      train=experiment.TrainCfg(out_dir=out_dir))


def random_params(cfg: experiment.Config, seed: int):
  """Parameters of the config's model drawn with numpy (N(0, 0.1^2), norm weights around 1), without running the
  model's own initializer (dozens of small compilations): the shapes come from `nnx.eval_shape`."""
  abstract = nnx.eval_shape(lambda: builders.build_model(cfg.model, cfg.data)[1])
  graphdef, state = nnx.split(abstract, nnx.Param)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    center = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
    return jnp.asarray(center + 0.1 * rng.normal(size=leaf.shape), leaf.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(draw, state)


def make_tiny_run(path, cfg: experiment.Config | None = None) -> dict:
  """A run directory as jaxvg.train leaves it: config.json, final/ and sft/params (two parameter draws)."""
  cfg = _tiny_config(str(path)) if cfg is None else cfg
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_lib.to_dict(cfg), f)
  saved = {}
  for name, sub, seed in (("final", "final", 3), ("sft", os.path.join("sft", "params"), 4),
                          ("teacher", os.path.join("teacher", "params"), 5)):
    graphdef, params = random_params(cfg, seed)
    checkpoint.save_params(os.path.join(path, sub), graphdef, params)
    saved[name] = params
  return saved


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  path = tmp_path_factory.mktemp("run")
  return path, make_tiny_run(path)


@pytest.fixture(scope="module")
def run_dir(run):
  return run[0]


@pytest.fixture(scope="module")
def policy(run_dir):
  return analysis.load_policy(run_dir=str(run_dir))


def _image(h, w, seed=0):
  rng = np.random.default_rng(seed)
  img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
  ImageDraw.Draw(img).ellipse((4, 4, w // 2, h // 2), fill=(220, 38, 38))
  return img


def _with_params(policy, edit):
  """A copy of the policy whose model `edit` changed (the fixture's parameters stay as they are)."""
  model = nnx.merge(policy.graphdef, jax.tree.map(jnp.copy, policy.params))
  edit(model)
  return dataclasses.replace(policy, params=nnx.split(model, nnx.Param)[1])


@functools.partial(jax.jit, static_argnums=0)
def _forward_logits(graphdef, params, ids_NS, positions_3NS, keep_NS, vision, row_index_R, swap_R, swap_RD):
  """A plain full forward over whole [prompt | completion] rows: [N, S, V] logits.

  The image-pad tokens of the rows take the tower's features row_index_R (in order), except where swap_R is set:
  those take swap_RD instead.
  """
  model = nnx.merge(graphdef, params)
  feats_QD = model.vision(vision)[0]
  feats_RD = jnp.where(swap_R[:, None], swap_RD, feats_QD[row_index_R])
  h, _, _ = model.hidden(ids_NS, positions_3NS, keep_NS, image_features_QD=feats_RD)
  return model.decoder.logits(h)


def _naive_logp(policy, prompts: batch_lib.PromptBatch, tokens, mask, *, hide_images=False, hide_pos=None,
                replace=None):
  """log_softmax (float64 numpy) of a plain full forward over [prompt | completion] at the completion's positions.

  hide_images: mask every image-pad key (the uncompacted text-only pass); hide_pos: mask the key at this prompt
  position; replace: (q, features) puts `features` in place of merged token q's in every row. The tower's features
  of prompt b are repeated for each of its G rows.
  """
  G = tokens.shape[0] // prompts.input_ids_BT.shape[0]
  seq = batch_lib.rollout_sequence(prompts, tokens, mask, group_size=G)
  keep = np.asarray(seq.attention_mask_NS).copy()
  if hide_images:
    keep[np.asarray(seq.input_ids_NS) == policy.model_cfg.image_token_id] = 0
  if hide_pos is not None:
    keep[:, hide_pos] = 0
  ids = np.asarray(prompts.input_ids_BT)
  counts = (ids == policy.model_cfg.image_token_id).sum(1)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  row_index = np.concatenate([starts[n // G] + np.arange(counts[n // G]) for n in range(tokens.shape[0])])
  swap = np.zeros(len(row_index), bool)
  swap_feats = np.zeros((len(row_index), policy.model_cfg.text.hidden_size), np.float32)
  if replace is not None:
    q, feats = replace
    swap[row_index == q] = True  # one prompt: merged token q of every row
    swap_feats[swap] = feats
  z = _forward_logits(policy.graphdef, policy.params, seq.input_ids_NS, seq.positions_3NS, jnp.asarray(keep),
                      prompts.vision, jnp.asarray(row_index), jnp.asarray(swap), jnp.asarray(swap_feats))
  T0, T = ids.shape[1], tokens.shape[1]
  z = np.asarray(z, np.float64)[:, T0 - 1:T0 - 1 + T]
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl(lp, lq):
  return (np.exp(lp) * (lp - lq)).sum(-1)


# ----------------------------------------------------------------------------------------------------- loading


def test_load_config_json_round_trip_and_errors(tmp_path):
  cfg = _tiny_config(str(tmp_path))
  path = tmp_path / "config.json"
  path.write_text(json.dumps(config_lib.to_dict(cfg)))
  assert analysis.load_config_json(str(path)) == cfg  # tuples of tuples, None and nested sections come back typed
  blob = config_lib.to_dict(cfg)
  blob["credit"]["not_a_field"] = 1
  path.write_text(json.dumps(blob))
  with pytest.raises(ValueError, match="not_a_field"):
    analysis.load_config_json(str(path))
  with pytest.raises(FileNotFoundError, match="jaxvg.train"):
    analysis.load_policy(run_dir=str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="exactly one"):
    analysis.load_policy()


def test_load_policy_reads_final_sft_or_teacher_params(run, policy):
  run_dir, saved = run
  for name, got in (("final", policy.params), ("sft", analysis.load_policy(run_dir=str(run_dir), params="sft").params),
                    ("teacher", analysis.load_policy(run_dir=str(run_dir), params="teacher").params)):
    assert jax.tree.structure(got) == jax.tree.structure(saved[name])
    for a, b in zip(jax.tree.leaves(saved[name]), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert policy.config == _tiny_config(str(run_dir)) and policy.fmt.name == "pgpo"
  with pytest.raises(ValueError, match="params="):
    analysis.load_policy(run_dir=str(run_dir), params="best")


def test_load_policy_from_an_hf_directory_with_a_config_file(tmp_path):
  from hf_fixtures import load_torch_model, make_tiny_hf_checkpoint
  from jaxvg.data.tokenizer import ASSET_DIR

  # vocab 951 puts the checkpoint's image / video pads where the shipped tokenizer has them (947, 948).
  hf_dir = make_tiny_hf_checkpoint(str(tmp_path / "hf"), vocab=951)
  config = tmp_path / "hf_config.py"
  config.write_text(
      "from jaxvg.run import experiment\n\n\n"
      "def get_config():\n"
      f"  return experiment.Config(data=experiment.DataCfg(tokenizer={str(ASSET_DIR)!r}, prompt_format='vgs'))\n")
  got = analysis.load_policy(hf_dir=hf_dir, config_path=str(config))
  assert got.config.model.hf_path == hf_dir and got.fmt.name == "vgs"
  assert got.model_cfg.image_token_id == got.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 947
  want = load_torch_model(hf_dir).state_dict()["model.language_model.embed_tokens.weight"].numpy()
  np.testing.assert_array_equal(np.asarray(nnx.merge(got.graphdef, got.params).decoder.embed_VD[...]), want)


# ------------------------------------------------------------------------------------------- dependency maps


def _records_case(policy):
  """The first two held-out records and their reference solutions (+ EOS), padded to a multiple of 32 tokens as
  `evaluate_groundtruth` pads them: the CLI test then reuses this test's compiled program."""
  records = analysis.heldout_records(policy.config, 2)
  refs = [groundtruth.reference_tokens(policy.tokenizer, synthetic.render_solution(r["solution"], r["answer"],
                                                                                   fmt=policy.fmt))
          for r in records]
  width = -(-(max(len(r.token_ids) for r in refs) + 1) // 32) * 32
  arrays = groundtruth.reference_arrays(refs, width=width, pad_id=int(policy.tokenizer.pad_token_id),
                                        eos_id=policy.tokenizer.convert_tokens_to_ids("<|im_end|>"))
  return records, arrays["tokens_NT"], arrays["mask_NT"]


def _user_case(seed=2):
  """One user image of 56 x 112 pixels (4 x 8 patches, 2 x 4 merged tokens) and G completions of 6 tokens."""
  record = analysis.user_record(_image(56, 112, seed=seed), "What color is the circle?", "red")
  tokens = np.random.default_rng(seed).integers(5, 900, (G, 6)).astype(np.int32)
  return record, tokens, np.arange(6)[None] < np.array([[6], [4]])


def test_dependency_maps_match_naive_forward_and_hand_formulas(policy):
  records, tokens, mask = _records_case(policy)
  N, T = tokens.shape
  batch = analysis.prepare_prompts(policy, records)
  adv = np.array([1.5, -0.5], np.float32)
  maps = analysis.dependency_maps(policy, batch, tokens, mask, group_size=1, adv_N=adv)

  lp = _naive_logp(policy, batch.prompts, tokens, mask)
  # mask_visual: the same full-length sequence with every image-pad key masked (the text-only pass, uncompacted).
  lq = _naive_logp(policy, batch.prompts, tokens, mask, hide_images=True)
  rows = np.arange(N)[:, None]
  logp_real, logp_cf = lp[rows, np.arange(T), tokens], lq[rows, np.arange(T), tokens]
  np.testing.assert_allclose(maps.logp_real_NT, np.where(mask, logp_real, 0), atol=2e-5)
  np.testing.assert_allclose(maps.logp_cf_NT, np.where(mask, logp_cf, 0), atol=2e-5)
  np.testing.assert_allclose(maps.kl_NT, np.where(mask, _kl(lp, lq), 0), atol=2e-5)
  assert maps.kl_NT.max() > 1e-3  # the random model uses the image: the comparison is not vacuous
  d = np.clip(logp_cf - logp_real, -20, 20)
  np.testing.assert_allclose(maps.k3_NT, np.where(mask, np.clip(np.exp(d) - d - 1, 0, 10), 0), atol=2e-5)

  # Steps: V_k and the KL sums by a loop over the tokens; the Otsu split by brute force over all cut points.
  C = policy.config.credit.max_steps
  v, klsum = np.zeros((N, C)), np.zeros((N, C))
  for n in range(N):
    for t in range(T):
      if mask[n, t]:
        k = maps.step_ids_NT[n, t]
        v[n, k] += logp_real[n, t] - logp_cf[n, t]
        klsum[n, k] += _kl(lp, lq)[n, t]
  np.testing.assert_allclose(maps.step_v_NC, v, atol=1e-4)
  np.testing.assert_allclose(maps.step_kl_NC, klsum, atol=1e-4)
  assert (maps.num_steps_N >= 3).all()  # perception, reasoning, the answer
  vals = np.concatenate([v[n, :maps.num_steps_N[n]] for n in range(N)])
  best = min((((vals[vals < c] - vals[vals < c].mean()) ** 2).sum() + ((vals[vals >= c] - vals[vals >= c].mean()) ** 2)
              .sum(), c) for c in np.unique(vals)[1:])
  assert maps.threshold == pytest.approx(best[1], abs=1e-5)
  labels = np.concatenate([maps.step_visual_NC[n, :maps.num_steps_N[n]] for n in range(N)])
  np.testing.assert_array_equal(labels, vals >= best[1])

  # PGPO (Eq. 4-8, tau 0.4, beta 2): log1p, min-max, gate, mass normalization, A_i * w_t.
  for n in range(N):
    s = np.log1p(maps.k3_NT[n][mask[n]].astype(np.float64))
    i = (s - s.min()) / (s.max() - s.min() + 1e-8)
    w = np.where(i < 0.4, i / 0.4, 1 + 2 * (i - 0.4) / 0.6)
    w = w * len(w) / w.sum()
    np.testing.assert_allclose(maps.weights_NT[n][mask[n]], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps.adv_before_NT[n], adv[n] * mask[n])
    np.testing.assert_allclose(maps.adv_after_NT[n][mask[n]], adv[n] * w, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="group_size"):
    analysis.dependency_maps(policy, batch, tokens, mask, group_size=3)
  with pytest.raises(ValueError, match="white_image"):
    analysis.dependency_maps(policy, batch, tokens, mask, group_size=1, counterfactual="white_image")


def test_image_blind_model_has_zero_dependency_everywhere(policy):
  def zero_vision(model):  # the merger's last layer: every image gives all-zero features
    model.vision.merger_fc2_MD[...] = jnp.zeros_like(model.vision.merger_fc2_MD[...])
    model.vision.merger_fc2_bias_D[...] = jnp.zeros_like(model.vision.merger_fc2_bias_D[...])

  blind = _with_params(policy, zero_vision)
  records, tokens, mask = _records_case(policy)
  batch = analysis.prepare_prompts(blind, records, counterfactual="white_image")
  maps = analysis.dependency_maps(blind, batch, tokens, mask, group_size=1, adv_N=np.array([1.0, -2.0]),
                                  counterfactual="white_image")
  for name in ("k3_NT", "kl_NT", "step_v_NC", "step_kl_NC"):
    np.testing.assert_allclose(getattr(maps, name), 0.0, atol=1e-6, err_msg=name)
  # Constant scores: every weight 1 (PGPO's fallback), so the advantages are unchanged.
  np.testing.assert_allclose(maps.weights_NT, mask.astype(float), atol=1e-6)
  np.testing.assert_allclose(maps.adv_after_NT, maps.adv_before_NT, atol=1e-6)
  record, user_tokens, user_mask = _user_case(seed=1)
  user = analysis.prepare_prompts(blind, [record], counterfactual="white_image")
  occ = analysis.occlusion_map(blind, user, user_tokens, user_mask, counterfactual="white_image", rows_per_call=3)
  assert occ.shape == (8,)
  np.testing.assert_allclose(occ, 0.0, atol=1e-6)

  # mask_visual hides the image keys themselves: a decoder without attention output sees no other token at all.
  def no_attention(model):
    model.decoder.o_LNHD[...] = jnp.zeros_like(model.decoder.o_LNHD[...])

  deaf = _with_params(policy, no_attention)
  maps = analysis.dependency_maps(deaf, analysis.prepare_prompts(deaf, records), tokens, mask, group_size=1)
  np.testing.assert_allclose(maps.kl_NT, 0.0, atol=1e-6)
  user = analysis.prepare_prompts(deaf, [record])
  np.testing.assert_allclose(analysis.occlusion_map(deaf, user, user_tokens, user_mask, rows_per_call=3), 0.0,
                             atol=1e-6)


# ------------------------------------------------------------------------------------------------ ground truth


def test_groundtruth_metrics_by_hand():
  # Tokens: visual {0.9, 0.7}, reasoning {0.5, 0.8}, one neither (3.0, ignored). k3: pairs (0.9 > 0.5), (0.9 > 0.8),
  # (0.7 > 0.5), (0.7 < 0.8) -> 3 / 4. kl ranks the other way round: 0.1 and 0.2 lose to 0.3 and 0.4 -> 0.
  got = analysis.groundtruth_metrics(
      k3_M=[0.9, 0.5, 3.0, 0.7, 0.8], kl_M=[0.1, 0.3, 9.0, 0.2, 0.4], is_visual_M=[1, 0, 0, 1, 0],
      is_reasoning_M=[0, 1, 0, 0, 1],
      # Steps: V [5, 4.5, 0.1, 0.2, 0] splits {0, 0.1, 0.2} | {4.5, 5} (SSE 0.02 + 0.125): all right.
      # KL sums [1, 2, 3, 2.5, 0]: Otsu {0, 1} | {2, 2.5, 3} (SSE 0.5 + 0.5; other cuts 2.19, 2.13, 3.69) -> visual
      # steps 1, 2, 3 -> steps 1 and 4 right, 2 / 5. Length [10, 12, 3, 4, 3]: {3, 3, 4} | {10, 12} -> all right.
      # KL mean [0.1, 1/6, 1, 0.625, 0]: {0, 0.1, 1/6} | {0.625, 1} (SSE 0.014 + 0.070 = 0.084; other cuts 0.534,
      # 0.353, 0.230) -> visual steps 2, 3 -> only step 4 right, 1 / 5.
      step_v_K=[5, 4.5, 0.1, 0.2, 0], step_kl_K=[1, 2, 3, 2.5, 0], step_len_K=[10, 12, 3, 4, 3],
      step_is_perception_K=[1, 1, 0, 0, 0])
  assert got["tokens"] == 5 and got["visual_tokens"] == 2 and got["reasoning_tokens"] == 2
  assert got["auroc_k3"] == pytest.approx(0.75) and got["auroc_kl"] == 0.0
  assert got["steps"] == 5 and got["perception_steps"] == 2
  assert got["split_accuracy_v"] == 1.0 and got["split_accuracy_length"] == 1.0
  assert got["split_accuracy_kl"] == pytest.approx(0.4) and got["split_accuracy_kl_mean"] == pytest.approx(0.2)
  assert got["majority_baseline"] == pytest.approx(0.6)
  assert got["visual_share"] == pytest.approx(0.4) and "pgpo_visual_mass" not in got


def test_groundtruth_metrics_pgpo_mass_by_hand():
  # PGPO weights [2, 0.5, 1, 1.5, 0] on tokens visual, reasoning, neither, visual, reasoning: the visual words hold
  # (2 + 1.5) / 5 = 0.7 of the mass while being 2 / 5 = 0.4 of the tokens.
  steps = dict(step_v_K=[1, 0], step_kl_K=[1, 0], step_len_K=[1, 1], step_is_perception_K=[1, 0])
  got = analysis.groundtruth_metrics(k3_M=[0] * 5, kl_M=[0] * 5, is_visual_M=[1, 0, 0, 1, 0],
                                     is_reasoning_M=[0, 1, 0, 0, 1], weight_M=[2, 0.5, 1, 1.5, 0], **steps)
  assert got["pgpo_visual_mass"] == pytest.approx(0.7) and got["visual_share"] == pytest.approx(0.4)
  # Uniform weights (no reweighting) put exactly the token share on the visual words.
  flat = analysis.groundtruth_metrics(k3_M=[0] * 5, kl_M=[0] * 5, is_visual_M=[1, 0, 0, 1, 0],
                                      is_reasoning_M=[0, 1, 0, 0, 1], weight_M=[1.0] * 5, **steps)
  assert flat["pgpo_visual_mass"] == pytest.approx(flat["visual_share"])


def test_groundtruth_metrics_length_either_way():
  # Lengths that give the steps away the other way round (perception short) score as well: 1.0, not 0.0.
  flipped = analysis.groundtruth_metrics(
      k3_M=[1.0], kl_M=[1.0], is_visual_M=[1], is_reasoning_M=[0], step_v_K=[1, 1, 0, 0, 0], step_kl_K=[1, 1, 0, 0, 0],
      step_len_K=[3, 4, 10, 12, 11], step_is_perception_K=[1, 1, 0, 0, 0])
  assert flipped["split_accuracy_length"] == 1.0
  with pytest.raises(ValueError, match="no labelled"):
    analysis.groundtruth_metrics(k3_M=[1.0], kl_M=[1.0], is_visual_M=[1], is_reasoning_M=[0], step_v_K=[],
                                 step_kl_K=[], step_len_K=[], step_is_perception_K=[])


# -------------------------------------------------------------------------------------------- image projection


def test_patch_grids_and_window_order_against_naive_loops():
  grids = np.array([[1, 4, 8], [1, 6, 4]])  # non-square, so rows and columns cannot be swapped unnoticed
  layout = vision_layout(grids, spatial_merge_size=2, window_size=56, patch_size=14)
  values = np.random.default_rng(0).normal(size=(8 + 6)).astype(np.float32)
  got = analysis.patch_grids(values, grids)
  # Naive: the processor's patch p has (row, col) = rope_hw[p] (block-major over 2x2 groups) and group p // 4.
  offset_p, offset_q = 0, 0
  for (t, h, w), grid in zip(grids, got):
    want = np.full((h, w), np.nan)
    for p in range(h * w):
      r, c = layout.rope_hw_P2[offset_p + p]
      want[r, c] = values[offset_q + p // 4]
    np.testing.assert_array_equal(grid, want)
    offset_p, offset_q = offset_p + h * w, offset_q + h * w // 4
  # The tower puts merge groups into window order with take(x, window_index) and undoes it with argsort.
  order = layout.window_index_Q
  assert not np.array_equal(order, np.arange(len(order)))  # several windows: the permutation is not trivial
  window_vals = np.asarray(jnp.take(jnp.asarray(values), jnp.asarray(order)))
  np.testing.assert_array_equal(analysis.window_to_processor_order(window_vals, order), values)
  np.testing.assert_array_equal(analysis.window_to_processor_order(window_vals, order), window_vals[np.argsort(order)])
  with pytest.raises(ValueError, match="merged tokens"):
    analysis.patch_grids(values[:-1], grids)
  with pytest.raises(ValueError, match="single-frame"):
    analysis.patch_grids(np.zeros(8), [[2, 4, 4]])


def test_occlusion_map_against_naive_loop(policy):
  record, tokens, mask = _user_case()
  for cf in ("mask_visual", "white_image"):
    batch = analysis.prepare_prompts(policy, [record], counterfactual=cf)
    got = analysis.occlusion_map(policy, batch, tokens, mask, counterfactual=cf, rows_per_call=3)  # 3 + 3 + 2
    pads = np.flatnonzero(np.asarray(batch.prompts.input_ids_BT)[0] == policy.model_cfg.image_token_id)
    assert len(pads) == 8 and got.shape == (8,)
    lp = _naive_logp(policy, batch.prompts, tokens, mask)
    white = (analysis._image_features(policy.params, policy.graphdef, batch.prompts.counterfactuals[cf].vision)
             if cf == "white_image" else None)
    want = []
    for q in range(8):
      if cf == "mask_visual":
        lq = _naive_logp(policy, batch.prompts, tokens, mask, hide_pos=pads[q])
      else:
        lq = _naive_logp(policy, batch.prompts, tokens, mask, replace=(q, white[q]))
      want.append((_kl(lp, lq) * mask).sum())
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)
    assert np.min(want) >= 0 and np.ptp(want) > 1e-4  # tokens differ in how much they matter
  with pytest.raises(ValueError, match="one prompt"):
    analysis.occlusion_map(policy, analysis.prepare_prompts(policy, [record, record]), np.zeros((2 * G, 6), int),
                           np.ones((2 * G, 6), bool))


# ---------------------------------------------------------------------------------------------------- display


def test_tokens_html_escapes_and_scales(policy):
  tok = policy.tokenizer
  ids = tok("<think>\nred</think>", add_special_tokens=False)["input_ids"]
  scores = np.linspace(0.0, 2.0, len(ids))
  out = views.tokens_html(tok, ids, scores, label="row 0")
  assert out.count("<span") == len(ids)
  # Without the markup the text reads back exactly, and every "<" / ">" of the completion was escaped.
  text = re.sub(r"</?(span|div|b)[^>]*>", "", out)
  assert "<" not in text and ">" not in text and html.unescape(text) == "row 0<think>\nred</think>"
  assert "rgba(220, 38, 38, 0.850)" in out and "rgba(220, 38, 38, 0.000)" in out  # max and min score
  masked = views.tokens_html(tok, ids, scores, np.arange(len(ids)) < 2)
  assert masked.count("<span") == 2


# -------------------------------------------------------------------------------------------------------- CLI


def _counts(tokenizer, fmt, indices):
  """Counts from the generator directly: tokens by tokenizing each rendered solution (+ EOS), visual tokens from the
  decoded pieces' character spans, steps from the solution's step labels (the answer segment excluded)."""
  n_tok, n_vis, n_steps, n_per = 0, 0, 0, 0
  for i in indices:
    record = synthetic.make_record(i, split="test", cfg=synthetic.SyntheticConfig(image_size=84))
    rendered = synthetic.render_solution(record["solution"], record["answer"], fmt=fmt)
    ids = tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
    n_tok += len(ids) + 1
    start = 0
    for t in ids:
      piece = tokenizer.decode([t])
      n_vis += bool(rendered.is_visual[start:start + len(piece)].any())
      start += len(piece)
    labels = [s["label"] for s in record["solution"]["steps"]]
    n_steps, n_per = n_steps + len(labels), n_per + labels.count("perception")
  return n_tok, n_vis, n_steps, n_per


def test_cli_prints_one_json_line_on_a_tiny_run(run_dir, policy, capsys):
  out = analysis.main(["--run", str(run_dir), "--num", "2", "--batch-size", "2"])
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(line) == out
  n_tok, n_vis, n_steps, n_per = _counts(policy.tokenizer, policy.fmt, range(2))
  assert (out["records"], out["tokens"], out["visual_tokens"]) == (2, n_tok, n_vis)
  assert (out["steps"], out["perception_steps"]) == (n_steps, n_per)
  for key in ("auroc_k3", "auroc_kl", "split_accuracy_v", "split_accuracy_kl", "majority_baseline", "visual_share",
              "pgpo_visual_mass"):
    assert 0.0 <= out[key] <= 1.0, key
  assert out["mean_kl"] > 0 and out["params"] == "final" and out["task"] is None
  # PGPO's weights average 1 per completion, so the visual words' share of the weight mass is their mean weight times
  # their share of the tokens.
  assert out["pgpo_visual_mass"] == pytest.approx(out["pgpo_weight_visual"] * out["visual_tokens"] / out["tokens"],
                                                  rel=1e-4)
  # One task family: record i is of family tasks[i % 5], so the first two `largest` records are 2 and 7.
  largest = analysis.main(["--run", str(run_dir), "--num", "2", "--batch-size", "2", "--task", "largest",
                           "--no-greedy"])
  n_tok, n_vis, n_steps, n_per = _counts(policy.tokenizer, policy.fmt, (2, 7))
  assert (largest["task"], largest["records"], largest["tokens"], largest["visual_tokens"]) == ("largest", 2, n_tok,
                                                                                                 n_vis)
  assert (largest["steps"], largest["perception_steps"]) == (n_steps, n_per)
  assert [r["source"] for r in analysis.heldout_records(policy.config, 3, task="largest")] == \
      ["synthetic/test/largest"] * 3
  with pytest.raises(ValueError, match="task='count' is not one of the run's data.tasks"):
    analysis.heldout_records(dataclasses.replace(policy.config, data=dataclasses.replace(
        policy.config.data, tasks=("color",))), 1, task="count")
  sft = analysis.main(["--run", str(run_dir), "--params", "sft", "--num", "2", "--batch-size", "2"])
  assert sft["params"] == "sft" and sft["records"] == 2 and sft["prompt_format"] == "pgpo"
  with pytest.raises(FileNotFoundError, match="jaxvg.train"):
    analysis.main(["--run", str(run_dir / "missing")])


def parity_reward(text, answer, fmt=None):
  """A reward any completion can earn, varying with the record: completion and answer lengths have the same parity
  (so the accuracy below is neither 0 nor 1 for a random model)."""
  del fmt
  return {"accuracy": float((len(text) + len(answer)) % 2 == 0), "overall": 0.0}


def test_greedy_accuracy_matches_a_per_record_greedy_loop(policy):
  """Batched over 2 (the last batch padded with an unscored row), against sample_rollouts at temperature 0."""
  cfg = dataclasses.replace(policy.config, algo=dataclasses.replace(policy.config.algo,
                                                                    reward_fn="test_analysis:parity_reward"))
  pol = dataclasses.replace(policy, config=cfg)
  records = analysis.heldout_records(cfg, 3)
  scores = []
  for r in records:
    texts = analysis.sample_rollouts(pol, analysis.prepare_prompts(pol, [r]), num_samples=1, max_new_tokens=6,
                                     temperature=0.0).texts
    scores.append(parity_reward(texts[0], r["answer"])["accuracy"])
  assert analysis.greedy_accuracy(pol, records, batch_size=2, max_new_tokens=6) == pytest.approx(np.mean(scores))


def test_a_teacher_read_in_its_privileged_context(run_dir, capsys):
  """--params teacher --prompt-format F reads the teacher's parameters in F: the prompt carries F's text (and the
  reference answer), the reference solutions the same tokens as in the run's format when F's sections hold them
  all, and the figures differ from the run's format because the prompt does."""
  ctx = analysis.load_policy(run_dir=str(run_dir), params="teacher", prompt_format="vigos_reference_teacher")
  own = analysis.load_policy(run_dir=str(run_dir), params="teacher")
  assert ctx.fmt.name == "vigos_reference_teacher" and own.fmt.name == "pgpo"
  record = analysis.heldout_records(ctx.config, 1)[0]
  batch = analysis.prepare_prompts(ctx, [record])
  real = np.asarray(batch.prompts.attention_mask_BT)[0] > 0
  text = ctx.tokenizer.decode(np.asarray(batch.prompts.input_ids_BT)[0][real])
  assert "=== Reference Solution Begin ===\n" + record["answer"] + "\n" in text
  assert text.endswith("<|im_start|>assistant\n<description>")
  args = ["--run", str(run_dir), "--params", "teacher", "--num", "2", "--batch-size", "2", "--no-greedy"]
  in_ctx = analysis.main([*args, "--prompt-format", "vigos_reference_teacher"])
  in_own = analysis.main(args)
  assert (in_ctx["prompt_format"], in_own["prompt_format"]) == ("vigos_reference_teacher", "pgpo")
  assert in_ctx["mean_kl"] != in_own["mean_kl"]
  with pytest.raises(ValueError, match="unknown prompt format 'vigos_teacher'"):
    analysis.load_policy(run_dir=str(run_dir), params="teacher", prompt_format="vigos_teacher")
