"""ViGOS: describe-then-reason on-policy self-distillation with three frozen teachers (methods.md 4.2 and 8).

The student writes `<description> ... </description> <think> ... </think> \\boxed{answer}` (the opening <description>
is prefilled in the prompt). On the student's completion grid [B, T]:

  perception teacher q_img (image-only context)   forward KL(q_img || p_S) on the description span T_d
  reasoning teacher  q_rea (privileged context)   forward KL(q_rea || p_S) on T_r u T_a (after <think> through the
                                                  closing brace of \\boxed{...}, </think> included)
  reference teacher  q_ref (privileged, full fmt) reverse KL(p_S || q_ref) on every token of an invalid rollout

  L = 1.0 L_perc + 1.0 L_rea + 2.0 L_ref,  each a token mean normalized by the step's global active-token count,
  per-token KL clamped at 0.05 after the vocabulary sum (tokens above the clamp get zero gradient). The released
  code's extra 0.05 clip on the last description and first reasoning token is implied by this clamp.

Following the released code, the reasoning teacher's sequence is its privileged prompt plus only the student's
reasoning+answer tokens; the caller builds it from `reasoning_start_B` / `reasoning_end_B` and scatters its
hidden states back onto the completion grid. Tags are matched on token ids: a tag is one or more id sequences,
and each position of a sequence lists the ids it accepts, because BPE merges tag characters with their neighbours
(Qwen: "</description>\\n" -> "</", "description", ">\\n"; "\\boxed{(" -> "\\", "boxed", "{(").
"""

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxvg import divergences


# ----------------------------------------------------------------------------------------------------------------------
# Format: tags on token ids.


@dataclasses.dataclass(frozen=True)
class Tag:
  """A marker in token ids: alternative id sequences; position j of a sequence accepts any id in its tuple."""
  alternatives: tuple[tuple[tuple[int, ...], ...], ...]

  def __post_init__(self):
    if not self.alternatives or any(not alt or any(not ids for ids in alt) for alt in self.alternatives):
      raise ValueError(f"a Tag needs non-empty sequences of non-empty id sets, got alternatives={self.alternatives}")


def make_tag(*alternatives: Sequence[int | Sequence[int]]) -> Tag:
  """make_tag([5]): one token; make_tag([7, 8, (9, 10)]): three tokens, the last 9 or 10; make_tag([5], [7, 8, 9]).

  Example: `</description>` in Qwen2.5 is "</", "description", then a token starting with ">" (">", ">\\n", ...).
  """
  norm = []
  for alt in alternatives:
    if isinstance(alt, int):
      raise ValueError(f"each alternative must be a sequence of positions, got the int {alt}; write make_tag([{alt}])")
    norm.append(tuple((int(p),) if isinstance(p, (int, np.integer)) else tuple(int(i) for i in p) for p in alt))
  return Tag(alternatives=tuple(norm))


@dataclasses.dataclass(frozen=True)
class DescribeReasonFormat:
  """The token-id form of the ViGOS student format.

  description_open: None when <description> is prefilled in the prompt (ViGOS), so the description starts at token 0;
    a Tag when the completion itself must open it.
  boxed_open: the ids of "\\boxed{", ending with the token(s) that hold the opening brace.
  content_ignore_ids: ids that do not count as content (EOS, pad), for the non-empty span rule.
  require_think_content: False follows the released code (the reasoning span T_r u T_a, which holds </think> and the
    boxed answer, must have a content token); True also requires a content token between <think> and </think>.
  """
  description_close: Tag
  think_open: Tag
  think_close: Tag
  boxed_open: Tag
  description_open: Tag | None = None
  content_ignore_ids: tuple[int, ...] = ()
  require_think_content: bool = False


TAG_PREFIXES = ("", " ", "\n")  # the tag alone, and after a space or newline (BPE merges them into its first token)


def tag_from_vocab(text: str, *, token_texts: Sequence[str], encode: Callable[[str], list[int]]) -> Tag:
  """The `Tag` of `text` for a tokenizer: its tokenizations alone and after " " / "\n", each widened at the ends.

  The first position accepts every token whose text is the tag's first piece behind optional whitespace (" </",
  "\n</"), the last every token that starts with the tag's last piece (">" also matches ">\n", "{" also "{5}").
  token_texts: the decoded text of every id; encode: text -> ids without special tokens.
  """
  strip_ws = [t.lstrip() for t in token_texts]
  alternatives = set()
  for prefix in TAG_PREFIXES:
    ids = encode(prefix + text)
    pieces = [token_texts[i] for i in ids]
    if "".join(pieces) != prefix + text:
      raise ValueError(f"decoding the tokens of {prefix + text!r} gives {''.join(pieces)!r}: token_texts must be the "
                       "tokenizer's decoded vocabulary")
    first = pieces[0][len(prefix):].lstrip() if len(pieces[0]) > len(prefix) else None
    if first is None:  # the prefix is a token of its own: the tag starts at the next one
      ids, pieces = ids[1:], pieces[1:]
      first = pieces[0]
    last = pieces[-1] if len(pieces) > 1 else None
    positions = []
    for j, i in enumerate(ids):
      if j == 0:
        allowed = [v for v, t in enumerate(strip_ws) if t == first or (len(pieces) == 1 and t.startswith(first))]
      elif j == len(ids) - 1:
        allowed = [v for v, t in enumerate(token_texts) if t.startswith(last)]
      else:
        allowed = [i]
      positions.append(tuple(sorted(set(allowed) | {i})))
    alternatives.add(tuple(positions))
  return Tag(alternatives=tuple(sorted(alternatives)))


def describe_reason_format(token_texts: Sequence[str], encode: Callable[[str], list[int]], *,
                           ignore_ids: Sequence[int] = (), description_prefilled: bool = True
                           ) -> DescribeReasonFormat:
  """The ViGOS format on a tokenizer's ids: </description>, <think>, </think> and \\boxed{ as `tag_from_vocab` tags.

  ignore_ids: ids that are not content (EOS, pad). description_prefilled: the prompt ends with "<description>"
  (ViGOS); False makes the completion open it.
  """
  tag = lambda text: tag_from_vocab(text, token_texts=token_texts, encode=encode)
  return DescribeReasonFormat(
      description_close=tag("</description>"), think_open=tag("<think>"), think_close=tag("</think>"),
      boxed_open=tag("\\boxed{"), description_open=None if description_prefilled else tag("<description>"),
      content_ignore_ids=tuple(int(i) for i in ignore_ids))


def brace_tables(token_texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Per-token brace structure, for matching the closing brace of \\boxed{...} on token ids.

  Returns:
    delta_V: number of "{" minus number of "}" in the token's text.
    min_V: min(0, the lowest running balance after each character), e.g. "}" -> -1, "}{" -> -1, "}}" -> -2, "{" -> 0.
  A token closes a box entered at depth d iff d + min_V[token] <= 0.
  """
  delta_V = np.zeros(len(token_texts), np.int32)
  min_V = np.zeros(len(token_texts), np.int32)
  for v, text in enumerate(token_texts):
    balance = lowest = 0
    for char in text:
      balance += (char == "{") - (char == "}")
      lowest = min(lowest, balance)
    delta_V[v], min_V[v] = balance, lowest
  return delta_V, min_V


def _shift_left(a_BT: jax.Array, j: int, fill) -> jax.Array:
  """a[:, t + j] at t (fill past the end)."""
  T = a_BT.shape[1]
  if j >= T:
    return jnp.full_like(a_BT, fill)
  return jnp.concatenate([a_BT[:, j:], jnp.full_like(a_BT[:, :j], fill)], axis=1)


def _tag_matches(tag: Tag, ids_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(match_BT: a tag starts at t, end_BT: one past its last token, the longest alternative matching at t)."""
  t_T = jnp.arange(ids_BT.shape[1])
  match_BT = jnp.zeros(ids_BT.shape, bool)
  end_BT = jnp.zeros(ids_BT.shape, jnp.int32)
  for alt in tag.alternatives:
    ok_BT = jnp.ones(ids_BT.shape, bool)
    for j, allowed in enumerate(alt):
      ids_j = _shift_left(ids_BT, j, -1)
      hit_BT = jnp.any(ids_j[..., None] == jnp.asarray(allowed, ids_BT.dtype), axis=-1)
      ok_BT = ok_BT & hit_BT & _shift_left(mask_BT, j, False)
    end_BT = jnp.where(ok_BT, jnp.maximum(end_BT, t_T + len(alt)), end_BT)
    match_BT = match_BT | ok_BT
  return match_BT, end_BT


def _first_at_or_after(match_BT: jax.Array, end_BT: jax.Array, lo_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(start_B, end_B) of the first match at t >= lo_B; start_B = T when there is none."""
  T = match_BT.shape[1]
  t_T = jnp.arange(T)
  start_B = jnp.min(jnp.where(match_BT & (t_T >= lo_B[:, None]), t_T, T), axis=-1)
  end_B = jnp.take_along_axis(end_BT, jnp.minimum(start_B, T - 1)[:, None], axis=-1)[:, 0]
  return start_B, jnp.where(start_B < T, end_B, T)


def _in_range(lo_B: jax.Array, hi_B: jax.Array, T: int) -> jax.Array:
  t_T = jnp.arange(T)
  return (t_T >= lo_B[:, None]) & (t_T < hi_B[:, None])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DescribeReasonSpans:
  """Span masks on the completion grid; description/reasoning are all-False on invalid rows."""
  description_BT: jax.Array  # bool, T_d: completion start (or after <description>) up to </description>, exclusive
  reasoning_BT: jax.Array  # bool, T_r u T_a: after <think> through the token closing \boxed{...}
  reference_BT: jax.Array  # bool, every active token of an invalid row (the reference teacher's tokens)
  valid_B: jax.Array  # bool
  reasoning_start_B: jax.Array  # int32, first reasoning token (0 on invalid rows)
  reasoning_end_B: jax.Array  # int32, one past the last reasoning token (0 on invalid rows)


def describe_reason_spans(
    ids_BT: Int[Array, "B T"],
    mask_BT: Bool[Array, "B T"],
    *,
    fmt: DescribeReasonFormat,
    brace_delta_V: Int[Array, "V"],
    brace_min_V: Int[Array, "V"],
) -> DescribeReasonSpans:
  """Find the ViGOS spans and the validity flag of each completion (released `_analyze_vigos_completion`).

  A row is valid iff, in order and within the mask: </description>; then <think>; then </think>; then \\boxed{ with
  a matching closing brace (nested braces counted); and both the description span and the reasoning span hold a
  content token (one not in `content_ignore_ids`). Answer correctness does not matter. Tokens between the spans
  and after the closing brace (".", EOS) belong to no span.

  Example (one token per item, <description> prefilled, T = 12):
    ids:         a  b  </description>  <think>  x  =  </think>  \\boxed{  5  }  .  <eos>
    description  1  1  0               0        0  0  0         0         0  0  0  0
    reasoning    0  0  0               0        1  1  1         1         1  1  0  0
  Without </think> the row is invalid and reference_BT = mask_BT on that row.
  """
  if ids_BT.shape != mask_BT.shape:
    raise ValueError(f"ids_BT {ids_BT.shape} and mask_BT {mask_BT.shape} must have the same shape")
  B, T = ids_BT.shape
  mask_BT = mask_BT.astype(bool)
  zeros_B = jnp.zeros((B,), jnp.int32)

  def find(tag, lo_B):
    match_BT, end_BT = _tag_matches(tag, ids_BT, mask_BT)
    return _first_at_or_after(match_BT, end_BT, lo_B)

  desc_start_B, found = zeros_B, jnp.ones((B,), bool)
  if fmt.description_open is not None:
    open_s, desc_start_B = find(fmt.description_open, zeros_B)
    found = open_s < T
  dclose_s, dclose_e = find(fmt.description_close, desc_start_B)
  think_s, think_e = find(fmt.think_open, dclose_e)
  tclose_s, tclose_e = find(fmt.think_close, think_e)
  box_s, box_e = find(fmt.boxed_open, tclose_e)
  found = found & (dclose_s < T) & (think_s < T) & (tclose_s < T) & (box_s < T)

  # Brace depth relative to the start of \boxed{: cum_BT[t] = depth before token t.
  brace_delta_V, brace_min_V = jnp.asarray(brace_delta_V, jnp.int32), jnp.asarray(brace_min_V, jnp.int32)
  if brace_delta_V.shape != brace_min_V.shape or brace_delta_V.ndim != 1:
    raise ValueError(f"brace_delta_V {brace_delta_V.shape} and brace_min_V {brace_min_V.shape} must be equal [V] "
                     "tables")
  safe_ids_BT = jnp.clip(ids_BT, 0, brace_delta_V.shape[0] - 1)
  delta_BT = jnp.where(mask_BT, brace_delta_V[safe_ids_BT], 0)
  min_BT = jnp.where(mask_BT, jnp.minimum(brace_min_V[safe_ids_BT], 0), 0)
  cum_BT = jnp.concatenate([jnp.zeros((B, 1), delta_BT.dtype), jnp.cumsum(delta_BT, axis=-1)], axis=-1)
  take = lambda a_BT, i_B: jnp.take_along_axis(a_BT, jnp.clip(i_B, 0, a_BT.shape[1] - 1)[:, None], axis=-1)[:, 0]
  base_B = take(cum_BT, box_s)
  closes_BT = mask_BT & (cum_BT[:, :T] - base_B[:, None] + min_BT <= 0) & (jnp.arange(T) >= box_e[:, None])
  closes_at_open_B = take(cum_BT, box_e) - base_B <= 0  # "{}" or "{5}" merged into the opening token
  close_B = jnp.where(closes_at_open_B, box_e - 1, jnp.min(jnp.where(closes_BT, jnp.arange(T), T), axis=-1))
  found = found & (close_B < T)
  answer_end_B = close_B + 1

  ignore = jnp.asarray(fmt.content_ignore_ids or (-1,), ids_BT.dtype)
  content_BT = mask_BT & ~jnp.any(ids_BT[..., None] == ignore, axis=-1)
  description_BT = mask_BT & _in_range(desc_start_B, dclose_s, T)
  reasoning_BT = mask_BT & _in_range(think_e, answer_end_B, T)
  valid_B = found & jnp.any(description_BT & content_BT, axis=-1) & jnp.any(reasoning_BT & content_BT, axis=-1)
  if fmt.require_think_content:
    valid_B = valid_B & jnp.any(content_BT & _in_range(think_e, tclose_s, T), axis=-1)

  return DescribeReasonSpans(
      description_BT=description_BT & valid_B[:, None],
      reasoning_BT=reasoning_BT & valid_B[:, None],
      reference_BT=mask_BT & ~valid_B[:, None],
      valid_B=valid_B,
      reasoning_start_B=jnp.where(valid_B, think_e, 0).astype(jnp.int32),
      reasoning_end_B=jnp.where(valid_B, answer_end_B, 0).astype(jnp.int32),
  )


# ----------------------------------------------------------------------------------------------------------------------
# The loss.


@dataclasses.dataclass(frozen=True)
class ViGOSConfig:
  """ViGOS loss weights (released scripts: 1 / 1 / 2) and the per-token clamp after the vocabulary sum (0.05)."""
  lambda_perception: float = 1.0
  lambda_reasoning: float = 1.0
  lambda_reference: float = 2.0
  max_token_value: float | None = 0.05
  chunk_size: int = 128

  def __post_init__(self):
    for name in ("lambda_perception", "lambda_reasoning", "lambda_reference"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if self.max_token_value is not None and self.max_token_value <= 0:
      raise ValueError(f"max_token_value must be positive or None, got {self.max_token_value}")
    if self.chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ViGOSCounts:
  """Active-token counts of the three terms; sum them over the micro-batches (and devices) of a step."""
  perception: jax.Array
  reasoning: jax.Array
  reference: jax.Array


def vigos_counts(spans: DescribeReasonSpans) -> ViGOSCounts:
  """This batch's active-token counts (float32 scalars)."""
  count = lambda m: jnp.sum(m, dtype=jnp.float32)
  return ViGOSCounts(count(spans.description_BT), count(spans.reasoning_BT), count(spans.reference_BT))


def vigos_token_values(
    *,
    student: divergences.Logits,
    perception: divergences.Logits,
    reasoning: divergences.Logits,
    reference: divergences.Logits,
    max_token_value: float | None,
    chunk_size: int,
) -> dict[str, jax.Array]:
  """Clamped per-token KLs [B, T], in one chunked pass over the four sides (teachers are stop-gradient).

    perception = min(KL(q_img || p_S), c), reasoning = min(KL(q_rea || p_S), c), reference = min(KL(p_S || q_ref), c)
  """

  def token_fn(logits, _):
    logp_s, logq_img, logq_rea, logq_ref = (divergences.log_probs(z) for z in logits)
    clamp = lambda v: divergences.clamp_tokens(v, max_token_value)
    return {
        "perception": clamp(divergences.kl(logq_img, logp_s)),
        "reasoning": clamp(divergences.kl(logq_rea, logp_s)),
        "reference": clamp(divergences.kl(logp_s, logq_ref)),
    }

  sources = (student, perception.frozen(), reasoning.frozen(), reference.frozen())
  return divergences.chunked_logits_map(token_fn, sources=sources, chunk_size=chunk_size)


def vigos_loss(
    *,
    student: divergences.Logits,
    perception: divergences.Logits,
    reasoning: divergences.Logits,
    reference: divergences.Logits,
    spans: DescribeReasonSpans,
    counts: ViGOSCounts,
    config: ViGOSConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = sum_k lambda_k sum_{t in mask_k} min(KL_k,t, 0.05) / max(N_k, 1), N_k = the step's count of term k.

  All four sides are on the completion grid [B, T] (position t predicts completion token t). With `counts` summed
  over a step's micro-batches, the micro-batch losses (and every metric below) add up to the step's values.

  Returns:
    (loss, metrics): vigos/loss_{perception,reasoning,reference} (unweighted term values), vigos/clipped_{...} (share
    of the term's tokens at the clamp, which get no gradient), vigos/valid_rows and vigos/rows (this batch's counts).
  """
  values = vigos_token_values(
      student=student, perception=perception, reasoning=reasoning, reference=reference,
      max_token_value=config.max_token_value, chunk_size=config.chunk_size)
  masks = {"perception": spans.description_BT, "reasoning": spans.reasoning_BT, "reference": spans.reference_BT}
  weights = {"perception": config.lambda_perception, "reasoning": config.lambda_reasoning,
             "reference": config.lambda_reference}
  loss = jnp.zeros((), jnp.float32)
  metrics = {}
  for name, mask_BT in masks.items():
    denom = jnp.maximum(getattr(counts, name), 1.0)
    term = jnp.sum(jnp.where(mask_BT, values[name], 0.0)) / denom
    loss = loss + weights[name] * term
    metrics[f"vigos/loss_{name}"] = jax.lax.stop_gradient(term)
    if config.max_token_value is not None:
      clipped_BT = mask_BT & (values[name] >= config.max_token_value)
      metrics[f"vigos/clipped_{name}"] = jnp.sum(clipped_BT, dtype=jnp.float32) / denom
  metrics["vigos/valid_rows"] = jnp.sum(spans.valid_B, dtype=jnp.float32)
  metrics["vigos/rows"] = jnp.asarray(spans.valid_B.shape[0], jnp.float32)
  return loss, metrics


# ----------------------------------------------------------------------------------------------------------------------
# PALR diagnostic.


def palr(
    *,
    supervision_BT: Float[Array, "B T"],
    answer_shift_BT: Float[Array, "B T"],
    image_shift_BT: Float[Array, "B T"],
    region_BT: Bool[Array, "B T"],
    eps: float = 1e-8,
) -> jax.Array:
  """Privileged Answer Leakage Rate over a token region G (a fraction; the paper reports percent).

    PALR(G) = sum_{t in G} S_t A_t / (sum_{t in G} S_t (A_t + I_t) + eps)

  The paper's exact S, A, I are not public; methods.md 4.2 proposes, on a fixed student trajectory:
    S_t = the per-token teacher-student KL of the teacher supervising t (`vigos_token_values`, unclamped),
    A_t = KL(q(.|answer) || q(.|answer')) with another sample's answer,  I_t = KL(q(.|I) || q(.|I')) with another image,
  each a `divergences.chunked_kl` over teacher passes that the caller runs. Regions: spans.description_BT,
  spans.reasoning_BT, or the completion mask.
  """
  w_BT = jnp.where(region_BT, supervision_BT, 0.0)
  num = jnp.sum(w_BT * answer_shift_BT)
  return num / (jnp.sum(w_BT * (answer_shift_BT + image_shift_BT)) + eps)
