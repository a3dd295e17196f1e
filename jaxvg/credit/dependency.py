"""The visual-dependency engine: log-probs of the same completions with and without the image.

Counterfactual inputs (methods.md section 8), one enum for the library:
  mask_visual  same ids and M-RoPE positions, every image-pad key masked out. Run on a *compacted* prompt: the pad
               tokens dropped, the remaining tokens keep their original positions, no vision tower. Causal attention
               with masked keys is exactly attention over the remaining keys, so the two passes agree (a test).
  no_image     the image removed from the chat message, the template re-applied, positions recomputed.
  white_image  a white image of the same size: same ids and positions, white pixels.
  image_only   the question text removed, the image kept.
The data pipeline builds each counterfactual prompt (`jaxvg.data`); this module scores completions under it and turns
the two passes into dependency maps.
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxvg.distill import divergences
from jaxvg.rl import scoring

COUNTERFACTUALS = ("mask_visual", "no_image", "white_image", "image_only")


def masked_visual_prompt(prompt: scoring.PromptInputs, image_token_id: int) -> scoring.PromptInputs:
  """The full-length `mask_visual` input: image-pad keys masked, ids and positions unchanged, vision skipped."""
  keep_BT = prompt.attention_mask_BT.astype(bool) & (prompt.input_ids_BT != image_token_id)
  return dataclasses.replace(prompt, attention_mask_BT=keep_BT.astype(prompt.attention_mask_BT.dtype), vision=None)


def compact_visual_prompt(input_ids_BT, attention_mask_BT, positions_3BT, next_position_B, *, image_token_id: int,
                          pad_to: int | None = None) -> scoring.PromptInputs:
  """The compacted `mask_visual` prompt (host side): image-pad tokens dropped, original positions kept.

  Rows stay left-padded; the length is the longest remaining row, or `pad_to` (a bucket) when given.
  Example: ids [pad, a, <img>, <img>, b] with positions [0, 0, 1, 1, 3] -> [a, b] with positions [0, 3].
  """
  ids, mask, pos = np.asarray(input_ids_BT), np.asarray(attention_mask_BT).astype(bool), np.asarray(positions_3BT)
  keep_BT = mask & (ids != image_token_id)
  length = int(keep_BT.sum(1).max()) if keep_BT.size else 0
  pad_to = length if pad_to is None else pad_to
  if pad_to < length:
    raise ValueError(f"pad_to={pad_to} is shorter than the longest compacted prompt ({length} tokens)")
  B = ids.shape[0]
  out_ids = np.zeros((B, pad_to), ids.dtype)
  out_mask = np.zeros((B, pad_to), np.int32)
  out_pos = np.zeros((3, B, pad_to), pos.dtype)
  for b in range(B):
    n = int(keep_BT[b].sum())
    out_ids[b, pad_to - n:] = ids[b, keep_BT[b]]
    out_mask[b, pad_to - n:] = 1
    out_pos[:, b, pad_to - n:] = pos[:, b, keep_BT[b]]
  return scoring.PromptInputs(jnp.asarray(out_ids), jnp.asarray(out_mask), jnp.asarray(out_pos),
                              jnp.asarray(next_position_B, jnp.int32), None)


def dual_logps(model, prompt: scoring.PromptInputs, counterfactual: scoring.PromptInputs, tokens_NT, mask_NT,
               group_size: int, *, chunk: int = 512):
  """(log pi(y | real input), log pi(y | counterfactual input)) per completion token [N, T], no gradient."""
  real = scoring.completion_logps(model, prompt, tokens_NT, mask_NT, group_size, chunk=chunk)
  cf = scoring.completion_logps(model, counterfactual, tokens_NT, mask_NT, group_size, chunk=chunk)
  return jax.lax.stop_gradient(real), jax.lax.stop_gradient(cf)


def full_kl(model, prompt: scoring.PromptInputs, counterfactual: scoring.PromptInputs, tokens_NT, mask_NT,
            group_size: int, *, chunk: int = 256):
  """Exact per-token KL(pi(. | real) || pi(. | counterfactual)) [N, T] over the full vocabulary, chunked along T."""
  h_real, _ = scoring.completion_hidden(model, prompt, tokens_NT, mask_NT, group_size)
  h_cf, _ = scoring.completion_hidden(model, counterfactual, tokens_NT, mask_NT, group_size)
  w_DV = model.decoder.head_weight_DV()
  kl_NT = divergences.chunked_kl(divergences.Logits(h_real, w_DV), divergences.Logits(h_cf, w_DV), chunk_size=chunk)
  return jax.lax.stop_gradient(kl_NT * mask_NT)


def step_scores(values_NT, step_ids_NT, num_steps: int, *, mean: bool = False):
  """Sums (or means) of a per-token quantity over each step: [N, C], C = num_steps (-1 ids are ignored)."""
  one_hot_NTC = (step_ids_NT[..., None] == jnp.arange(num_steps)).astype(values_NT.dtype)
  sums_NC = jnp.einsum("NT,NTC->NC", values_NT, one_hot_NTC)
  if not mean:
    return sums_NC
  return sums_NC / jnp.maximum(one_hot_NTC.sum(1), 1.0)


class DependencyGuard:
  """Warns loudly when the mean dependency on image prompts stays near zero: the image is not being used.

  A dropped image, wrong M-RoPE ids or a processor mismatch all look like this; training still "works".
  """

  def __init__(self, *, threshold: float = 1e-4, patience: int = 3, logger: logging.Logger | None = None):
    self.threshold, self.patience = threshold, patience
    self.low_steps = 0
    self.logger = logger or logging.getLogger("jaxvg")

  def update(self, mean_dependency: float) -> bool:
    """Records one step's mean dependency; returns True when the warning fires."""
    self.low_steps = self.low_steps + 1 if mean_dependency < self.threshold else 0
    if self.low_steps >= self.patience:
      self.logger.warning(
          "VISUAL DEPENDENCY ~ 0 for %d steps (mean %.2e < %.1e): the policy is not using the image. Check that "
          "images reach the model (pixel_values, image-pad tokens, M-RoPE positions from mm_token_type_ids).",
          self.low_steps, mean_dependency, self.threshold)
      return True
    return False
