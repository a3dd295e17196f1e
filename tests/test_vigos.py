"""ViGOS: spans and validity on hand-written completions, the loss against a naive reference, global normalization.

The span rule is also checked on the real Qwen2.5 vocabulary in tests/test_vigos_real_vocab.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvg.distill import vigos
from jaxvg.distill import divergences as dv

VOCAB = ["<pad>", "<eos>", "</", "description", ">", ">\n", "<think>", "</think>", "\\", "boxed", "{", "}", "}}",
         "{(", ")}", "}{", "a", "b", "x", "=", "5", "frac", ".", "<th", "ink", "1", "2", "{5}", "<", ".</", "}."]
ID = {text: i for i, text in enumerate(VOCAB)}
IGNORE = (ID["<pad>"], ID["<eos>"])
FMT = vigos.DescribeReasonFormat()
T = 20
DCLOSE = ["</", "description", ">\n"]
BOX5 = ["\\", "boxed", "{", "5", "}"]


def _encode(rows, n_active=None):
  """Token strings -> (ids [B, T], mask [B, T]); n_active[b] < len(row) masks out the tail as padding."""
  ids = np.full((len(rows), T), ID["<pad>"], np.int32)
  mask = np.zeros((len(rows), T), bool)
  for b, row in enumerate(rows):
    ids[b, :len(row)] = [ID[t] for t in row]
    mask[b, :len(row) if n_active is None else n_active[b]] = True
  return ids, mask


def _spans(rows, fmt=FMT, n_active=None):
  ids, mask = _encode(rows, n_active)
  return vigos.describe_reason_spans(ids, mask, token_texts=VOCAB, fmt=fmt, ignore_ids=IGNORE), mask


def _positions(mask_T):
  return [int(t) for t in np.flatnonzero(np.asarray(mask_T))]


def test_valid_completion_spans():
  #       0  1  2-4 (</description>)  5        6  7  8  9         10-12 (\boxed{)  13 14 15 16
  row = ["a", "b", *DCLOSE, "<think>", "x", "=", "5", "</think>", *BOX5, ".", "<eos>"]
  spans, mask = _spans([row])
  assert bool(spans.valid_B[0])
  assert _positions(spans.description_BT[0]) == [0, 1]
  assert _positions(spans.reasoning_BT[0]) == list(range(6, 15))  # "x" .. "}" incl. </think>; not "." nor <eos>
  assert not np.any(spans.reference_BT)
  assert (int(spans.reasoning_start_B[0]), int(spans.reasoning_end_B[0])) == (6, 15)


def test_tokens_straddling_a_tag_belong_to_the_tag():
  # ".</" holds the description's last character and the tag's first: it is the tag's (the released rule), so the
  # description is "a b"; "}." closes the box and ends the reasoning span.
  #       0    1    2      3             4      5          6    7           8-10              11   12
  row = ["a", "b", ".</", "description", ">\n", "<think>", "x", "</think>", "\\", "boxed", "{", "5", "}.", "<eos>"]
  spans, _ = _spans([row])
  assert bool(spans.valid_B[0])
  assert _positions(spans.description_BT[0]) == [0, 1]
  assert _positions(spans.reasoning_BT[0]) == list(range(6, 13))


@pytest.mark.parametrize("name,row", [
    ("missing </think>", ["a", *DCLOSE, "<think>", "x", *BOX5]),
    ("missing </description>", ["a", "<think>", "x", "</think>", *BOX5]),
    ("missing boxed", ["a", *DCLOSE, "<think>", "x", "</think>", "5", "."]),
    ("think before </description>", ["<think>", "x", "</think>", "a", *DCLOSE, *BOX5]),
    ("boxed before </think>", ["a", *DCLOSE, "<think>", "x", *BOX5, "</think>"]),
    ("empty description", [*DCLOSE, "<think>", "x", "</think>", *BOX5]),
    ("description of EOS only", ["<eos>", *DCLOSE, "<think>", "x", "</think>", *BOX5]),
    ("description of the straddling token only", [".</", "description", ">", "<think>", "x", "</think>", *BOX5]),
    ("unclosed box", ["a", *DCLOSE, "<think>", "x", "</think>", "\\", "boxed", "{", "5", "<eos>"]),
    ("box closed only by an opening brace", ["a", *DCLOSE, "<think>", "x", "</think>", "\\", "boxed", "{", "{", "}"]),
])
def test_invalid_completions_fall_back_to_the_reference_teacher(name, row):
  spans, mask = _spans([row])
  assert not bool(spans.valid_B[0]), name
  assert not np.any(spans.description_BT) and not np.any(spans.reasoning_BT)
  np.testing.assert_array_equal(spans.reference_BT, mask)


def test_empty_reasoning_follows_the_code_by_default_and_the_strict_rule_on_request():
  row = ["a", *DCLOSE, "<think>", "</think>", *BOX5]  # nothing between <think> and </think>
  spans, _ = _spans([row])
  assert bool(spans.valid_B[0])  # T_r u T_a still holds </think> and the boxed answer
  assert _positions(spans.reasoning_BT[0]) == list(range(5, 11))
  strict, _ = _spans([row], fmt=vigos.DescribeReasonFormat(require_think_content=True))
  assert not bool(strict.valid_B[0])


def test_multi_token_tags_and_merged_braces():
  # <think> spelled as "<th" "ink" ">\n"; the box opens with "{(" and closes with ")}".
  #       0   1-3       4     5      6      7    8           9     10       11    12   13    14
  row = ["a", *DCLOSE, "<th", "ink", ">\n", "x", "</think>", "\\", "boxed", "{(", "1", ")}", "<eos>"]
  spans, _ = _spans([row])
  assert bool(spans.valid_B[0])
  assert _positions(spans.description_BT[0]) == [0]
  assert _positions(spans.reasoning_BT[0]) == list(range(7, 14))


def test_nested_braces_close_at_the_matching_token():
  # \boxed{ frac { 1 }{ 2 }} .  depth: 1, 1, 2, 2, 2 ("}{" dips to 1), 2, 0 at "}}".
  #       0   1-3       4         5    6           7-9                     10      11   12   13    14   15    16   17
  row = ["a", *DCLOSE, "<think>", "x", "</think>", "\\", "boxed", "{", "frac", "{", "1", "}{", "2", "}}", ".", "<eos>"]
  spans, _ = _spans([row])
  assert bool(spans.valid_B[0])
  assert _positions(spans.reasoning_BT[0]) == list(range(5, 16))


def test_box_opened_and_closed_in_one_token():
  row = ["a", *DCLOSE, "<think>", "x", "</think>", "\\", "boxed", "{5}", "<eos>"]
  spans, _ = _spans([row])
  assert bool(spans.valid_B[0])
  assert _positions(spans.reasoning_BT[0]) == list(range(5, 10))


def test_padding_hides_tags_and_rows_are_independent():
  good = ["a", *DCLOSE, "<think>", "x", "</think>", *BOX5, "<eos>"]
  # Row 1: the box sits in the padded tail (mask stops after </think>): invalid, and the reference mask stops too.
  spans, mask = _spans([good, good, ["<pad>"] * 3], n_active=[len(good), 7, 0])
  np.testing.assert_array_equal(spans.valid_B, [True, False, False])
  assert _positions(spans.reference_BT[1]) == list(range(7))
  assert not np.any(spans.reference_BT[2])  # an all-padding row supervises nothing
  assert _positions(spans.reasoning_BT[0]) == list(range(5, 12))  # "x" .. "}" (11); <eos> at 12 is not


def test_description_open_tag_when_not_prefilled():
  fmt = vigos.DescribeReasonFormat(description_open="<description>")
  row = ["<", "description", ">", "b", *DCLOSE, "<think>", "x", "</think>", *BOX5]
  spans, _ = _spans([row, row[3:]], fmt=fmt)
  np.testing.assert_array_equal(spans.valid_B, [True, False])
  assert _positions(spans.description_BT[0]) == [3]


# ---------------------------------------------------------------------------------------------------------------------
# The loss.

ROWS = [
    ["a", "b", *DCLOSE, "<think>", "x", "=", "5", "</think>", *BOX5, "<eos>"],
    ["a", *DCLOSE, "<think>", "x", *BOX5, "<eos>"],  # invalid: no </think>
    ["b", "a", "x", *DCLOSE, "<think>", "5", "</think>", *BOX5],
    ["x", "<eos>"],  # invalid
]
V = len(VOCAB)


def _logits(seed, scale):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), (len(ROWS), T, V))


def _naive_loss(z_s, z_img, z_rea, z_ref, spans, clamp):
  """Loops over tokens: clamp(KL) per token, summed per term, divided by the term's count; weights 1 / 1 / 2."""
  def log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  lp = [log_softmax(z) for z in (z_s, z_img, z_rea, z_ref)]
  kl = lambda a, b: float(np.sum(np.exp(a) * (a - b)))
  c = (lambda v: min(v, clamp)) if clamp is not None else (lambda v: v)
  sums = {"perception": 0.0, "reasoning": 0.0, "reference": 0.0}
  n = {"perception": 0, "reasoning": 0, "reference": 0}
  for b in range(z_s.shape[0]):
    for t in range(T):
      if spans.description_BT[b, t]:
        sums["perception"] += c(kl(lp[1][b, t], lp[0][b, t])); n["perception"] += 1
      if spans.reasoning_BT[b, t]:
        sums["reasoning"] += c(kl(lp[2][b, t], lp[0][b, t])); n["reasoning"] += 1
      if spans.reference_BT[b, t]:
        sums["reference"] += c(kl(lp[0][b, t], lp[3][b, t])); n["reference"] += 1
  return sums["perception"] / max(n["perception"], 1) + sums["reasoning"] / max(n["reasoning"], 1) + \
      2.0 * sums["reference"] / max(n["reference"], 1)


def _loss(z_s, z_img, z_rea, z_ref, spans, counts, config):
  return vigos.vigos_loss(student=dv.Logits(z_s), perception=dv.Logits(z_img), reasoning=dv.Logits(z_rea),
                          reference=dv.Logits(z_ref), spans=spans, counts=counts, config=config)


LOSS = jax.jit(_loss, static_argnames="config")


def test_loss_matches_a_naive_token_loop_with_and_without_the_clamp():
  spans, _ = _spans(ROWS)
  np.testing.assert_array_equal(spans.valid_B, [True, False, True, False])
  zs = [_logits(i, 0.2) for i in range(4)]
  counts = vigos.vigos_counts(spans)
  for clamp in (0.05, None):
    config = vigos.ViGOSConfig(max_token_value=clamp, chunk_size=7)
    loss, metrics = LOSS(*zs, spans, counts, config)
    np.testing.assert_allclose(loss, _naive_loss(*zs, spans, clamp), rtol=1e-5)
    assert float(metrics["vigos/valid_rows"]) == 2.0 and float(metrics["vigos/rows"]) == 4.0
    if clamp is not None:  # with logits this spread, the clamp is active on some tokens but not all
      assert 0.0 < float(metrics["vigos/clipped_reasoning"]) < 1.0


def test_loss_is_zero_when_student_equals_every_teacher():
  spans, _ = _spans(ROWS)
  z = _logits(0, 1.0)
  counts = vigos.vigos_counts(spans)
  config = vigos.ViGOSConfig(chunk_size=5)
  loss, _ = LOSS(z, z, z, z, spans, counts, config)
  assert float(loss) == 0.0
  g = jax.grad(lambda z: LOSS(z, z, z, z, spans, counts, config)[0])(z)
  np.testing.assert_allclose(g, 0.0, atol=1e-7)


def test_gradients_flow_to_the_student_only_and_match_the_forward_kl_formula():
  spans, _ = _spans(ROWS)
  zs = [_logits(i + 10, 0.05) for i in range(4)]  # small logits: every KL stays below the 0.05 clamp
  counts = vigos.vigos_counts(spans)
  config = vigos.ViGOSConfig(chunk_size=6)
  grads = jax.grad(lambda *z: LOSS(*z, spans, counts, config)[0], argnums=(0, 1, 2, 3))(*zs)
  for g in grads[1:]:
    assert np.all(np.asarray(g) == 0.0)
  # Description token (0, 0): d/dz KL(q_img || p_S) / N_perc = (p_S - q_img) / N_perc  (N_perc = 2 + 3 = 5).
  p_s, q_img = jax.nn.softmax(zs[0][0, 0]), jax.nn.softmax(zs[1][0, 0])
  np.testing.assert_allclose(grads[0][0, 0], (p_s - q_img) / 5.0, atol=1e-7)
  # Reference token (1, 0): 2 * d/dz KL(p_S || q_ref) / N_ref = 2 p_S (log p_S - log q_ref - KL) / N_ref,
  # N_ref = 12 + 2.
  lp_s, lq = jax.nn.log_softmax(zs[0][1, 0]), jax.nn.log_softmax(zs[3][1, 0])
  want = 2.0 * jnp.exp(lp_s) * (lp_s - lq - dv.kl(lp_s, lq)) / 14.0
  np.testing.assert_allclose(grads[0][1, 0], want, atol=1e-7)
  # Tokens in no span (row 0's <eos> at 15) get no gradient.
  assert np.all(np.asarray(grads[0][0, 15]) == 0.0)


def test_micro_batches_normalize_by_the_global_count():
  spans, _ = _spans(ROWS)
  zs = [_logits(i + 20, 0.3) for i in range(4)]
  config = vigos.ViGOSConfig(chunk_size=8)
  full_loss, full_metrics = LOSS(*zs, spans, vigos.vigos_counts(spans), config)
  halves = [jax.tree.map(lambda a: a[s], spans) for s in (slice(0, 2), slice(2, 4))]
  counts = jax.tree.map(lambda a, b: a + b, *(vigos.vigos_counts(h) for h in halves))
  # Perception tokens: 2 (row 0) + 3 (row 2); reasoning: 9 + 7; reference: 12 (row 1) + 2 (row 3).
  assert (float(counts.perception), float(counts.reasoning), float(counts.reference)) == (5.0, 16.0, 14.0)
  parts = [LOSS(*(z[s] for z in zs), h, counts, config) for s, h in zip((slice(0, 2), slice(2, 4)), halves)]
  np.testing.assert_allclose(parts[0][0] + parts[1][0], full_loss, rtol=1e-6)
  np.testing.assert_allclose(parts[0][0] + parts[1][0], _naive_loss(*zs, spans, 0.05), rtol=1e-5)
  for name in ("vigos/loss_perception", "vigos/loss_reasoning", "vigos/loss_reference"):
    np.testing.assert_allclose(parts[0][1][name] + parts[1][1][name], full_metrics[name], rtol=1e-6)
  # Normalizing each micro-batch by its own count would weigh the halves differently.
  local = sum(LOSS(*(z[s] for z in zs), h, vigos.vigos_counts(h), config)[0]
              for s, h in zip((slice(0, 2), slice(2, 4)), halves))
  assert abs(float(local) - float(full_loss)) > 1e-3


def test_palr_by_hand():
  # S = (1, 2, 3), A = (0.5, 0, 1), I = (0.5, 1, 1), region = first and last token:
  # (1*0.5 + 3*1) / (1*(0.5+0.5) + 3*(1+1)) = 3.5 / 7 = 0.5.
  s, a, i = (jnp.array([v]) for v in ([1.0, 2.0, 3.0], [0.5, 0.0, 1.0], [0.5, 1.0, 1.0]))
  region = jnp.array([[True, False, True]])
  got = vigos.palr(supervision_BT=s, answer_shift_BT=a, image_shift_BT=i, region_BT=region)
  np.testing.assert_allclose(got, 0.5, rtol=1e-6)
  whole = vigos.palr(supervision_BT=s, answer_shift_BT=a, image_shift_BT=i, region_BT=jnp.ones_like(region))
  np.testing.assert_allclose(whole, (0.5 + 0.0 + 3.0) / (1.0 + 2.0 + 6.0), rtol=1e-6)


def test_bad_inputs_raise_named_errors():
  with pytest.raises(ValueError, match="lambda_reference"):
    vigos.ViGOSConfig(lambda_reference=-1.0)
  with pytest.raises(ValueError, match="think_open"):
    vigos.DescribeReasonFormat(think_open="")
  with pytest.raises(ValueError, match="boxed_open"):
    vigos.DescribeReasonFormat(boxed_open="\\boxed")
  ids, mask = _encode([["a"]])
  with pytest.raises(ValueError, match="mask_BT"):
    vigos.describe_reason_spans(ids, mask[:, :3], token_texts=VOCAB)
  mask[0, 5] = True  # a hole: not right padding
  with pytest.raises(ValueError, match=r"rows \[0\] are not prefixes"):
    vigos.describe_reason_spans(ids, mask, token_texts=VOCAB)
