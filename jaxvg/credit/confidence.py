r"""Answer-forcing confidences of the real model: all K + 1 of every rollout from one forward pass (PACR / PDCR).

  c_k = sum_{l in Y_gt} log pi(s_l | I, q, H_<=k, s_<l),   k = 0..K

where H_<=k is the rollout up to the end of its step k (H_<=0 is empty) and s is the answer-forcing suffix in the
policy's own format: the closing tag of the format's last section, a newline, then the boxed answer; for the pgpo
format s = "</think>\n\\boxed{" + Y_gt + "}". Only the suffix tokens that overlap the answer's characters count: with
a byte-level BPE "\\boxed{square}" may tokenize as ["\\boxed", "{square", "}"], and "{square" is an answer token.

One pass (`tree_confidences`): row n = [prompt (T0, left-padded) | completion (Tn, right-padded)] is extended with K + 1
copies of its suffix (L slots each) under the tree mask of `steps.tree_layout`: copy k sees the row up to boundary k
(the last prompt token for k = 0, the last token of step k otherwise) and itself causally, at positions continuing
after boundary k. The decoder ANDs that mask with causality, which it already implies. The prompt, image features
included, is embedded once per prompt and repeated over its G samples, as in `scoring`; only the (K + 1) * L rows that
predict suffix tokens go through the vocabulary head (chunked, float32 log-softmax).

`separate_confidences` computes the same numbers with K + 1 ordinary causal passes over [prompt | H_<=k | suffix]:
the reference of the tests and the baseline of the benchmark.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvg.core import hosts
from jaxvg.credit import steps
from jaxvg.data.prompts import BOX_OPEN, PromptFormat
from jaxvg.rl import scoring


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AnswerSuffix:
  """The answer-forcing suffix of every rollout row (N = B * G; the G samples of a prompt share one)."""

  tokens_NL: jax.Array  # int32 suffix ids, right-padded to L with 0
  valid_NL: jax.Array  # bool: real suffix slots (a prefix of each row)
  answer_NL: jax.Array  # bool: slots whose token overlaps the answer's characters (the terms of c_k)


def suffix_text(fmt: PromptFormat, answer: str) -> tuple[str, int, int]:
  r"""The answer-forcing text of `fmt` and the character span [start, end) of the answer inside it.

  Example (pgpo, answer "square"): ("</think>\n\\boxed{square}", 16, 22).
  """
  if not fmt.sections:
    raise ValueError(f"prompt format {fmt.name!r} has no sections to close")
  answer = str(answer).strip()
  if not answer:
    raise ValueError("answer must be a non-empty string; an empty answer has no confidence")
  head = fmt.sections[-1].close + "\n" + BOX_OPEN
  return head + answer + "}", len(head), len(head) + len(answer)


def answer_suffixes(tokenizer, answers: Sequence[str], *, fmt: PromptFormat, group_size: int,
                    pad_multiple: int = 8) -> AnswerSuffix:
  """Host side: tokenize each prompt's suffix once, flag the answer tokens by character offsets, repeat G times.

  Args:
    tokenizer: a fast (offset-reporting) tokenizer.
    answers: the B ground-truth answers, one per prompt.
    fmt: the prompt format (which closing tag the suffix starts with).
    group_size: G; row n = b * G + g gets prompt b's suffix.
    pad_multiple: L is the longest suffix rounded up to this (fewer compiled shapes).

  Returns:
    AnswerSuffix with [B * G, L] arrays.

  Example (pgpo, "square", tokens ["</", "think", ">\\n", "\\\\boxed", "{square", "}"]):
    answer_NL = [0, 0, 0, 0, 1, 0, 0, 0] (L = 8).
  """
  if group_size < 1 or pad_multiple < 1:
    raise ValueError(f"group_size ({group_size}) and pad_multiple ({pad_multiple}) must be >= 1")
  if not answers:
    raise ValueError("answers is empty: need one answer per prompt")
  rows = []
  for answer in answers:
    text, a0, a1 = suffix_text(fmt, answer)
    try:
      enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:  # slow tokenizers have no offsets
      raise ValueError(f"the tokenizer reports no character offsets (a fast tokenizer is needed): {e}") from None
    ids, spans = list(enc["input_ids"]), list(enc["offset_mapping"])
    flags = [s < a1 and e > a0 and e > s for s, e in spans]
    if not any(flags):
      raise ValueError(f"no token of {text!r} overlaps the answer {answer!r}")
    rows.append((ids, flags))
  width = -(-max(len(ids) for ids, _ in rows) // pad_multiple) * pad_multiple
  B = len(rows)
  tokens = np.zeros((B, width), np.int32)
  valid = np.zeros((B, width), bool)
  answer_mask = np.zeros((B, width), bool)
  for b, (ids, flags) in enumerate(rows):
    tokens[b, :len(ids)], valid[b, :len(ids)], answer_mask[b, :len(ids)] = ids, True, flags
  rep = lambda x: jnp.asarray(np.repeat(x, group_size, axis=0))
  return AnswerSuffix(tokens_NL=rep(tokens), valid_NL=rep(valid), answer_NL=rep(answer_mask))


def _check(prompt: scoring.PromptInputs, tokens_NT, mask_NT, group_size: int, boundary_NK1, suffix: AnswerSuffix):
  N = jnp.shape(tokens_NT)[0]
  if jnp.shape(prompt.input_ids_BT)[0] * group_size != N:
    raise ValueError(f"tokens_NT has {N} rows, expected B * G = {jnp.shape(prompt.input_ids_BT)[0]} * {group_size}")
  if jnp.shape(mask_NT) != jnp.shape(tokens_NT):
    raise ValueError(f"mask_NT {jnp.shape(mask_NT)} and tokens_NT {jnp.shape(tokens_NT)} must have one shape")
  if jnp.ndim(boundary_NK1) != 2 or jnp.shape(boundary_NK1)[0] != N:
    raise ValueError(f"boundary_NK1 must be [N={N}, K + 1], got {jnp.shape(boundary_NK1)}")
  for name in ("tokens_NL", "valid_NL", "answer_NL"):
    if jnp.shape(getattr(suffix, name)) != jnp.shape(suffix.tokens_NL) or jnp.shape(suffix.tokens_NL)[0] != N:
      raise ValueError(f"suffix.{name} has shape {jnp.shape(getattr(suffix, name))}, expected [N={N}, L] like "
                       f"suffix.tokens_NL {jnp.shape(suffix.tokens_NL)}")


def tree_confidences(model, prompt: scoring.PromptInputs, tokens_NT, mask_NT, group_size: int, *, boundary_NK1,
                     suffix: AnswerSuffix, chunk: int = 256):
  """c_k for k = 0..K of every rollout from ONE forward pass with the tree mask (see the module docstring).

  Args:
    model: a Qwen25VL.
    prompt: B prompts (left-padded, with their images).
    tokens_NT, mask_NT: the N = B * G completions (right-padded); row b * G + g is sample g of prompt b.
    group_size: G.
    boundary_NK1: row index (in [prompt | completion]) of the last token before each confidence:
      `steps.confidence_boundaries(T0, segments)`; -1 for unused slots.
    suffix: `answer_suffixes(...)`.

  Returns:
    [N, K + 1] float32 stop-gradient confidences; 0 for unused slots.
  """
  _check(prompt, tokens_NT, mask_NT, group_size, boundary_NK1, suffix)
  T0, N = prompt.input_ids_BT.shape[1], tokens_NT.shape[0]
  rep = lambda x, axis: jnp.repeat(x, group_size, axis=axis)
  base_NT = jnp.concatenate([rep(prompt.input_ids_BT, 0), tokens_NT], axis=1)
  pos_3NT = jnp.concatenate([rep(prompt.positions_3BT, 1),
                             scoring.completion_positions(prompt.next_position_B, group_size, tokens_NT.shape[1])],
                            axis=2)
  valid_NT = jnp.concatenate([rep(prompt.attention_mask_BT.astype(bool), 0), mask_NT.astype(bool)], axis=1)
  layout = steps.tree_layout(base_NT, pos_3NT.transpose(1, 0, 2), valid_NT, boundary_NK1, suffix.tokens_NL,
                             suffix.valid_NL, suffix.answer_NL)

  x_prompt_BTD, _ = model.embed(prompt.input_ids_BT, prompt.vision)
  x_NSD = jnp.concatenate([rep(x_prompt_BTD, 0), model.decoder.embed(layout.tokens_BT[:, T0:])], axis=1)
  # The tree mask already holds key validity (and a self-edge for padding rows), so every key is "real" here.
  kv_mask_NS = jnp.ones(layout.tokens_BT.shape, bool)
  h_NSD, _, _ = model.decoder(x_NSD, layout.positions_BT.transpose(1, 0, 2), kv_mask_NS,
                              attn_mask_BTS=layout.mask_BTT)
  _, k1, sl = layout.target_BK1L.shape
  h_NJD = jnp.take_along_axis(h_NSD, layout.logit_index_BK1L.reshape(N, k1 * sl)[:, :, None], axis=1)
  logp_NJ = scoring.token_logps(h_NJD, model.decoder.head_weight_DV(), layout.target_BK1L.reshape(N, k1 * sl),
                                chunk=min(chunk, k1 * sl))
  terms_NK1L = jnp.where(layout.target_mask_BK1L, logp_NJ.reshape(N, k1, sl), 0.0)
  return jax.lax.stop_gradient(jnp.sum(terms_NK1L, axis=-1))


def _tree_fn(params, graphdef, prompt, tokens_NT, mask_NT, group_size, boundary_NK1, suffix):
  return tree_confidences(nnx.merge(graphdef, params), prompt, tokens_NT, mask_NT, group_size,
                          boundary_NK1=boundary_NK1, suffix=suffix)


# Jitted entry point: (params, graphdef, prompt, tokens_NT, mask_NT, group_size, boundary_NK1, suffix) -> c_NK1.
tree_confidences_fn = jax.jit(_tree_fn, static_argnums=(1, 5))


@functools.partial(jax.jit, static_argnums=(1, 5))
def _completion_logps(params, graphdef, prompt, tokens_NT, mask_NT, group_size):
  return scoring.completion_logps(nnx.merge(graphdef, params), prompt, tokens_NT, mask_NT, group_size)


def separate_confidences(params, graphdef, prompt: scoring.PromptInputs, tokens_NT, mask_NT, group_size: int, *,
                         boundary_NK1, suffix: AnswerSuffix, width_multiple: int = 32) -> np.ndarray:
  """The same c_k with K + 1 causal passes: pass k scores [prompt | H_<=k | suffix] for every row (host loop).

  Pass k is as wide as its longest prefix plus the suffix, rounded up to `width_multiple` (a bucket), so it costs
  what a static-shape implementation of the K + 1 passes would. Returns [N, K + 1] float32 (numpy).
  """
  _check(prompt, tokens_NT, mask_NT, group_size, boundary_NK1, suffix)
  T0 = prompt.input_ids_BT.shape[1]
  tokens, boundary = hosts.to_numpy(tokens_NT), hosts.to_numpy(boundary_NK1)
  sfx, sfx_valid, sfx_answer = (hosts.to_numpy(x) for x in (suffix.tokens_NL, suffix.valid_NL, suffix.answer_NL))
  N, K1 = boundary.shape
  out = np.zeros((N, K1), np.float32)
  for k in range(K1):
    used_N = boundary[:, k] >= 0
    if not used_N.any():
      continue
    keep_N = np.where(used_N, boundary[:, k] - T0 + 1, 0)  # completion tokens before the suffix (0 for c_0)
    lengths_N = keep_N + sfx_valid.sum(1)
    width = -(-int(lengths_N[used_N].max()) // width_multiple) * width_multiple
    rows = np.zeros((N, width), np.int32)
    row_mask = np.zeros((N, width), np.int32)
    answer = np.zeros((N, width), bool)
    for n in np.flatnonzero(used_N):
      kk, s = keep_N[n], sfx[n][sfx_valid[n]]
      rows[n, :kk], rows[n, kk:kk + len(s)] = tokens[n, :kk], s
      row_mask[n, :kk + len(s)] = 1
      answer[n, kk:kk + len(s)] = sfx_answer[n][sfx_valid[n]]
    logp = hosts.to_numpy(_completion_logps(params, graphdef, prompt, jnp.asarray(rows), jnp.asarray(row_mask),
                                            group_size))
    out[:, k] = np.where(used_N, np.sum(np.where(answer, logp, 0.0), axis=1), 0.0)
  return out
