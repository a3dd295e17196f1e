"""Ground truth for visual-dependency scores on the synthetic dataset: reference solutions as labelled tokens, the
AUROC of a token score, and the accuracy of the Otsu perception / reasoning split of step scores.

The generator knows which characters of a reference solution state an image fact and which step each character
belongs to (`synthetic.render_solution`). Tokenized with character offsets, a token is visual when any of its
characters is, and belongs to the step of its first character that has one (tags and separators have none). On these
tokens a dependency score of a trained policy (PGPO's k3, the full KL, ...) should rank the visual tokens above the
tokens of reasoning steps (`token_auroc`), and the PDCR step score V_k split by Otsu should recover the perception /
reasoning labels of the steps (`step_split_accuracy`). With a random model both numbers are chance; they are meant for
trained checkpoints (the replication table).
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxvg.credit import clusters
from jaxvg.data.synthetic import RenderedSolution

PERCEPTION, REASONING, ANSWER = "perception", "reasoning", "answer"


@dataclasses.dataclass(frozen=True)
class ReferenceTokens:
  """A rendered reference solution as tokens."""

  token_ids: np.ndarray  # int32 [T]
  is_visual: np.ndarray  # bool [T]: the token covers a character that states an image fact
  step_id: np.ndarray  # int32 [T]: index into step_labels; -1 on tags and separators
  step_labels: tuple[str, ...]  # "perception" | "reasoning" per step, then "answer"

  @property
  def is_reasoning(self) -> np.ndarray:
    """bool [T]: tokens of reasoning steps (the negatives of `token_auroc`)."""
    labels = np.asarray(self.step_labels + ("",))  # index -1 -> ""
    return labels[self.step_id] == REASONING

  @property
  def is_answer(self) -> np.ndarray:
    """bool [T]: tokens of the final answer segment (the closing tag's line excluded: it has no step)."""
    labels = np.asarray(self.step_labels + ("",))
    return labels[self.step_id] == ANSWER


def char_labels_to_tokens(offsets, is_visual_chars, step_id_chars) -> tuple[np.ndarray, np.ndarray]:
  """Per-token (is_visual, step_id) from per-character labels and the tokens' [start, end) character offsets.

  Example: text "ab cd", visual chars [0, 0, 0, 1, 1], steps [0, 0, -1, 1, 1], offsets [(0, 2), (2, 4), (4, 5)]
    -> is_visual [F, T, T], step_id [0, 1, 1] (token " c" takes the step of "c", its first labelled character).
  """
  is_visual_chars = np.asarray(is_visual_chars, bool)
  step_id_chars = np.asarray(step_id_chars, np.int32)
  if is_visual_chars.shape != step_id_chars.shape:
    raise ValueError(f"is_visual_chars {is_visual_chars.shape} and step_id_chars {step_id_chars.shape} differ")
  n = len(offsets)
  visual, step = np.zeros(n, bool), np.full(n, -1, np.int32)
  for t, (s, e) in enumerate(offsets):
    if not 0 <= s <= e <= len(is_visual_chars):
      raise ValueError(f"token {t} has offsets ({s}, {e}) outside the text of {len(is_visual_chars)} characters")
    visual[t] = bool(is_visual_chars[s:e].any())
    labelled = step_id_chars[s:e][step_id_chars[s:e] >= 0]
    step[t] = labelled[0] if labelled.size else -1
  return visual, step


def reference_tokens(tokenizer, rendered: RenderedSolution) -> ReferenceTokens:
  """Tokenize a rendered reference solution (no special tokens) and carry its character labels over to the tokens."""
  enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
  visual, step = char_labels_to_tokens(enc["offset_mapping"], rendered.is_visual, rendered.step_id)
  return ReferenceTokens(token_ids=np.asarray(enc["input_ids"], np.int32), is_visual=visual, step_id=step,
                         step_labels=tuple(rendered.step_labels))


def reference_arrays(refs: Sequence[ReferenceTokens], *, width: int, pad_id: int, eos_id: int | None = None) -> dict:
  """Right-padded [N, width] arrays of reference completions for a scoring pass (EOS appended when given).

  Returns {"tokens_NT", "mask_NT", "is_visual_NT", "is_reasoning_NT", "is_answer_NT", "step_id_NT"}; EOS and
  padding are none of the three classes, and have step id -1.
  """
  out = {"tokens_NT": np.full((len(refs), width), pad_id, np.int32), "mask_NT": np.zeros((len(refs), width), bool),
         "is_visual_NT": np.zeros((len(refs), width), bool), "is_reasoning_NT": np.zeros((len(refs), width), bool),
         "is_answer_NT": np.zeros((len(refs), width), bool), "step_id_NT": np.full((len(refs), width), -1, np.int32)}
  for n, r in enumerate(refs):
    ids = list(r.token_ids) + ([] if eos_id is None else [eos_id])
    if len(ids) > width:
      raise ValueError(f"reference {n} has {len(ids)} tokens, more than width={width}")
    L = len(r.token_ids)
    out["tokens_NT"][n, :len(ids)], out["mask_NT"][n, :len(ids)] = ids, True
    out["is_visual_NT"][n, :L], out["is_reasoning_NT"][n, :L] = r.is_visual, r.is_reasoning
    out["is_answer_NT"][n, :L] = r.is_answer
    out["step_id_NT"][n, :L] = r.step_id
  return out


def auroc(scores, positive, *, valid=None) -> float:
  """P(score of a random positive > score of a random negative) + P(tie) / 2 (Mann-Whitney U / (n_pos * n_neg)).

  Computed from average ranks in O(n log n). NaN when there is no positive or no negative.
  Example: scores [0.9, 0.8, 0.3, 0.1], positive [T, F, T, F] -> pairs (0.9 > 0.8), (0.9 > 0.1), (0.3 < 0.8),
    (0.3 > 0.1) -> 3 / 4.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  positive = np.asarray(positive, bool).reshape(-1)
  if scores.shape != positive.shape:
    raise ValueError(f"scores ({scores.size} values) and positive ({positive.size}) must have one size")
  if valid is not None:
    valid = np.asarray(valid, bool).reshape(-1)
    if valid.shape != scores.shape:
      raise ValueError(f"valid ({valid.size} values) must match scores ({scores.size})")
    scores, positive = scores[valid], positive[valid]
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores must be finite")
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  # Average 1-based rank of each distinct value: the tied block [start + 1, start + count].
  start = np.concatenate([[0], np.cumsum(counts)[:-1]])
  ranks = (start + (counts + 1) / 2.0)[inverse]
  u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def token_auroc(score_NT, is_visual_NT, is_reasoning_NT) -> float:
  """AUROC of a token dependency score at ranking visual tokens above the tokens of reasoning steps.

  Tokens that are neither (tags, separators, the non-visual words of perception steps, EOS, padding) are left out.
  """
  score = np.asarray(score_NT)
  visual, reasoning = np.asarray(is_visual_NT, bool), np.asarray(is_reasoning_NT, bool)
  if np.any(visual & reasoning):
    raise ValueError("a token cannot be both visual and a reasoning-step token")
  return auroc(score, visual, valid=visual | reasoning)


def segment_labels(seg_step_T, ref_step_T, step_labels: Sequence[str]) -> list[str]:
  """The reference label of each segmented step: the label of the reference step most of its tokens belong to.

  `seg_step_T` are step ids from `steps.segment_steps` (-1 on padding), `ref_step_T` the tokens' reference step ids
  (-1 on tags). A segment with no labelled token gets "none"; ties go to the earlier reference step.
  Example: seg [0, 0, 0, 1, 1], ref [-1, 0, 0, 1, -1], labels (perception, answer) -> [perception, answer].
  """
  seg, ref = np.asarray(seg_step_T), np.asarray(ref_step_T)
  if seg.shape != ref.shape:
    raise ValueError(f"seg_step_T {seg.shape} and ref_step_T {ref.shape} must have one shape")
  out = []
  for k in range(int(seg.max()) + 1 if (seg >= 0).any() else 0):
    ids = ref[(seg == k) & (ref >= 0)]
    out.append(step_labels[int(np.argmax(np.bincount(ids)))] if ids.size else "none")
  return out


def step_split_accuracy(step_scores_M, is_perception_M) -> tuple[float, float]:
  """(accuracy, threshold) of the Otsu split of step scores against perception (True) / reasoning (False) labels.

  The split is the one PDCR trains with (`clusters.otsu_threshold`; ties with the threshold go to the visual side).
  Example: scores [5, 4.5, 0.1, 0.2, 0], perception [T, T, F, F, F] -> threshold 4.5, accuracy 1.0.
  """
  scores = np.asarray(step_scores_M, np.float32).reshape(-1)
  labels = np.asarray(is_perception_M, bool).reshape(-1)
  if scores.shape != labels.shape or scores.size == 0:
    raise ValueError(f"step_scores_M ({scores.size}) and is_perception_M ({labels.size}) must be one non-empty size")
  threshold, pred = clusters.otsu_threshold(scores, np.ones(scores.shape, bool))
  return float(np.mean((np.asarray(pred) == 1) == labels)), float(threshold)
