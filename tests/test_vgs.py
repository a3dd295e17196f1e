"""VGS-LP: per-token terms and their gradients, q*, the step-wide LP gate, adaptive gamma, eta calibration."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvg.distill import vgs
from jaxvg.distill import divergences as dv

B, T, V = 3, 6, 9
MASK = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)


def _z(seed, shape=(B, T, V), scale=1.0):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), shape)


def _np_logp(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(a, b):
  return float(np.sum(np.exp(a) * (a - b)))


def _values(z_si, z_sx, z_ti, z_tx, chunk_size=4):
  return vgs.vgs_token_values(student_image=dv.Logits(z_si), student_text=dv.Logits(z_sx),
                              teacher_image=dv.Logits(z_ti), teacher_text=dv.Logits(z_tx), chunk_size=chunk_size)


VALUES = jax.jit(_values, static_argnames="chunk_size")


def test_visual_target_by_hand():
  # p_S(.|x) = (.5, .3, .2), q_T(.|I,x) = (.6, .2, .2), q_T(.|x) = (.4, .4, .2):
  # q* ~ (.5*.6/.4, .3*.2/.4, .2*.2/.2) = (.75, .15, .2), sum 1.1 -> (.681818, .136364, .181818).
  z_sx, z_ti, z_tx = (jnp.log(jnp.array(p)) + c for p, c in (((.5, .3, .2), 1.0), ((.6, .2, .2), -2.0),
                                                              ((.4, .4, .2), 0.5)))
  q_star = jnp.exp(vgs.visual_target_logp(z_sx, z_ti, z_tx))
  np.testing.assert_allclose(q_star, [0.75 / 1.1, 0.15 / 1.1, 0.2 / 1.1], rtol=1e-6)


def test_all_terms_are_zero_when_student_equals_teacher_and_nonnegative_otherwise():
  z_i, z_x = _z(0), _z(1)
  values = VALUES(z_i, z_x, z_i, z_x)
  for name in ("std", "lang", "vis"):
    assert np.all(np.asarray(values[name]) == 0.0), name
  config = vgs.VGSConfig(eta=0.4, chunk_size=4)
  loss, _ = jax.jit(lambda z_i, z_x: vgs.vgs_loss(
      student_image=dv.Logits(z_i), student_text=dv.Logits(z_x), teacher_image=dv.Logits(z_i),
      teacher_text=dv.Logits(z_x), mask_BT=MASK, vds_threshold_high=jnp.float32(0.0), vds_threshold_low=None,
      count=None, config=config))(z_i, z_x)
  assert float(loss) == 0.0
  values = VALUES(*(_z(s) for s in range(4)))
  for name in ("std", "lang", "vis", "vds"):
    assert np.all(np.asarray(values[name]) > 0.0), name


def test_term_values_match_a_naive_computation():
  zs = [_z(s) for s in range(10, 14)]
  values = VALUES(*zs, chunk_size=5)
  lsi, lsx, lti, ltx = (_np_logp(z) for z in zs)
  for b, t in [(0, 0), (1, 4), (2, 5)]:
    log_q_star = _np_logp(np.asarray(zs[1][b, t]) + np.asarray(zs[2][b, t]) - np.asarray(zs[3][b, t]))
    want = {"std": _np_kl(lsi[b, t], lti[b, t]), "lang": _np_kl(lsx[b, t], ltx[b, t]),
            "vis": _np_kl(lsi[b, t], log_q_star), "vds": _np_kl(lti[b, t], ltx[b, t])}
    for name, w in want.items():
      np.testing.assert_allclose(values[name][b, t], w, rtol=1e-5, err_msg=name)


def test_gradients_of_each_term_by_hand():
  # One token. With p = p_S(.|I,x) = softmax(z): d KL(p || r) / dz = p (log p - log r - KL(p || r)) for a fixed r.
  z_si, z_sx, z_ti, z_tx = (_z(s, (1, 1, V)) for s in range(20, 24))

  @jax.jit
  def all_grads(*z):
    return {name: jax.grad(lambda *z: jnp.sum(_values(*z, chunk_size=1)[name]), argnums=(0, 1, 2, 3))(*z)
            for name in ("std", "vis", "lang", "vds")}

  grads = all_grads(z_si, z_sx, z_ti, z_tx).__getitem__

  def fixed_target_grad(z, log_r):
    p, lp = jax.nn.softmax(z), jax.nn.log_softmax(z)
    return p * (lp - log_r - dv.kl(lp, log_r))

  zero = np.zeros((1, 1, V))
  g = grads("std")
  np.testing.assert_allclose(g[0], fixed_target_grad(z_si, jax.nn.log_softmax(z_ti)), atol=1e-6)
  for i in (1, 2, 3):
    np.testing.assert_array_equal(g[i], zero)
  # l_Vis: q* is a stop-gradient target, so only the image-conditioned student gets gradient.
  g = grads("vis")
  log_q_star = jax.nn.log_softmax(z_sx + z_ti - z_tx)
  np.testing.assert_allclose(g[0], fixed_target_grad(z_si, log_q_star), atol=1e-6)
  for i in (1, 2, 3):
    np.testing.assert_array_equal(g[i], zero)
  g = grads("lang")
  np.testing.assert_allclose(g[1], fixed_target_grad(z_sx, jax.nn.log_softmax(z_tx)), atol=1e-6)
  for i in (0, 2, 3):
    np.testing.assert_array_equal(g[i], zero)
  for gi in grads("vds"):
    np.testing.assert_array_equal(gi, zero)


def test_chunk_sizes_agree_for_hidden_state_sources():
  h = [jax.random.normal(jax.random.PRNGKey(s), (B, T, 4)) for s in range(30, 34)]
  w = [jax.random.normal(jax.random.PRNGKey(s), (4, V)) for s in range(34, 38)]
  weights = jax.random.uniform(jax.random.PRNGKey(38), (4, B, T))

  def weighted_terms(h, w, c):
    vals = vgs.vgs_token_values(student_image=dv.Logits(h[0], w[0]), student_text=dv.Logits(h[1], w[1]),
                                teacher_image=dv.Logits(h[2], w[2]), teacher_text=dv.Logits(h[3], w[3]), chunk_size=c)
    stacked = jnp.stack([vals[k] for k in ("std", "lang", "vis", "vds")])
    return jnp.sum(weights * stacked), stacked

  @jax.jit
  def per_chunk_size(h, w):
    return [jax.value_and_grad(weighted_terms, argnums=(0, 1), has_aux=True)(h, w, c) for c in (6, 4)]

  ((_, v0), g0), ((_, v), g) = per_chunk_size(h, w)  # one chunk vs chunks of 4, which do not divide T = 6
  np.testing.assert_allclose(v, v0, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Teachers (sides 2 and 3) get exactly zero gradient.
  assert all(np.all(np.asarray(g0[i][j]) == 0) for i in (0, 1) for j in (2, 3))


# ---------------------------------------------------------------------------------------------------------------------
# Quantiles, the LP gate and adaptive gamma.


QUANTILE = jax.jit(vgs.masked_quantile, static_argnums=2)


def test_masked_quantile_matches_numpy_and_ignores_padding():
  x = jax.random.uniform(jax.random.PRNGKey(40), (4, 7))
  mask = jax.random.uniform(jax.random.PRNGKey(41), (4, 7)) > 0.4
  padded = jnp.where(mask, x, 1e6)  # padding values must not move the quantile
  for q in (0.0, 0.4, 0.7, 1.0):
    want = np.quantile(np.asarray(x)[np.asarray(mask)], q)
    np.testing.assert_allclose(QUANTILE(padded, mask, q), want, rtol=1e-6)
  one = jnp.zeros((1, 3), bool).at[0, 1].set(True)
  assert float(QUANTILE(jnp.array([[5.0, 2.0, 9.0]]), one, 0.7)) == 2.0
  ties = jnp.full((2, 3), 0.25)
  assert float(QUANTILE(ties, jnp.ones((2, 3), bool), 0.7)) == 0.25
  assert float(QUANTILE(x, jnp.zeros_like(mask), 0.7)) == math.inf


def test_lp_gate_uses_the_step_wide_quantile_by_hand():
  # Two micro-batches of one step; the 10 response tokens have VDS 0.1 .. 1.0, the rest is padding.
  vds_a = jnp.array([[0.1, 0.9, 0.3, 0.0], [0.5, 0.7, 0.0, 0.0]])
  mask_a = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  vds_b = jnp.array([[0.2, 1.0, 0.4, 0.6], [0.8, 0.0, 0.0, 0.0]])
  mask_b = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0]], bool)
  # Q_0.7 over the 10 values: position 0.7 * 9 = 6.3 between 0.7 and 0.8: 0.7 + 0.3 * 0.1 = 0.73.
  q70 = vgs.masked_quantile(jnp.concatenate([vds_a, vds_b]), jnp.concatenate([mask_a, mask_b]), 0.7)
  np.testing.assert_allclose(q70, 0.73, rtol=1e-6)
  np.testing.assert_array_equal(vgs.lp_gate(vds_a, mask_a, q70), [[0, 1, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(vgs.lp_gate(vds_b, mask_b, q70), [[0, 1, 0, 0], [1, 0, 0, 0]])
  # A per-micro-batch quantile would gate differently: batch a alone has 0.7 * 4 = 2.8 -> 0.5 + 0.8 * 0.2 = 0.66,
  # which would also let 0.7 through.
  q_a = vgs.masked_quantile(vds_a, mask_a, 0.7)
  np.testing.assert_allclose(q_a, 0.66, rtol=1e-6)
  np.testing.assert_array_equal(vgs.lp_gate(vds_a, mask_a, q_a), [[0, 1, 0, 0], [0, 1, 0, 0]])


def test_adaptive_gamma_bins_by_hand():
  vds = jnp.array([[0.1, 0.3, 0.45, 0.6, 0.9]])
  got = vgs.token_gamma(vds, gamma=2.0, adaptive=True, threshold_low=jnp.float32(0.3), threshold_high=jnp.float32(0.6))
  # <= Q_0.4 -> 0 (0.3 is on the boundary), <= Q_0.7 -> gamma / 2 (0.6 on the boundary), above -> gamma.
  np.testing.assert_array_equal(got, [[0.0, 0.0, 1.0, 1.0, 2.0]])
  fixed = vgs.token_gamma(vds, gamma=2.0, adaptive=False, threshold_low=None, threshold_high=None)
  np.testing.assert_array_equal(fixed, np.full((1, 5), 2.0))


# ---------------------------------------------------------------------------------------------------------------------
# The loss against a naive reference.


def _naive_vgs_loss(zs, mask, config):
  lsi, lsx, lti, ltx = (_np_logp(z) for z in zs)
  m = np.asarray(mask)
  per_tok = {k: np.zeros((B, T)) for k in ("std", "vis", "lang", "vds")}
  for b in range(B):
    for t in range(T):
      log_q_star = _np_logp(np.asarray(zs[1][b, t]) + np.asarray(zs[2][b, t]) - np.asarray(zs[3][b, t]))
      per_tok["std"][b, t] = _np_kl(lsi[b, t], lti[b, t])
      per_tok["vis"][b, t] = _np_kl(lsi[b, t], log_q_star)
      per_tok["lang"][b, t] = _np_kl(lsx[b, t], ltx[b, t])
      per_tok["vds"][b, t] = _np_kl(lti[b, t], ltx[b, t])
  vds = per_tok["vds"][m]
  q_hi, q_lo = np.quantile(vds, config.lp_quantile), np.quantile(vds, config.gamma_low_quantile)
  gamma = np.where(per_tok["vds"] <= q_lo, 0.0, np.where(per_tok["vds"] <= q_hi, config.gamma / 2, config.gamma))
  if not config.adaptive_gamma:
    gamma = np.full((B, T), config.gamma)
  tok = per_tok["std"] + gamma * per_tok["vis"] + config.lp_weight * (per_tok["vds"] > q_hi) * per_tok["lang"]
  if config.aggregation == "token_mean":
    return config.eta * tok[m].sum() / m.sum()
  rows = [tok[b][m[b]].mean() for b in range(B) if m[b].any()]
  return config.eta * sum(rows) / len(rows)


@pytest.mark.parametrize("aggregation,adaptive", [("sequence_mean", False), ("token_mean", True)])
def test_loss_matches_a_naive_reference(aggregation, adaptive):
  zs = [_z(s, scale=1.5) for s in range(50, 54)]
  config = vgs.VGSConfig(eta=0.41, lp_weight=0.5, adaptive_gamma=adaptive, aggregation=aggregation, chunk_size=4)

  @jax.jit
  def loss(zs):
    vds = vgs.chunked_vds(teacher_image=dv.Logits(zs[2]), teacher_text=dv.Logits(zs[3]), chunk_size=5)
    th = vgs.vds_thresholds(vds, MASK, config=config)
    return vgs.vgs_loss(student_image=dv.Logits(zs[0]), student_text=dv.Logits(zs[1]), teacher_image=dv.Logits(zs[2]),
                        teacher_text=dv.Logits(zs[3]), mask_BT=MASK, vds_threshold_high=th["high"],
                        vds_threshold_low=th["low"], count=None, config=config)

  value, metrics = loss(zs)
  np.testing.assert_allclose(value, _naive_vgs_loss(zs, MASK, config), rtol=1e-5)
  np.testing.assert_allclose(value, 0.41 * metrics["vgs/unscaled"], rtol=1e-6)
  # 9 response tokens: 0.7 * 8 = 5.6, so 3 tokens lie strictly above Q_0.7 (token mean of the gate: 3 / 9).
  if aggregation == "token_mean":
    np.testing.assert_allclose(metrics["vgs/lp_fraction"], 3 / 9, rtol=1e-6)


def test_rl_distill_mix_by_hand():
  # alpha = 0.3, O_GRPO = 2, l_VGS = 1: loss = 0.3 * 1 - 0.7 * 2 = -1.1.
  np.testing.assert_allclose(vgs.rl_distill_loss(grpo_objective=jnp.float32(2.0), distill_loss=jnp.float32(1.0),
                                                 alpha=0.3), -1.1, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# eta calibration.


def test_eta_and_tree_angles_by_hand():
  g_std = {"a": jnp.array([3.0, 0.0]), "b": jnp.zeros((2, 2))}
  g_vis = {"a": jnp.array([0.0, 4.0]), "b": jnp.zeros((2, 2))}
  np.testing.assert_allclose(vgs.tree_norm(g_vis), 4.0)
  np.testing.assert_allclose(vgs.tree_angle_degrees(g_std, g_vis), 90.0, atol=1e-5)
  np.testing.assert_allclose(vgs.tree_angle_degrees(g_std, g_std), 0.0, atol=1e-2)
  np.testing.assert_allclose(vgs.tree_angle_degrees(g_std, jax.tree.map(lambda x: -2 * x, g_std)), 180.0, atol=1e-2)
  # |g_S| = 3, |g_V| = 4, cos = 0, gamma = 2: eta = 3 / sqrt(9 + 4 * 16) = 3 / sqrt(73).
  eta = vgs.eta_from_gradient_stats(norm_std=3.0, norm_vis=4.0, cosine=0.0, gamma=2.0)
  assert eta == pytest.approx(3 / math.sqrt(73))


def test_eta_from_stats_equals_the_direct_norm_ratio():
  g_std = {"w": jax.random.normal(jax.random.PRNGKey(60), (5, 3)), "b": jax.random.normal(jax.random.PRNGKey(61), (3,))}
  g_vis = {"w": jax.random.normal(jax.random.PRNGKey(62), (5, 3)), "b": jax.random.normal(jax.random.PRNGKey(63), (3,))}
  gamma = 2.0
  eta = vgs.eta_from_gradient_stats(norm_std=float(vgs.tree_norm(g_std)), norm_vis=float(vgs.tree_norm(g_vis)),
                                    cosine=float(vgs.tree_cosine(g_std, g_vis)), gamma=gamma)
  direct = vgs.tree_norm(g_std) / vgs.tree_norm(jax.tree.map(lambda s, v: s + gamma * v, g_std, g_vis))
  np.testing.assert_allclose(eta, direct, rtol=1e-5)


def test_bad_inputs_raise_named_errors():
  with pytest.raises(ValueError, match="eta"):
    vgs.VGSConfig(eta=0.0)
  with pytest.raises(ValueError, match="aggregation"):
    vgs.VGSConfig(eta=0.4, aggregation="mean")
  with pytest.raises(ValueError, match="lp_quantile"):
    vgs.VGSConfig(eta=0.4, gamma_low_quantile=0.8, lp_quantile=0.7)
  with pytest.raises(ValueError, match="alpha"):
    vgs.rl_distill_loss(grpo_objective=jnp.float32(0.0), distill_loss=jnp.float32(0.0), alpha=1.5)
  with pytest.raises(ValueError, match="threshold_low"):
    vgs.token_gamma(jnp.zeros((1, 2)), gamma=2.0, adaptive=True, threshold_low=None, threshold_high=jnp.float32(1.0))
  with pytest.raises(ValueError, match="cosine"):
    vgs.eta_from_gradient_stats(norm_std=1.0, norm_vis=1.0, cosine=2.0, gamma=2.0)
  with pytest.raises(ValueError, match="structure"):
    vgs.tree_cosine({"a": jnp.ones(2)}, {"b": jnp.ones(2)})
