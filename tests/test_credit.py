"""The credit functions end to end on a tiny model and a synthetic batch from the real pipeline: PGPO weights keep
each response's mass, PACR / PDCR match a naive reference built from separate passes and a text-level segmentation,
and a bigram model (every layer's output projections zeroed) gives confidences computable by hand."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxvg.credit import assign, confidence
from jaxvg.data import prompts, synthetic
from jaxvg.rl import optim, update
from jaxvg.run import builders
from jaxvg.run.experiment import CreditCfg, DataCfg, ModelCfg

G = 2
WIDTH = 96
MAX_STEPS = 5
ADV_O = np.array([1.0, -2.0, 0.5, 3.0], np.float32)  # the outcome advantage of each row (row 3 is empty)
_score = jax.jit(update.score_fn, static_argnums=(1, 5))


@pytest.fixture(scope="module")
def setup():
  # The one-step-per-scene form of the solutions: every rollout has at most MAX_STEPS steps, which the naive
  # references below assume.
  data = DataCfg(source="synthetic", num_train=4, prompts_per_batch=2, image_size=84, min_pixels=56 * 56,
                 max_pixels=56 * 56, length_buckets=(128,), patch_buckets=(64,), perception="scene", cell_tint=0)
  tok, model = builders.build_model(ModelCfg(preset="tiny", tiny_width=32, tiny_layers=2), data)
  batch = next(iter(builders.make_train_data(data, tok, model.cfg, counterfactuals=("mask_visual", "white_image"))))
  src = builders.source(data, "train")
  records = {src[i]["id"]: src[i] for i in range(len(src))}
  eos = tok.convert_tokens_to_ids("<|im_end|>")
  rows = []
  for b, rid in enumerate(batch.ids):
    text = synthetic.render_solution(records[rid]["solution"], records[rid]["answer"], fmt=prompts.PGPO).text
    rows.append(tok(text, add_special_tokens=False)["input_ids"] + [eos])
    rows.append(tok(text[:text.index("\n\n") + 2], add_special_tokens=False)["input_ids"] if b == 0 else [])
  tokens = np.full((len(rows), WIDTH), tok.pad_token_id, np.int32)
  mask = np.zeros((len(rows), WIDTH), bool)
  for n, r in enumerate(rows):
    tokens[n, :len(r)], mask[n, :len(r)] = r, True
  state = update.init_state(model, optim.make_optimizer(optim.OptimConfig(), optim.trainable_params(model)))
  mb = types.SimpleNamespace(prompts=batch.prompts, tokens_NT=jnp.asarray(tokens), mask_NT=jnp.asarray(mask),
                             answers=batch.answers)
  prompt = assign.as_prompt_inputs(batch.prompts)
  logp_real, _ = _score(state.params, state.graphdef, prompt, mb.tokens_NT, mb.mask_NT, G)
  adv_NT = jnp.asarray(ADV_O[:, None] * mask)
  fns = {m: assign.make_credit_fn(CreditCfg(method=m, counterfactual="white_image" if m == "pdcr" else "mask_visual",
                                            max_steps=MAX_STEPS), model.cfg, tok, G, fmt=prompts.PGPO)
         for m in ("pgpo", "pacr", "pdcr")}
  return dict(tok=tok, model=model, state=state, mb=mb, prompt=prompt, logp_real=logp_real, adv=adv_NT, fns=fns,
              tokens=tokens, mask=mask, eos=eos)


def _naive_steps(tok, tokens, mask, eos):
  """Text-level segmentation: a non-blank token opens a step when a "\\n\\n" token came after the last non-blank one;
  one step only -> the same with "\\n". Returns per row the step id of each valid token."""
  out = []
  for row, m in zip(tokens, mask):
    texts = [tok.decode([int(t)]) for t in row[m]]

    def split(delim):
      ids, step, seen, pending = [], 0, False, False
      for t, text in zip(row[m], texts):
        content = bool(text.strip()) and t != eos
        if content and seen and pending:
          step += 1
        if content:
          seen, pending = True, False
        pending = pending or delim in text
        ids.append(step)
      return ids

    ids = split("\n\n")
    if ids and max(ids) == 0:
      ids = split("\n")
    out.append(np.asarray(ids, np.int32))
  return out


def _naive_step_advantages(s, step_ids, visual=None, lambda_o=1.0, lambda_p=0.5, answers=None, adv_o=None):
  """A_total per token from separate-pass confidences, G_k = c_K - c_{k-1} (gamma 1), per-cluster min-max.

  `answers` / `adv_o` list several micro-batches that share the rows of s (their answers and A_O differ); their steps
  form one pool. Returns (one [N, T] array per micro-batch, K per row, clusters, spread of G per cluster).
  """
  answers = [s["mb"].answers] if answers is None else answers
  adv_o = [ADV_O] if adv_o is None else adv_o
  T0 = s["prompt"].input_ids_BT.shape[1]
  K = [int(ids.max()) + 1 if ids.size else 0 for ids in step_ids]
  boundary = np.full((len(K), MAX_STEPS + 1), -1, np.int32)
  for n, ids in enumerate(step_ids):
    if K[n]:
      boundary[n, 0] = T0 - 1
      boundary[n, 1:K[n] + 1] = [T0 + np.flatnonzero(ids == k).max() for k in range(K[n])]
  returns = {}
  for j, ans in enumerate(answers):
    suffix = confidence.answer_suffixes(s["tok"], ans, fmt=prompts.PGPO, group_size=G)
    c = confidence.separate_confidences(s["state"].params, s["state"].graphdef, s["prompt"], s["tokens"], s["mask"],
                                        G, boundary_NK1=boundary, suffix=suffix, width_multiple=128)
    for n in range(len(K)):
      for k in range(K[n]):
        returns[j, n, k] = c[n, K[n]] - c[n, k]  # G_{k+1} = c_K - c_k
  cluster = {key: 0 for key in returns}
  if visual is not None:  # brute-force Otsu: the threshold among the values with the least SSE (first on ties)
    vals = np.array([v for row in visual for v in row], np.float64)
    best = None
    for c_star in np.unique(vals)[1:]:
      hi, lo = vals[vals >= c_star], vals[vals < c_star]
      sse = ((hi - hi.mean())**2).sum() + ((lo - lo.mean())**2).sum()
      if best is None or sse < best[0] - 1e-12:
        best = (sse, c_star)
    c_star = best[1] if best else vals.min()
    cluster = {(j, n, k): int(visual[n][k] >= c_star) for j, n, k in returns}
  process, spread = {}, {}
  for label in (0, 1):
    members = [key for key in returns if cluster[key] == label]
    if not members:
      continue
    g = np.array([returns[key] for key in members])
    spread[label] = g.max() - g.min()
    for key, v in zip(members, g):
      process[key] = (v - g.min()) / (g.max() - g.min() + 1e-8) if g.max() > g.min() else 0.0
  advs = [np.zeros(s["tokens"].shape) for _ in answers]
  for j in range(len(answers)):
    for n, ids in enumerate(step_ids):
      for t, k in enumerate(ids):
        advs[j][n, t] = lambda_o * adv_o[j][n] + lambda_p * process[j, n, k]
  clusters = [[cluster[0, n, k] for k in range(K[n])] for n in range(len(K))]
  return advs, K, clusters, spread


def test_counterfactuals_needed_and_config_errors():
  assert assign.counterfactuals_needed(CreditCfg(method="none")) == ()
  assert assign.counterfactuals_needed(CreditCfg(method="pgpo")) == ("mask_visual",)
  assert assign.counterfactuals_needed(CreditCfg(method="pacr")) == ()
  assert assign.counterfactuals_needed(CreditCfg(method="pdcr", counterfactual="white_image")) == ("white_image",)
  with pytest.raises(ValueError, match="credit.method='ppo'"):
    assign.counterfactuals_needed(CreditCfg(method="ppo"))
  with pytest.raises(ValueError, match="credit.counterfactual='blur'"):
    assign.counterfactuals_needed(CreditCfg(method="pdcr", counterfactual="blur"))
  with pytest.raises(ValueError, match="max_steps"):
    assign.counterfactuals_needed(CreditCfg(method="pacr", max_steps=0))
  with pytest.raises(ValueError, match="step_score"):
    assign.make_credit_fn(CreditCfg(method="pacr", step_score="median"), None, None, 2, fmt=prompts.PGPO)


def test_pgpo_weights_sum_to_each_response_length_on_the_real_path(setup):
  s = setup
  adv, metrics, dep = s["fns"]["pgpo"](s["state"], s["mb"], s["logp_real"], s["adv"])
  adv = np.asarray(adv)
  w = adv / np.where(ADV_O == 0, 1, ADV_O)[:, None]
  lengths = s["mask"].sum(1)
  np.testing.assert_allclose(w.sum(1), lengths, rtol=1e-5)  # Eq. 7: sum_t w~_t = |o_i| (0 for the empty row)
  assert np.all(w >= 0) and np.all(adv[~s["mask"]] == 0)
  assert not np.allclose(w[s["mask"]], 1.0)  # the weights really vary
  # The logged k3 map is the sampled-token estimator of the two passes, written out.
  cf = assign.as_prompt_inputs(s["mb"].prompts.counterfactuals["mask_visual"])
  logp_cf, _ = _score(s["state"].params, s["state"].graphdef, cf, s["mb"].tokens_NT, s["mb"].mask_NT, G)
  d = np.clip(np.asarray(logp_cf) - np.asarray(s["logp_real"]), -20, 20)
  np.testing.assert_allclose(dep["token_k3"], np.clip(np.exp(d) - d - 1, 0, 10)[s["mask"]], atol=1e-6)
  assert 0.0 <= metrics["pgpo/frac_boosted"] <= 1.0


def test_pacr_matches_a_naive_reference(setup):
  s = setup
  adv, metrics, dep = s["fns"]["pacr"](s["state"], s["mb"], s["logp_real"], s["adv"])
  step_ids = _naive_steps(s["tok"], s["tokens"], s["mask"], s["eos"])
  (want,), K, _, spread = _naive_step_advantages(s, step_ids)
  assert spread[0] > 1e-3  # the returns differ, so the min-max is not degenerate
  # c agrees to ~1e-5; min-max divides by the spread of the returns, so the tolerance scales with 1 / spread.
  np.testing.assert_allclose(np.asarray(adv), want, atol=0.5 * 4e-5 / spread[0] + 1e-6)
  assert dep is None
  assert metrics["pacr/steps_per_response"] == pytest.approx(np.mean([k for k in K if k]))
  assert metrics["pacr/all_steps"] == sum(K)
  # Global min-max: the best step of the batch gets lambda_O A_O + lambda_P, the worst lambda_O A_O.
  a_p = (np.asarray(adv) - ADV_O[:, None]) / 0.5
  assert a_p[s["mask"]].max() == pytest.approx(1.0, abs=1e-5) and a_p[s["mask"]].min() == pytest.approx(0, abs=1e-5)


def test_pdcr_matches_a_naive_reference(setup):
  s = setup
  adv, metrics, dep = s["fns"]["pdcr"](s["state"], s["mb"], s["logp_real"], s["adv"])
  step_ids = _naive_steps(s["tok"], s["tokens"], s["mask"], s["eos"])
  white = assign.as_prompt_inputs(s["mb"].prompts.counterfactuals["white_image"])
  logp_white, _ = _score(s["state"].params, s["state"].graphdef, white, s["mb"].tokens_NT, s["mb"].mask_NT, G)
  diff = np.asarray(s["logp_real"]) - np.asarray(logp_white)
  visual = [[float(diff[n, :len(ids)][ids == k].sum()) for k in range(int(ids.max()) + 1 if ids.size else 0)]
            for n, ids in enumerate(step_ids)]
  (want,), K, cluster, spread = _naive_step_advantages(s, step_ids, visual=visual)
  np.testing.assert_allclose(dep["step_V"], [v for row in visual for v in row], atol=1e-5)
  tol = 0.5 * 4e-5 / min(v for v in spread.values() if v > 0) + 1e-6
  np.testing.assert_allclose(np.asarray(adv), want, atol=tol)
  n_visual = sum(c for row in cluster for c in row)
  assert metrics["pdcr/visual_steps"] == n_visual and metrics["pdcr/textual_steps"] == sum(K) - n_visual
  assert 0 < n_visual < sum(K)  # two real clusters


def test_batch_credit_pools_every_micro_batch_of_the_rollout_batch(setup):
  s = setup
  batch_fn = assign.make_batch_credit_fn(CreditCfg(method="pacr", max_steps=MAX_STEPS), s["model"].cfg, s["tok"], G,
                                         fmt=prompts.PGPO)
  # A second micro-batch: the same rollouts graded against other answers, with other outcome advantages.
  mb2 = types.SimpleNamespace(**{**vars(s["mb"]), "answers": ("7", "blue")})
  adv_o2 = np.array([-1.0, 1.0, 2.0, 0.0], np.float32)
  advs, metrics, _ = batch_fn(s["state"], [s["mb"], mb2], [s["logp_real"]] * 2,
                              [s["adv"], jnp.asarray(adv_o2[:, None] * s["mask"])])
  step_ids = _naive_steps(s["tok"], s["tokens"], s["mask"], s["eos"])
  want, K, _, spread = _naive_step_advantages(s, step_ids, answers=[s["mb"].answers, mb2.answers],
                                              adv_o=[ADV_O, adv_o2])
  for got, ref in zip(advs, want):
    np.testing.assert_allclose(np.asarray(got), ref, atol=0.5 * 4e-5 / spread[0] + 1e-6)
  assert metrics["pacr/all_steps"] == 2 * sum(K)
  # The pool is the whole batch: normalized alone, the first micro-batch gets other advantages.
  alone, _, _ = s["fns"]["pacr"](s["state"], s["mb"], s["logp_real"], s["adv"])
  assert np.max(np.abs(np.asarray(alone) - np.asarray(advs[0]))) > 1e-3
  # A micro-batch given twice changes no statistic: each copy gets exactly what it gets alone.
  twice, _, _ = batch_fn(s["state"], [s["mb"], s["mb"]], [s["logp_real"]] * 2, [s["adv"]] * 2)
  for got in twice:
    np.testing.assert_allclose(np.asarray(got), np.asarray(alone), atol=1e-6)


def _bigram_state(s):
  """The model with every attention and MLP output projection zeroed: the residual stream stays the token embedding,
  so log pi(next | context) depends on the current token only, and neither positions nor the image matter."""
  zero = ("o_LNHD", "down_LFD")
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if any(getattr(p, "key", None) in zero for p in path) else x,
      s["state"].params)
  return s["state"].replace(params=params)


def test_bigram_model_confidences_and_advantages_by_hand(setup):
  s = setup
  state = _bigram_state(s)
  cfg = s["model"].cfg.text
  model = nnx.merge(state.graphdef, state.params)
  assert float(jnp.abs(model.decoder.o_LNHD[...]).max()) == 0.0
  E = np.asarray(model.decoder.embed_VD[...], np.float64)
  norm = np.asarray(model.decoder.final_norm_D[...], np.float64)
  h = E / np.sqrt(np.mean(E**2, axis=1, keepdims=True) + cfg.rms_norm_eps) * norm
  logits = h @ E.T  # tied head
  top = logits.max(1, keepdims=True)
  bigram = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))  # log_softmax per current token

  # c_k = sum over the answer slots l of log p(s_l | s_{l-1}): the answer follows "\\boxed" or "{" whatever the
  # prefix, so every c_k of a row is the same number, the gains and returns are 0, the min-max is degenerate
  # (A_P = 0) and A_total = lambda_O * A_O on every token.
  suffix = confidence.answer_suffixes(s["tok"], s["mb"].answers, fmt=prompts.PGPO, group_size=G)
  sfx, valid, ans = (np.asarray(x) for x in (suffix.tokens_NL, suffix.valid_NL, suffix.answer_NL))
  c = [sum(bigram[sfx[n, l - 1], sfx[n, l]] for l in range(1, int(valid[n].sum())) if ans[n, l]) for n in range(4)]
  rows = s["mask"].any(1)
  adv, metrics, _ = s["fns"]["pacr"](state, s["mb"], s["logp_real"], s["adv"])
  assert metrics["pacr/c0_mean"] == pytest.approx(np.mean(np.array(c)[rows]), abs=1e-4)
  assert metrics["pacr/c_final_mean"] == pytest.approx(metrics["pacr/c0_mean"], abs=1e-5)
  assert metrics["pacr/gain_mean"] == pytest.approx(0.0, abs=1e-5)
  np.testing.assert_allclose(np.asarray(adv), ADV_O[:, None] * s["mask"], atol=1e-6)
  # The image cannot matter either, so V_k = 0 for every step: Otsu keeps one (visual) cluster; PDCR equals PACR.
  logp_real, _ = _score(state.params, state.graphdef, s["prompt"], s["mb"].tokens_NT, s["mb"].mask_NT, G)
  adv_pdcr, metrics, dep = s["fns"]["pdcr"](state, s["mb"], logp_real, s["adv"])
  np.testing.assert_allclose(dep["step_V"], 0.0, atol=1e-6)
  assert metrics["pdcr/textual_steps"] == 0 and metrics["pdcr/visual_steps"] == len(dep["step_V"])
  np.testing.assert_allclose(np.asarray(adv_pdcr), np.asarray(adv), atol=1e-6)


def test_step_credit_input_errors(setup):
  s = setup
  no_answers = types.SimpleNamespace(prompts=s["mb"].prompts, tokens_NT=s["mb"].tokens_NT, mask_NT=s["mb"].mask_NT)
  with pytest.raises(ValueError, match="mb.answers"):
    s["fns"]["pacr"](s["state"], no_answers, s["logp_real"], s["adv"])
  one_answer = types.SimpleNamespace(**{**vars(s["mb"]), "answers": s["mb"].answers[:1]})
  with pytest.raises(ValueError, match="1 entries for 2 prompts"):
    s["fns"]["pacr"](s["state"], one_answer, s["logp_real"], s["adv"])
  with pytest.raises(ValueError, match="needs the prompt format"):
    assign.make_credit_fn(CreditCfg(method="pdcr", counterfactual="white_image"), s["model"].cfg, s["tok"], G)
  fn = assign.make_credit_fn(CreditCfg(method="pdcr", counterfactual="no_image"), s["model"].cfg, s["tok"], G,
                             fmt=prompts.PGPO)
  with pytest.raises(ValueError, match="no 'no_image' variant"):
    fn(s["state"], s["mb"], s["logp_real"], s["adv"])
