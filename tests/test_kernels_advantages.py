"""group_relative_advantages / group_statistics / mgrpo_advantages against the NumPy oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import np_reference as ref
from mgrpo_jax.kernels import group_relative_advantages, group_statistics, mgrpo_advantages


def _rewards(rng, shape, n_levels=4):
    # Few distinct levels, like real rewards (0, 0.1, 1.1, ...), so equal-reward groups occur.
    return rng.integers(0, n_levels, size=shape).astype(np.float32) * 0.5 + 0.1


@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("axis", [-1, 0, (1, 2), (0, 2)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_numpy(scale, ddof, axis, masked):
    rng = np.random.default_rng(0)
    rewards = _rewards(rng, (3, 4, 5))
    mask = rng.random((3, 4, 5)) > 0.3 if masked else None
    got = group_relative_advantages(rewards, mask, axis=axis, scale=scale, ddof=ddof)
    want = ref.group_advantages(rewards, mask, axis, scale=scale, ddof=ddof)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_known_values_std_and_ddof():
    r = np.array([[0.0, 1.0, 1.0, 0.0]], np.float32)
    # ddof=0: mean .5, std .5 -> +-1 ; ddof=1: std = sqrt(1/3)
    np.testing.assert_allclose(group_relative_advantages(r, eps=0.0), [[-1, 1, 1, -1]], atol=1e-6)
    s = np.sqrt(1 / 3)
    np.testing.assert_allclose(group_relative_advantages(r, eps=0.0, ddof=1), [[-0.5 / s, 0.5 / s, 0.5 / s, -0.5 / s]],
                               rtol=1e-6)
    np.testing.assert_allclose(group_relative_advantages(r, scale="none"), [[-0.5, 0.5, 0.5, -0.5]], atol=1e-7)


def test_equal_rewards_give_exact_zero():
    # 0.1 is not exactly representable: a float mean of copies differs from 0.1 by round-off. Still exact 0.
    r = np.full((2, 7), 0.1, np.float32)
    r[1] = 1.1
    for scale in ("std", "none"):
        adv = group_relative_advantages(r, scale=scale)
        assert np.all(np.asarray(adv) == 0.0)
    stats = group_statistics(r)
    assert np.all(np.asarray(stats.zero_variance))


def test_masked_slots_excluded_and_zero():
    r = np.array([[1.0, 2.0, 3.0, 100.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]])
    adv = np.asarray(group_relative_advantages(r, mask, eps=0.0))
    np.testing.assert_allclose(adv[0, :3], ref.group_advantages(r[:, :3], None, -1, eps=0.0)[0], rtol=1e-6)
    assert adv[0, 3] == 0.0
    r2 = r.copy()
    r2[0, 3] = -1e6  # what a masked slot holds must not matter
    np.testing.assert_array_equal(group_relative_advantages(r2, mask, eps=0.0), adv)


def test_all_masked_group_is_zero_and_finite():
    r = np.array([[1.0, 2.0], [3.0, 5.0]], np.float32)
    mask = np.array([[0, 0], [1, 1]])
    adv = np.asarray(group_relative_advantages(r, mask))
    assert np.all(np.isfinite(adv)) and np.all(adv[0] == 0)
    stats = group_statistics(r, mask)
    np.testing.assert_array_equal(stats.count, [0, 2])
    np.testing.assert_array_equal(stats.zero_variance, [False, False])
    # ddof=1 with one valid entry: std undefined -> 0, never NaN.
    adv1 = group_relative_advantages(r, np.array([[1, 0], [1, 1]]), ddof=1)
    assert np.all(np.isfinite(np.asarray(adv1)))


def test_group_statistics_matches_numpy():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(4, 6)).astype(np.float32)
    mask = rng.random((4, 6)) > 0.2
    stats = group_statistics(r, mask, ddof=1)
    for g in range(4):
        vals = r[g][mask[g]].astype(np.float64)
        assert int(stats.count[g]) == len(vals)
        np.testing.assert_allclose(stats.mean[g], vals.mean(), rtol=1e-5)
        np.testing.assert_allclose(stats.std[g], vals.std(ddof=1), rtol=1e-5)


def test_bf16_rewards_accumulate_in_float32():
    rng = np.random.default_rng(2)
    r = jnp.asarray(rng.normal(size=(3, 8)), jnp.bfloat16)
    got = group_relative_advantages(r)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref.group_advantages(np.asarray(r, np.float32), None, -1), rtol=1e-4, atol=1e-4)


def test_jit_grad_vmap():
    rng = np.random.default_rng(3)
    r = rng.normal(size=(5, 4)).astype(np.float32)
    r[2] = 0.5  # a zero-variance group must not make the gradient NaN
    f = jax.jit(lambda x: jnp.sum(group_relative_advantages(x) * jnp.arange(4.0)))
    g = jax.grad(f)(r)
    assert np.all(np.isfinite(np.asarray(g)))
    vmapped = jax.vmap(lambda x: group_relative_advantages(x, axis=0))(r)
    np.testing.assert_allclose(vmapped, group_relative_advantages(r, axis=-1), rtol=1e-6)


def test_bad_arguments_raise_clear_errors():
    r = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"scale='var'.*\['none', 'std'\]"):
        group_relative_advantages(r, scale="var")
    with pytest.raises(ValueError, match=r"rewards \(2, 3\), mask \(3, 2\)"):
        group_relative_advantages(r, np.ones((3, 2)))
    with pytest.raises(ValueError, match="out of range"):
        group_relative_advantages(r, axis=2)
    with pytest.raises(ValueError, match="ddof"):
        group_relative_advantages(r, ddof=-1)


# ---- M-GRPO grouping ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sub_group,axes", [("per_query", (1, 2)), ("per_rollout", (2,)), ("per_call_index", (1,))])
def test_mgrpo_groupings(sub_group, axes):
    rng = np.random.default_rng(4)
    q, k, d = 3, 4, 3
    main = _rewards(rng, (q, k))
    sub = _rewards(rng, (q, k, d))
    sub_mask = rng.random((q, k, d)) > 0.25
    adv_main, adv_sub = mgrpo_advantages(main, sub, sub_mask, sub_group=sub_group)
    np.testing.assert_allclose(adv_main, ref.group_advantages(main, None, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv_sub, ref.group_advantages(sub, sub_mask, axes), rtol=1e-5, atol=1e-5)


def test_mgrpo_groups_never_mix_queries():
    # LESSONS.md item 1: a sub-agent group must be one query's slots. Changing query 1 leaves query 0 alone.
    rng = np.random.default_rng(5)
    main, sub = _rewards(rng, (2, 4)), _rewards(rng, (2, 4, 3))
    mask = np.ones((2, 4, 3), bool)
    a_main, a_sub = mgrpo_advantages(main, sub, mask)
    main2, sub2 = main.copy(), sub.copy()
    main2[1] += 5.0
    sub2[1] = rng.normal(size=(4, 3))
    b_main, b_sub = mgrpo_advantages(main2, sub2, mask)
    np.testing.assert_array_equal(a_main[0], b_main[0])
    np.testing.assert_array_equal(a_sub[0], b_sub[0])
    assert not np.allclose(a_sub[1], b_sub[1])


def test_mgrpo_bad_arguments():
    with pytest.raises(ValueError, match=r"per_query"):
        mgrpo_advantages(np.zeros((2, 3)), np.zeros((2, 3, 4)), np.ones((2, 3, 4)), sub_group="per_agent")
    with pytest.raises(ValueError, match=r"main_rewards \(2, 3\), sub_rewards \(2, 4, 4\)"):
        mgrpo_advantages(np.zeros((2, 3)), np.zeros((2, 4, 4)), np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match=r"mask \(2, 3, 5\)"):
        mgrpo_advantages(np.zeros((2, 3)), np.zeros((2, 3, 4)), np.ones((2, 3, 5)))


# ---- properties -----------------------------------------------------------------------------------------

_groups = hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(2, 8)),
                     elements=st.integers(-20, 20).map(lambda v: np.float32(v / 4)))


@given(_groups, st.floats(-50, 50), st.floats(0.05, 20))
def test_std_advantages_invariant_to_shift_and_positive_scale(r, shift, scale):
    base = np.asarray(group_relative_advantages(r, eps=0.0))
    moved = np.asarray(group_relative_advantages(r * np.float32(scale) + np.float32(shift), eps=0.0))
    np.testing.assert_allclose(moved, base, rtol=1e-3, atol=1e-3)


@given(_groups, st.randoms(use_true_random=False))
def test_equivariant_to_permutation_within_group(r, rnd):
    perm = list(range(r.shape[1]))
    rnd.shuffle(perm)
    np.testing.assert_allclose(group_relative_advantages(r[:, perm]), np.asarray(group_relative_advantages(r))[:, perm],
                               rtol=1e-5, atol=1e-6)


@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 6)),
                  elements=st.floats(-1e6, 1e6, width=32)),
       hnp.arrays(np.bool_, st.just(6)))
def test_outputs_always_finite(r, mask_row):
    mask = np.broadcast_to(mask_row[: r.shape[1]], r.shape)
    for scale in ("std", "none"):
        adv = np.asarray(group_relative_advantages(r, mask, scale=scale))
        assert np.all(np.isfinite(adv))
        assert np.all(adv[~mask] == 0)
