"""Trajectory alignment: properties over arbitrary d_k (hypothesis) and the exact rules of MGRPO.md."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mgrpo_jax.train.alignment import AlignmentConfig, DMaxEstimator, align

_counts = hnp.arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(1, 5)), elements=st.integers(0, 7))
_configs = st.builds(AlignmentConfig, pad_mode=st.sampled_from(["duplicate", "mask"]),
                     fill_empty_from_siblings=st.booleans(), reweight_duplicates=st.booleans())


def _owner(counts):
    """flat index -> (query, rollout), computed independently of the module's offsets."""
    owners = []
    for q in range(counts.shape[0]):
        for k in range(counts.shape[1]):
            owners += [(q, k)] * int(counts[q, k])
    return owners


@given(_counts, st.integers(1, 5), _configs, st.integers(0, 2**31))
def test_alignment_properties(counts, d_max, config, seed):
    out = align(counts, d_max, config, np.random.default_rng(seed))
    q_n, k_n = counts.shape
    # The shape never depends on d_k.
    assert out.index.shape == out.weight.shape == out.borrowed.shape == (q_n, k_n, d_max)
    owners = _owner(counts)
    for q in range(q_n):
        for k in range(k_n):
            slots = out.index[q, k]
            filled = slots[slots >= 0]
            for i, flat in enumerate(slots):
                if flat < 0:
                    assert out.weight[q, k, i] == 0
                    continue
                oq, ok = owners[flat]
                assert oq == q  # never another query's trajectory (LESSONS.md item 1)
                assert ok == k or (out.borrowed[q, k, i] and counts[q, k] == 0)
            own = {f for f, owner in enumerate(owners) if owner == (q, k)}
            if counts[q, k] <= d_max:
                assert own <= set(filled.tolist())  # nothing dropped when d_k <= D_max
            else:
                assert len(set(filled.tolist())) == d_max  # D_max distinct survivors
            if config.pad_mode == "mask" or counts[q, k] >= d_max:
                assert len(filled) == len(set(filled.tolist()))  # no copies
            if config.pad_mode == "duplicate" and counts[q, k] > 0:
                assert len(filled) == d_max  # every slot used
    # Weights add up as specified.
    valid = out.index >= 0
    if config.reweight_duplicates:
        for flat in set(out.index[valid].tolist()):
            np.testing.assert_allclose(out.weight[out.index == flat].sum(), 1.0, rtol=1e-6)
    else:
        np.testing.assert_array_equal(out.weight, valid.astype(np.float32))
    kept_distinct = len(set(out.index[valid & ~out.borrowed].tolist()))
    assert out.stats["kept"] == kept_distinct
    assert out.stats["dropped"] == int(counts.sum()) - kept_distinct
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
    assert out.stats == dict(kept=6, dropped=3, duplicated=3, borrowed=3, masked=0)


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
