"""Step segmentation on token ids and the one-pass tree layout for answer-forcing confidences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvg.credit import steps

# A toy vocabulary: id -> decoded text.
TEXTS = ["<pad>", "a", "b", "\n\n", "\n", ".\n\n", " ", "c", "\n\n\n", ".\n", " x"]
PAD, A, B, NN, N, DOT_NN, SP, C, NNN, DOT_N, X = range(len(TEXTS))
TABLES = steps.build_step_tables(lambda i: TEXTS[i], len(TEXTS))
_jit_segment = jax.jit(steps.segment_steps, static_argnames=("max_steps",))
_jit_layout = jax.jit(steps.tree_layout)


def _segment(rows, max_steps=6, fallback=True, blank=True, split=True):
  """Right-pad python token lists with PAD to one fixed shape (one compile for most tests), segment, trim."""
  width = max(len(r) for r in rows)
  tokens = np.full((40, 24), PAD, np.int32)
  mask = np.zeros((40, 24), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    mask[i, :len(r)] = True
  seg = _jit_segment(jnp.asarray(tokens), jnp.asarray(mask), is_boundary_V=TABLES.is_boundary_V,
                     is_fallback_V=TABLES.is_fallback_V if fallback else None,
                     is_blank_V=TABLES.is_blank_V if blank else None,
                     ends_head_V=TABLES.ends_head_V if split else None,
                     starts_tail_V=TABLES.starts_tail_V if split else None, max_steps=max_steps)
  n = len(rows)
  return np.asarray(seg.step_ids_BT)[:n, :width], np.asarray(seg.num_steps_B)[:n], np.asarray(seg.step_end_BC)[:n]


def _naive_ids(tokens, delimiter):
  """A sequential state machine: a content token after a pending delimiter opens a step if content came before. A
  delimiter is pending once it ends inside a token of the text read so far."""
  ids, step, seen_content, pending, before = [], 0, False, False, ""
  for tok in tokens:
    text = TEXTS[tok]
    content = bool(text.strip())
    if content and seen_content and pending:
      step += 1
    if content:
      seen_content, pending = True, False
    window = before[len(before) - len(delimiter) + 1:] + text  # the delimiter's length - 1 chars before, then text
    last = window.rfind(delimiter)
    if last >= 0 and last + len(delimiter) > len(window) - len(text):
      pending = True
    before += text
    ids.append(step)
  return ids


def _naive_segment(tokens, max_steps):
  ids = _naive_ids(tokens, "\n\n")
  if tokens and max(ids) == 0:
    ids = _naive_ids(tokens, "\n")
  ids = [min(i, max_steps - 1) for i in ids]
  num = max(ids) + 1 if tokens else 0
  ends = [max(t for t, i in enumerate(ids) if i == k) for k in range(num)] + [-1] * (max_steps - num)
  return ids, num, ends


def test_build_step_tables_by_hand():
  # "\n\n" occurs in ids 3 ("\n\n"), 5 (".\n\n"), 8 ("\n\n\n"); "\n" also in 4 and 9; blank: 3, 4, 6 (" "), 8.
  np.testing.assert_array_equal(np.flatnonzero(TABLES.is_boundary_V), [NN, DOT_NN, NNN])
  np.testing.assert_array_equal(np.flatnonzero(TABLES.is_fallback_V), [NN, N, DOT_NN, NNN, DOT_N])
  np.testing.assert_array_equal(np.flatnonzero(TABLES.is_blank_V), [NN, N, SP, NNN])
  # A "\n\n" split over two tokens: the first ends with "\n" and the second starts with "\n".
  np.testing.assert_array_equal(np.flatnonzero(TABLES.ends_head_V), [NN, N, DOT_NN, NNN, DOT_N])
  np.testing.assert_array_equal(np.flatnonzero(TABLES.starts_tail_V), [NN, N, NNN])
  one_char = steps.build_step_tables(lambda i: TEXTS[i], len(TEXTS), delimiter="\n")
  assert not one_char.ends_head_V.any() and not one_char.starts_tail_V.any()  # "\n" cannot be split
  for delimiter, fallback in (("", "\n"), ("\n\n\n", "\n"), ("\n\n", "\n\n")):
    with pytest.raises(ValueError, match="delimiter"):
      steps.build_step_tables(lambda i: "", 3, delimiter=delimiter, fallback_delimiter=fallback)


def test_blank_ids_keep_eos_in_the_last_step():
  # "a\n\nb\n\n<eos>": with <eos> (id 0 here) marked blank it joins step 1 instead of opening an EOS-only step 2.
  tables = steps.build_step_tables(lambda i: TEXTS[i], len(TEXTS), blank_ids=[PAD])
  assert tables.is_blank_V[PAD] and not TABLES.is_blank_V[PAD]
  row = jnp.array([[A, NN, B, NN, PAD]])
  kwargs = dict(is_boundary_V=tables.is_boundary_V, is_fallback_V=tables.is_fallback_V, max_steps=4)
  seg = _jit_segment(row, jnp.ones((1, 5), bool), is_blank_V=tables.is_blank_V, **kwargs)
  np.testing.assert_array_equal(seg.step_ids_BT[0], [0, 0, 1, 1, 1])
  seg = _jit_segment(row, jnp.ones((1, 5), bool), is_blank_V=TABLES.is_blank_V, **kwargs)
  np.testing.assert_array_equal(seg.step_ids_BT[0], [0, 0, 1, 1, 2])
  with pytest.raises(ValueError, match="blank_ids"):
    steps.build_step_tables(lambda i: TEXTS[i], len(TEXTS), blank_ids=[99])


def test_double_newline_steps():
  # "a\n\nb\n\nc": steps [a \n\n] [b \n\n] [c]; ends at response indices 1, 3, 4.
  ids, num, ends = _segment([[A, NN, B, NN, C]])
  np.testing.assert_array_equal(ids[0], [0, 0, 1, 1, 2])
  assert num[0] == 3
  np.testing.assert_array_equal(ends[0], [1, 3, 4, -1, -1, -1])


def test_delimiter_inside_a_content_token():
  # "a.\n\nb x": the ".\n\n" token closes step 0.
  ids, num, ends = _segment([[A, DOT_NN, B, X]])
  np.testing.assert_array_equal(ids[0], [0, 0, 1, 1])
  np.testing.assert_array_equal(ends[0, :2], [1, 3])


def test_consecutive_delimiters_and_blank_pieces_merge_into_previous_step():
  # "a\n\n\n\nb": the second "\n\n" starts no new (empty) step. "a\n\n \n\n\n\nb": the blank " " and the runs merge too.
  ids, num, _ = _segment([[A, NN, NN, B], [A, NN, SP, NN, NNN, B, NN, C]])
  np.testing.assert_array_equal(ids[0, :4], [0, 0, 0, 1])
  np.testing.assert_array_equal(ids[1], [0, 0, 0, 0, 0, 1, 1, 2])
  np.testing.assert_array_equal(num, [2, 3])


def test_leading_and_trailing_delimiters():
  # A leading "\n\n" has no previous step: it joins the first one. A trailing one ends the last step.
  ids, num, ends = _segment([[NN, A, NN, B], [A, NN, B, NN]])
  np.testing.assert_array_equal(ids, [[0, 0, 0, 1], [0, 0, 1, 1]])
  np.testing.assert_array_equal(num, [2, 2])
  np.testing.assert_array_equal(ends[:, :2], [[2, 3], [1, 3]])


def test_single_newline_fallback():
  # "a\nb\nc" has no "\n\n": one step -> re-split on "\n": [a \n] [b .\n] [c].
  ids, num, _ = _segment([[A, N, B, DOT_N, C]])
  np.testing.assert_array_equal(ids[0], [0, 0, 1, 1, 2])
  assert num[0] == 3
  # Without the fallback table the row stays one step.
  ids, num, _ = _segment([[A, N, B, DOT_N, C]], fallback=False)
  np.testing.assert_array_equal(ids[0], [0, 0, 0, 0, 0])
  # Two "\n\n" steps: no fallback even though "\n" would give more steps.
  ids, num, _ = _segment([[A, N, B, NN, C, N, A]])
  np.testing.assert_array_equal(ids[0], [0, 0, 0, 0, 1, 1, 1])


def test_double_newline_split_over_two_tokens():
  # A sampled tokenization may split "\n\n" as ".\n" + "\n" (both are Qwen2.5 tokens): "a\n\nb.\n" + "\nc" has
  # three steps, "a.\n" + "\nb\nc" two (no fallback to "\n"), "a\n" + "\nb" two.
  rows = [[A, NN, B, DOT_N, N, C], [A, DOT_N, N, B, N, C], [A, N, N, B]]
  ids, num, ends = _segment(rows)
  np.testing.assert_array_equal(ids[0], [0, 0, 1, 1, 1, 2])
  np.testing.assert_array_equal(ids[1], [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(ids[2], [0, 0, 0, 1, -1, -1])
  np.testing.assert_array_equal(num, [3, 2, 2])
  np.testing.assert_array_equal(ends[:, :3], [[1, 4, 5], [2, 5, -1], [2, 3, -1]])
  # Without the split tables the first row misses its second boundary and the second falls back to three "\n" steps.
  ids, num, _ = _segment(rows[:2], split=False)
  np.testing.assert_array_equal(ids[:, :6], [[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 2]])
  # The halves pair across a masked token (the previous VALID token counts), never with a masked one.
  tokens = jnp.array([[A, NN, B, DOT_N, X, N, C], [A, NN, B, X, DOT_N, N, C]])
  mask = jnp.array([[1, 1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 0, 1, 1]], bool)
  seg = _jit_segment(tokens, mask, **vars(TABLES), max_steps=4)
  np.testing.assert_array_equal(seg.step_ids_BT, [[0, 0, 1, 1, -1, 1, 2], [0, 0, 1, 1, -1, 1, 1]])


def test_split_boundary_token_holding_content_ends_its_step():
  # "a.\n" + "\nb" + "c": "\nb" completes the "\n\n", so it is a boundary token and ends step 0 (as ".\n\nb" would).
  texts = ["a", ".\n", "\nb", "c"]
  tables = steps.build_step_tables(lambda i: texts[i], len(texts))
  seg = _jit_segment(jnp.array([[0, 1, 2, 3]]), jnp.ones((1, 4), bool), **vars(tables), max_steps=3)
  np.testing.assert_array_equal(seg.step_ids_BT[0], [0, 0, 0, 1])
  with pytest.raises(ValueError, match="both"):
    steps.segment_steps(jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool), is_boundary_V=tables.is_boundary_V,
                        ends_head_V=tables.ends_head_V, max_steps=2)


def test_no_delimiter_padding_and_empty_rows():
  # "abc" -> one step ending at index 2; a padded row keeps -1 on padding; an empty row has 0 steps.
  ids, num, ends = _segment([[A, B, C, A], [A, NN, B], []])
  np.testing.assert_array_equal(ids, [[0, 0, 0, 0], [0, 0, 1, -1], [-1, -1, -1, -1]])
  np.testing.assert_array_equal(num, [1, 2, 0])
  np.testing.assert_array_equal(ends[:, :3], [[3, -1, -1], [1, 2, -1], [-1, -1, -1]])


def test_left_padding():
  tokens = jnp.array([[PAD, PAD, A, NN, B]])
  mask = jnp.array([[False, False, True, True, True]])
  seg = _jit_segment(tokens, mask, is_boundary_V=TABLES.is_boundary_V, is_blank_V=TABLES.is_blank_V,
                     max_steps=3)
  np.testing.assert_array_equal(seg.step_ids_BT[0], [-1, -1, 0, 0, 1])
  np.testing.assert_array_equal(seg.step_end_BC[0], [3, 4, -1])


def test_overflow_merges_into_last_slot():
  # Four steps with max_steps = 2: steps 1..3 share slot 1.
  ids, num, ends = _segment([[A, NN, B, NN, C, NN, A]], max_steps=2)
  np.testing.assert_array_equal(ids[0], [0, 0, 1, 1, 1, 1, 1])
  assert num[0] == 2
  np.testing.assert_array_equal(ends[0], [1, 6])


def test_blank_default_without_blank_table():
  # Without is_blank_V the delimiter tokens count as blank: "a\n\n\n\nb" still gives two steps.
  ids, num, _ = _segment([[A, NN, NNN, B]], blank=False)
  np.testing.assert_array_equal(ids[0], [0, 0, 0, 1])


def test_segmentation_matches_state_machine_on_random_rows():
  rng = np.random.default_rng(0)
  ids_pool = np.array([A, B, C, X, NN, N, DOT_NN, SP, NNN, DOT_N])
  probs = np.array([4, 4, 4, 4, 2, 2, 1, 1, 1, 1], float)
  rows = [list(rng.choice(ids_pool, size=rng.integers(0, 24), p=probs / probs.sum())) for _ in range(40)]
  got_ids, got_num, got_ends = _segment(rows, 5)
  for r, row in enumerate(rows):
    ids, num, ends = _naive_segment(row, 5)
    np.testing.assert_array_equal(got_ids[r, :len(row)], ids, err_msg=f"row {r}: {[TEXTS[t] for t in row]}")
    assert np.all(got_ids[r, len(row):] == -1)
    assert got_num[r] == num
    np.testing.assert_array_equal(got_ends[r], ends)


def test_segment_steps_jits_and_validates():
  fn = jax.jit(functools.partial(steps.segment_steps, max_steps=4))
  seg = fn(jnp.array([[A, NN, B]]), jnp.ones((1, 3), bool), is_boundary_V=jnp.asarray(TABLES.is_boundary_V),
           is_fallback_V=jnp.asarray(TABLES.is_fallback_V), is_blank_V=jnp.asarray(TABLES.is_blank_V))
  np.testing.assert_array_equal(seg.step_ids_BT[0], [0, 0, 1])
  with pytest.raises(ValueError, match="max_steps"):
    steps.segment_steps(jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool), is_boundary_V=TABLES.is_boundary_V,
                        max_steps=0)
  with pytest.raises(ValueError, match="mask_BT"):
    steps.segment_steps(jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 3), bool), is_boundary_V=TABLES.is_boundary_V,
                        max_steps=2)


# ---------------------------------------------------------------------------------------------------------------------
# Tree layout
# ---------------------------------------------------------------------------------------------------------------------


def test_tree_mask_and_positions_by_hand():
  # T0 = 3 (all valid), boundaries [0, 2], L = 2 -> T = 7 (the docstring example).
  layout = _jit_layout(jnp.array([[5, 6, 7]]), jnp.array([[0, 1, 2]]), jnp.ones((1, 3), bool),
                       jnp.array([[0, 2]]), jnp.array([[8, 9]]), jnp.ones((1, 2), bool),
                       jnp.array([[False, True]]))
  want = np.array([[1, 0, 0, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0, 0],
                   [1, 0, 0, 1, 0, 0, 0],
                   [1, 0, 0, 1, 1, 0, 0],
                   [1, 1, 1, 0, 0, 1, 0],
                   [1, 1, 1, 0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(layout.mask_BTT[0], want)
  np.testing.assert_array_equal(layout.tokens_BT[0], [5, 6, 7, 8, 9, 8, 9])
  # Copy 0 continues after position 0, copy 1 after position 2.
  np.testing.assert_array_equal(layout.positions_BT[0], [0, 1, 2, 1, 2, 3, 4])
  # Slot 0 of copy k is predicted by the boundary row, slot 1 by the copy's slot 0 (rows 3 and 5).
  np.testing.assert_array_equal(layout.logit_index_BK1L[0], [[0, 3], [2, 5]])
  np.testing.assert_array_equal(layout.target_mask_BK1L[0], [[False, True], [False, True]])


def test_tree_layout_mrope_positions_and_unused_copies():
  # M-RoPE rows: index 1..2 is an "image" whose components differ; the text token at index 3 has position 3 on all.
  pos = jnp.array([[[0, 1, 1, 3], [0, 1, 2, 3], [0, 1, 1, 3]]])
  layout = _jit_layout(jnp.array([[1, 2, 2, 3]]), pos, jnp.ones((1, 4), bool), jnp.array([[3, -1]]),
                       jnp.array([[4, 5]]), jnp.ones((1, 2), bool), jnp.ones((1, 2), bool))
  # Copy 0 (after index 3) starts at 4 on every component; the unused copy gets 0s and a diagonal-only mask.
  np.testing.assert_array_equal(layout.positions_BT[0], [[0, 1, 1, 3, 4, 5, 0, 0],
                                                         [0, 1, 2, 3, 4, 5, 0, 0],
                                                         [0, 1, 1, 3, 4, 5, 0, 0]])
  np.testing.assert_array_equal(layout.mask_BTT[0, 6:], np.eye(8, dtype=bool)[6:])
  assert not np.any(layout.target_mask_BK1L[0, 1])


# A tiny pure-JAX causal transformer: token embedding, two attention layers with 1-D RoPE, explicit positions and mask.
def _init_model(key, vocab=16, width=16, heads=2, head_dim=8, layers=2):
  keys = jax.random.split(key, 2 + 4 * layers)
  params = {"embed": jax.random.normal(keys[0], (vocab, width)), "out": jax.random.normal(keys[1], (width, vocab)),
            "layers": []}
  for i in range(layers):
    q, k, v, o = (jax.random.normal(keys[2 + 4 * i + j], shape) / np.sqrt(shape[0])
                  for j, shape in enumerate([(width, heads, head_dim)] * 3 + [(heads * head_dim, width)]))
    params["layers"].append({"q": q, "k": k, "v": v, "o": o})
  return params


def _rope(x_TNH, pos_T):
  half = x_TNH.shape[-1] // 2
  freq_H = 1.0 / (100.0 ** (jnp.arange(half) / half))
  ang_T1H = (pos_T[:, None].astype(jnp.float32) * freq_H[None, :])[:, None, :]
  x1, x2 = x_TNH[..., :half], x_TNH[..., half:]
  return jnp.concatenate([x1 * jnp.cos(ang_T1H) - x2 * jnp.sin(ang_T1H), x1 * jnp.sin(ang_T1H) + x2 * jnp.cos(ang_T1H)],
                         axis=-1)


def _forward(params, tokens_T, pos_T, mask_TT):
  x_TD = params["embed"][tokens_T]
  for layer in params["layers"]:
    h_TD = x_TD / jnp.sqrt(jnp.mean(x_TD**2, axis=-1, keepdims=True) + 1e-6)
    q_TNH = _rope(jnp.einsum("TD,DNH->TNH", h_TD, layer["q"]), pos_T)
    k_SNH = _rope(jnp.einsum("TD,DNH->TNH", h_TD, layer["k"]), pos_T)
    v_SNH = jnp.einsum("TD,DNH->TNH", h_TD, layer["v"])
    s_NTS = jnp.einsum("TNH,SNH->NTS", q_TNH, k_SNH) / np.sqrt(q_TNH.shape[-1])
    p_NTS = jax.nn.softmax(jnp.where(mask_TT[None], s_NTS, -1e30), axis=-1)
    o_TNH = jnp.einsum("NTS,SNH->TNH", p_NTS, v_SNH)
    x_TD = x_TD + o_TNH.reshape(o_TNH.shape[0], -1) @ layer["o"]
  return x_TD @ params["out"]


def test_one_tree_pass_equals_separate_passes():
  params = _init_model(jax.random.PRNGKey(0))
  # Row = [prompt buffer (width 6, left-padded) | response (width 9, right-padded)]; response_start = 6.
  prompts = [[11, 12, 13, 14], [12, 15, 11, 13, 14, 12]]
  responses = [[A, NN, B, C, DOT_NN, X, NN, C], [A, B, NN, C]]
  suffixes = [[13, 14, 9, 10], [13, 14, 7]]  # "</think>\n\boxed{" ~ [13, 14], then the answer, then "}"
  answer_masks = [[0, 0, 1, 0], [0, 0, 1, 0]]
  width_p, width_r, sl, max_steps = 6, 9, 4, 4
  tokens = np.zeros((2, width_p + width_r), np.int32)
  valid = np.zeros((2, width_p + width_r), bool)
  resp_tokens = np.zeros((2, width_r), np.int32)
  resp_mask = np.zeros((2, width_r), bool)
  suffix = np.zeros((2, sl), np.int32)
  suffix_valid = np.zeros((2, sl), bool)
  for b in range(2):
    p, r = prompts[b], responses[b]
    tokens[b, width_p - len(p):width_p] = p
    tokens[b, width_p:width_p + len(r)] = r
    valid[b, width_p - len(p):width_p + len(r)] = True
    resp_tokens[b, :len(r)], resp_mask[b, :len(r)] = r, True
    suffix[b, :len(suffixes[b])], suffix_valid[b, :len(suffixes[b])] = suffixes[b], True
  positions = np.where(valid, np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
  answer = np.array(answer_masks, bool)

  seg = _jit_segment(jnp.asarray(resp_tokens), jnp.asarray(resp_mask), is_boundary_V=TABLES.is_boundary_V,
                     is_fallback_V=TABLES.is_fallback_V, is_blank_V=TABLES.is_blank_V, max_steps=max_steps)
  boundary = steps.confidence_boundaries(jnp.full((2,), width_p), seg)
  # Row 0: steps end at response indices 1, 4, 6, 7 -> boundaries 5, 7, 10, 12, 13. Row 1: ends 2, 3 -> 5, 8, 9, -1, -1.
  np.testing.assert_array_equal(boundary, [[5, 7, 10, 12, 13], [5, 8, 9, -1, -1]])

  layout = _jit_layout(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid), boundary,
                       jnp.asarray(suffix), jnp.asarray(suffix_valid), jnp.asarray(answer))
  one_pass = jax.jit(lambda lay: steps.answer_confidences(
      jax.vmap(functools.partial(_forward, params))(lay.tokens_BT, lay.positions_BT, lay.mask_BTT), lay))
  c_one_pass = np.asarray(one_pass(layout))

  pad_to = width_p + width_r + sl
  causal = jnp.tril(jnp.ones((pad_to, pad_to), bool))
  separate_pass = jax.jit(lambda seq, pos: jax.nn.log_softmax(_forward(params, seq, pos, causal), axis=-1))
  for b in range(2):
    for k, bnd in enumerate(np.asarray(boundary[b])):
      if bnd < 0:
        assert c_one_pass[b, k] == 0.0
        continue
      keep = np.flatnonzero(valid[b] & (np.arange(valid.shape[1]) <= bnd))
      suf = suffixes[b]
      # A plain causal pass over [kept tokens, suffix], right-padded to a fixed length so one compile serves all.
      n = len(keep) + len(suf)
      seq = np.zeros(pad_to, np.int32)
      seq[:n] = np.concatenate([tokens[b, keep], suf])
      pos = np.zeros(pad_to, np.int32)
      pos[:n] = np.concatenate([positions[b, keep], positions[b, bnd] + 1 + np.arange(len(suf))])
      logp = separate_pass(jnp.asarray(seq), jnp.asarray(pos))
      want = sum(float(logp[len(keep) + l - 1, suf[l]]) for l in range(len(suf)) if answer[b, l])
      np.testing.assert_allclose(c_one_pass[b, k], want, rtol=1e-5, atol=1e-5, err_msg=f"example {b}, copy {k}")

  # The same layout with M-RoPE-shaped positions (3 equal components) gives the same mask and 3 equal position rows.
  layout3 = _jit_layout(jnp.asarray(tokens), jnp.asarray(np.repeat(positions[:, None], 3, axis=1)),
                        jnp.asarray(valid), boundary, jnp.asarray(suffix), jnp.asarray(suffix_valid),
                        jnp.asarray(answer))
  np.testing.assert_array_equal(layout3.mask_BTT, layout.mask_BTT)
  for r in range(3):
    np.testing.assert_array_equal(layout3.positions_BT[:, r], layout.positions_BT)


def test_tree_layout_validates_shapes():
  with pytest.raises(ValueError, match="suffix"):
    steps.tree_layout(jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3), bool),
                      jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 3), bool),
                      jnp.ones((1, 2), bool))
  with pytest.raises(ValueError, match="positions_BT0"):
    steps.tree_layout(jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 3), bool),
                      jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool),
                      jnp.ones((1, 2), bool))
