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
hidden states back onto the completion grid. The spans are found on the host after sampling, by searching the tags
in the decoded text and mapping character offsets back to tokens (`row_spans`): BPE merges tag characters with
their neighbours (Qwen: ".</", ")</", "><", ">\\n", ">\\", "}."), so a tag is no fixed sequence of token ids.
"""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxvg.distill import divergences


# ----------------------------------------------------------------------------------------------------------------------
# Format: the tags, found in the decoded completion.


@dataclasses.dataclass(frozen=True)
class DescribeReasonFormat:
  """The ViGOS student format as text.

  description_open: None when "<description>" is prefilled in the prompt (ViGOS), so the description starts at
    token 0; the tag text when the completion itself must open it.
  require_think_content: False follows the released code (the reasoning span T_r u T_a, which holds </think> and the
    boxed answer, must have a content token); True also requires a content token between <think> and </think>.
  """
  description_close: str = "</description>"
  think_open: str = "<think>"
  think_close: str = "</think>"
  boxed_open: str = "\\boxed{"
  description_open: str | None = None
  require_think_content: bool = False

  def __post_init__(self):
    for name in ("description_close", "think_open", "think_close", "boxed_open", "description_open"):
      if getattr(self, name) == "":
        raise ValueError(f"DescribeReasonFormat.{name} must be a non-empty tag, got ''")
    if not self.boxed_open.endswith("{"):
      raise ValueError(f"DescribeReasonFormat.boxed_open must end with '{{', got {self.boxed_open!r}")


@dataclasses.dataclass(frozen=True)
class RowSpans:
  """Token spans [start, end) of one valid completion."""
  description: tuple[int, int]
  reasoning: tuple[int, int]
  think: tuple[int, int]  # between <think> and </think> (exclusive of both tags' tokens)


def row_spans(pieces: Sequence[str], fmt: DescribeReasonFormat = DescribeReasonFormat()) -> RowSpans | None:
  """The spans of one completion given as the decoded text of each of its tokens; None when the tags are missing.

  The tags are searched in the text, in order, each after the previous one's end: </description>, <think>, </think>,
  \\boxed{ and its matching closing brace (nested braces counted). A tag occupies every token that holds one of its
  characters, so a token that straddles a tag boundary (Qwen's ".</", "><", ">\\n", "}." ...) belongs to the tag:
    description = tokens before the one holding the "<" of </description>,
    reasoning   = tokens after the one holding the ">" of <think>, through the one holding the box's closing "}".
  This is the released code's rule (search the decoded text, map character offsets to tokens), which it applies
  through the fast tokenizer's offset mapping; here the offsets are the per-token texts' own, so sampled,
  non-canonical tokenizations map exactly too. Tags are ASCII, so a multi-byte character split over tokens (decoded
  as U+FFFD per token) cannot create or hide one.
  """
  ends = np.cumsum([len(p) for p in pieces])
  text = "".join(pieces)
  token_of = lambda char: int(np.searchsorted(ends, char, side="right"))  # the token holding character `char`

  def find(tag, lo):  # (first token, one past the last token, char end) of the first `tag` at or after char lo
    at = text.find(tag, lo)
    return None if at < 0 else (token_of(at), token_of(at + len(tag) - 1) + 1, at + len(tag))

  desc_start, lo = 0, 0
  if fmt.description_open is not None:
    dopen = find(fmt.description_open, 0)
    if dopen is None:
      return None
    desc_start, lo = dopen[1], dopen[2]
  dclose = find(fmt.description_close, lo)
  think = dclose and find(fmt.think_open, dclose[2])
  tclose = think and find(fmt.think_close, think[2])
  box = tclose and find(fmt.boxed_open, tclose[2])
  if box is None:
    return None
  depth = 1
  for at in range(box[2], len(text)):
    depth += (text[at] == "{") - (text[at] == "}")
    if depth == 0:
      return RowSpans(description=(desc_start, dclose[0]), reasoning=(think[1], token_of(at) + 1),
                      think=(think[1], tclose[0]))
  return None


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
    ids_BT: Int[np.ndarray, "B T"],
    mask_BT: Bool[np.ndarray, "B T"],
    *,
    token_texts: Sequence[str],
    fmt: DescribeReasonFormat = DescribeReasonFormat(),
    ignore_ids: Sequence[int] = (),
) -> DescribeReasonSpans:
  """The ViGOS spans and validity flag of each completion, on the host (released `_analyze_vigos_completion`).

  A row is valid iff `row_spans` finds its tags within the mask, and both the description span and the reasoning span
  hold a content token (one not in `ignore_ids`: EOS, pad). Answer correctness does not matter. Tokens between the
  spans and after the closing brace (".", EOS) belong to no span; an invalid row's active tokens all go to the
  reference teacher.

  Args:
    ids_BT, mask_BT: sampled completions; each row's mask is a prefix (right padding).
    token_texts: the decoded text of every id (ids past its end decode to "").

  Example (one token per item, <description> prefilled):
    tokens:      a  b.</  description  >\\n  <think>  x  =  </think>  \\boxed{  5  }.  <eos>
    description  1  0     0            0     0        0  0  0         0         0  0   0
    reasoning    0  0     0            0     0        1  1  1         1         1  1   0
  """
  ids_BT, mask_BT = np.asarray(ids_BT), np.asarray(mask_BT).astype(bool)
  if ids_BT.ndim != 2 or ids_BT.shape != mask_BT.shape:
    raise ValueError(f"ids_BT {ids_BT.shape} and mask_BT {mask_BT.shape} must be equal 2-D shapes")
  B, T = ids_BT.shape
  length_B = mask_BT.sum(-1)
  ragged = [b for b in range(B) if not mask_BT[b, :length_B[b]].all()]
  if ragged:
    raise ValueError(f"describe_reason_spans: the masks of rows {ragged[:8]} are not prefixes (right padding)")
  ignore = np.asarray(list(ignore_ids) or [-1])
  content_BT = mask_BT & ~np.isin(ids_BT, ignore)
  n_texts = len(token_texts)
  out = {k: np.zeros((B, T), bool) for k in ("description_BT", "reasoning_BT")}
  start_B, end_B, valid_B = np.zeros(B, np.int32), np.zeros(B, np.int32), np.zeros(B, bool)
  for b in range(B):
    ids = ids_BT[b, :length_B[b]]
    spans = row_spans([token_texts[i] if 0 <= i < n_texts else "" for i in ids], fmt)
    if spans is None:
      continue
    has_content = lambda span: content_BT[b, span[0]:span[1]].any()
    ok = has_content(spans.description) and has_content(spans.reasoning)
    if not ok or (fmt.require_think_content and not has_content(spans.think)):
      continue
    valid_B[b] = True
    out["description_BT"][b, slice(*spans.description)] = True
    out["reasoning_BT"][b, slice(*spans.reasoning)] = True
    start_B[b], end_B[b] = spans.reasoning
  return DescribeReasonSpans(**out, reference_BT=mask_BT & ~valid_B[:, None], valid_B=valid_B,
                             reasoning_start_B=start_B, reasoning_end_B=end_B)


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
