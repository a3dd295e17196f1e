"""The sampler against full forwards without a cache, on left-padded prompts with images.

References are independent of the sampler: step-by-step argmax of full (uncached) forwards whose M-RoPE positions
come from `mrope_positions` on the extended sequence, numpy log-softmax and a numpy nucleus for the log-probs, and
naive python loops for stop tokens and masks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxvg.models as M
from jaxvg.rl import rollout as R

N_NEW = 6  # max_new_tokens of the image-prompt tests (one compiled prefill for all of them)
G = 2
ROWS = [[3, (4, 4), 2], [2, (4, 8), 3], [5]]  # int: text tokens; (h, w): an image of h x w patches


def unit_scale(model, seed: int = 0):
  """Redraws every weight at unit scale: fan-in normal matrices, norms 1 + 0.2 N(0, 1), biases 0.2 N(0, 1).

  At the default init (std 0.02) the layers barely move the residual stream, so a wrong position or cache entry
  would hardly change the logits; at unit scale it does.
  """
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, shape = str(path[-1]), var.get_value().shape
    noise = rng.standard_normal(shape).astype(np.float32)
    suffix = name.rsplit("_", 1)[1]
    if "norm" in name:
      value = 1.0 + 0.2 * noise
    elif "bias" in name:
      value = 0.2 * noise
    else:  # fan-in: D for the (tied) embedding, N*H into an output projection, else the first non-layer axis
      fan_in = (shape[1] if suffix == "VD" else shape[1] * shape[2] if suffix.startswith("LNH")
                else shape[1] if suffix.startswith("L") else shape[0])
      value = noise / np.sqrt(fan_in)
    var.set_value(jnp.asarray(value))
  return model


def make_prompts(cfg, rows, *, seed: int = 0):
  """Left-padded prompts: an int n is n random text tokens, (h, w) an image of h x w patches with its markers.

  Returns (input_ids, attention_mask, mm_token_type_ids, pixel_values or None, image_grid_thw or None), numpy.
  """
  rng = np.random.default_rng(seed)
  seqs, grids, pixels = [], [], []
  for row in rows:
    seq = []
    for item in row:
      if isinstance(item, int):
        seq += rng.integers(1, cfg.image_token_id - 4, item).tolist()
      else:
        h, w = item
        grids.append([1, h, w])
        pixels.append(rng.standard_normal((h * w, cfg.vision.patch_dim)).astype(np.float32))
        n = h * w // cfg.vision.merge_unit
        seq += [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
    seqs.append(seq)
  T = max(map(len, seqs))
  ids = np.zeros((len(rows), T), np.int32)
  mask = np.zeros((len(rows), T), np.int32)
  for b, seq in enumerate(seqs):
    ids[b, T - len(seq):], mask[b, T - len(seq):] = seq, 1
  types = (ids == cfg.image_token_id).astype(np.int32)
  if not grids:
    return ids, mask, types, None, None
  return ids, mask, types, np.concatenate(pixels), np.asarray(grids)


def vision_inputs(cfg, pixels, grid):
  if grid is None:
    return None
  v = cfg.vision
  layout = M.vision_layout(grid, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                           patch_size=v.patch_size)
  return M.VisionInputs.from_layout(pixels, layout)


@nnx.jit
def full_logits(model, ids, positions, mask, vision):
  return model(ids, positions, mask, vision=vision)[0]


@pytest.fixture(scope="module")
def setup():
  cfg = M.tiny()
  model = unit_scale(nnx.eval_shape(lambda: M.Qwen25VL(cfg, rngs=nnx.Rngs(0))), seed=1)  # every value redrawn
  ids, mask, types, pixels, grid = make_prompts(cfg, ROWS, seed=2)
  positions, deltas = M.mrope_positions(ids, types, grid, mask)
  vision = vision_inputs(cfg, pixels, grid)
  graphdef, params = nnx.split(model)
  prompts = dict(input_ids_BT=ids, attention_mask_BT=mask, positions_3BT=positions, deltas_B=deltas, vision=vision)
  return dict(cfg=cfg, model=model, graphdef=graphdef, params=params, prompts=prompts, types=types, grid=grid)


def reference_logits(s, completion, completion_mask):
  """Full forwards of prompt + completion (right padded past each row's mask); logits [rows, T + N, V], numpy."""
  ids, mask, types = (s["prompts"]["input_ids_BT"], s["prompts"]["attention_mask_BT"], s["types"])
  ext_ids = np.concatenate([ids, completion], axis=1)
  ext_mask = np.concatenate([mask, completion_mask.astype(mask.dtype)], axis=1)
  ext_types = np.concatenate([types, np.zeros_like(completion)], axis=1)
  positions, _ = M.mrope_positions(ext_ids, ext_types, s["grid"], ext_mask)
  return np.asarray(full_logits(s["model"], ext_ids, positions, ext_mask, s["prompts"]["vision"]), np.float64)


@pytest.fixture(scope="module")
def greedy_reference(setup):
  """Greedy decoding by argmax of a full forward at every step (no cache)."""
  B, T = setup["prompts"]["input_ids_BT"].shape
  completion = np.zeros((B, N_NEW), np.int32)
  for n in range(N_NEW):
    on = (np.arange(N_NEW) < n)[None].repeat(B, 0)
    logits = reference_logits(setup, completion, on)
    completion[:, n] = logits[:, T + n - 1].argmax(-1)
  logits = reference_logits(setup, completion, np.ones_like(completion, bool))
  return completion, logits


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def nucleus_logq(logits, *, temperature, top_p, top_k):
  """float64 log q of the sampling distribution: top-k by value, then whole tie groups in descending order until
  their mass reaches top_p."""
  z = np.asarray(logits, np.float64) / temperature
  keep = np.ones(z.shape, bool) if not 0 < top_k < len(z) else z >= np.sort(z)[-top_k]
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  if top_p < 1.0:
    nucleus, mass = np.zeros_like(keep), 0.0
    for value in sorted(set(z[keep].tolist()), reverse=True):
      group = keep & (z == value)
      nucleus, mass = nucleus | group, mass + p[group].sum()
      if mass >= top_p:
        break
    keep = nucleus
  with np.errstate(divide="ignore"):
    return np.where(keep, z - np.log(np.exp(z[keep] - z.max()).sum()) - z.max(), -np.inf)


def run(s, config, key=0):
  return jax.device_get(R.rollout(s["graphdef"], s["params"], **s["prompts"], key=jax.random.key(key), config=config))


def test_greedy_equals_argmax_of_full_forwards(setup, greedy_reference):
  completion, logits = greedy_reference
  T = setup["prompts"]["input_ids_BT"].shape[1]
  out = run(setup, R.SamplingConfig(num_samples=G, max_new_tokens=N_NEW, temperature=0.0))
  np.testing.assert_array_equal(out.tokens_BT, np.repeat(completion, G, axis=0))
  assert out.mask_BT.all() and not out.finished_B.any() and int(out.steps) == N_NEW
  np.testing.assert_array_equal(out.lengths_B, N_NEW)
  np.testing.assert_array_equal(out.prompt_index_B, [0, 0, 1, 1, 2, 2])
  logp = np.take_along_axis(log_softmax(logits[:, T - 1:-1]), completion[..., None], -1)[..., 0]
  np.testing.assert_allclose(out.logp_BT, np.repeat(logp, G, axis=0), atol=1e-4)
  np.testing.assert_array_equal(out.sample_logp_BT, 0.0)  # greedy: a point mass


def test_sampled_logps_equal_full_forward(setup):
  B, T = setup["prompts"]["input_ids_BT"].shape
  stops = tuple(range(100, 164))  # 1/8 of the vocabulary: some rows stop, others run to the end
  cfg = R.SamplingConfig(num_samples=4, max_new_tokens=N_NEW, temperature=0.8, top_p=0.9, top_k=40,
                         stop_token_ids=stops, pad_token_id=7)
  out = run(setup, cfg, key=3)
  Gs = cfg.num_samples
  assert out.finished_B.any() and not out.finished_B.all()
  for g in range(Gs):
    rows = np.arange(B) * Gs + g
    logits = reference_logits(setup, out.tokens_BT[rows], out.mask_BT[rows])[:, T - 1:-1]
    for r, row in enumerate(rows):
      for n in range(N_NEW):
        if not out.mask_BT[row, n]:
          continue
        tok = out.tokens_BT[row, n]
        assert abs(out.logp_BT[row, n] - log_softmax(logits[r, n])[tok]) <= 1e-4
        logq = nucleus_logq(logits[r, n], temperature=0.8, top_p=0.9, top_k=40)
        assert np.isfinite(logq[tok]), "a token outside the top-k / top-p set was sampled"
        assert abs(out.sample_logp_BT[row, n] - logq[tok]) <= 1e-4
  # Mask and padding, by a naive loop over each row.
  for row in range(B * Gs):
    toks = out.tokens_BT[row].tolist()
    first_stop = next((n for n, t in enumerate(toks) if t in stops), None)
    length = N_NEW if first_stop is None else first_stop + 1
    assert out.lengths_B[row] == length and out.finished_B[row] == (first_stop is not None)
    np.testing.assert_array_equal(out.mask_BT[row], np.arange(N_NEW) < length)
    assert toks[length:] == [7] * (N_NEW - length)
    np.testing.assert_array_equal(out.logp_BT[row, length:], 0.0)
    np.testing.assert_array_equal(out.sample_logp_BT[row, length:], 0.0)
  assert int(out.steps) == out.lengths_B.max()


def test_stop_tokens_end_rows_and_the_loop_exits_early(setup, greedy_reference):
  completion, _ = greedy_reference
  stops = tuple(sorted(set(completion[:, 1].tolist())))  # every row meets a stop token by its 2nd token
  cfg = R.SamplingConfig(num_samples=G, max_new_tokens=N_NEW, temperature=0.0, stop_token_ids=stops)
  cache, prefix = R.prefill(setup["graphdef"], setup["params"], *(jnp.asarray(setup["prompts"][k]) for k in
                            ("input_ids_BT", "attention_mask_BT", "positions_3BT", "deltas_B")),
                            setup["prompts"]["vision"], num_samples=G, max_new_tokens=N_NEW, mesh=None,
                            data_axes=("data",))  # the keywords `rollout` passes: the compiled prefill is reused
  donated = cache.k_LBSKH
  out, _ = R.decode(setup["graphdef"], setup["params"], cache, prefix, jax.random.key(0), config=cfg, mesh=None,
                    data_axes=("data",))
  assert donated.is_deleted()  # the cache buffer was donated to the loop
  out = jax.device_get(out)
  lengths = [next(n for n, t in enumerate(row) if t in stops) + 1 for row in completion.tolist()]
  assert max(lengths) <= 2
  assert int(out.steps) == max(lengths) < N_NEW  # the loop ran max(lengths) steps, not max_new_tokens
  for row in range(len(out.tokens_BT)):
    n = lengths[row // G]
    np.testing.assert_array_equal(out.tokens_BT[row, :n], completion[row // G, :n])
    np.testing.assert_array_equal(out.tokens_BT[row, n:], 0)
    np.testing.assert_array_equal(out.mask_BT[row], np.arange(N_NEW) < n)
  assert out.finished_B.all()


def test_compilations_bounded_by_buckets(setup):
  cfg = setup["cfg"]
  config = R.SamplingConfig(num_samples=2, max_new_tokens=3, temperature=1.0, top_k=20)
  shapes = [(1, 3), (2, 5), (3, 4), (1, 7), (3, 8), (2, 2)]
  combos = {(R.bucket(b, (4,)), R.bucket(t, (4, 8))) for b, t in shapes}
  before = R.prefill._cache_size(), R.decode._cache_size()
  outs = {}
  for i, (b, t) in enumerate(shapes):
    ids, mask, types, _, _ = make_prompts(cfg, [[t - r] for r in range(b)], seed=10 + i)
    positions, deltas = M.mrope_positions(ids, types, None, mask)
    padded, num = R.pad_to_buckets(input_ids_BT=ids, attention_mask_BT=mask, positions_3BT=positions,
                                   deltas_B=deltas, length_buckets=(4, 8), batch_buckets=(4,))
    out = R.rollout(setup["graphdef"], setup["params"], **padded, vision=None, key=jax.random.key(5), config=config)
    out = jax.device_get(R.take_prompts(out, num, config.num_samples))
    assert out.tokens_BT.shape == (b * 2, 3) and num == b
    outs[(b, t)] = (ids, out)
  grew = R.prefill._cache_size() - before[0], R.decode._cache_size() - before[1]
  assert len(combos) == 2 < len(set(shapes))
  assert 1 <= grew[0] <= len(combos) and 1 <= grew[1] <= len(combos)
  for (b, _), (_, out) in outs.items():
    assert out.lengths_B.max() <= 3 and (out.prompt_index_B == np.arange(b * 2) // 2).all()


def test_same_prompt_same_draws_whatever_its_neighbours(setup):
  cfg = setup["cfg"]
  config = R.SamplingConfig(num_samples=2, max_new_tokens=3, temperature=1.0, top_k=20)
  results = []
  for rows in ([[6]], [[6], [3], [8]]):
    ids, mask, types, _, _ = make_prompts(cfg, rows, seed=4)  # the same rng: row 0 is the same prompt
    positions, deltas = M.mrope_positions(ids, types, None, mask)
    padded, num = R.pad_to_buckets(input_ids_BT=ids, attention_mask_BT=mask, positions_3BT=positions,
                                   deltas_B=deltas, length_buckets=(4, 8), batch_buckets=(4,))
    out = R.rollout(setup["graphdef"], setup["params"], **padded, vision=None, key=jax.random.key(5), config=config)
    results.append(jax.device_get(R.take_prompts(out, num, 2)))
  np.testing.assert_array_equal(results[0].tokens_BT, results[1].tokens_BT[:2])
  np.testing.assert_allclose(results[0].logp_BT, results[1].logp_BT[:2], atol=1e-5)


def test_pad_to_buckets_by_hand():
  ids = np.array([[0, 5, 6], [7, 8, 9]])
  mask = np.array([[0, 1, 1], [1, 1, 1]])
  pos = np.stack([np.array([[0, 0, 1], [0, 1, 2]])] * 3)
  padded, num = R.pad_to_buckets(input_ids_BT=ids, attention_mask_BT=mask, positions_3BT=pos,
                                 deltas_B=np.array([4, 0]), length_buckets=(2, 5), batch_buckets=(1, 3),
                                 pad_token_id=0)
  assert num == 2
  np.testing.assert_array_equal(padded["input_ids_BT"], [[0, 0, 0, 5, 6], [0, 0, 7, 8, 9], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(padded["attention_mask_BT"], [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])
  np.testing.assert_array_equal(padded["positions_3BT"][1], [[0, 0, 0, 0, 1], [0, 0, 0, 1, 2], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(padded["deltas_B"], [4, 0, 0])
  assert R.bucket(5, (8, 4, 16)) == 8 and R.bucket(4, (8, 4)) == 4
  with pytest.raises(ValueError, match="largest bucket"):
    R.bucket(17, (8, 16))


def test_bad_inputs_raise(setup):
  with pytest.raises(ValueError, match="top_p"):
    R.SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    R.SamplingConfig(temperature=-1.0)
  with pytest.raises(ValueError, match="num_samples"):
    R.SamplingConfig(num_samples=0)
  with pytest.raises(ValueError, match="stop_token_ids"):
    R.SamplingConfig(stop_token_ids=[1, 2])
  p = dict(setup["prompts"])
  right = dict(p, attention_mask_BT=p["attention_mask_BT"][:, ::-1].copy())
  with pytest.raises(ValueError, match="left padded"):
    R.rollout(setup["graphdef"], setup["params"], **right, key=jax.random.key(0), config=R.SamplingConfig())
  bad = dict(p, deltas_B=p["deltas_B"][:2])
  with pytest.raises(ValueError, match="deltas_B"):
    R.rollout(setup["graphdef"], setup["params"], **bad, key=jax.random.key(0), config=R.SamplingConfig())
