"""Trajectory alignment: properties over arbitrary d_k (hypothesis) and the exact rules of MGRPO.md; the
sub-agent's slots and advantages (align_sub_slots) against a brute-force computation of each group."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mgrpo_jax.train.alignment import AlignmentConfig, DMaxEstimator, align, align_sub_slots

_counts = hnp.arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(1, 5)), elements=st.integers(0, 7))
_configs = st.builds(AlignmentConfig, pad_mode=st.sampled_from(["duplicate", "mask"]),
                     fill_empty_from_siblings=st.booleans(), reweight_duplicates=st.booleans())


def _owner(counts):
    """flat index -> (query, rollout, call index), computed independently of the module's offsets."""
    owners = []
    for q in range(counts.shape[0]):
        for k in range(counts.shape[1]):
            owners += [(q, k, c) for c in range(int(counts[q, k]))]
    return owners


@st.composite
def _batches(draw, counts=_counts):
    """(counts, excluded): d_k per rollout and a random set of excluded (infrastructure-failed) records."""
    counts = draw(counts)
    n = int(counts.sum())
    excluded = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool) if n else np.zeros(0, bool)
    return counts, excluded


@given(_batches(), st.integers(1, 5), _configs, st.integers(0, 2**31))
def test_alignment_properties(batch, d_max, config, seed):
    counts, excluded = batch
    out = align(counts, d_max, config, np.random.default_rng(seed), excluded=excluded)
    q_n, k_n = counts.shape
    # The shape never depends on d_k.
    assert out.index.shape == out.call_index.shape == out.weight.shape == out.borrowed.shape == (q_n, k_n, d_max)
    owners = _owner(counts)
    usable = counts.copy()
    for flat in np.flatnonzero(excluded):
        usable[owners[flat][:2]] -= 1
    for q in range(q_n):
        for k in range(k_n):
            slots = out.index[q, k]
            filled = slots[slots >= 0]
            for i, flat in enumerate(slots):
                if flat < 0:
                    assert out.weight[q, k, i] == 0 and out.call_index[q, k, i] == -1
                    continue
                oq, ok, call = owners[flat]
                assert not excluded[flat]  # excluded records appear nowhere
                assert oq == q  # never another query's trajectory (LESSONS.md item 1)
                assert ok == k or (out.borrowed[q, k, i] and usable[q, k] == 0)
                assert out.call_index[q, k, i] == call  # every slot knows its record's call index
            own = {f for f, owner in enumerate(owners) if owner[:2] == (q, k) and not excluded[f]}
            if usable[q, k] <= d_max:
                assert own <= set(filled.tolist())  # nothing dropped when d_k <= D_max
            else:
                assert len(set(filled.tolist())) == d_max  # D_max distinct survivors
            if config.pad_mode == "mask" or usable[q, k] >= d_max:
                assert len(filled) == len(set(filled.tolist()))  # no copies
            if config.pad_mode == "duplicate" and usable[q, k] > 0:
                assert len(filled) == d_max  # every slot used
    # Weights add up as specified.
    valid = out.index >= 0
    if config.reweight_duplicates:
        for flat in set(out.index[valid].tolist()):
            np.testing.assert_allclose(out.weight[out.index == flat].sum(), 1.0, rtol=1e-6)
    else:
        np.testing.assert_array_equal(out.weight, valid.astype(np.float32))
    # The counts add up: every record is kept (in some slot), dropped (in none) or excluded.
    in_batch = set(out.index[valid].tolist())
    assert out.stats["kept"] == len(in_batch)
    assert out.stats["dropped"] == sum(1 for f in range(len(owners)) if f not in in_batch and not excluded[f])
    assert out.stats["excluded"] == int(excluded.sum())
    assert out.stats["kept"] + out.stats["dropped"] + out.stats["excluded"] == int(counts.sum())
    assert out.stats["masked"] == int((~valid).sum())
    assert out.stats["borrowed"] == int(out.borrowed.sum())


def test_exact_rules_on_a_small_batch():
    counts = np.array([[6, 1, 0, 2]])  # drop, duplicate, borrow, duplicate
    cfg = AlignmentConfig(d_max=3)
    out = align(counts, 3, cfg, np.random.default_rng(0))
    # flat list: rollout 0 -> 0..5, rollout 1 -> 6, rollout 3 -> 7, 8
    assert set(out.index[0, 0]) <= set(range(6)) and len(set(out.index[0, 0])) == 3
    np.testing.assert_array_equal(out.index[0, 1], [6, 6, 6])
    assert set(out.index[0, 2]) <= {0, 1, 2, 3, 4, 5, 6, 7, 8} and out.borrowed[0, 2].all()
    assert len(set(out.index[0, 2])) == 3  # borrowed without replacement while the pool allows
    assert list(out.index[0, 3][:2]) == [7, 8] and out.index[0, 3, 2] in (7, 8)
    in_batch = set(out.index.reshape(-1).tolist())
    assert out.stats == dict(kept=len(in_batch), dropped=9 - len(in_batch), excluded=0, duplicated=3, borrowed=3,
                             masked=0)
    np.testing.assert_array_equal(out.call_index[0, 1], [0, 0, 0])
    np.testing.assert_array_equal(out.call_index[0, 3][:2], [0, 1])


def test_mask_mode_and_no_siblings():
    counts = np.array([[0, 0], [2, 0]])
    out = align(counts, 3, AlignmentConfig(pad_mode="mask"), np.random.default_rng(0))
    np.testing.assert_array_equal(out.index, [[[-1, -1, -1], [-1, -1, -1]], [[0, 1, -1], [-1, -1, -1]]])
    out = align(counts, 3, AlignmentConfig(), np.random.default_rng(0))
    assert (out.index[0] == -1).all()  # query 0 has no sub trajectory anywhere: masked
    assert out.borrowed[1, 1].all() and set(out.index[1, 1]) == {0, 1}
    out = align(counts, 3, AlignmentConfig(fill_empty_from_siblings=False), np.random.default_rng(0))
    assert (out.index[1, 1] == -1).all()


def test_reweighted_duplicates_weigh_one_each():
    out = align(np.array([[1, 2]]), 4, AlignmentConfig(reweight_duplicates=True), np.random.default_rng(3))
    np.testing.assert_allclose(out.weight[0, 0], [0.25] * 4)
    assert out.weight.sum() == pytest.approx(3.0)  # three distinct trajectories


def test_deterministic_for_a_seed():
    counts = np.random.default_rng(0).integers(0, 6, size=(3, 4))
    a = align(counts, 2, AlignmentConfig(), np.random.default_rng(7))
    b = align(counts, 2, AlignmentConfig(), np.random.default_rng(7))
    np.testing.assert_array_equal(a.index, b.index)
    c = align(counts, 2, AlignmentConfig(), np.random.default_rng(8))
    assert not np.array_equal(a.index, c.index)


def test_auto_d_max_freezes_after_warmup():
    est = DMaxEstimator(AlignmentConfig(d_max="auto", auto_percentile=75, auto_warmup_rollouts=8))
    with pytest.raises(RuntimeError, match="warming up"):
        _ = est.value
    assert not est.observe([[1, 2, 3, 4]])
    assert est.observe([[5, 6, 7, 8]])
    assert est.value == int(np.ceil(np.percentile([1, 2, 3, 4, 5, 6, 7, 8], 75)))
    est.observe([[50] * 8])  # frozen: later rollouts do not move it
    assert est.value == 7
    restored = DMaxEstimator(est.config)
    restored.load_state_dict(est.state_dict())
    assert restored.value == 7


def test_bad_config_and_counts():
    with pytest.raises(ValueError, match="pad_mode='copy'"):
        AlignmentConfig(pad_mode="copy")
    with pytest.raises(ValueError, match="d_max must be an int >= 1 or 'auto'"):
        AlignmentConfig(d_max=0)
    with pytest.raises(ValueError, match=r"\[Q, K\] array of non-negative ints"):
        align(np.array([[1, -1]]), 2, AlignmentConfig(), np.random.default_rng(0))


# ---- issue 17: slots that mean what they say ------------------------------------------------------------

def test_call_index_follows_the_record_not_the_slot():
    # The example: d = [0, 1, 3, 2], D_max = 2. Slot 1 is "call 1" in name only: rollout 1 fills it
    # with a copy of its call 0, rollout 2 may keep calls 0 and 2, rollout 0 borrows anything.
    counts = np.array([[0, 1, 3, 2]])
    owners = _owner(counts)
    for seed in range(10):
        out = align(counts, 2, AlignmentConfig(), np.random.default_rng(seed))
        for slot in np.ndindex(out.index.shape):
            assert out.call_index[slot] == owners[out.index[slot]][2]
        assert out.call_index[0, 1, 1] == 0  # rollout 1's second slot holds its first call


def test_dropped_counts_only_what_left_the_batch():
    # Rollout 0 makes 4 calls, D_max = 2 drops 2 of them; rollout 1 made none and borrows 2 of the 4 without
    # replacement, often a dropped one. Before, align/dropped said 2 even when fewer were absent.
    counts = np.array([[4, 0]])
    seen_borrow_back = False
    for seed in range(20):
        out = align(counts, 2, AlignmentConfig(), np.random.default_rng(seed))
        absent = 4 - len(set(out.index.reshape(-1).tolist()))
        assert out.stats["dropped"] == absent
        seen_borrow_back |= absent < 2
    assert seen_borrow_back  # the case of the issue occurred


def test_excluded_records_are_left_out_and_counted():
    # A failed generation (0 sampled tokens, reward 0) must not take a slot or move its siblings' baseline.
    counts = np.array([[2, 1, 1]])  # records: r0 -> 0, 1; r1 -> 2; r2 -> 3
    rewards = np.array([1.0, 0.0, 0.0, 1.0], np.float32)
    failed = np.array([False, True, False, False])
    out = align_sub_slots(counts, rewards, 2, AlignmentConfig(pad_mode="mask"), np.random.default_rng(0),
                          excluded=failed)
    assert 1 not in out.alignment.index and out.metrics["align/excluded"] == 1.0
    assert out.metrics["align/dropped"] == 0.0 and out.metrics["align/kept"] == 3.0
    good = rewards[~failed]
    want = (good - good.mean()) / (good.std() + 1e-6)
    np.testing.assert_allclose(out.advantages[0, :, 0], want, rtol=1e-5)
    np.testing.assert_array_equal(out.weight, out.alignment.valid.astype(np.float32))
    # A rollout whose only call failed is aligned as one that made none (here: borrows from its siblings).
    out = align_sub_slots(np.array([[1, 1]]), np.array([0.0, 1.0]), 2, AlignmentConfig(), np.random.default_rng(0),
                          excluded=np.array([True, False]))
    assert out.alignment.borrowed[0, 0].all() and (out.alignment.index == 1).all()
    with pytest.raises(ValueError, match=r"excluded must be a bool array \[N\] over the N=2"):
        align(np.array([[1, 1]]), 2, AlignmentConfig(), np.random.default_rng(0), excluded=np.array([True]))


@pytest.mark.parametrize("sub_group", ["per_query", "per_rollout"])
def test_excluding_equals_never_having_made_the_call(sub_group):
    rng = np.random.default_rng(1)
    for trial in range(4):
        counts = rng.integers(0, 4, size=(2, 3))
        n = int(counts.sum())
        rewards = rng.integers(0, 3, size=n).astype(np.float32) / 2
        excluded = rng.random(n) < 0.3
        owners = _owner(counts)
        reduced = counts.copy()
        for f in np.flatnonzero(excluded):
            reduced[owners[f][:2]] -= 1
        opts = dict(sub_group=sub_group)
        a = align_sub_slots(counts, rewards, 2, AlignmentConfig(), np.random.default_rng(trial), excluded=excluded,
                            **opts)
        b = align_sub_slots(reduced, rewards[~excluded], 2, AlignmentConfig(), np.random.default_rng(trial), **opts)
        renumber = np.cumsum(~excluded) - 1  # flat index with exclusions -> flat index without them
        np.testing.assert_array_equal(np.where(a.alignment.valid, renumber[a.alignment.index], -1),
                                      b.alignment.index)
        np.testing.assert_array_equal(a.advantages, b.advantages)
        np.testing.assert_array_equal(a.weight, b.weight)


def test_per_rollout_never_forms_a_group_from_borrowed_slots():
    # Issue 17: rollout 2 made no call; under per_rollout its slots used to be a group of borrowed copies and
    # carried the only non-zero advantages. Now they stay empty: weight 0, advantage 0, counted as masked.
    counts = np.array([[1, 1, 0]])
    rewards = np.array([1.0, 0.0], np.float32)
    out = align_sub_slots(counts, rewards, 2, AlignmentConfig(), np.random.default_rng(0), sub_group="per_rollout")
    assert not out.alignment.borrowed.any()
    np.testing.assert_array_equal(out.weight[0, 2], [0.0, 0.0])
    np.testing.assert_array_equal(out.advantages, np.zeros((1, 3, 2)))  # each rollout: one record, copies
    assert out.metrics["align/borrowed"] == 0 and out.metrics["align/masked"] == 2
    # per_query still borrows (unchanged default).
    out = align_sub_slots(counts, rewards, 2, AlignmentConfig(), np.random.default_rng(0))
    assert out.alignment.borrowed[0, 2].all() and out.metrics["align/borrowed"] == 2


def _brute_force_advantages(out, rewards, counts, sub_group):
    """Each valid slot's group by definition, its statistics in float64, looped."""
    owners = _owner(counts)
    index, valid = out.alignment.index, out.alignment.valid
    members = {}
    for slot in zip(*np.nonzero(valid)):
        q, k, _ = slot
        if sub_group == "per_rollout" and out.alignment.borrowed[slot]:
            continue
        key = {"per_query": (q,), "per_rollout": (q, k), "per_call_index": (q, owners[index[slot]][2])}[sub_group]
        members.setdefault(key, []).append(slot)
    adv = np.zeros(index.shape)
    for key, slots in members.items():
        values = np.array([rewards[index[s]] for s in slots], np.float64)
        if np.all(values == values[0]):
            continue
        for s, v in zip(slots, values):
            adv[s] = (v - values.mean()) / (values.std() + 1e-6)
    zero_var = np.mean([len(set(rewards[index[s]] for s in slots)) == 1 for slots in members.values()]) \
        if members else 0.0
    return adv, members, zero_var


# Few [Q, K, D] shapes: each new shape compiles the advantage kernels.
_few_shapes = hnp.arrays(np.int64, st.just((2, 4)), elements=st.integers(0, 5))


@settings(max_examples=25)
@given(_batches(_few_shapes), st.integers(2, 3), _configs, st.sampled_from(["per_query", "per_rollout", "per_call_index"]),
       st.integers(0, 2**31))
def test_sub_slots_properties(batch, d_max, config, sub_group, seed):
    counts, excluded = batch
    rewards = (np.random.default_rng(seed).integers(0, 3, size=int(counts.sum())) / 2).astype(np.float32)
    out = align_sub_slots(counts, rewards, d_max, config, np.random.default_rng(seed), sub_group=sub_group,
                          excluded=excluded)
    index, valid = out.alignment.index, out.alignment.valid
    want, members, zero_var = _brute_force_advantages(out, rewards, counts, sub_group)
    np.testing.assert_allclose(out.advantages, want, rtol=1e-5, atol=1e-5)
    assert out.metrics["sub/zero_variance_frac"] == pytest.approx(zero_var)
    # Copies of one record share one advantage, in every slot that trains on it.
    trained = out.weight > 0
    for flat in set(index[trained].tolist()):
        assert len(set(out.advantages[trained & (index == flat)].tolist())) == 1
    # per_call_index groups hold one call index only (44.8% of slots did not, by slot, before).
    if sub_group == "per_call_index":
        owners = _owner(counts)
        for (q, call), slots in members.items():
            assert all(owners[index[s]][2] == call == out.alignment.call_index[s] for s in slots)
    assert not set(index[valid].tolist()) & set(np.flatnonzero(excluded).tolist())
    if sub_group == "per_rollout":
        assert not out.alignment.borrowed.any()
    np.testing.assert_array_equal(out.rewards, np.where(valid, rewards[np.where(valid, index, 0)], 0.0)
                                  if len(rewards) else 0.0)
    stats = out.alignment.stats
    assert stats["kept"] + stats["dropped"] + stats["excluded"] == int(counts.sum())
