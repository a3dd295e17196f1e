"""Reasoning-step segmentation on token ids, and the tree layout for answer-forcing confidences (PACR / PDCR).

Steps (methods.md section 8): a response is split after every token in which a "\\n\\n" of the response text ends:
the token's own text contains it, or the previous token's text ends with "\\n" and this one's starts with "\\n" (a
sampled, non-canonical tokenization such as ".\\n" + "\\n"). When that gives a single step, the split falls back to
"\\n". A step ends at (and includes) its boundary token. Runs of boundary tokens and whitespace-only pieces merge into
the previous step (a leading run merges into the first step); whatever follows the last boundary (the final answer)
is the last step.

Confidences: c_k = sum log pi(Y_gt tokens | I, q, H_<=k, answer-forcing suffix) for k = 0..K. All K + 1 of them come
from one forward pass over the row [prompt + response | suffix copy 0 | ... | suffix copy K], where copy k attends to
the row up to boundary k and causally to itself (tree attention), with positions continuing after boundary k.
"""

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepSegments:
  step_ids_BT: jax.Array  # int32 [B, T]: step of each response token, 0..K_b-1; -1 on padding
  num_steps_B: jax.Array  # int32 [B]: K_b (0 for an empty response)
  step_end_BC: jax.Array  # int32 [B, C]: response index of the last token of each step; -1 for c >= K_b


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepTables:
  """Per-vocabulary-id tables built on the host from the tokenizer (bool [V]); the fields are `segment_steps`'s
  keyword arguments: `segment_steps(tokens, mask, **vars(tables), max_steps=C)`."""

  is_boundary_V: np.ndarray  # decoded text contains the delimiter ("\n\n")
  is_fallback_V: np.ndarray  # decoded text contains the fallback delimiter ("\n")
  is_blank_V: np.ndarray  # decoded text is empty or whitespace-only
  ends_head_V: np.ndarray  # decoded text ends with the delimiter's first character ("\n")
  starts_tail_V: np.ndarray  # decoded text starts with the delimiter's second character ("\n")


def build_step_tables(decode: Callable[[int], str], vocab_size: int, *, delimiter: str = "\n\n",
                      fallback_delimiter: str = "\n", blank_ids: Sequence[int] = ()) -> StepTables:
  """Host-side: decode every id once and record which ids hold the delimiters or only whitespace.

  `decode(id) -> str` is e.g. `lambda i: tokenizer.decode([i])`. `blank_ids` are also marked blank, so they never
  open a step: pass the end-of-turn / EOS ids, otherwise "answer\n\n<|im_end|>" would end with an EOS-only step.
  The delimiter has one or two characters (two tokens can split a two-character one, see `segment_steps`), the
  fallback delimiter one (no token pair can split it).
  """
  if len(delimiter) not in (1, 2) or len(fallback_delimiter) != 1:
    raise ValueError(f"the delimiter needs 1 or 2 characters and the fallback 1, got {delimiter!r} and "
                     f"{fallback_delimiter!r}")
  if vocab_size < 1:
    raise ValueError(f"vocab_size must be positive, got {vocab_size}")
  bad = [i for i in blank_ids if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(f"blank_ids {bad} lie outside [0, vocab_size={vocab_size})")
  texts = [decode(i) for i in range(vocab_size)]
  is_blank_V = np.array([not s.strip() for s in texts], bool)
  is_blank_V[list(blank_ids)] = True
  split = len(delimiter) == 2
  return StepTables(is_boundary_V=np.array([delimiter in s for s in texts], bool),
                    is_fallback_V=np.array([fallback_delimiter in s for s in texts], bool), is_blank_V=is_blank_V,
                    ends_head_V=np.array([split and s.endswith(delimiter[0]) for s in texts], bool),
                    starts_tail_V=np.array([split and s.startswith(delimiter[1:]) for s in texts], bool))


def _segment_row(boundary_T: jnp.ndarray, content_T: jnp.ndarray, mask_T: jnp.ndarray):
  """Step ids (0-based, unclipped; 0 on padding) and the step count of one response from its token flags."""
  t_T = jnp.arange(boundary_T.shape[0])
  # Index of the last content token strictly before t (-1 if none).
  prev_content_T = jnp.concatenate([jnp.array([-1]), jax.lax.cummax(jnp.where(content_T, t_T, -1))[:-1]])
  # Boundaries in [0, t - 1], and in [0, p - 1] for p = prev_content; their difference counts those in [p, t - 1].
  nb_before_T = jnp.cumsum(boundary_T) - boundary_T
  nb_before_prev_T = jnp.where(prev_content_T >= 0, nb_before_T[jnp.maximum(prev_content_T, 0)], 0)
  # A content token starts a new step when a boundary lies between it and the previous content token.
  start_T = content_T & (prev_content_T >= 0) & (nb_before_T > nb_before_prev_T)
  step_T = jnp.cumsum(start_T)
  num_steps = jnp.where(jnp.any(mask_T), jnp.max(jnp.where(mask_T, step_T, 0)) + 1, 0)
  return step_T, num_steps


def segment_steps(tokens_BT: Int[Array, "B T"], mask_BT: Bool[Array, "B T"], *, is_boundary_V: Bool[Array, " V"],
                  is_fallback_V: Bool[Array, " V"] | None = None, is_blank_V: Bool[Array, " V"] | None = None,
                  ends_head_V: Bool[Array, " V"] | None = None, starts_tail_V: Bool[Array, " V"] | None = None,
                  max_steps: int) -> StepSegments:
  """Split each response into reasoning steps on token ids.

  A valid token is a boundary when `is_boundary_V` holds for it, or (with `ends_head_V` and `starts_tail_V`) when it
  starts with the delimiter's tail and the previous valid token ends with its head: the delimiter ends inside it in
  the response text, also for a sampled tokenization that splits "\\n\\n" as ".\\n" + "\\n" (a token that decodes
  to nothing, such as an id past the tokenizer, between the two hides that split). A new step starts at a non-blank
  token when a boundary lies between it and the previous non-blank token. Rows that give exactly one step are
  re-split with `is_fallback_V` (when given). Steps past `max_steps` merge into the last one (step ids are clipped to
  max_steps - 1). Without `is_blank_V`, the tokens of the boundary tables count as blank: right for tokenizers whose
  delimiter tokens are pure whitespace.

  Args:
    tokens_BT: response token ids (right- or left-padded).
    mask_BT: valid response tokens.
    is_boundary_V, is_fallback_V, is_blank_V, ends_head_V, starts_tail_V: per-id tables (`build_step_tables`).
    max_steps: C, the static number of step slots.

  Returns:
    StepSegments with step_ids_BT, num_steps_B and step_end_BC.

  Example ("\\n\\n" and "\\n" are tokens, "." one token, [pad] masked):
    tokens  = [a, "\\n\\n", "\\n\\n", b, ".", "\\n", "\\n", c, pad]
    step_ids = [0,  0,      0,      1, 1,   1,    1,    2, -1];  num_steps = 3;  step_end = [2, 6, 7, -1, ...]
  """
  if jnp.ndim(tokens_BT) != 2 or jnp.shape(tokens_BT) != jnp.shape(mask_BT):
    raise ValueError(f"tokens_BT {jnp.shape(tokens_BT)} and mask_BT {jnp.shape(mask_BT)} must be equal 2-D shapes")
  if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
    raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
  tables = {"is_boundary_V": is_boundary_V, "is_fallback_V": is_fallback_V, "is_blank_V": is_blank_V,
            "ends_head_V": ends_head_V, "starts_tail_V": starts_tail_V}
  for name, table in tables.items():
    if table is not None and jnp.ndim(table) != 1:
      raise ValueError(f"{name} must be 1-D [V], got shape {jnp.shape(table)}")
  if (ends_head_V is None) != (starts_tail_V is None):
    raise ValueError("give both ends_head_V and starts_tail_V, or neither")
  mask_BT = jnp.asarray(mask_BT, bool)
  lookup = lambda table_V: jnp.take(jnp.asarray(table_V, bool), tokens_BT, mode="fill", fill_value=False) & mask_BT
  segment = jax.vmap(_segment_row)

  boundary_BT = lookup(is_boundary_V)
  fallback_BT = None if is_fallback_V is None else lookup(is_fallback_V)
  if is_blank_V is not None:
    blank_BT = lookup(is_blank_V)
  else:  # the delimiter tokens
    blank_BT = boundary_BT if fallback_BT is None else boundary_BT | fallback_BT
  content_BT = mask_BT & ~blank_BT
  if ends_head_V is not None:
    t_T = jnp.arange(mask_BT.shape[1])
    # Index of the previous valid token (-1 if none).
    prev_BT = jnp.pad(jax.lax.cummax(jnp.where(mask_BT, t_T, -1), axis=1)[:, :-1], ((0, 0), (1, 0)),
                      constant_values=-1)
    prev_head_BT = jnp.take_along_axis(lookup(ends_head_V), jnp.maximum(prev_BT, 0), axis=1) & (prev_BT >= 0)
    boundary_BT = boundary_BT | (lookup(starts_tail_V) & prev_head_BT)
  step_BT, num_B = segment(boundary_BT, content_BT, mask_BT)
  if fallback_BT is not None:
    step_fb_BT, num_fb_B = segment(fallback_BT, content_BT, mask_BT)
    use_fb_B = num_B == 1
    step_BT = jnp.where(use_fb_B[:, None], step_fb_BT, step_BT)
    num_B = jnp.where(use_fb_B, num_fb_B, num_B)

  step_BT = jnp.where(mask_BT, jnp.minimum(step_BT, max_steps - 1), -1).astype(jnp.int32)
  num_B = jnp.minimum(num_B, max_steps).astype(jnp.int32)
  t_T = jnp.arange(step_BT.shape[1], dtype=jnp.int32)
  end_BC = jax.vmap(lambda ids_T: jax.ops.segment_max(t_T, jnp.where(ids_T >= 0, ids_T, max_steps),
                                                      num_segments=max_steps))(step_BT)
  end_BC = jnp.where(jnp.arange(max_steps)[None, :] < num_B[:, None], end_BC, -1).astype(jnp.int32)
  return StepSegments(step_ids_BT=step_BT, num_steps_B=num_B, step_end_BC=end_BC)


# ---------------------------------------------------------------------------------------------------------------------
# Tree layout: all K + 1 answer-forcing confidences in one forward pass.
# ---------------------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TreeLayout:
  """The extended rows of one batch; T = T0 + K1 * L. Positions are [B, T] or [B, 3, T] like the input."""

  tokens_BT: jax.Array  # int32: base row, then K1 suffix copies of length L
  positions_BT: jax.Array  # int32 [B, T] or [B, 3, T]: copy k continues after boundary k
  mask_BTT: jax.Array  # bool [B, T(query), T(key)]
  logit_index_BK1L: jax.Array  # int32: row index whose logits predict suffix token l of copy k
  target_BK1L: jax.Array  # int32: suffix token ids
  target_mask_BK1L: jax.Array  # bool: answer tokens of valid copies (the terms of c_k)


def tree_layout_row(tokens_T0, positions_T0, valid_T0, boundary_K1, suffix_L, suffix_valid_L,
                    answer_mask_L) -> TreeLayout:
  """One example of `tree_layout` (fields without the leading B)."""
  t0, k1, sl = tokens_T0.shape[0], boundary_K1.shape[0], suffix_L.shape[0]
  total = t0 + k1 * sl
  pos_RT0 = positions_T0[None, :] if positions_T0.ndim == 1 else positions_T0
  valid_T0 = jnp.asarray(valid_T0, bool)
  suffix_valid_L = jnp.asarray(suffix_valid_L, bool)
  copy_valid_K1 = boundary_K1 >= 0
  bnd_K1 = jnp.maximum(boundary_K1, 0)

  tokens_T = jnp.concatenate([tokens_T0, jnp.tile(suffix_L, k1)]).astype(jnp.int32)
  # Text tokens share one value across the M-RoPE components; the next text position is max + 1.
  start_K1 = jnp.max(pos_RT0[:, bnd_K1], axis=0) + 1
  copy_pos_K1L = jnp.where(copy_valid_K1[:, None], start_K1[:, None] + jnp.arange(sl)[None, :], 0)
  copy_pos_RK1L = jnp.broadcast_to(copy_pos_K1L.reshape(-1), (pos_RT0.shape[0], k1 * sl))
  pos_RT = jnp.concatenate([pos_RT0, copy_pos_RK1L.astype(pos_RT0.dtype)], axis=1).astype(jnp.int32)
  positions = pos_RT[0] if positions_T0.ndim == 1 else pos_RT

  i_T = jnp.arange(total)
  is_base_T = i_T < t0
  rel_T = jnp.maximum(i_T - t0, 0)
  copy_T = jnp.where(is_base_T, -1, rel_T // sl)
  off_T = jnp.where(is_base_T, -1, rel_T % sl)
  key_base_T = is_base_T & valid_T0[jnp.minimum(i_T, t0 - 1)]
  key_suffix_T = ~is_base_T & suffix_valid_L[jnp.maximum(off_T, 0)]
  limit_T = jnp.where(is_base_T, i_T, boundary_K1[jnp.maximum(copy_T, 0)])
  row_valid_T = jnp.where(is_base_T, key_base_T, key_suffix_T & copy_valid_K1[jnp.maximum(copy_T, 0)])
  # Base keys up to the query's limit (itself for base rows, its boundary for copy rows); own-copy keys causally.
  see_base_TT = key_base_T[None, :] & (i_T[None, :] <= limit_T[:, None])
  see_copy_TT = (key_suffix_T[None, :] & ~is_base_T[:, None] & (copy_T[:, None] == copy_T[None, :])
                 & (off_T[None, :] <= off_T[:, None]))
  # Padding rows see only themselves, so every softmax row is non-empty.
  mask_TT = ((see_base_TT | see_copy_TT) & row_valid_T[:, None]) | jnp.eye(total, dtype=bool)

  l_L = jnp.arange(sl)
  copy_start_K1 = t0 + jnp.arange(k1) * sl
  logit_index_K1L = jnp.where(l_L[None, :] == 0, bnd_K1[:, None], copy_start_K1[:, None] + l_L[None, :] - 1)
  target_K1L = jnp.broadcast_to(suffix_L[None, :], (k1, sl)).astype(jnp.int32)
  target_mask_K1L = copy_valid_K1[:, None] & (suffix_valid_L & jnp.asarray(answer_mask_L, bool))[None, :]
  return TreeLayout(tokens_BT=tokens_T, positions_BT=positions, mask_BTT=mask_TT,
                    logit_index_BK1L=logit_index_K1L.astype(jnp.int32), target_BK1L=target_K1L,
                    target_mask_BK1L=target_mask_K1L)


def tree_layout(tokens_BT0: Int[Array, "B T0"], positions_BT0: Int[Array, "B T0"] | Int[Array, "B 3 T0"],
                valid_BT0: Bool[Array, "B T0"], boundary_BK1: Int[Array, "B K1"], suffix_BL: Int[Array, "B L"],
                suffix_valid_BL: Bool[Array, "B L"], answer_mask_BL: Bool[Array, "B L"]) -> TreeLayout:
  """Extend each prompt+response row with K1 answer-forcing suffix copies under a tree attention mask.

  Row b becomes [base (T0) | copy 0 (L) | ... | copy K1-1 (L)]. Attention (query row -> key column):
    base token i   -> valid base tokens j <= i (causal);
    copy k, slot l -> valid base tokens j <= boundary_k, and valid slots l' <= l of copy k; nothing else.
  Positions of copy k, slot l: max(positions[:, boundary_k]) + 1 + l, the same on all M-RoPE components. Copies with
  boundary_k = -1 are unused; rows of padding or unused copies attend only to themselves.

  Args:
    tokens_BT0, positions_BT0, valid_BT0: the prompt+response rows, their (M-RoPE) positions and validity.
    boundary_BK1: row index of the last token before confidence k (0: the last prompt token; k: the end of step k);
      -1 for unused copies (see `confidence_boundaries`).
    suffix_BL: the answer-forcing suffix, e.g. the ids of "</think>\\n\\\\boxed{" + Y_gt + "}", padded to L.
    suffix_valid_BL: valid suffix slots. answer_mask_BL: the Y_gt slots whose log-probs sum to c_k.

  Returns:
    TreeLayout; feed tokens, positions and mask to the model, then `answer_confidences`.

  Example (T0 = 3, boundaries [0, 2], L = 2; rows are queries, 1 = may attend):
    base 0: 1 0 0 | 0 0 | 0 0      positions: 0 1 2 | 1 2 | 3 4
    base 1: 1 1 0 | 0 0 | 0 0
    base 2: 1 1 1 | 0 0 | 0 0
    c0 l0:  1 0 0 | 1 0 | 0 0
    c0 l1:  1 0 0 | 1 1 | 0 0
    c1 l0:  1 1 1 | 0 0 | 1 0
    c1 l1:  1 1 1 | 0 0 | 1 1
  """
  b = jnp.shape(tokens_BT0)[0]
  for name, x, ndim in (("positions_BT0", positions_BT0, None), ("valid_BT0", valid_BT0, 2),
                        ("boundary_BK1", boundary_BK1, 2), ("suffix_BL", suffix_BL, 2),
                        ("suffix_valid_BL", suffix_valid_BL, 2), ("answer_mask_BL", answer_mask_BL, 2)):
    if jnp.shape(x)[0] != b or (ndim is not None and jnp.ndim(x) != ndim):
      raise ValueError(f"{name} has shape {jnp.shape(x)}, expected {ndim}-D with leading dim {b}")
  if jnp.ndim(positions_BT0) not in (2, 3) or jnp.shape(positions_BT0)[-1] != jnp.shape(tokens_BT0)[1]:
    raise ValueError(f"positions_BT0 must be [B, T0] or [B, 3, T0], got {jnp.shape(positions_BT0)}")
  if jnp.shape(suffix_BL) != jnp.shape(suffix_valid_BL) or jnp.shape(suffix_BL) != jnp.shape(answer_mask_BL):
    raise ValueError(f"suffix_BL {jnp.shape(suffix_BL)}, suffix_valid_BL {jnp.shape(suffix_valid_BL)} and "
                     f"answer_mask_BL {jnp.shape(answer_mask_BL)} must have equal shapes")
  return jax.vmap(tree_layout_row)(jnp.asarray(tokens_BT0), jnp.asarray(positions_BT0), jnp.asarray(valid_BT0),
                                   jnp.asarray(boundary_BK1), jnp.asarray(suffix_BL), jnp.asarray(suffix_valid_BL),
                                   jnp.asarray(answer_mask_BL))


def confidence_boundaries(response_start_B: Int[Array, " B"], segments: StepSegments) -> Int[Array, "B K1"]:
  """Boundary row indices for the C + 1 confidences: start - 1, then start + step_end[k]; -1 past K_b.

  The row is [prompt | response] with the response starting at row index response_start_B.
  """
  start_B1 = jnp.asarray(response_start_B, jnp.int32)[:, None]
  ends_BC = jnp.where(segments.step_end_BC >= 0, start_B1 + segments.step_end_BC, -1)
  # An empty response has no steps, and its c_0 is meaningless too.
  first_B1 = jnp.where(segments.num_steps_B[:, None] > 0, start_B1 - 1, -1)
  return jnp.concatenate([first_B1, ends_BC], axis=1).astype(jnp.int32)


def answer_confidences(logits_BTV: Float[Array, "B T V"], layout: TreeLayout) -> Float[Array, "B K1"]:
  """c_k = sum over answer slots l of log softmax(logits[logit_index[k, l]])[target[k, l]]; 0 for unused copies.

  Only the K1 * L predicting rows are gathered before the float32 log-softmax. The result is stop-gradient.
  """
  b, k1, sl = layout.target_BK1L.shape
  index_BN = layout.logit_index_BK1L.reshape(b, k1 * sl)
  logits_BNV = jnp.take_along_axis(logits_BTV, index_BN[:, :, None], axis=1)
  logp_BNV = jax.nn.log_softmax(logits_BNV.astype(jnp.float32), axis=-1)  # float32 for a stable normalizer
  tok_BN = jnp.take_along_axis(logp_BNV, layout.target_BK1L.reshape(b, k1 * sl, 1), axis=-1)[..., 0]
  tok_BK1L = jnp.where(layout.target_mask_BK1L, tok_BN.reshape(b, k1, sl), 0.0)
  return jax.lax.stop_gradient(jnp.sum(tok_BK1L, axis=-1))
