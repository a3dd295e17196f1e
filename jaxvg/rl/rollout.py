"""Rollouts: prefill each prompt once, then decode G samples per prompt from its shared KV cache in one jitted loop.

  prompts [B, T] (left padded) --prefill--> cache [L, B, T] --repeat G, pad to S = T + T_new--> cache [L, B*G, S]
  --decode (lax.while_loop, cache donated)--> Rollouts: tokens / mask / log-probs [B*G, T_new]

Row b*G + g of every output is sample g of prompt b. Prompts are left padded, so every row writes its n-th generated
token at the same cache slot T + n; `kv_mask_BS` keeps the prompt padding invisible. The n-th generated token of a
row (n = 0, 1, ...) gets the M-RoPE position `valid_b + n + delta_b` on all three axes, valid_b being the number of
real prompt tokens and delta_b the offset returned by `mrope_positions`.

Sampling of step n of sequence i uses the key fold_in(fold_in(key, i), n), with i the global row index, so draws do
not depend on how the batch is sharded. The token-selection distribution is

  q(v) ∝ exp(z_v / temperature) over the kept set,  kept = top-k by z, then the smallest top-p nucleus of the rest

(ties at either cut are all kept); temperature 0 is greedy argmax. The returned `logp_BT` is the POLICY log-prob
log_softmax(z)_v at temperature 1 with no truncation (the rollout log-prob of the RL losses); `sample_logp_BT` is
log q(v) (0 for greedy).

Compiled programs are keyed by (B, T, vision shapes, SamplingConfig); `pad_to_buckets` rounds B and T up to a few
bucket sizes so a run compiles at most (#batch buckets x #length buckets) prefill/decode pairs per config.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, Int

from jaxvg.core import hosts
from jaxvg.models.decoder import KVCache
from jaxvg.models.vision import VisionInputs


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How rollouts are drawn. Frozen and hashable: it is a static argument of the jitted decode."""

  num_samples: int = 1  # G, samples per prompt
  max_new_tokens: int = 256  # T_new
  temperature: float = 1.0  # 0.0: greedy
  top_p: float = 1.0  # 1.0: off
  top_k: int = 0  # 0: off
  stop_token_ids: tuple[int, ...] = ()  # any of them ends a sequence (and is part of the response)
  pad_token_id: int = 0  # written after the stop token

  def __post_init__(self):
    if self.num_samples < 1:
      raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.temperature >= 0.0:
      raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 is off), got {self.top_k}")
    if not isinstance(self.stop_token_ids, tuple):
      raise ValueError(f"stop_token_ids must be a tuple of ints, got {self.stop_token_ids!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefix:
  """What decode needs besides the cache (every array has B*G rows)."""

  logits_BV: jax.Array  # float32 [B*G, V] next-token logits after the prompt
  kv_mask_BS: jax.Array  # bool [B*G, S] False on prompt padding, True on prompt tokens and decode slots
  start_B: jax.Array  # int32 [B*G] position id of the first generated token: valid prompt tokens + delta


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollouts:
  """Completions of B prompts x G samples; row b*G + g is sample g of prompt b."""

  tokens_BT: jax.Array  # int32 [B*G, T_new] sampled tokens, pad_token_id after the stop token
  mask_BT: jax.Array  # bool [B*G, T_new] response tokens: the stop token included, what follows excluded
  logp_BT: jax.Array  # float32 [B*G, T_new] policy log-prob log_softmax(logits)[token], temperature 1; 0 off mask
  sample_logp_BT: jax.Array  # float32 [B*G, T_new] log-prob under the sampling distribution; 0 off mask
  prompt_index_B: jax.Array  # int32 [B*G] the prompt of each row (row // G)
  lengths_B: jax.Array  # int32 [B*G] response length, mask_BT.sum(-1)
  finished_B: jax.Array  # bool [B*G] True when a stop token ended the row (False: cut at max_new_tokens)
  steps: jax.Array  # int32 [] decode-loop iterations run == max(lengths_B); < T_new on early exit


# ---------------------------------------------------------------- token selection


def sampling_logits(logits_BV: Float[Array, "B V"], *, temperature: float, top_p: float,
                    top_k: int) -> Float[Array, "B V"]:
  """Unnormalized log-probs of the sampling distribution: z / temperature, -inf outside top-k and the top-p nucleus.

  Top-k keeps every entry >= the k-th largest. Top-p then keeps, in descending order, each entry whose preceding mass
  (under softmax of the top-k survivors) is < top_p, and every entry tied with the smallest kept one.

  Example: z / T = log [0.5, 0.3, 0.15, 0.05], top_p = 0.8: masses before = [0, 0.5, 0.8, 0.95] -> keeps {0, 1}.
  """
  z_BV = logits_BV.astype(jnp.float32) / temperature  # float32 for the softmax
  V = z_BV.shape[-1]
  if 0 < top_k < V:
    top_BK = jax.lax.top_k(z_BV, top_k)[0]  # sorted descending
    z_BV = jnp.where(z_BV >= top_BK[:, -1:], z_BV, -jnp.inf)
  else:
    top_BK = None
  if top_p < 1.0:
    sorted_BK = top_BK if top_BK is not None else -jnp.sort(-z_BV, axis=-1)
    # Normalized over every survivor: a tie at the k-th value keeps more than the k sorted entries.
    p_BK = jnp.exp(sorted_BK - jax.nn.logsumexp(z_BV, axis=-1, keepdims=True))
    before_BK = jnp.cumsum(p_BK, axis=-1) - p_BK
    num_kept_B1 = jnp.sum(before_BK < top_p, axis=-1, keepdims=True)  # >= 1: the first entry has 0 before it
    cutoff_B1 = jnp.take_along_axis(sorted_BK, num_kept_B1 - 1, axis=-1)
    z_BV = jnp.where(z_BV >= cutoff_B1, z_BV, -jnp.inf)
  return z_BV


def token_logp(logits_BV: Float[Array, "B V"], tokens_B: Int[Array, " B"]) -> Float[Array, " B"]:
  """log_softmax(logits)[token] in float32, without materializing the [B, V] log-softmax."""
  logits_BV = logits_BV.astype(jnp.float32)
  picked_B = jnp.take_along_axis(logits_BV, tokens_B[:, None], axis=-1)[:, 0]
  return picked_B - jax.nn.logsumexp(logits_BV, axis=-1)


def first_argmax(x_BV: Float[Array, "B V"]) -> Int[Array, " B"]:
  """argmax over the last axis (the first index on ties) as a max and a min-index reduction.

  XLA's CPU backend runs the (value, index) reduction of `jnp.argmax` several times slower than two plain ones.
  """
  V = x_BV.shape[-1]
  iota_BV = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, x_BV.ndim - 1)
  first_B = jnp.min(jnp.where(x_BV == jnp.max(x_BV, axis=-1, keepdims=True), iota_BV, V), axis=-1)
  return jnp.minimum(first_B, V - 1)  # a NaN row still yields an in-range id


def select_tokens(logits_BV: Float[Array, "B V"], keys_B, *, temperature: float, top_p: float,
                  top_k: int) -> tuple[Int[Array, " B"], Float[Array, " B"]]:
  """Draws one token per row from `sampling_logits` (Gumbel-max with the row's key); greedy when temperature == 0.

  Returns (tokens_B int32, log-prob of each token under the sampling distribution; 0 for greedy).
  """
  if temperature == 0.0:
    return first_argmax(logits_BV), jnp.zeros(logits_BV.shape[:1], jnp.float32)
  z_BV = sampling_logits(logits_BV, temperature=temperature, top_p=top_p, top_k=top_k)
  gumbel_BV = jax.vmap(lambda k: jax.random.gumbel(k, z_BV.shape[-1:], jnp.float32))(keys_B)
  # Materialize the noise: fused into the reduction, the random-bit generation runs several times slower on CPU.
  gumbel_BV = jax.lax.optimization_barrier(gumbel_BV)
  tokens_B = first_argmax(z_BV + gumbel_BV)
  return tokens_B, token_logp(z_BV, tokens_B)


def row_keys(key, num_rows: int, step):
  """Key of step `step` for each of `num_rows` rows: fold_in(fold_in(key, row), step)."""
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, i), step))(jnp.arange(num_rows))


# ---------------------------------------------------------------- prefill and decode


def _constrain(x, mesh, spec):
  return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "max_new_tokens", "mesh", "data_axes"))
def prefill(graphdef, params, input_ids_BT, attention_mask_BT, positions_3BT, deltas_B, vision, *,
            num_samples: int, max_new_tokens: int, mesh=None, data_axes=("data",)) -> tuple[KVCache, Prefix]:
  """Runs each prompt once (with its images) and repeats its cache and next-token logits for its G samples.

  Returns:
    (cache [L, B*G, S = T + max_new_tokens, K, H] holding the prompts in slots [0, T), the Prefix).
  """
  model = nnx.merge(graphdef, params)
  B, T = input_ids_BT.shape
  cache = KVCache.zeros(model.cfg.text, B, T, dtype=model.decoder.dtype)
  h_BTD, cache, _ = model.hidden(input_ids_BT, positions_3BT, attention_mask_BT, vision=vision, cache=cache,
                                 cache_index=0)
  logits_BV = model.decoder.logits(h_BTD[:, -1:])[:, 0]  # left padding: the last column is every row's last token

  G, batch = num_samples, P(data_axes)
  grow = lambda c_LBTKH: _constrain(jnp.pad(jnp.repeat(c_LBTKH, G, axis=1),
                                            ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0))),
                                    mesh, P(None, data_axes))
  mask_BT = jnp.repeat(attention_mask_BT.astype(bool), G, axis=0)
  kv_mask_BS = jnp.concatenate([mask_BT, jnp.ones((B * G, max_new_tokens), bool)], axis=1)
  start_B = jnp.sum(attention_mask_BT, axis=-1).astype(jnp.int32) + deltas_B.astype(jnp.int32)
  return KVCache(grow(cache.k_LBSKH), grow(cache.v_LBSKH)), Prefix(
      logits_BV=_constrain(jnp.repeat(logits_BV, G, axis=0), mesh, batch),
      kv_mask_BS=_constrain(kv_mask_BS, mesh, batch),
      start_B=_constrain(jnp.repeat(start_B, G, axis=0), mesh, batch),
  )


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "mesh", "data_axes"), donate_argnames=("cache",))
def decode(graphdef, params, cache: KVCache, prefix: Prefix, key, *, config: SamplingConfig, mesh=None,
           data_axes=("data",)) -> tuple[Rollouts, KVCache]:
  """Samples up to `config.max_new_tokens` tokens per row; the loop exits as soon as every row has stopped.

  Iteration n samples token n from the carried logits (the prefill's for n = 0), writes it at column n, then feeds
  it at cache slot T + n (position start + n) for the next logits. The cache is donated and returned: the loop
  updates its buffers in place.
  """
  model = nnx.merge(graphdef, params)
  cfg = config
  BG, S = prefix.kv_mask_BS.shape
  N = cfg.max_new_tokens
  T = S - N
  stop_ids = jnp.asarray(cfg.stop_token_ids, jnp.int32)
  batch = P(data_axes)

  def cond(carry):
    n, done_B = carry[0], carry[3]
    return (n < N) & ~jnp.all(done_B)

  def body(carry):
    n, cache, logits_BV, done_B, (tokens_BT, mask_BT, logp_BT, slogp_BT) = carry
    tok_B, slogp_B = select_tokens(logits_BV, row_keys(key, BG, n), temperature=cfg.temperature, top_p=cfg.top_p,
                                   top_k=cfg.top_k)
    logp_B = token_logp(logits_BV, tok_B)
    live_B = ~done_B
    tok_B = jnp.where(live_B, tok_B, cfg.pad_token_id)
    put = lambda buf, col: _constrain(jax.lax.dynamic_update_slice(buf, col[:, None].astype(buf.dtype), (0, n)),
                                      mesh, batch)
    bufs = (put(tokens_BT, tok_B), put(mask_BT, live_B), put(logp_BT, jnp.where(live_B, logp_B, 0.0)),
            put(slogp_BT, jnp.where(live_B, slogp_B, 0.0)))
    done_B = done_B | (live_B & jnp.isin(tok_B, stop_ids))
    # The next logits; after the last step they go unused (one extra step keeps a single sampling site).
    pos_3B1 = jnp.broadcast_to((prefix.start_B + n)[None, :, None], (3, BG, 1))
    h_B1D, cache, _ = model.hidden(tok_B[:, None], pos_3B1, None, cache=cache, cache_index=T + n,
                                   kv_mask_BS=prefix.kv_mask_BS)
    return n + 1, cache, model.decoder.logits(h_B1D)[:, 0], done_B, bufs

  bufs = (jnp.full((BG, N), cfg.pad_token_id, jnp.int32), jnp.zeros((BG, N), bool), jnp.zeros((BG, N), jnp.float32),
          jnp.zeros((BG, N), jnp.float32))
  init = (jnp.int32(0), cache, prefix.logits_BV, jnp.zeros((BG,), bool), bufs)
  steps, cache, _, done_B, bufs = jax.lax.while_loop(cond, body, init)
  tokens_BT, mask_BT, logp_BT, slogp_BT = bufs
  rollouts = Rollouts(tokens_BT=tokens_BT, mask_BT=mask_BT, logp_BT=logp_BT, sample_logp_BT=slogp_BT,
                      prompt_index_B=_constrain(jnp.arange(BG, dtype=jnp.int32) // cfg.num_samples, mesh, batch),
                      lengths_B=jnp.sum(mask_BT, axis=-1, dtype=jnp.int32), finished_B=done_B, steps=steps)
  return rollouts, cache


def _check_inputs(input_ids_BT, attention_mask_BT, positions_3BT, deltas_B):
  if jnp.ndim(input_ids_BT) != 2:
    raise ValueError(f"input_ids_BT must be 2-D [B, T], got shape {jnp.shape(input_ids_BT)}")
  B, T = jnp.shape(input_ids_BT)
  for name, x, want in (("attention_mask_BT", attention_mask_BT, (B, T)), ("positions_3BT", positions_3BT, (3, B, T)),
                        ("deltas_B", deltas_B, (B,))):
    if tuple(jnp.shape(x)) != want:
      raise ValueError(f"{name} has shape {tuple(jnp.shape(x))}, expected {want}")
  if isinstance(attention_mask_BT, np.ndarray):  # host arrays are cheap to check; device arrays are trusted
    mask = attention_mask_BT.astype(bool)
    if not mask[:, -1].all():
      raise ValueError(f"attention_mask_BT: rows {np.flatnonzero(~mask[:, -1]).tolist()} are empty or right padded; "
                       "prompts must be left padded with at least one token")
    if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
      raise ValueError("attention_mask_BT must be left padded (zeros, then ones) in every row")


def rollout(graphdef, params, *, input_ids_BT, attention_mask_BT, positions_3BT, deltas_B,
            vision: VisionInputs | None, key, config: SamplingConfig, mesh: jax.sharding.Mesh | None = None,
            data_axes: tuple[str, ...] = ("data",)) -> Rollouts:
  """Samples `config.num_samples` completions for each of B left-padded prompts.

  Args:
    graphdef, params: `nnx.split(model)` of a `Qwen25VL`.
    input_ids_BT, attention_mask_BT: left-padded prompts (1 = real token); every row has at least one token.
    positions_3BT, deltas_B: M-RoPE positions and offsets of the prompts (`mrope_positions`).
    vision: the prompts' images (`VisionInputs`) or None.
    key: a PRNG key; the same key gives the same rollouts whatever the mesh.
    config: the `SamplingConfig` (static: one compiled decode per config and shape).
    mesh: shard the batch over `data_axes` of this mesh (B must be a multiple of their size); None: no constraint.

  Returns:
    Rollouts with B * G rows.
  """
  _check_inputs(input_ids_BT, attention_mask_BT, positions_3BT, deltas_B)
  if mesh is not None:
    shards = int(np.prod([mesh.shape[a] for a in data_axes]))
    B = jnp.shape(input_ids_BT)[0]
    if B % shards:
      raise ValueError(f"batch B={B} is not a multiple of the {shards} shards of mesh axes {data_axes}; "
                       "pad it with pad_to_buckets")
    put = lambda x, spec: hosts.put(x, NamedSharding(mesh, spec))
    input_ids_BT, attention_mask_BT, deltas_B = (put(x, P(data_axes)) for x in (input_ids_BT, attention_mask_BT,
                                                                               deltas_B))
    positions_3BT = put(positions_3BT, P(None, data_axes))
    vision = None if vision is None else jax.tree.map(lambda x: put(x, P()), vision)
  cache, prefix = prefill(graphdef, params, jnp.asarray(input_ids_BT), jnp.asarray(attention_mask_BT),
                   jnp.asarray(positions_3BT), jnp.asarray(deltas_B), vision, num_samples=config.num_samples,
                   max_new_tokens=config.max_new_tokens, mesh=mesh, data_axes=data_axes)
  rollouts, _ = decode(graphdef, params, cache, prefix, key, config=config, mesh=mesh, data_axes=data_axes)
  return rollouts


# ---------------------------------------------------------------- bucketing


def bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n."""
  fits = [b for b in sorted(buckets) if b >= n]
  if not fits:
    raise ValueError(f"size {n} exceeds the largest bucket {max(buckets)} of {sorted(buckets)}")
  return fits[0]


def pad_to_buckets(*, input_ids_BT, attention_mask_BT, positions_3BT, deltas_B, length_buckets: Sequence[int],
                   batch_buckets: Sequence[int], pad_token_id: int = 0):
  """Host-side: left-pads prompts to the next length bucket and appends filler prompts up to the next batch bucket.

  A filler prompt is one valid `pad_token_id` token at position 0; its rollouts (rows >= num_prompts * G) are to be
  dropped with `take_prompts`. Real rows keep their index, hence their random draws.

  Returns:
    (dict with input_ids_BT, attention_mask_BT, positions_3BT, deltas_B as numpy arrays, num_prompts).
  """
  ids, mask = np.asarray(input_ids_BT), np.asarray(attention_mask_BT)
  pos, deltas = np.asarray(positions_3BT), np.asarray(deltas_B)
  B, T = ids.shape
  Bb, Tb = bucket(B, batch_buckets), bucket(T, length_buckets)
  out_ids = np.full((Bb, Tb), pad_token_id, ids.dtype)
  out_mask = np.zeros((Bb, Tb), mask.dtype)
  out_pos = np.zeros((3, Bb, Tb), pos.dtype)
  out_deltas = np.zeros((Bb,), deltas.dtype)
  out_ids[:B, Tb - T:], out_mask[:B, Tb - T:], out_pos[:, :B, Tb - T:], out_deltas[:B] = ids, mask, pos, deltas
  out_mask[B:, -1] = 1
  return dict(input_ids_BT=out_ids, attention_mask_BT=out_mask, positions_3BT=out_pos, deltas_B=out_deltas), B


def take_prompts(rollouts: Rollouts, num_prompts: int, num_samples: int) -> Rollouts:
  """The rows of the first `num_prompts` prompts (drops the filler prompts of `pad_to_buckets`)."""
  rows = num_prompts * num_samples
  return jax.tree.map(lambda x: x[:rows] if jnp.ndim(x) else x, rollouts)
