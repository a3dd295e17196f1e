"""Log-probabilities of completions given prompts: the forward pass every RL and distillation stage shares.

A batch of B prompts (left-padded, with their images) is scored against N = B * G completions (right-padded; row
b * G + g is sample g of prompt b). The prompts are embedded once, image features included, and repeated G times;
completion tokens take the M-RoPE positions that follow their prompt (`next_position_B`, identical on all three
axes). Counterfactual prompts (the image masked, removed, or whitened) reuse this function with their own prompt
arrays; `mask_visual` keeps the real prompt's `next_position_B`, so completion positions do not move.

Log-probabilities are computed from hidden states in chunks along the sequence, so the [N, T, V] logits never exist
at once (Qwen's V is ~152k).
"""

import dataclasses

import jax
import jax.numpy as jnp

from jaxvg.models.vision import VisionInputs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptInputs:
  input_ids_BT: jax.Array          # int32, left-padded
  attention_mask_BT: jax.Array     # bool/int, 1 on real tokens
  positions_3BT: jax.Array         # int32 M-RoPE ids
  next_position_B: jax.Array       # int32 position id of the first completion token
  vision: VisionInputs | None = None


def completion_positions(next_position_B, group_size: int, length: int):
  """[3, B*G, length] positions of completion tokens: next_position + index, on all three axes."""
  pos_NT = jnp.repeat(next_position_B, group_size)[:, None] + jnp.arange(length)[None, :]
  return jnp.broadcast_to(pos_NT[None], (3,) + pos_NT.shape)


def completion_hidden(model, prompt: PromptInputs, tokens_NT, mask_NT, group_size: int, *, attn_mask_NSS=None,
                      return_hidden: bool = False):
  """Hidden states [N, T, D] at the positions that predict each completion token (after the final norm).

  Position j of the output predicts `tokens_NT[:, j]`: it is the last prompt token for j = 0, else completion
  token j - 1.
  """
  T0 = prompt.input_ids_BT.shape[1]
  Tn = tokens_NT.shape[1]
  x_prompt_BTD, out = model.embed(prompt.input_ids_BT, prompt.vision)
  x_NTD = jnp.concatenate([jnp.repeat(x_prompt_BTD, group_size, axis=0), model.decoder.embed(tokens_NT)], axis=1)
  positions_3NT = jnp.concatenate([jnp.repeat(prompt.positions_3BT, group_size, axis=1),
                                   completion_positions(prompt.next_position_B, group_size, Tn)], axis=2)
  kv_mask_NS = jnp.concatenate([jnp.repeat(prompt.attention_mask_BT.astype(bool), group_size, axis=0),
                                mask_NT.astype(bool)], axis=1)
  h_NSD, _, dec_out = model.decoder(x_NTD, positions_3NT, kv_mask_NS, attn_mask_BTS=attn_mask_NSS,
                                    return_hidden=return_hidden)
  out.update(dec_out)
  return h_NSD[:, T0 - 1:T0 - 1 + Tn], out


def token_logps(h_NTD, w_DV, tokens_NT, *, chunk: int = 512, with_entropy: bool = False):
  """log p(tokens) [N, T] (and the entropy of each next-token distribution), chunked along T.

  Each chunk computes its logits in float32 and is rematerialized in the backward pass, so peak memory holds one
  [N, chunk, V] block, never [N, T, V].
  """
  N, T, D = h_NTD.shape
  chunk = min(chunk, T)
  pad = -T % chunk
  h_CNcD = jnp.pad(h_NTD, ((0, 0), (0, pad), (0, 0))).reshape(N, -1, chunk, D).swapaxes(0, 1)
  t_CNc = jnp.pad(tokens_NT, ((0, 0), (0, pad))).reshape(N, -1, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(args):
    h_NcD, t_Nc = args
    logits_NcV = jnp.einsum("NcD,DV->NcV", h_NcD, w_DV.astype(h_NcD.dtype), preferred_element_type=jnp.float32)
    logp_NcV = jax.nn.log_softmax(logits_NcV, axis=-1)
    logp_Nc = jnp.take_along_axis(logp_NcV, t_Nc[..., None], axis=-1)[..., 0]
    ent_Nc = -jnp.sum(jnp.exp(logp_NcV) * logp_NcV, axis=-1) if with_entropy else jnp.zeros_like(logp_Nc)
    return logp_Nc, ent_Nc

  logp_CNc, ent_CNc = jax.lax.map(one, (h_CNcD, t_CNc))
  unchunk = lambda a: a.swapaxes(0, 1).reshape(N, -1)[:, :T]
  return (unchunk(logp_CNc), unchunk(ent_CNc)) if with_entropy else unchunk(logp_CNc)


def token_top1(h_NTD, w_DV, tokens_NT, *, chunk: int = 512):
  """bool [N, T]: the token is the argmax of its next-token distribution (teacher-forced accuracy), chunked along T."""
  N, T, D = h_NTD.shape
  chunk = min(chunk, T)
  pad = -T % chunk
  h_CNcD = jnp.pad(h_NTD, ((0, 0), (0, pad), (0, 0))).reshape(N, -1, chunk, D).swapaxes(0, 1)
  t_CNc = jnp.pad(tokens_NT, ((0, 0), (0, pad))).reshape(N, -1, chunk).swapaxes(0, 1)

  def one(args):
    h_NcD, t_Nc = args
    logits_NcV = jnp.einsum("NcD,DV->NcV", h_NcD, w_DV.astype(h_NcD.dtype), preferred_element_type=jnp.float32)
    return jnp.argmax(logits_NcV, axis=-1) == t_Nc

  return jax.lax.map(one, (h_CNcD, t_CNc)).swapaxes(0, 1).reshape(N, -1)[:, :T]


def completion_logps(model, prompt: PromptInputs, tokens_NT, mask_NT, group_size: int, *, chunk: int = 512,
                     with_entropy: bool = False):
  """log pi(completion tokens | prompt) [N, T] under `model` (zero where mask is 0), optionally with entropies."""
  h_NTD, _ = completion_hidden(model, prompt, tokens_NT, mask_NT, group_size)
  res = token_logps(h_NTD, model.decoder.head_weight_DV(), tokens_NT, chunk=chunk, with_entropy=with_entropy)
  mask = mask_NT.astype(jnp.float32)
  if with_entropy:
    return res[0] * mask, res[1] * mask
  return res * mask


def prompt_inputs(cfg, *, input_ids, attention_mask=None, mm_token_type_ids=None, pixel_values=None,
                  image_grid_thw=None) -> PromptInputs:
  """PromptInputs from processor outputs (numpy, left-padded), computing positions on the host."""
  from jaxvg.models.vlm import prepare_inputs  # local: keeps this module free of host-side imports at load time
  ids, positions, mask, vision = prepare_inputs(cfg, input_ids=input_ids, attention_mask=attention_mask,
                                                mm_token_type_ids=mm_token_type_ids, pixel_values=pixel_values,
                                                image_grid_thw=image_grid_thw)
  next_position_B = jnp.max(positions, axis=(0, 2)) + 1
  return PromptInputs(ids, mask, positions, next_position_B.astype(jnp.int32), vision)
