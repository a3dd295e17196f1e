"""Divergences: values against naive loops, gradients against hand-derived formulas, chunked == unchunked."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvg.distill import divergences as dv

V = 6


def _logits(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) * 2.0


def _np_logp(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _loop_kl(logp_p, logp_q):
  """sum_v p_v (log p_v - log q_v), one entry at a time."""
  total = 0.0
  for v in range(len(logp_p)):
    total += math.exp(logp_p[v]) * (logp_p[v] - logp_q[v])
  return total


def _loop_jsd(logp_p, logp_q, beta):
  total = 0.0
  for v in range(len(logp_p)):
    p, q = math.exp(logp_p[v]), math.exp(logp_q[v])
    m = beta * p + (1 - beta) * q
    total += beta * p * math.log(p / m) + (1 - beta) * q * math.log(q / m)
  return total


# ---------------------------------------------------------------------------------------------------------------------
# Values.


def test_kl_matches_naive_loop_and_is_nonnegative():
  zp, zq = _logits(0, (4, V)), _logits(1, (4, V))
  got = dv.kl(dv.log_probs(zp), dv.log_probs(zq))
  lp, lq = _np_logp(zp), _np_logp(zq)
  want = [_loop_kl(lp[i], lq[i]) for i in range(4)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got) > 0)


def test_kl_is_exactly_zero_for_equal_distributions():
  logp = dv.log_probs(_logits(2, (3, 5, V)))
  assert np.all(np.asarray(dv.kl(logp, logp)) == 0.0)
  for beta in (0.0, 0.3, 0.5, 0.9, 1.0):
    assert np.all(np.asarray(dv.generalized_jsd(logp, logp, beta=beta)) == 0.0)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.8])
def test_jsd_matches_naive_loop(beta):
  zp, zq = _logits(3, (4, V)), _logits(4, (4, V))
  got = dv.generalized_jsd(dv.log_probs(zp), dv.log_probs(zq), beta=beta)
  lp, lq = _np_logp(zp), _np_logp(zq)
  np.testing.assert_allclose(got, [_loop_jsd(lp[i], lq[i], beta) for i in range(4)], rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got) >= 0)


def test_jsd_end_points_are_the_two_kls_and_the_scaled_limits_approach_them():
  lp, lq = dv.log_probs(_logits(5, (4, V))), dv.log_probs(_logits(6, (4, V)))
  np.testing.assert_array_equal(dv.generalized_jsd(lp, lq, beta=0.0), dv.kl(lp, lq))
  np.testing.assert_array_equal(dv.generalized_jsd(lp, lq, beta=1.0), dv.kl(lq, lp))
  # JSD_beta = beta KL(p||q) + O(beta^2) near 0, and (1 - beta) KL(q||p) + O((1 - beta)^2) near 1.
  eps = 1e-3
  np.testing.assert_allclose(dv.generalized_jsd(lp, lq, beta=eps) / eps, dv.kl(lp, lq), rtol=2e-2)
  np.testing.assert_allclose(dv.generalized_jsd(lp, lq, beta=1 - eps) / eps, dv.kl(lq, lp), rtol=2e-2)


def test_entry_clip_and_token_clamp_by_hand():
  # p = (0.5, 0.5), q = (0.25, 0.75): summands 0.5 ln 2 = 0.34657 and 0.5 ln(2/3) = -0.20273.
  lp, lq = jnp.log(jnp.array([0.5, 0.5])), jnp.log(jnp.array([0.25, 0.75]))
  full = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
  np.testing.assert_allclose(dv.kl(lp, lq), full, rtol=1e-6)
  np.testing.assert_allclose(dv.kl(lp, lq, entry_clip=0.1), 0.1 + 0.5 * math.log(2 / 3), rtol=1e-6)
  np.testing.assert_allclose(dv.clamp_tokens(dv.kl(lp, lq), 0.05), 0.05)
  np.testing.assert_allclose(dv.clamp_tokens(dv.kl(lp, lq), 1.0), full, rtol=1e-6)


def test_kl_with_masked_vocabulary_entries_has_no_nan():
  # p puts zero mass on entry 2 (logit -inf): KL only sums over p's support; its gradient stays finite.
  zp = jnp.array([0.3, -1.0, -jnp.inf, 0.5])
  zq = jnp.array([0.1, 0.2, 0.3, -0.4])
  lp, lq = _np_logp(np.array([0.3, -1.0, -1e30, 0.5])), _np_logp(zq)
  want = sum(math.exp(lp[v]) * (lp[v] - lq[v]) for v in (0, 1, 3))
  np.testing.assert_allclose(dv.kl(dv.log_probs(zp), dv.log_probs(zq)), want, rtol=1e-5)
  g = jax.grad(lambda a, b: dv.kl(dv.log_probs(a), dv.log_probs(b)), argnums=(0, 1))(zp, zq)
  assert all(np.all(np.isfinite(x)) for x in g)


# ---------------------------------------------------------------------------------------------------------------------
# Gradients wrt the student logits z: q = softmax(z) the student, p the teacher (fixed); dq_k/dz_j = q_k(d_kj - q_j).


def test_grad_forward_kl_wrt_student_logits():
  # KL(p || q) = sum p log p - sum_v p_v log q_v;  d/dz_j = -sum_v p_v (d_vj - q_j) = q_j - p_j.
  lp, z = dv.log_probs(_logits(7, (V,))), _logits(8, (V,))
  g = jax.grad(lambda z: dv.kl(lp, dv.log_probs(z)))(z)
  np.testing.assert_allclose(g, jax.nn.softmax(z) - jnp.exp(lp), atol=1e-6)


def test_grad_reverse_kl_wrt_student_logits():
  # KL(q || p) = sum_v q_v (log q_v - log p_v); d/dq_v = log q_v - log p_v + 1, chained through the softmax:
  # d/dz_j = q_j (log q_j - log p_j - KL(q || p))  (the +1 cancels because sum_v q_v (d_vj - q_j) = 0).
  lp, z = dv.log_probs(_logits(9, (V,))), _logits(10, (V,))
  g = jax.grad(lambda z: dv.kl(dv.log_probs(z), lp))(z)
  q, lq = jax.nn.softmax(z), jax.nn.log_softmax(z)
  np.testing.assert_allclose(g, q * (lq - lp - dv.kl(lq, lp)), atol=1e-6)


@pytest.mark.parametrize("beta", [0.2, 0.5, 0.7])
def test_grad_jsd_wrt_student_logits(beta):
  # m = b p + (1-b) q. d JSD / d q_v = -b(1-b) p_v/m_v + (1-b)(log(q_v/m_v) + 1 - (1-b) q_v/m_v) = (1-b) log(q_v/m_v)
  # since b p_v + (1-b) q_v = m_v. Through the softmax: d/dz_j = (1-b) q_j (log(q_j/m_j) - KL(q || m)).
  lp, z = dv.log_probs(_logits(11, (V,))), _logits(12, (V,))
  g = jax.grad(lambda z: dv.generalized_jsd(lp, dv.log_probs(z), beta=beta))(z)
  q = np.asarray(jax.nn.softmax(z), np.float64)
  m = beta * np.exp(np.asarray(lp, np.float64)) + (1 - beta) * q
  kl_qm = np.sum(q * np.log(q / m))
  np.testing.assert_allclose(g, (1 - beta) * q * (np.log(q / m) - kl_qm), atol=1e-6)


def test_grad_entry_clipped_forward_kl_wrt_student_logits():
  # Summand s_v = p_v (log p_v - log q_v); entries with s_v < tau (set A) keep d s_v / d z_j = -p_v (d_vj - q_j):
  # d/dz_j = -p_j 1[j in A] + q_j sum_{v in A} p_v. Entries at the clip have zero gradient.
  lp, z = dv.log_probs(_logits(13, (V,))), _logits(14, (V,))
  terms = np.exp(lp) * (lp - jax.nn.log_softmax(z))
  tau = float(np.sort(np.asarray(terms))[V // 2]) - 1e-3  # about half the entries clipped, no ties
  active = np.asarray(terms) < tau
  assert 0 < active.sum() < V
  g = jax.grad(lambda z: dv.kl(lp, dv.log_probs(z), entry_clip=tau))(z)
  p, q = np.exp(np.asarray(lp)), np.asarray(jax.nn.softmax(z))
  np.testing.assert_allclose(g, -p * active + q * p[active].sum(), atol=1e-6)


def test_token_clamp_kills_the_gradient_above_the_clamp():
  lp, z = dv.log_probs(_logits(15, (V,))), _logits(16, (V,))
  value = float(dv.kl(lp, dv.log_probs(z)))
  f = lambda z, c: dv.clamp_tokens(dv.kl(lp, dv.log_probs(z)), c)
  np.testing.assert_array_equal(jax.grad(f)(z, value / 2), np.zeros(V))
  np.testing.assert_allclose(jax.grad(f)(z, value * 2), jax.nn.softmax(z) - jnp.exp(lp), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Chunked == unchunked.

B, T, D, VB = 2, 7, 5, 11


def _sides(seed=20):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  h_s, h_t = (jax.random.normal(k[i], (B, T, D)) for i in (0, 1))
  w_s, w_t = (jax.random.normal(k[i], (D, VB)) for i in (2, 3))
  return h_s, w_s, h_t, w_t


CONFIGS = [
    dv.DivergenceConfig(kind="kl_teacher_student"),
    dv.DivergenceConfig(kind="kl_student_teacher", max_token_value=1.0),
    dv.DivergenceConfig(kind="jsd", beta=0.5, entry_clip=0.05),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.kind)
def test_chunked_equals_unchunked_values_and_grads(config):
  h_s, w_s, h_t, w_t = _sides()
  scale = 0.8
  weights_BT = jax.random.uniform(jax.random.PRNGKey(1), (B, T))

  def chunked(h_s, w_s, h_t, w_t, chunk_size):
    values = dv.chunked_divergence(student=dv.Logits(h_s, w_s, scale=scale), teacher=dv.Logits(h_t, w_t, scale=scale),
                                   config=config, chunk_size=chunk_size)
    return jnp.sum(values * weights_BT), values

  def naive(h_s, w_s, h_t, w_t):
    logp_s = dv.log_probs(scale * jnp.einsum("BTD,DV->BTV", h_s, w_s))
    logp_t = jax.lax.stop_gradient(dv.log_probs(scale * jnp.einsum("BTD,DV->BTV", h_t, w_t)))
    values = dv.token_divergence(logp_t, logp_s, config=config)
    return jnp.sum(values * weights_BT), values

  grad_chunked = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2, 3), has_aux=True), static_argnums=4)
  (_, v_n), g_n = jax.jit(jax.value_and_grad(naive, argnums=(0, 1, 2, 3), has_aux=True))(h_s, w_s, h_t, w_t)
  chunk_sizes = (1, 3, 16) if config.kind == "kl_teacher_student" else (3,)  # T = 7: 3 does not divide it
  for chunk_size in chunk_sizes:
    (_, v_c), g_c = grad_chunked(h_s, w_s, h_t, w_t, chunk_size)
    assert v_c.shape == (B, T)
    np.testing.assert_allclose(v_c, v_n, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_c, g_n):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The teacher side gets exactly zero gradient.
    assert np.all(np.asarray(g_c[2]) == 0) and np.all(np.asarray(g_c[3]) == 0)


def test_chunked_kl_precomputed_logits_and_callable_variant_agree():
  z_p, z_q = _logits(30, (B, T, VB)), _logits(31, (B, T, VB))
  want = dv.kl(dv.log_probs(z_p), dv.log_probs(z_q))
  got = jax.jit(lambda a, b: dv.chunked_kl(dv.Logits(a), dv.Logits(b), chunk_size=3))(z_p, z_q)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  w_DV = jax.random.normal(jax.random.PRNGKey(32), (D, VB))
  h_p, h_q = jax.random.normal(jax.random.PRNGKey(33), (B, T, D)), jax.random.normal(jax.random.PRNGKey(34), (B, T, D))
  via_fn = jax.jit(lambda a, b: dv.map_token_chunks(
      lambda z, _: dv.kl(dv.log_probs(z[0]), dv.log_probs(z[1])), xs=(a, b), logits_fns=(lambda x: x @ w_DV,) * 2,
      chunk_size=4))(h_p, h_q)
  np.testing.assert_allclose(via_fn, dv.kl(dv.log_probs(h_p @ w_DV), dv.log_probs(h_q @ w_DV)), rtol=1e-5, atol=1e-6)


def test_chunked_token_logp_gathers_the_sampled_tokens():
  z = _logits(35, (B, T, VB))
  ids = jax.random.randint(jax.random.PRNGKey(36), (B, T), 0, VB)
  got = jax.jit(lambda z, ids: dv.chunked_token_logp(dv.Logits(z), ids, chunk_size=3))(z, ids)
  lp = _np_logp(z)
  want = [[lp[b, t, int(ids[b, t])] for t in range(T)] for b in range(B)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation and the OPD losses.


def test_masked_aggregate_by_hand_with_an_all_masked_row():
  values = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
  mask = jnp.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]], bool)
  # token mean: (1 + 2 + 7 + 8 + 9) / 5 = 5.4; sequence mean: ((1+2)/2 + (7+8+9)/3) / 2 = (1.5 + 8) / 2 = 4.75.
  np.testing.assert_allclose(dv.masked_aggregate(values, mask, aggregation="token_mean"), 5.4, rtol=1e-6)
  np.testing.assert_allclose(dv.masked_aggregate(values, mask, aggregation="sequence_mean"), 4.75, rtol=1e-6)
  assert float(dv.aggregate_count(mask, aggregation="sequence_mean")) == 2.0
  nothing = jnp.zeros_like(mask)
  assert float(dv.masked_aggregate(values, nothing, aggregation="token_mean")) == 0.0
  assert float(dv.masked_aggregate(values, nothing, aggregation="sequence_mean")) == 0.0


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_micro_batches_with_the_global_count_add_up_to_the_full_batch(aggregation):
  values = jax.random.uniform(jax.random.PRNGKey(40), (4, 5))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  full = dv.masked_aggregate(values, mask, aggregation=aggregation)
  count = dv.aggregate_count(mask[:2], aggregation=aggregation) + dv.aggregate_count(mask[2:], aggregation=aggregation)
  parts = [dv.masked_aggregate(values[s], mask[s], aggregation=aggregation, count=count) for s in (slice(0, 2),
                                                                                                   slice(2, 4))]
  np.testing.assert_allclose(sum(parts), full, rtol=1e-6)


def test_sampled_token_opd_loss_value_and_gradient():
  # Two tokens: log p_S = (-1, -2), log p_T = (-0.5, -3): A = (0.5, -1); loss = -(0.5 * -1 + -1 * -2) / 2 = -0.75.
  ls, lt = jnp.array([[-1.0, -2.0]]), jnp.array([[-0.5, -3.0]])
  mask = jnp.ones((1, 2), bool)
  f = lambda ls: dv.sampled_token_opd_loss(logp_student_BT=ls, logp_teacher_BT=lt, mask_BT=mask,
                                           aggregation="token_mean", count=None)
  np.testing.assert_allclose(f(ls), -0.75, rtol=1e-6)
  # A is stop-gradient, so d loss / d log p_S = -A / 2 = (-0.25, 0.5).
  np.testing.assert_allclose(jax.grad(f)(ls), [[-0.25, 0.5]], rtol=1e-6)
  assert float(dv.sampled_token_opd_loss(logp_student_BT=ls, logp_teacher_BT=ls, mask_BT=mask,
                                         aggregation="sequence_mean", count=None)) == 0.0


def test_opd_loss_is_zero_when_student_equals_teacher():
  h, w, _, _ = _sides()
  mask = jnp.ones((B, T), bool)

  @jax.jit
  def losses(h):
    out = []
    for config in CONFIGS:
      loss, metrics = dv.opd_loss(student=dv.Logits(h, w), teacher=dv.Logits(h, w), mask_BT=mask, config=config,
                                  aggregation="sequence_mean", count=None, chunk_size=3)
      out.append(loss + metrics["opd/divergence"])
    return jnp.stack(out)

  np.testing.assert_array_equal(losses(h), np.zeros(len(CONFIGS)))
  np.testing.assert_allclose(jax.jit(jax.jacrev(losses))(h), 0.0, atol=1e-7)


def test_bad_inputs_raise_named_errors():
  with pytest.raises(ValueError, match="kind"):
    dv.DivergenceConfig(kind="forward")
  with pytest.raises(ValueError, match="beta"):
    dv.generalized_jsd(jnp.zeros(3), jnp.zeros(3), beta=1.5)
  with pytest.raises(ValueError, match="chunk_size"):
    dv.chunked_kl(dv.Logits(jnp.zeros((1, 2, 3))), dv.Logits(jnp.zeros((1, 2, 3))), chunk_size=0)
  with pytest.raises(ValueError, match="xs\\[1\\]"):
    dv.chunked_kl(dv.Logits(jnp.zeros((1, 2, 3))), dv.Logits(jnp.zeros((1, 3, 3))), chunk_size=2)
  with pytest.raises(ValueError, match="aggregation"):
    dv.masked_aggregate(jnp.zeros((1, 2)), jnp.ones((1, 2), bool), aggregation="mean")
