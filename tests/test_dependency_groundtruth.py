"""Ground truth for visual dependency on the synthetic dataset: the AUROC and Otsu step-split metrics on constructed
inputs (by hand and against brute force), and the generator's reference solutions mapped onto token ids.

With a tiny random model the metrics themselves are chance, so the model-free parts are what is tested here; the
replication table applies the same functions to a trained policy's scores.
"""

import numpy as np
import pytest

from jaxvg.credit import assign, groundtruth, steps
from jaxvg.data import prompts, synthetic
from jaxvg.data.tokenizer import load_tokenizer

from data_fixtures import qwen25vl_tokenizer

NON_VISUAL_WORDS = {"I", "see", "a", "at", "the", "and", "digit"}


def _pair_auroc(scores, positive):
  """Brute force over all (positive, negative) pairs: 1 for a win, 1/2 for a tie."""
  pos = [s for s, p in zip(scores, positive) if p]
  neg = [s for s, p in zip(scores, positive) if not p]
  return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg) / (len(pos) * len(neg))


def test_auroc_by_hand():
  # Pairs (0.9, 0.8) win, (0.9, 0.1) win, (0.3, 0.8) loss, (0.3, 0.1) win -> 3 / 4.
  assert groundtruth.auroc([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0]) == pytest.approx(0.75)
  # Positives {2, 1}, negatives {1, 0}: 1 + 1 + 1/2 (the tie) + 1 -> 3.5 / 4.
  assert groundtruth.auroc([2, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(0.875)
  assert groundtruth.auroc([3, 3, 3], [1, 0, 0]) == pytest.approx(0.5)  # all tied
  assert groundtruth.auroc([5, 4, 1, 0], [1, 1, 0, 0]) == 1.0
  assert groundtruth.auroc([5, 4, 1, 0], [0, 0, 1, 1]) == 0.0
  # Entries outside `valid` do not count: without the 0.8 negative, both positives beat the only negative 0.1.
  assert groundtruth.auroc([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0], valid=[1, 0, 1, 1]) == pytest.approx(1.0)
  assert np.isnan(groundtruth.auroc([1, 2], [1, 1]))
  assert np.isnan(groundtruth.auroc([1, 2], [1, 0], valid=[1, 0]))
  with pytest.raises(ValueError, match="finite"):
    groundtruth.auroc([np.nan, 1.0], [1, 0])
  with pytest.raises(ValueError, match="one size"):
    groundtruth.auroc([1.0, 2.0], [1, 0, 1])


def test_auroc_matches_pair_count_with_ties():
  rng = np.random.default_rng(0)
  for _ in range(20):
    n = int(rng.integers(2, 40))
    scores = rng.integers(0, 5, n).astype(float)  # few distinct values: many ties
    positive = rng.random(n) < 0.4
    if positive.all() or not positive.any():
      continue
    assert groundtruth.auroc(scores, positive) == pytest.approx(_pair_auroc(scores, positive), abs=1e-12)


def test_token_auroc_ranks_visual_against_reasoning_tokens_only():
  score = np.array([[0.9, 0.1, 0.5, 0.2, 7.0], [0.3, 0.8, 0.0, 0.0, 0.0]])
  visual = np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]], bool)
  reasoning = np.array([[0, 0, 1, 1, 0], [1, 0, 0, 0, 0]], bool)
  # Positives {0.9, 0.8}, negatives {0.5, 0.2, 0.3}: all 6 pairs win; the 7.0 token (neither) is ignored.
  assert groundtruth.token_auroc(score, visual, reasoning) == 1.0
  with pytest.raises(ValueError, match="both"):
    groundtruth.token_auroc(score, visual, visual)


def test_char_labels_to_tokens_by_hand():
  visual, step = groundtruth.char_labels_to_tokens([(0, 2), (2, 4), (4, 5)], [0, 0, 0, 1, 1], [0, 0, -1, 1, 1])
  np.testing.assert_array_equal(visual, [False, True, True])
  np.testing.assert_array_equal(step, [0, 1, 1])  # " c" takes the step of "c"
  visual, step = groundtruth.char_labels_to_tokens([(0, 1), (1, 1)], [0], [-1])  # an empty (special) token
  np.testing.assert_array_equal(visual, [False, False])
  np.testing.assert_array_equal(step, [-1, -1])
  with pytest.raises(ValueError, match="outside"):
    groundtruth.char_labels_to_tokens([(0, 3)], [0, 0], [0, 0])


def test_segment_labels_by_hand():
  labels = ("perception", "reasoning", "answer")
  assert groundtruth.segment_labels([0, 0, 0, 1, 1, 2, -1], [-1, 0, 0, 1, -1, 2, -1], labels) == list(labels)
  # A segment whose tokens are mostly reference step 1 takes its label; a segment of tags only gets "none".
  assert groundtruth.segment_labels([0, 0, 0, 1], [0, 1, 1, -1], labels) == ["reasoning", "none"]
  assert groundtruth.segment_labels([-1, -1], [0, 0], labels) == []


def test_step_split_accuracy_by_hand():
  # Otsu on [5, 4.5, 0.1, 0.2, 0]: {0, 0.1, 0.2} | {4.5, 5} (SSE 0.02 + 0.125), threshold 4.5.
  assert groundtruth.step_split_accuracy([5, 4.5, 0.1, 0.2, 0], [1, 1, 0, 0, 0]) == (1.0, 4.5)
  acc, _ = groundtruth.step_split_accuracy([5, 4.5, 0.1, 0.2, 0], [1, 0, 0, 0, 0])
  assert acc == pytest.approx(0.8)  # one step mislabelled by the score
  # No split exists for equal scores: every step goes to the visual side.
  assert groundtruth.step_split_accuracy([1, 1, 1, 1], [1, 0, 0, 0])[0] == pytest.approx(0.25)
  with pytest.raises(ValueError, match="non-empty"):
    groundtruth.step_split_accuracy([], [])


@pytest.fixture(scope="module", params=["shipped", "qwen2.5"])
def tok(request):
  # The shipped small vocabulary, and the real Qwen2.5 BPE (which merges tags and "\n\n" with their neighbours).
  return load_tokenizer() if request.param == "shipped" else qwen25vl_tokenizer()


@pytest.mark.parametrize("fmt", [prompts.PGPO, prompts.VGS])
def test_reference_solutions_map_onto_tokens(tok, fmt):
  tables = assign.step_tables(tok, len(tok))
  refs = []
  for index in range(10):  # two records of each of the five task families
    record = synthetic.make_record(index, split="train")
    rendered = synthetic.render_solution(record["solution"], record["answer"], fmt=fmt)
    ref = groundtruth.reference_tokens(tok, rendered)
    refs.append(ref)
    pieces = [tok.decode([int(t)]) for t in ref.token_ids]
    assert "".join(pieces) == rendered.text
    # Character spans from the decoded pieces (independent of the tokenizer's offsets) give the same labels.
    ends = np.cumsum([len(p) for p in pieces])
    spans = list(zip(np.concatenate([[0], ends[:-1]]), ends))
    visual, step = groundtruth.char_labels_to_tokens(spans, rendered.is_visual, rendered.step_id)
    np.testing.assert_array_equal(ref.is_visual, visual)
    np.testing.assert_array_equal(ref.step_id, step)
    # Visual tokens lie in perception steps only; connective words are never visual; every item's color / digit is.
    labels = np.asarray(ref.step_labels)
    assert np.all(labels[ref.step_id[ref.is_visual]] == "perception")
    assert not np.any(ref.is_visual & ref.is_reasoning)
    assert ref.is_reasoning.any() and ref.is_visual.any()
    for p, v in zip(pieces, ref.is_visual):
      if p.strip() in NON_VISUAL_WORDS:
        assert not v, (p, rendered.text)
    visual_text = " ".join(p.strip() for p, v in zip(pieces, ref.is_visual) if v)
    for item in record["solution"]["scene"]:
      word = str(item["digit"]) if item["shape"] == "digit" else item["color"]
      assert word in visual_text, (word, visual_text)
    # Segmenting the token ids ("\n\n" steps) recovers the generator's steps, then the answer segment.
    seg = steps.segment_steps(ref.token_ids[None], np.ones((1, len(ref.token_ids)), bool),
                              is_boundary_V=tables.is_boundary_V, is_fallback_V=tables.is_fallback_V,
                              is_blank_V=tables.is_blank_V, max_steps=8)
    got = groundtruth.segment_labels(np.asarray(seg.step_ids_BT)[0], ref.step_id, ref.step_labels)
    assert got == list(ref.step_labels), (got, rendered.text)

  eos = tok.convert_tokens_to_ids("<|im_end|>")
  width = max(len(r.token_ids) for r in refs) + 3
  arrays = groundtruth.reference_arrays(refs, width=width, pad_id=int(tok.pad_token_id), eos_id=eos)
  for n, r in enumerate(refs):
    L = len(r.token_ids)
    assert arrays["mask_NT"][n].sum() == L + 1 and arrays["tokens_NT"][n, L] == eos
    np.testing.assert_array_equal(arrays["is_visual_NT"][n, :L], r.is_visual)
    assert not arrays["is_visual_NT"][n, L:].any() and not arrays["is_reasoning_NT"][n, L:].any()
    # The answer class is the boxed answer's segment: its tokens decode to text that holds the \boxed{...} answer.
    answer_text = tok.decode([int(t) for t in r.token_ids[arrays["is_answer_NT"][n, :L]]])
    assert "\\boxed{" in answer_text and not arrays["is_answer_NT"][n, L:].any()
    assert not (arrays["is_answer_NT"][n] & (arrays["is_visual_NT"][n] | arrays["is_reasoning_NT"][n])).any()
  # An oracle score (1 on visual tokens, 0 elsewhere) ranks perfectly; its negation perfectly wrong.
  oracle = arrays["is_visual_NT"].astype(float)
  assert groundtruth.token_auroc(oracle, arrays["is_visual_NT"], arrays["is_reasoning_NT"]) == 1.0
  assert groundtruth.token_auroc(-oracle, arrays["is_visual_NT"], arrays["is_reasoning_NT"]) == 0.0
  with pytest.raises(ValueError, match="width"):
    groundtruth.reference_arrays(refs, width=4, pad_id=0)
