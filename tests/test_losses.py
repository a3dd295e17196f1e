"""The clipped policy loss against hand arithmetic, naive loops, jax.grad and packing invariance."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvg.rl.losses import aggregate, policy_loss, PolicyLossConfig, preset, sequence_mean

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# Two sequences of lengths 2 and 3 in a [2, 3] batch; position (0, 2) is padding with garbage values.
MASK = np.array([[1, 1, 0], [1, 1, 1]], dtype=bool)


def _cfg(aggregation, **kw):
  return PolicyLossConfig(aggregation=aggregation, max_len=4, **kw)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _value_and_grad(logp, logp_old, adv, mask, cfg, **kw):
  """(loss, metrics), d loss / d logp: one compiled program per test case (eager mode is checked separately)."""
  def fn(lp):
    return policy_loss(lp, logp_old, adv, mask, cfg, **kw)
  return jax.value_and_grad(fn, has_aux=True)(logp)


def _run(logp, logp_old, adv, mask, cfg, **kw):
  kw = {k: jnp.asarray(v) for k, v in kw.items()}
  (loss, metrics), grad = _value_and_grad(jnp.asarray(logp, jnp.float32), jnp.asarray(logp_old, jnp.float32),
                                          jnp.asarray(adv, jnp.float32), jnp.asarray(mask), cfg=cfg, **kw)
  return loss, metrics, np.asarray(grad)


def _loss(logp, logp_old, adv, mask, cfg, **kw):
  return _run(logp, logp_old, adv, mask, cfg, **kw)[:2]


def _grad_logp(logp, logp_old, adv, mask, cfg, **kw):
  return _run(logp, logp_old, adv, mask, cfg, **kw)[2]


def test_aggregations_by_hand_ratio_one():
  # ratio = 1 everywhere, so the token loss is -A: [[-1, -3], [-2, 1, -8]]; the pad holds garbage.
  adv = np.array([[1.0, 3.0, 100.0], [2.0, -1.0, 8.0]])
  logp = np.array([[-1.0, -2.0, -50.0], [-0.5, -0.7, -0.1]])
  expected = {
      "token-mean": -(1 + 3 + 2 - 1 + 8) / 5,                   # -2.6
      "seq-mean-token-mean": -((1 + 3) / 2 + (2 - 1 + 8) / 3) / 2,  # -(2 + 3)/2 = -2.5
      "seq-mean-token-sum-norm": -((1 + 3) / 4 + (2 - 1 + 8) / 4) / 2,  # -13/8 with max_len 4
  }
  for aggregation, value in expected.items():
    loss, metrics = _loss(logp, logp, adv, MASK, _cfg(aggregation))
    np.testing.assert_allclose(loss, value, rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio_mean"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(metrics["approx_kl"], 0.0, atol=1e-7)


def test_aggregations_by_hand_unclipped_ratios():
  # ratios inside [0.8, 1.2]: rho = [[1.1, 0.9], [1.0, 1.15, 0.85]], A = [[1, 2], [-1, 1, -2]]
  # token loss -A*rho = [[-1.1, -1.8], [1.0, -1.15, 1.7]]: row sums -2.9 and 1.55
  rho = np.array([[1.1, 0.9, 7.0], [1.0, 1.15, 0.85]])
  adv = np.array([[1.0, 2.0, 5.0], [-1.0, 1.0, -2.0]])
  logp_old = np.array([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
  logp = logp_old + np.log(rho)
  expected = {
      "token-mean": (-2.9 + 1.55) / 5,                     # -0.27
      "seq-mean-token-mean": (-2.9 / 2 + 1.55 / 3) / 2,    # -0.46667
      "seq-mean-token-sum-norm": (-2.9 / 4 + 1.55 / 4) / 2,  # -0.16875
  }
  for aggregation, value in expected.items():
    loss, metrics = _loss(logp, logp_old, adv, MASK, _cfg(aggregation))
    np.testing.assert_allclose(loss, value, rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_mean"], (1.1 + 0.9 + 1.0 + 1.15 + 0.85) / 5, rtol=1e-5)
    assert metrics["clip_frac_low"] == 0 and metrics["clip_frac_high"] == 0


def _naive_aggregate(loss, mask, aggregation, max_len):
  """Reference: python loops over rows (one sequence per row)."""
  rows = [[loss[b][t] for t in range(len(mask[b])) if mask[b][t]] for b in range(len(mask))]
  rows = [r for r in rows if r]
  if aggregation == "token-mean":
    return sum(sum(r) for r in rows) / max(sum(len(r) for r in rows), 1)
  if aggregation == "seq-mean-token-mean":
    return sum(sum(r) / len(r) for r in rows) / max(len(rows), 1)
  return sum(sum(r) / max_len for r in rows) / max(len(rows), 1)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_ratio_one_loss_is_minus_aggregated_advantage(aggregation):
  rng = np.random.default_rng(1)
  adv = rng.normal(size=(4, 6))
  mask = rng.random((4, 6)) < 0.6
  mask[2] = False  # an all-masked row counts in no denominator
  logp = -rng.random((4, 6))
  loss, _ = _loss(logp, logp, adv, mask, _cfg(aggregation))
  np.testing.assert_allclose(loss, -_naive_aggregate(adv, mask, aggregation, 4), rtol=1e-5)


def test_all_masked_batch_is_zero_and_finite():
  zeros = np.zeros((2, 3))
  for aggregation in AGGREGATIONS:
    loss, metrics = _loss(zeros, zeros, np.ones((2, 3)), np.zeros((2, 3), bool), _cfg(aggregation),
                          logp_ref_BT=zeros, entropy_BT=zeros + 1.0)
    assert float(loss) == 0.0
    assert all(np.isfinite(v) for v in jax.tree.leaves(metrics))


def test_clip_high_gives_constant_and_zero_gradient():
  cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28, aggregation="token-mean")
  mask = np.ones((1, 3), bool)
  # tokens: (rho 1.5, A +1) clipped high; (rho 0.5, A +1) unclipped; (rho 0.5, A -1) clipped low
  rho = np.array([[1.5, 0.5, 0.5]])
  adv = np.array([[1.0, 1.0, -1.0]])
  logp_old = np.full((1, 3), -1.0)
  logp = logp_old + np.log(rho)
  loss, metrics = _loss(logp, logp_old, adv, mask, cfg)
  # token losses: -1 * 1.28, -1 * 0.5, +1 * 0.8 (max(0.5, 0.8))
  np.testing.assert_allclose(loss, (-1.28 - 0.5 + 0.8) / 3, rtol=1e-6)
  # d(-A rho)/d logp = -A rho / 3 on the unclipped token only
  np.testing.assert_allclose(_grad_logp(logp, logp_old, adv, mask, cfg), [[0.0, -0.5 / 3, 0.0]], atol=1e-7)
  np.testing.assert_allclose(metrics["clip_frac_high"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics["clip_frac_low"], 1 / 3, rtol=1e-6)


def test_dual_clip_caps_negative_advantage():
  mask = np.ones((1, 2), bool)
  rho = np.array([[5.0, 2.0]])
  adv = np.array([[-2.0, -2.0]])
  logp_old = np.full((1, 2), -2.0)
  logp = logp_old + np.log(rho)
  dual = PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0, aggregation="token-mean")
  loss, metrics = _loss(logp, logp_old, adv, mask, dual)
  # rho 5: min(max(2*5, 2*1.28), 3*2) = 6; rho 2: min(max(4, 2.56), 6) = 4
  np.testing.assert_allclose(loss, (6.0 + 4.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(_grad_logp(logp, logp_old, adv, mask, dual), [[0.0, 2.0 * 2.0 / 2]], rtol=1e-6)
  np.testing.assert_allclose(metrics["dual_clip_frac"], 0.5)
  plain, _ = _loss(logp, logp_old, adv, mask, dataclasses.replace(dual, dual_clip=None))
  np.testing.assert_allclose(plain, (10.0 + 4.0) / 2, rtol=1e-6)


def test_clip_metrics_ignore_padding():
  cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0, aggregation="token-mean")
  # valid tokens: clipped high, clipped low, dual clipped, plain; the padded token would be clipped high
  rho = np.array([[1.5, 0.5, 4.0, 1.0, 9.0]])
  adv = np.array([[1.0, -1.0, -1.0, 1.0, 1.0]])
  mask = np.array([[1, 1, 1, 1, 0]], bool)
  _, metrics = _loss(np.log(rho), np.zeros((1, 5)), adv, mask, cfg)
  for key in ("clip_frac_high", "clip_frac_low", "dual_clip_frac"):
    np.testing.assert_allclose(metrics[key], 0.25, rtol=1e-6)
  np.testing.assert_allclose(metrics["ratio_mean"], (1.5 + 0.5 + 4.0 + 1.0) / 4, rtol=1e-6)
  # k3 of rho: rho - 1 - log rho per token
  np.testing.assert_allclose(metrics["approx_kl"], np.mean([r - 1 - math.log(r) for r in (1.5, 0.5, 4.0, 1.0)]),
                             rtol=1e-5)


def test_gspo_ratio_and_gradient_match_the_paper():
  cfg = PolicyLossConfig(clip_low=0.9, clip_high=100.0, ratio_level="sequence", aggregation="seq-mean-token-mean")
  logp_old = np.array([[-1.0, -2.0, -9.0], [-0.5, -1.5, -2.5]])
  lr = np.array([[0.1, -0.3, 4.0], [0.2, 0.05, -0.1]])  # token log-ratios; (0, 2) is padding
  logp = logp_old + lr
  adv = np.array([[1.5, 1.5, 1.5], [-0.5, -0.5, -0.5]])
  s = [math.exp((0.1 - 0.3) / 2), math.exp((0.2 + 0.05 - 0.1) / 3)]  # s_i = exp(mean_t log-ratio)
  loss, metrics = _loss(logp, logp_old, adv, MASK, cfg)
  # unclipped GSPO objective J = (1/G) sum_i s_i A_i, loss = -J
  np.testing.assert_allclose(loss, -(s[0] * 1.5 + s[1] * -0.5) / 2, rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio_mean"], (2 * s[0] + 3 * s[1]) / 5, rtol=1e-5)
  # grad J = (1/G) sum_i s_i A_i (1/|y_i|) sum_t grad log pi(y_it): d loss / d logp_it = -s_i A_i / (G |y_i|)
  expected = [[-s[0] * 1.5 / (2 * 2)] * 2 + [0.0], [-s[1] * -0.5 / (2 * 3)] * 3]
  np.testing.assert_allclose(_grad_logp(logp, logp_old, adv, MASK, cfg), expected, rtol=1e-5, atol=1e-7)


def test_gspo_clips_whole_sequences():
  cfg = preset("gspo")
  logp_old = np.zeros((2, 3))
  # sequence 0: mean log-ratio 1e-3 > log(1 + 4e-4), A > 0: clipped; sequence 1: mean 1e-4, inside the range
  lr = np.array([[0.003, -0.001, 0.0], [0.0003, -0.0001, 0.0001]])
  adv = np.ones((2, 3))
  grad = _grad_logp(logp_old + lr, logp_old, adv, MASK, cfg)
  np.testing.assert_array_equal(grad[0], 0.0)
  np.testing.assert_allclose(grad[1], -math.exp(1e-4) / (2 * 3), rtol=1e-5)


def _pack(x_BT, fill):
  """Sequences a (row 0, len 2), b (row 1, len 3), c (row 2, len 1) repacked into rows [a a b b b], [c . . . .]."""
  x = np.asarray(x_BT)
  return np.array([[x[0, 0], x[0, 1], x[1, 0], x[1, 1], x[1, 2]], [x[2, 0], fill, fill, fill, fill]])


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_packed_equals_unpacked(aggregation, ratio_level):
  rng = np.random.default_rng(2)
  mask = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]], bool)
  logp_old = -rng.random((3, 3)) * 3
  logp = logp_old + rng.normal(size=(3, 3)) * 0.4  # some tokens clip
  adv = rng.normal(size=(3, 3))
  ref, ent = -rng.random((3, 3)) * 3, rng.random((3, 3))
  cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0, ratio_level=ratio_level,
                         aggregation=aggregation, max_len=5, kl_coef=0.1, entropy_coef=0.01)
  ids = np.array([[0, 0, 1, 1, 1], [0, -1, -1, -1, -1]], np.int32)
  extra = dict(logp_ref_BT=jnp.asarray(ref, jnp.float32), entropy_BT=jnp.asarray(ent, jnp.float32))
  packed_extra = dict(logp_ref_BT=jnp.asarray(_pack(ref, 0.0), jnp.float32),
                      entropy_BT=jnp.asarray(_pack(ent, 50.0), jnp.float32))
  loss, metrics, grad = _run(logp, logp_old, adv, mask, cfg, **extra)
  packed_loss, packed_metrics, packed_grad = _run(_pack(logp, -30.0), _pack(logp_old, 0.0), _pack(adv, 9.0),
                                                  _pack(mask, True), cfg, seq_ids_BT=ids, **packed_extra)
  np.testing.assert_allclose(packed_loss, loss, rtol=1e-5)
  for key, value in metrics.items():
    np.testing.assert_allclose(packed_metrics[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
  np.testing.assert_allclose(packed_grad, _pack(grad, 0.0), rtol=1e-5, atol=1e-7)


def test_sequence_mean_and_aggregate_with_ids_by_hand():
  x = np.array([[1.0, 3.0, 5.0, 7.0]])
  mask = np.array([[1, 1, 1, 0]])
  ids = np.array([[0, 0, 1, -1]])
  np.testing.assert_allclose(sequence_mean(x, mask, seq_ids_BT=ids), [[2.0, 2.0, 5.0, 0.0]])
  # sequences [1, 3] and [5]: seq-mean-token-mean = (2 + 5)/2, sum-norm with max_len 4 = (4/4 + 5/4)/2
  np.testing.assert_allclose(aggregate(x, mask, aggregation="seq-mean-token-mean", seq_ids_BT=ids), 3.5)
  np.testing.assert_allclose(aggregate(x, mask, aggregation="seq-mean-token-sum-norm", max_len=4, seq_ids_BT=ids),
                             1.125)
  np.testing.assert_allclose(aggregate(x, mask, aggregation="token-mean", seq_ids_BT=ids), 3.0)


def test_k3_kl_to_reference_by_hand():
  logp = np.array([[-1.0, -2.0]])
  # r = pi_ref / pi = 2 and 1/2: k3 = 2 - 1 - log 2 = 0.30685, 0.5 - 1 + log 2 = 0.19315
  ref = logp + np.log([[2.0, 0.5]])
  kl = [2 - 1 - math.log(2), 0.5 - 1 + math.log(2)]
  mask = np.ones((1, 2), bool)
  cfg = PolicyLossConfig(aggregation="token-mean", kl_coef=0.1)
  loss, metrics = _loss(logp, logp, np.zeros((1, 2)), mask, cfg, logp_ref_BT=jnp.asarray(ref, jnp.float32))
  np.testing.assert_allclose(metrics["kl_ref"], sum(kl) / 2, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.1 * sum(kl) / 2, rtol=1e-5)
  # d/dlogp (r - 1 - log r) with r = exp(ref - logp) is 1 - r
  np.testing.assert_allclose(_grad_logp(logp, logp, np.zeros((1, 2)), mask, cfg, logp_ref_BT=jnp.asarray(ref)),
                             [[0.1 * (1 - 2) / 2, 0.1 * (1 - 0.5) / 2]], rtol=1e-5)
  # with kl_coef 0 the KL is logged but not added
  loss0, metrics0 = _loss(logp, logp, np.zeros((1, 2)), mask, PolicyLossConfig(aggregation="token-mean"),
                          logp_ref_BT=jnp.asarray(ref, jnp.float32))
  assert float(loss0) == 0.0
  np.testing.assert_allclose(metrics0["kl_ref"], sum(kl) / 2, rtol=1e-5)


def test_entropy_bonus_by_hand():
  zeros = np.zeros((2, 3))
  ent = np.array([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])
  cfg = PolicyLossConfig(aggregation="token-mean", entropy_coef=0.01)
  loss, metrics = _loss(zeros, zeros, zeros, MASK, cfg, entropy_BT=jnp.asarray(ent, jnp.float32))
  np.testing.assert_allclose(metrics["entropy"], 15.0 / 5, rtol=1e-6)
  np.testing.assert_allclose(loss, -0.01 * 15.0 / 5, rtol=1e-6)
  z = jnp.zeros((2, 3))
  grad_fn = jax.jit(jax.grad(lambda e: policy_loss(z, z, z, MASK, cfg, entropy_BT=e)[0]))
  grad_ent = grad_fn(jnp.asarray(ent, jnp.float32))
  np.testing.assert_allclose(grad_ent, -0.01 / 5 * MASK, rtol=1e-6)


def test_no_gradient_through_old_logp_and_advantages():
  logp = jnp.array([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
  adv = jnp.ones((2, 3))
  cfg = preset("dapo")
  grad_fn = jax.jit(jax.grad(lambda lo, a: policy_loss(logp, lo, a, MASK, cfg)[0], argnums=(0, 1)))
  g_old, g_adv = grad_fn(logp - 0.1, adv)
  np.testing.assert_array_equal(g_old, 0.0)
  np.testing.assert_array_equal(g_adv, 0.0)


def test_jit_matches_eager():
  rng = np.random.default_rng(3)
  logp_old = -rng.random((2, 3))
  logp = logp_old + rng.normal(size=(2, 3)) * 0.3
  adv = rng.normal(size=(2, 3))
  cfg = dataclasses.replace(preset("dapo"), ratio_level="sequence")  # the widest code path
  args = [jnp.asarray(x, jnp.float32) for x in (logp, logp_old, adv)] + [jnp.asarray(MASK)]
  eager_loss, eager_metrics = policy_loss(*args, cfg)
  jit_loss, jit_metrics = jax.jit(functools.partial(policy_loss, cfg=cfg))(*args)
  np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-6)
  for key, value in eager_metrics.items():
    np.testing.assert_allclose(jit_metrics[key], value, rtol=1e-6, err_msg=key)


def test_presets_follow_methods_md():
  assert preset("grpo") == PolicyLossConfig(clip_low=0.2, clip_high=0.2, aggregation="seq-mean-token-mean")
  dapo = preset("dapo")
  assert (dapo.clip_low, dapo.clip_high, dapo.dual_clip, dapo.aggregation) == (0.2, 0.28, 3.0, "token-mean")
  drgrpo = preset("drgrpo", max_len=2048)
  assert (drgrpo.aggregation, drgrpo.max_len) == ("seq-mean-token-sum-norm", 2048)
  gspo = preset("gspo")
  assert (gspo.ratio_level, gspo.clip_low, gspo.clip_high) == ("sequence", 3e-4, 4e-4)
  assert preset("dapo", kl_coef=0.01).kl_coef == 0.01
  for cfg in (dapo, drgrpo, gspo):
    assert cfg.kl_coef == 0.0 and cfg.entropy_coef == 0.0


def test_bad_inputs():
  with pytest.raises(ValueError, match="max_len"):
    preset("drgrpo")
  with pytest.raises(ValueError, match="unknown loss preset"):
    preset("ppo2")
  with pytest.raises(ValueError, match="clip_eps"):
    preset("grpo", clip_eps=0.1)
  with pytest.raises(ValueError, match="aggregation"):
    PolicyLossConfig(aggregation="sum")
  with pytest.raises(ValueError, match="dual_clip"):
    PolicyLossConfig(dual_clip=0.5)
  with pytest.raises(ValueError, match="ratio_level"):
    PolicyLossConfig(ratio_level="step")
  x = np.zeros((2, 3))
  with pytest.raises(ValueError, match="logp_ref_BT"):
    _loss(x, x, x, MASK, PolicyLossConfig(kl_coef=0.1))
  with pytest.raises(ValueError, match="entropy_BT"):
    _loss(x, x, x, MASK, PolicyLossConfig(entropy_coef=0.1))
  with pytest.raises(ValueError, match="adv_BT"):
    _loss(x, x, np.zeros((2, 4)), MASK, PolicyLossConfig())
  with pytest.raises(ValueError, match="seq_ids_BT"):
    _loss(x, x, x, MASK, PolicyLossConfig(), seq_ids_BT=jnp.zeros((2, 3), jnp.float32))


@pytest.mark.parametrize("name", ["dapo", "gspo", "drgrpo"])
def test_non_finite_padding_stays_out_of_the_loss(name):
  """A -inf (or NaN) log-prob on padding gives the same loss and gradient as a 0 there: padding is selected out."""
  cfg = preset(name, max_len=4) if name == "drgrpo" else preset(name)
  logp = np.array([[-1.0, -2.0, 0.0], [-0.5, -1.5, -0.7]], np.float32)
  old = logp - np.array([[0.1, -0.2, 0.0], [0.05, 0.3, -0.1]], np.float32)
  adv = np.array([[1.0, 1.0, 0.0], [-0.5, -0.5, -0.5]], np.float32)
  loss, metrics, grad = _run(logp, old, adv, MASK, cfg)
  for bad in (-np.inf, np.nan):
    logp_bad, old_bad, adv_bad = logp.copy(), old.copy(), adv.copy()
    logp_bad[0, 2], old_bad[0, 2], adv_bad[0, 2] = bad, bad, bad
    got_loss, got_metrics, got_grad = _run(logp_bad, old_bad, adv_bad, MASK, cfg)
    assert np.isfinite(float(got_loss)) and np.isfinite(got_grad).all()
    np.testing.assert_allclose(float(got_loss), float(loss), rtol=1e-6)
    np.testing.assert_allclose(got_grad, grad, rtol=1e-6)
    assert all(np.isfinite(float(v)) for v in got_metrics.values())
  # sequence_mean on its own: the mean of the valid tokens whatever padding holds ((-1 - 2) / 2 for row 0).
  x = np.array([[-1.0, -2.0, -np.inf], [1.0, 2.0, 3.0]], np.float32)
  np.testing.assert_allclose(sequence_mean(x, MASK), [[-1.5, -1.5, 0.0], [2.0, 2.0, 2.0]])
