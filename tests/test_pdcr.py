"""PACR / PDCR step advantages against hand arithmetic (two rollouts, two clusters) and naive loops."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvg.credit import pdcr
from jaxvg.credit.steps import StepSegments

CFG = pdcr.PDCRConfig()
_pdcr = jax.jit(pdcr.pdcr_advantages, static_argnames=("cfg",))
_pacr = jax.jit(pdcr.pacr_advantages, static_argnames=("cfg",))

# Two rollouts, C = 3 step slots, T = 8 response tokens.
# Row 0: steps [t0 t1 t2] [t3 t4] [t5 t6], t7 padding.  Row 1: steps [t0 t1] [t2 t3 t4], t5..t7 padding.
STEP_IDS = np.array([[0, 0, 0, 1, 1, 2, 2, -1], [0, 0, 1, 1, 1, -1, -1, -1]], np.int32)
SEGMENTS = StepSegments(step_ids_BT=jnp.asarray(STEP_IDS), num_steps_B=jnp.array([3, 2], jnp.int32),
                        step_end_BC=jnp.array([[2, 4, 6], [1, 4, -1]], jnp.int32))
# Confidences. Row 0: c = [-3, -2, -2.5, -1] -> g = [1, -0.5, 1.5] -> G = [2, 1, 1.5].
# Row 1: c = [-3, -5, -2, (unused 99)] -> g = [-2, 3] -> G = [1, 3].
C_BK1 = jnp.array([[-3.0, -2.0, -2.5, -1.0], [-3.0, -5.0, -2.0, 99.0]])
# log pi(o_t | I) - log pi(o_t | white) per token; the padding tokens carry 9 and must be ignored.
# Row 0: V = [2 + 2 + 1, 0.05 + 0.05, 0.1 + 0.1] = [5, 0.1, 0.2]. Row 1: V = [4 + 0.5, 0 + 0 + 0] = [4.5, 0].
DIFF = np.array([[2.0, 2.0, 1.0, 0.05, 0.05, 0.1, 0.1, 9.0], [4.0, 0.5, 0.0, 0.0, 0.0, 9.0, 9.0, 9.0]], np.float32)
LOGP_WHITE = np.full((2, 8), -1.0, np.float32)
LOGP_REAL = LOGP_WHITE + DIFF
ADV_O = jnp.array([1.0, -1.0])


def test_gains_and_returns_by_hand():
  gains = pdcr.confidence_gains(C_BK1, SEGMENTS.num_steps_B)
  np.testing.assert_allclose(np.asarray(gains), [[1.0, -0.5, 1.5], [-2.0, 3.0, 0.0]])
  mask = pdcr.step_mask(SEGMENTS.num_steps_B, 3)
  np.testing.assert_allclose(np.asarray(pdcr.discounted_returns(gains, mask, gamma=1.0)), [[2, 1, 1.5], [1, 3, 0]])
  # gamma 0.5: row 0: G3 = 1.5, G2 = -0.5 + 0.5 * 1.5 = 0.25, G1 = 1 + 0.5 * 0.25 = 1.125;
  # row 1: G2 = 3, G1 = -2 + 1.5 = -0.5.  gamma 0: G = g.
  np.testing.assert_allclose(np.asarray(pdcr.discounted_returns(gains, mask, gamma=0.5)),
                             [[1.125, 0.25, 1.5], [-0.5, 3.0, 0.0]])
  np.testing.assert_allclose(np.asarray(pdcr.discounted_returns(gains, mask, gamma=0.0)), np.asarray(gains))


def test_returns_match_loop():
  rng = np.random.default_rng(0)
  gains = rng.normal(size=(5, 7)).astype(np.float32)
  num = np.array([7, 0, 3, 1, 5])
  mask = np.arange(7)[None, :] < num[:, None]
  got = np.asarray(pdcr.discounted_returns(jnp.asarray(gains), jnp.asarray(mask), gamma=0.9))
  want = np.zeros_like(gains)
  for b in range(5):
    for k in range(num[b]):
      want[b, k] = sum(0.9 ** (m - k) * gains[b, m] for m in range(k, num[b]))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_visual_dependence_sum_and_mean():
  v_sum = pdcr.step_visual_dependence(LOGP_REAL, LOGP_WHITE, STEP_IDS, 3)
  np.testing.assert_allclose(np.asarray(v_sum), [[5.0, 0.1, 0.2], [4.5, 0.0, 0.0]], atol=1e-6)
  # Per-token mean: [5/3, 0.1/2, 0.2/2] and [4.5/2, 0/3]; the empty slot stays 0.
  v_mean = pdcr.step_visual_dependence(LOGP_REAL, LOGP_WHITE, STEP_IDS, 3, step_score="mean")
  np.testing.assert_allclose(np.asarray(v_mean), [[5 / 3, 0.05, 0.1], [2.25, 0.0, 0.0]], atol=1e-6)


@pytest.mark.parametrize("step_score", ["sum", "mean"])
def test_pdcr_two_clusters_by_hand(step_score):
  # Otsu on V (sum): {0, 0.1, 0.2} | {4.5, 5} -> SSE 0.02 + 0.125 (any other split is larger) -> c* = 4.5.
  # (mean: {0, 0.05, 0.1} | {1.667, 2.25} -> the same clusters, c* = 5/3.)
  # Visual cluster: G = {r0k0: 2, r1k0: 1} -> A_P = [(2 - 1) / 1, 0] = [1, 0].
  # Textual cluster: G = {r0k1: 1, r0k2: 1.5, r1k1: 3} -> (G - 1) / 2 = [0, 0.25, 1].
  # A_total = A_O + 0.5 A_P: row 0 = [1.5, 1.0, 1.125], row 1 = [-1.0, -0.5].
  cfg = pdcr.PDCRConfig(step_score=step_score)
  out = _pdcr(ADV_O, C_BK1, SEGMENTS, logp_real_BT=jnp.asarray(LOGP_REAL), logp_white_BT=jnp.asarray(LOGP_WHITE),
               cfg=cfg)
  np.testing.assert_array_equal(out.cluster_BC, [[1, 0, 0], [1, 0, -1]])
  np.testing.assert_allclose(float(out.threshold), 4.5 if step_score == "sum" else 5 / 3, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out.process_adv_BC), [[1.0, 0.0, 0.25], [0.0, 1.0, 0.0]], atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.step_adv_BC), [[1.5, 1.0, 1.125], [-1.0, -0.5, 0.0]], atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.adv_BT), [[1.5, 1.5, 1.5, 1.0, 1.0, 1.125, 1.125, 0.0],
                                                      [-1.0, -1.0, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0]], atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.returns_BC), [[2.0, 1.0, 1.5], [1.0, 3.0, 0.0]], atol=1e-6)


def test_pacr_one_global_cluster_by_hand():
  # Global G {2, 1, 1.5, 1, 3}: min 1, max 3 -> A_P = (G - 1) / 2 = [[0.5, 0, 0.25], [0, 1]].
  # A_total = A_O + 0.5 A_P = [[1.25, 1.0, 1.125], [-1.0, -0.5]].
  out = _pacr(ADV_O, C_BK1, SEGMENTS, cfg=CFG)
  np.testing.assert_allclose(np.asarray(out.process_adv_BC), [[0.5, 0.0, 0.25], [0.0, 1.0, 0.0]], atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.step_adv_BC), [[1.25, 1.0, 1.125], [-1.0, -0.5, 0.0]], atol=1e-6)
  np.testing.assert_array_equal(out.cluster_BC, [[0, 0, 0], [0, 0, -1]])
  assert np.all(np.asarray(out.visual_BC) == 0.0) and float(out.threshold) == 0.0


def test_lambdas_and_degenerate_cluster():
  # All returns equal inside each cluster -> A_P = 0 everywhere -> A_total = lambda_O * A_O on every step.
  c = jnp.array([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])  # row 0 G = [1, 0, 0]; row 1 G = [1, 0]
  # V: visual steps are the first of each row with G = 1, textual ones have G = 0: both clusters constant.
  out = _pdcr(ADV_O, c, SEGMENTS, logp_real_BT=jnp.asarray(LOGP_REAL), logp_white_BT=jnp.asarray(LOGP_WHITE),
              cfg=pdcr.PDCRConfig(lambda_o=2.0, lambda_p=1.0))
  np.testing.assert_array_equal(out.cluster_BC, [[1, 0, 0], [1, 0, -1]])
  np.testing.assert_allclose(np.asarray(out.process_adv_BC), 0.0)
  np.testing.assert_allclose(np.asarray(out.step_adv_BC), [[2.0, 2.0, 2.0], [-2.0, -2.0, 0.0]])


def test_all_correct_group_still_gets_process_signal():
  # A_O = 0 (an all-correct group): A_total = lambda_P * A_P, non-zero where the return is above its cluster min.
  out = _pdcr(jnp.zeros(2), C_BK1, SEGMENTS, logp_real_BT=jnp.asarray(LOGP_REAL),
              logp_white_BT=jnp.asarray(LOGP_WHITE), cfg=CFG)
  np.testing.assert_allclose(np.asarray(out.step_adv_BC), [[0.5, 0.0, 0.125], [0.0, 0.5, 0.0]], atol=1e-6)


def test_matches_naive_loop_on_random_batch():
  rng = np.random.default_rng(1)
  b, t, c_slots = 6, 12, 4
  num = np.array([4, 1, 3, 0, 2, 4])
  step_ids = np.full((b, t), -1, np.int32)
  for i in range(b):
    if num[i]:
      lengths = rng.multinomial(t - num[i] - rng.integers(0, 3), np.ones(num[i]) / num[i]) + 1
      step_ids[i, :lengths.sum()] = np.repeat(np.arange(num[i]), lengths)
  ends = np.array([[np.flatnonzero(step_ids[i] == k).max() if k < num[i] else -1 for k in range(c_slots)]
                   for i in range(b)], np.int32)
  seg = StepSegments(step_ids_BT=jnp.asarray(step_ids), num_steps_B=jnp.asarray(num, jnp.int32),
                     step_end_BC=jnp.asarray(ends))
  conf = rng.normal(size=(b, c_slots + 1)).astype(np.float32)
  logp_real = -rng.exponential(1.0, size=(b, t)).astype(np.float32)
  logp_white = -rng.exponential(1.0, size=(b, t)).astype(np.float32)
  adv_o = rng.normal(size=b).astype(np.float32)
  cfg = pdcr.PDCRConfig(gamma=0.8)
  out = _pdcr(jnp.asarray(adv_o), jnp.asarray(conf), seg, logp_real_BT=jnp.asarray(logp_real),
              logp_white_BT=jnp.asarray(logp_white), cfg=cfg)
  out = jax.tree.map(np.asarray, out)
  # Naive reference, with the clusters taken from the code's labels (Otsu itself is tested in test_clusters).
  labels = np.asarray(out.cluster_BC)
  returns = {}
  for i in range(b):
    for k in range(num[i]):
      returns[i, k] = sum(0.8 ** (m - k) * (conf[i, m + 1] - conf[i, m]) for m in range(k, num[i]))
      v = sum(logp_real[i, s] - logp_white[i, s] for s in range(t) if step_ids[i, s] == k)
      np.testing.assert_allclose(float(out.visual_BC[i, k]), v, rtol=1e-5, atol=1e-5)
      thr = float(out.threshold)
      assert labels[i, k] == int(np.float32(v) >= thr) or abs(v - thr) < 1e-5
  for i in range(b):
    for k in range(num[i]):
      pool = [g for (j, m), g in returns.items() if labels[j, m] == labels[i, k]]
      lo, hi = min(pool), max(pool)
      a_p = 0.0 if hi == lo else (returns[i, k] - lo) / (hi - lo + 1e-8)
      np.testing.assert_allclose(float(out.step_adv_BC[i, k]), adv_o[i] + 0.5 * a_p, rtol=1e-5, atol=1e-5)
      for s in np.flatnonzero(step_ids[i] == k):
        assert float(out.adv_BT[i, s]) == float(out.step_adv_BC[i, k])
  assert np.all(np.asarray(out.adv_BT)[step_ids < 0] == 0.0)


def test_no_gradient_flows():
  def total(c, real):
    out = pdcr.pdcr_advantages(ADV_O, c, SEGMENTS, logp_real_BT=real, logp_white_BT=jnp.asarray(LOGP_WHITE), cfg=CFG)
    return jnp.sum(out.adv_BT) + jnp.sum(out.visual_BC) + jnp.sum(out.returns_BC)

  g_c, g_real = jax.jit(jax.grad(total, argnums=(0, 1)))(C_BK1, jnp.asarray(LOGP_REAL))
  assert np.all(np.asarray(g_c) == 0.0) and np.all(np.asarray(g_real) == 0.0)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="step_score"):
    pdcr.PDCRConfig(step_score="max")
  with pytest.raises(ValueError, match="gamma"):
    pdcr.PDCRConfig(gamma=1.5)
  with pytest.raises(ValueError, match="c_BK1"):
    pdcr.pacr_advantages(ADV_O, C_BK1[:, :3], SEGMENTS, cfg=CFG)
  with pytest.raises(ValueError, match="adv_o_B"):
    pdcr.pacr_advantages(jnp.zeros(3), C_BK1, SEGMENTS, cfg=CFG)
