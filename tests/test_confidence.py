"""Answer-forcing confidences with the real (tiny) model: the one tree-masked pass equals K + 1 separate passes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxvg.credit import assign, confidence, steps
from jaxvg.data import prompts, synthetic
from jaxvg.run import builders
from jaxvg.run.experiment import DataCfg, ModelCfg

G = 2
WIDTH = 96  # completion width: the reference solutions of the batch fit
MAX_STEPS = 5


@pytest.fixture(scope="module")
def setup():
  # The one-step-per-scene form of the solutions: rollouts of a known number of steps (below).
  data = DataCfg(source="synthetic", num_train=4, prompts_per_batch=2, image_size=84, min_pixels=56 * 56,
                 max_pixels=56 * 56, length_buckets=(128,), patch_buckets=(64,), perception="scene", cell_tint=0)
  tok, model = builders.build_model(ModelCfg(preset="tiny", tiny_width=32, tiny_layers=2), data)
  batch = next(iter(builders.make_train_data(data, tok, model.cfg)))
  src = builders.source(data, "train")
  records = {src[i]["id"]: src[i] for i in range(len(src))}
  eos = tok.convert_tokens_to_ids("<|im_end|>")
  rows = []
  for b, rid in enumerate(batch.ids):
    text = synthetic.render_solution(records[rid]["solution"], records[rid]["answer"], fmt=prompts.PGPO).text
    rows.append(tok(text, add_special_tokens=False)["input_ids"] + [eos])  # a full rollout
    # Sample 1 of prompt 0: cut after the first step (a rollout that ran out of tokens); of prompt 1: empty.
    rows.append(tok(text[:text.index("\n\n") + 2], add_special_tokens=False)["input_ids"] if b == 0 else [])
  tokens = np.full((len(rows), WIDTH), tok.pad_token_id, np.int32)
  mask = np.zeros((len(rows), WIDTH), bool)
  for n, r in enumerate(rows):
    tokens[n, :len(r)], mask[n, :len(r)] = r, True
  graphdef, params = nnx.split(model, nnx.Param)
  prompt = assign.as_prompt_inputs(batch.prompts)
  tables = assign.step_tables(tok, model.cfg.text.vocab_size)
  seg = steps.segment_steps(jnp.asarray(tokens), jnp.asarray(mask), is_boundary_V=tables.is_boundary_V,
                            is_fallback_V=tables.is_fallback_V, is_blank_V=tables.is_blank_V, max_steps=MAX_STEPS)
  T0 = prompt.input_ids_BT.shape[1]
  boundary = steps.confidence_boundaries(jnp.full((len(rows),), T0), seg)
  suffix = confidence.answer_suffixes(tok, batch.answers, fmt=prompts.PGPO, group_size=G)
  return dict(tok=tok, model=model, params=params, graphdef=graphdef, prompt=prompt, tokens=tokens, mask=mask,
              boundary=boundary, suffix=suffix, answers=batch.answers, seg=seg)


def _naive_confidences(s):
  """K + 1 plain causal forwards of [prompt | H_<=k | suffix] per row, built by hand (positions, image features)."""
  model, prompt = s["model"], s["prompt"]
  ids_B = np.asarray(prompt.input_ids_BT)
  T0 = ids_B.shape[1]
  features_QD, _ = jax.jit(lambda v: model.vision(v))(prompt.vision)
  features_QD = np.asarray(features_QD)
  counts_B = (ids_B == model.cfg.image_token_id).sum(1)
  starts_B = np.concatenate([[0], np.cumsum(counts_B)[:-1]])
  tokens, boundary = s["tokens"], np.asarray(s["boundary"])
  sfx, valid, answer = (np.asarray(x) for x in (s["suffix"].tokens_NL, s["suffix"].valid_NL, s["suffix"].answer_NL))
  N, K1 = boundary.shape
  width = T0 + WIDTH + sfx.shape[1]
  forward = jax.jit(lambda ids, pos, m, feats: jax.nn.log_softmax(
      model.decoder.logits(model.hidden(ids, pos, m, image_features_QD=feats)[0]), axis=-1))
  out = np.zeros((N, K1))
  # Image features of row n = those of its prompt n // G, in row order.
  feats = np.concatenate([features_QD[starts_B[n // G]:starts_B[n // G] + counts_B[n // G]] for n in range(N)])
  for k in range(K1):
    ids = np.zeros((N, width), np.int32)
    pos = np.zeros((3, N, width), np.int32)
    m = np.zeros((N, width), np.int32)
    targets = []
    for n in range(N):
      b = n // G
      ids[n, :T0], m[n, :T0], pos[:, n, :T0] = ids_B[b], np.asarray(prompt.attention_mask_BT)[b], \
          np.asarray(prompt.positions_3BT)[:, b]
      keep = boundary[n, k] - T0 + 1
      s_n = sfx[n][valid[n]]
      seq = np.concatenate([tokens[n, :keep], s_n])
      ids[n, T0:T0 + len(seq)], m[n, T0:T0 + len(seq)] = seq, 1
      pos[:, n, T0:T0 + len(seq)] = int(prompt.next_position_B[b]) + np.arange(len(seq))
      targets.append([(T0 + keep + l, int(s_n[l])) for l in range(len(s_n)) if answer[n][l]])
    logp = np.asarray(forward(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(m), jnp.asarray(feats)))
    for n in range(N):
      if boundary[n, k] >= 0:
        # The token at row index i is predicted by the logits at i - 1.
        out[n, k] = sum(logp[n, i - 1, t] for i, t in targets[n])
  return out


def test_one_tree_pass_equals_k_plus_1_separate_passes(setup):
  s = setup
  # Sanity of the inputs: rollouts of 3, 2, 3 and 0 steps (the second falls back to "\n" splits).
  np.testing.assert_array_equal(np.asarray(s["seg"].num_steps_B), [3, 2, 3, 0])
  T0 = s["prompt"].input_ids_BT.shape[1]
  assert np.all(np.asarray(s["boundary"])[:3, 0] == T0 - 1) and np.all(np.asarray(s["boundary"])[3] == -1)
  got = np.asarray(confidence.tree_confidences_fn(s["params"], s["graphdef"], s["prompt"], jnp.asarray(s["tokens"]),
                                                  jnp.asarray(s["mask"]), G, s["boundary"], s["suffix"]))
  want = _naive_confidences(s)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  sep = confidence.separate_confidences(s["params"], s["graphdef"], s["prompt"], s["tokens"], s["mask"], G,
                                        boundary_NK1=s["boundary"], suffix=s["suffix"], width_multiple=128)
  np.testing.assert_allclose(sep, want, atol=1e-5, rtol=0)
  # Unused slots (past K_n, and the whole empty row) are exactly 0; used ones are real log-probs (< 0, distinct).
  used = np.asarray(s["boundary"]) >= 0
  assert np.all(got[~used] == 0.0) and np.all(got[used] < 0.0)
  assert np.ptp(got[0, :4]) > 1e-4  # the confidences do move with the prefix (else the test proves little)


def test_padding_does_not_change_confidences(setup):
  s = setup
  base = confidence.tree_confidences_fn(s["params"], s["graphdef"], s["prompt"], jnp.asarray(s["tokens"]),
                                        jnp.asarray(s["mask"]), G, s["boundary"], s["suffix"])
  pad = lambda x, w, v: jnp.pad(jnp.asarray(x), ((0, 0), (0, w)), constant_values=v)
  wide_suffix = confidence.AnswerSuffix(pad(s["suffix"].tokens_NL, 8, 5), pad(s["suffix"].valid_NL, 8, False),
                                        pad(s["suffix"].answer_NL, 8, False))
  # Extra completion columns hold junk tokens (masked), extra suffix slots too: nothing may leak.
  got = confidence.tree_confidences_fn(s["params"], s["graphdef"], s["prompt"], pad(s["tokens"], 16, 7),
                                       pad(s["mask"], 16, False), G, s["boundary"], wide_suffix)
  np.testing.assert_allclose(got, base, atol=1e-5, rtol=0)


def test_suffix_text_spans_by_hand():
  # "</think>" (8) + "\n" (1) + "\\boxed{" (7) = 16 characters before the answer.
  assert confidence.suffix_text(prompts.PGPO, "square") == ("</think>\n\\boxed{square}", 16, 22)
  # "</reason>" (9) + "\n" + "\\boxed{" -> 17.
  assert confidence.suffix_text(prompts.VGS, " 14 ") == ("</reason>\n\\boxed{14}", 17, 19)
  assert confidence.suffix_text(prompts.VIGOS, "x")[0] == "</think>\n\\boxed{x}"
  with pytest.raises(ValueError, match="answer"):
    confidence.suffix_text(prompts.PGPO, "  ")


def test_answer_tokens_found_by_offsets(setup):
  tok = setup["tok"]
  sfx = confidence.answer_suffixes(tok, ["square", "14", "blue"], fmt=prompts.PGPO, group_size=3)
  tokens, valid, answer = (np.asarray(x) for x in (sfx.tokens_NL, sfx.valid_NL, sfx.answer_NL))
  assert tokens.shape[0] == 9 and tokens.shape[1] % 8 == 0
  for n, (ans, text) in enumerate([("square", "</think>\n\\boxed{square}"), ("14", "</think>\n\\boxed{14}"),
                                   ("blue", "</think>\n\\boxed{blue}")]):
    for g in range(3):  # the G samples of a prompt share its suffix
      np.testing.assert_array_equal(tokens[3 * n + g], tokens[3 * n])
    pieces = [tok.decode([int(t)]) for t in tokens[3 * n][valid[3 * n]]]
    assert "".join(pieces) == text
    flags = answer[3 * n][valid[3 * n]]
    # The flagged tokens are one contiguous run that covers the answer and at most the "{" before / "}" after it.
    run = "".join(p for p, f in zip(pieces, flags) if f)
    assert ans in run and run.strip("{}") == ans, (ans, pieces, flags)
    first = int(np.argmax(flags))
    assert np.all(flags[first:first + int(flags.sum())])
    assert "".join(pieces[:first]).endswith("\\boxed") or "".join(pieces[:first]).endswith("{")
  assert not np.any(answer & ~valid)


def test_bad_inputs_raise(setup):
  s = setup
  with pytest.raises(ValueError, match="answers is empty"):
    confidence.answer_suffixes(s["tok"], [], fmt=prompts.PGPO, group_size=2)
  with pytest.raises(ValueError, match="B \\* G"):
    confidence.tree_confidences(s["model"], s["prompt"], jnp.asarray(s["tokens"][:3]), jnp.asarray(s["mask"][:3]), G,
                                boundary_NK1=s["boundary"][:3], suffix=s["suffix"])
  short = dataclasses.replace(s["suffix"], answer_NL=s["suffix"].answer_NL[:, :2])
  with pytest.raises(ValueError, match="answer_NL"):
    confidence.tree_confidences(s["model"], s["prompt"], jnp.asarray(s["tokens"]), jnp.asarray(s["mask"]), G,
                                boundary_NK1=s["boundary"], suffix=short)
