"""group_relative_advantages / group_statistics / grouped_* / mgrpo_advantages against the NumPy oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import np_reference as ref
from mgrpo_jax.kernels import (
    group_relative_advantages,
    group_statistics,
    grouped_advantages,
    grouped_statistics,
    mgrpo_advantages,
    sub_advantages,
    sub_group_ids,
)


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

@pytest.mark.parametrize("sub_group,axes", [("per_query", (1, 2)), ("per_rollout", (2,))])
def test_mgrpo_groupings(sub_group, axes):
    rng = np.random.default_rng(4)
    q, k, d = 3, 4, 3
    main = _rewards(rng, (q, k))
    sub = _rewards(rng, (q, k, d))
    sub_mask = rng.random((q, k, d)) > 0.25
    adv_main, adv_sub = mgrpo_advantages(main, sub, sub_mask, sub_group=sub_group)
    np.testing.assert_allclose(adv_main, ref.group_advantages(main, None, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv_sub, ref.group_advantages(sub, sub_mask, axes), rtol=1e-5, atol=1e-5)


def test_mgrpo_per_call_index_groups_by_the_records_call_index():
    # Issue 17: slot i does not hold call i once alignment drops, duplicates or borrows. The group is
    # (query, call index of the record), wherever the record sits.
    rng = np.random.default_rng(6)
    q, k, d = 3, 4, 3
    main, sub = _rewards(rng, (q, k)), _rewards(rng, (q, k, d))
    sub_mask = rng.random((q, k, d)) > 0.2
    call_index = np.where(sub_mask, rng.integers(0, 5, size=(q, k, d)), -1)
    _, adv_sub = mgrpo_advantages(main, sub, sub_mask, sub_group="per_call_index", sub_call_index=call_index)
    groups = np.where(sub_mask, np.arange(q)[:, None, None] * 100 + call_index, -1)
    np.testing.assert_allclose(adv_sub, ref.grouped_advantages(sub, groups, sub_mask), rtol=1e-5, atol=1e-5)
    # The case: one trajectory (reward 1, call 0) in slot 0 of rollout 0 and, duplicated, in slot 1 of
    # rollout 1. Grouped by slot it got two different advantages; grouped by call it gets one.
    sub = np.array([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]], np.float32)
    call = np.array([[[0, 1], [0, 0], [0, 1]]])
    _, adv = mgrpo_advantages(np.zeros((1, 3)), sub, np.ones_like(sub), sub_group="per_call_index",
                              sub_call_index=call)
    adv = np.asarray(adv)
    assert adv[0, 0, 0] == adv[0, 1, 1] != 0
    np.testing.assert_allclose(adv[0, 0, 0], ref.group_advantages(np.array([[1.0, 0.0, 1.0, 0.0]]), None, 1)[0, 0],
                               rtol=1e-5)


def test_mgrpo_per_rollout_masks_borrowed_slots():
    # Issue 17: a rollout with no call of its own borrows siblings' trajectories; under per_rollout those
    # slots must not form a group (before, the only non-zero sub advantages came from such a group).
    sub = np.array([[[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]], np.float32)  # rollout 2 holds borrowed copies
    borrowed = np.zeros(sub.shape, bool)
    borrowed[0, 2] = True
    _, adv = mgrpo_advantages(np.zeros((1, 3)), sub, np.ones_like(sub), sub_group="per_rollout",
                              sub_borrowed=borrowed)
    adv = np.asarray(adv)
    np.testing.assert_array_equal(adv[0, 2], [0.0, 0.0])
    np.testing.assert_allclose(adv[0, :2], ref.group_advantages(sub[0, :2], None, 1), rtol=1e-5, atol=1e-6)
    # per_query keeps borrowed slots as members (same query): unchanged behaviour.
    _, adv_q = mgrpo_advantages(np.zeros((1, 3)), sub, np.ones_like(sub), sub_borrowed=borrowed)
    np.testing.assert_allclose(adv_q, ref.group_advantages(sub, None, (1, 2)), rtol=1e-5, atol=1e-6)


def test_sub_group_ids_and_errors():
    mask = np.ones((2, 3, 2), bool)
    call = np.array([[[0, 1], [0, 0], [2, 1]], [[0, 1], [1, 1], [0, 0]]])
    ids, m = sub_group_ids("per_call_index", mask, sub_call_index=call)
    ids = np.asarray(ids)
    for a in np.ndindex(ids.shape):
        for b in np.ndindex(ids.shape):
            assert (ids[a] == ids[b]) == (a[0] == b[0] and call[a] == call[b])
    with pytest.raises(ValueError, match="pass sub_call_index"):
        sub_advantages(np.zeros((2, 3, 2)), mask, sub_group="per_call_index")
    with pytest.raises(ValueError, match=r"sub_call_index \(2, 3, 1\)"):
        sub_advantages(np.zeros((2, 3, 2)), mask, sub_group="per_call_index", sub_call_index=call[..., :1])


# ---- arbitrary groups -----------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_matches_numpy(scale, ddof, masked):
    rng = np.random.default_rng(7)
    rewards = _rewards(rng, (3, 4, 5))
    ids = rng.choice([-7, 0, 3, 1000003, 2**30], size=(3, 4, 5))  # any ints, not dense, not small
    mask = rng.random((3, 4, 5)) > 0.3 if masked else None
    got = grouped_advantages(rewards, ids, mask, scale=scale, ddof=ddof)
    assert got.dtype == jnp.float32 and got.shape == rewards.shape
    np.testing.assert_allclose(got, ref.grouped_advantages(rewards, ids, mask, scale=scale, ddof=ddof),
                               rtol=1e-5, atol=1e-5)


def test_grouped_equals_the_axis_grouping():
    rng = np.random.default_rng(8)
    rewards, mask = _rewards(rng, (4, 3, 2)), rng.random((4, 3, 2)) > 0.3
    ids = np.broadcast_to(np.arange(4)[:, None, None], rewards.shape)
    np.testing.assert_allclose(grouped_advantages(rewards, ids, mask),
                               group_relative_advantages(rewards, mask, axis=(1, 2)), rtol=1e-6, atol=1e-6)


def test_grouped_statistics_per_group():
    r = np.array([1.0, 2.0, 5.0, 0.1, 0.1, 9.0], np.float32)
    ids = np.array([7, 3, 7, 3, 3, 5])
    mask = np.array([1, 0, 1, 1, 1, 0])
    stats = grouped_statistics(r, ids, mask, ddof=0)
    # Groups of valid entries in ascending id order: 3 -> {0.1, 0.1}, 7 -> {1, 5}; the rest empty.
    np.testing.assert_array_equal(stats.count, [2, 2, 0, 0, 0, 0])
    np.testing.assert_allclose(stats.mean[:2], [0.1, 3.0], rtol=1e-6)
    np.testing.assert_allclose(stats.std[:2], [0.0, 2.0], atol=1e-6)
    np.testing.assert_array_equal(stats.zero_variance, [True, False, False, False, False, False])


def test_grouped_jit_grad_vmap():
    rng = np.random.default_rng(9)
    r = rng.normal(size=(5, 4)).astype(np.float32)
    ids = rng.integers(0, 3, size=(5, 4))
    r[ids == 1] = 0.5  # a zero-variance group must not make the gradient NaN
    f = jax.jit(lambda x, g: jnp.sum(grouped_advantages(x, g) * jnp.arange(4.0)))
    assert np.all(np.isfinite(np.asarray(jax.grad(f)(r, ids))))
    vmapped = jax.vmap(grouped_advantages)(r, ids)
    for row in range(5):
        np.testing.assert_allclose(vmapped[row], ref.grouped_advantages(r[row], ids[row]), rtol=1e-5, atol=1e-5)


def test_grouped_bad_arguments():
    with pytest.raises(ValueError, match=r"group_ids must have the shape of rewards"):
        grouped_advantages(np.zeros((2, 3)), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match=r"group_ids must be integers"):
        grouped_advantages(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"scale='var'"):
        grouped_advantages(np.zeros((2, 3)), np.zeros((2, 3), int), scale="var")


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
    with pytest.raises(ValueError, match=r"sub_borrowed \(2, 3, 5\)"):
        mgrpo_advantages(np.zeros((2, 3)), np.zeros((2, 3, 4)), np.ones((2, 3, 4)), sub_group="per_rollout",
                         sub_borrowed=np.zeros((2, 3, 5), bool))


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


@settings(max_examples=15)
@given(hnp.arrays(np.float32, st.just((2, 6)),
                  elements=st.integers(0, 3).map(lambda v: np.float32(v / 2))),
       st.randoms(use_true_random=False))
def test_grouped_is_invariant_to_renaming_groups(r, rnd):
    ids = np.array([[rnd.randrange(3) for _ in range(r.shape[1])] for _ in range(r.shape[0])])
    renamed = np.vectorize({0: 905, 1: -2, 2: 17}.get)(ids)
    np.testing.assert_array_equal(grouped_advantages(r, ids), grouped_advantages(r, renamed))
