"""kl_estimate / aggregate_loss / policy_loss against the NumPy oracle, clipping cases, finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_reference as ref
from mgrpo_jax.kernels import AGG_MODES, aggregate_loss, kl_estimate, policy_loss

B, T = 5, 6


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 0.5, size=(B, T)).astype(np.float32)
    logp = (old + rng.normal(0, 0.4, size=(B, T))).astype(np.float32)  # ratios on both sides of the clip
    mask = (rng.random((B, T)) > 0.3).astype(np.float32)
    mask[3] = 0.0  # a sequence with no valid token must not count
    adv = rng.normal(size=(B,)).astype(np.float32)
    weights = rng.uniform(0.2, 2.0, size=(B,)).astype(np.float32)
    return logp, old, adv, mask, weights


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clamp", [None, 0.3])
def test_kl_estimate_matches_numpy(kind, clamp):
    logp, old, *_ = _batch()
    np.testing.assert_allclose(kl_estimate(logp, old, kind=kind, clamp=clamp), ref.kl(logp, old, kind, clamp),
                               rtol=1e-5, atol=1e-6)
    if clamp is not None:
        assert float(jnp.max(jnp.abs(kl_estimate(logp, old - 5, kind=kind, clamp=clamp)))) <= np.float32(clamp)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("use_weights", [False, True])
def test_aggregate_loss_matches_numpy(mode, use_weights):
    rng = np.random.default_rng(1)
    per_token = rng.normal(size=(B, T)).astype(np.float32)
    _, _, _, mask, weights = _batch()
    w = weights if use_weights else None
    total, denom = aggregate_loss(per_token, mask, mode=mode, weights=w, max_len=11)
    want_total, want_denom = ref.aggregate(per_token, mask, mode, max_len=11, weights=w)
    np.testing.assert_allclose([total, denom], [want_total, want_denom], rtol=1e-5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batches_accumulate_to_the_global_loss(mode):
    # LESSONS.md item 4: summing (total, denom) over micro-batches reproduces the global-batch loss exactly.
    rng = np.random.default_rng(2)
    per_token = rng.normal(size=(B, T)).astype(np.float32)
    _, _, _, mask, weights = _batch()
    total, denom = aggregate_loss(per_token, mask, mode=mode, weights=weights)
    parts = [aggregate_loss(per_token[s], mask[s], mode=mode, weights=weights[s], max_len=T)
             for s in (slice(0, 2), slice(2, B))]
    np.testing.assert_allclose(sum(p[0] for p in parts) / sum(p[1] for p in parts), total / denom, rtol=1e-6)


def test_sequences_without_tokens_do_not_count():
    per_token = np.ones((3, 4), np.float32)
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], np.float32)
    assert aggregate_loss(per_token, mask, mode="seq-mean-token-mean")[1] == 2.0
    assert aggregate_loss(per_token, mask, mode="seq-mean-token-sum-norm", max_len=10)[1] == 20.0
    assert aggregate_loss(per_token, mask, mode="token-mean")[1] == 3.0


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("token_adv", [False, True])
def test_policy_loss_matches_numpy(agg, dual_clip, token_adv):
    logp, old, adv, mask, weights = _batch(3)
    if token_adv:
        adv = np.random.default_rng(4).normal(size=(B, T)).astype(np.float32)
    total, denom, _ = policy_loss(logp, old, adv, mask, agg=agg, dual_clip=dual_clip, weights=weights)
    want = ref.policy_loss(logp, old, adv, mask, agg=agg, weights=weights, eps_low=0.2, eps_high=0.28,
                           dual_clip=dual_clip)
    np.testing.assert_allclose([total, denom], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3"])
def test_policy_loss_with_kl_and_entropy(kl_kind):
    logp, old, adv, mask, _ = _batch(5)
    rng = np.random.default_rng(6)
    ref_logp = (logp + rng.normal(0, 0.3, size=(B, T))).astype(np.float32)
    entropy = rng.uniform(0, 3, size=(B, T)).astype(np.float32)
    kw = dict(ref_logp=ref_logp, kl_coef=0.05, kl_kind=kl_kind, kl_clamp=0.5, entropy=entropy, entropy_coef=0.01)
    total, denom, metrics = policy_loss(logp, old, adv, mask, agg="token-mean", **kw)
    want = ref.policy_loss(logp, old, adv, mask, agg="token-mean", eps_low=0.2, eps_high=0.28, **kw)
    np.testing.assert_allclose([total, denom], want, rtol=1e-5, atol=1e-6)
    m = mask.astype(bool)
    np.testing.assert_allclose(metrics["kl_mean"], ref.kl(logp, ref_logp, kl_kind, 0.5)[m].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["entropy_mean"], entropy[m].mean(), rtol=1e-5)


def _one_token(ratio, adv, **kw):
    """Loss and d loss / d logp for one token with the given ratio and advantage."""
    old = np.zeros((1, 1), np.float32)

    def f(lp):
        total, denom, _ = policy_loss(lp, old, jnp.array([adv], jnp.float32), jnp.ones((1, 1)), agg="token-mean", **kw)
        return total / denom

    lp = jnp.full((1, 1), np.log(ratio), jnp.float32)
    return float(f(lp)), float(jax.grad(f)(lp)[0, 0])


def test_clipping_cases():
    # A > 0: gain capped above 1 + eps_high (no gradient), unclipped below.
    loss, grad = _one_token(1.5, 2.0)
    assert loss == pytest.approx(-2.0 * 1.28) and grad == 0.0
    loss, grad = _one_token(0.5, 2.0)
    assert loss == pytest.approx(-2.0 * 0.5) and grad == pytest.approx(-2.0 * 0.5)
    # A < 0, ratio < 1 - eps_low: clipped (no gradient).
    loss, grad = _one_token(0.5, -2.0)
    assert loss == pytest.approx(2.0 * 0.8) and grad == 0.0
    # A < 0, ratio above 1 + eps_high: the pessimistic bound keeps the *unclipped* loss and its gradient
    # (LESSONS.md item 11).
    loss, grad = _one_token(1.5, -2.0)
    assert loss == pytest.approx(2.0 * 1.5, rel=1e-6) and grad == pytest.approx(2.0 * 1.5, rel=1e-5)
    # ... unless dual clip bounds it at -c A (then no gradient).
    loss, grad = _one_token(5.0, -2.0, dual_clip=3.0)
    assert loss == pytest.approx(6.0) and grad == 0.0
    loss, grad = _one_token(1.5, -2.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0, rel=1e-6) and grad != 0.0


def test_clip_metrics_match_numpy():
    logp, old, adv, mask, _ = _batch(7)
    _, _, metrics = policy_loss(logp, old, adv, mask, dual_clip=1.5)
    ratio = np.exp(logp.astype(np.float64) - old)
    a = np.repeat(adv[:, None], T, axis=1)
    m = mask.astype(bool)
    np.testing.assert_allclose(metrics["clip_frac_low"], ((a < 0) & (ratio < 0.8))[m].mean(), atol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_high"], ((a > 0) & (ratio > 1.28))[m].mean(), atol=1e-6)
    unbounded = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.28))
    np.testing.assert_allclose(metrics["dual_clip_frac"], ((a < 0) & (unbounded > -1.5 * a))[m].mean(), atol=1e-6)
    np.testing.assert_allclose(metrics["ratio_mean"], ratio[m].mean(), rtol=1e-5)
    assert float(metrics["num_tokens"]) == mask.sum()
    assert float(metrics["clip_frac_low"]) + float(metrics["clip_frac_high"]) > 0  # the batch exercises clipping


@pytest.mark.parametrize("agg", AGG_MODES)
def test_grad_matches_finite_differences_of_numpy_oracle(agg):
    rng = np.random.default_rng(8)
    old = rng.normal(-2.0, 0.5, size=(3, 4))
    # Ratios away from the clip boundaries (finite differences are not defined there).
    ratios = rng.choice([0.5, 0.9, 1.1, 1.2, 1.6], size=(3, 4))
    logp = old + np.log(ratios)
    adv = np.array([1.3, -0.7, -2.0])
    mask = np.array([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1]], np.float64)
    ref_logp = logp + rng.normal(0, 0.2, size=(3, 4))
    entropy = rng.uniform(0.5, 2.0, size=(3, 4))
    kw = dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0, ref_logp=ref_logp, kl_coef=0.1, kl_kind="k3",
              entropy=entropy, entropy_coef=0.01)

    def oracle(lp):
        total, denom = ref.policy_loss(lp, old, adv, mask, agg=agg, **kw)
        return total / denom

    fd = np.zeros_like(logp)
    h = 1e-6
    for idx in np.ndindex(logp.shape):
        e = np.zeros_like(logp)
        e[idx] = h
        fd[idx] = (oracle(logp + e) - oracle(logp - e)) / (2 * h)

    def kernel(lp):
        total, denom, _ = policy_loss(lp, old.astype(np.float32), adv.astype(np.float32), mask, agg=agg,
                                      **{**kw, "ref_logp": ref_logp.astype(np.float32),
                                         "entropy": entropy.astype(np.float32)})
        return total / denom

    grad = jax.grad(kernel)(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-5)
    assert np.abs(fd).max() > 0.01


def test_bf16_inputs():
    logp, old, adv, mask, _ = _batch(9)
    total, denom, _ = policy_loss(jnp.asarray(logp, jnp.bfloat16), jnp.asarray(old, jnp.bfloat16),
                                  jnp.asarray(adv, jnp.bfloat16), mask)
    assert total.dtype == jnp.float32
    want = ref.policy_loss(np.asarray(jnp.asarray(logp, jnp.bfloat16), np.float32),
                           np.asarray(jnp.asarray(old, jnp.bfloat16), np.float32),
                           np.asarray(jnp.asarray(adv, jnp.bfloat16), np.float32), mask,
                           agg="seq-mean-token-mean", eps_low=0.2, eps_high=0.28)
    np.testing.assert_allclose([total, denom], want, rtol=1e-5, atol=1e-6)


def test_vmap_over_agents():
    batches = [_batch(s) for s in (10, 11)]
    stacked = [np.stack(x) for x in zip(*batches)]
    totals = jax.vmap(lambda lp, o, a, m: policy_loss(lp, o, a, m)[0])(*stacked[:4])
    for i, (lp, o, a, m, _) in enumerate(batches):
        np.testing.assert_allclose(totals[i], policy_loss(lp, o, a, m)[0], rtol=1e-6)


def test_bad_arguments_raise_clear_errors():
    logp, old, adv, mask, _ = _batch()
    with pytest.raises(ValueError, match=r"agg='mean'.*'seq-mean-token-mean'"):
        policy_loss(logp, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match=r"kind='k4'.*\['k1', 'k2', 'k3'\]"):
        kl_estimate(logp, old, kind="k4")
    with pytest.raises(ValueError, match=r"kl_kind='k4'"):
        policy_loss(logp, old, adv, mask, kl_kind="k4")
    with pytest.raises(ValueError, match=r"advantages \(4,\) for logp \(5, 6\)"):
        policy_loss(logp, old, adv[:4], mask)
    with pytest.raises(ValueError, match=r"logp \(5, 6\), old_logp \(5, 5\)"):
        policy_loss(logp, old[:, :5], adv, mask)
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="needs entropy"):
        policy_loss(logp, old, adv, mask, entropy_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match=r"weights must be \[B\]"):
        aggregate_loss(logp, mask, mode="token-mean", weights=np.ones(3))
