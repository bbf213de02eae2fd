"""mgrpo_jax.models.attention: dense against a NumPy loop oracle; chunked and splash against dense.

Layouts are drawn by hypothesis at fixed shapes (so each test compiles once): left and right padding, several
packed segments per row (ids repeating across pads too), all-pad rows, KV-cache offsets (q_slots start > 0,
S > T), arbitrary slots, T and S not multiples of the tiles, grouped-query groups 1 and > 1.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mgrpo_jax.models import attention as attn_lib
from mgrpo_jax.models.attention import IMPLEMENTATIONS, attention, select_implementation

TOL = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ oracle


def np_attention(q, k, v, q_seg, kv_seg, q_slots, kv_slots, kv_len=None):
    """Loop-by-loop float64 attention with the documented mask; rows that see nothing are 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_, t_, hq, d = q.shape
    s_, hkv = k.shape[1], k.shape[2]
    kv_slots = np.broadcast_to(np.asarray(kv_slots), (b_, s_))
    out = np.zeros(q.shape)
    for b in range(b_):
        for t in range(t_):
            keys = [s for s in range(s_) if q_seg[b, t] != 0 and q_seg[b, t] == kv_seg[b, s]
                    and kv_slots[b, s] <= q_slots[b, t] and (kv_len is None or s < kv_len)]
            if not keys:
                continue
            for h in range(hq):
                kh = h // (hq // hkv)
                logits = np.array([q[b, t, h] @ k[b, s, kh] for s in keys]) / np.sqrt(d)
                w = np.exp(logits - logits.max())
                w /= w.sum()
                out[b, t, h] = sum(wi * v[b, s, kh] for wi, s in zip(w, keys))
    return out


# --------------------------------------------------------------------------------------------- layouts


@st.composite
def segment_rows(draw, batch: int, length: int, max_id: int = 3):
    """[batch, length] int32 segment ids: each row padded left/right, packed, all pads, or runs of any ids."""
    rows = []
    for _ in range(batch):
        kind = draw(st.sampled_from(["left", "right", "packed", "pad", "runs"]))
        if kind == "pad":
            rows.append([0] * length)
            continue
        if kind in ("left", "right"):
            n = draw(st.integers(0, length))
            sid = draw(st.integers(1, max_id))
            rows.append([0] * (length - n) + [sid] * n if kind == "left" else [sid] * n + [0] * (length - n))
            continue
        pieces = draw(st.lists(st.tuples(st.integers(0 if kind == "runs" else 1, max_id), st.integers(1, length)),
                               min_size=1, max_size=5))
        if kind == "packed":  # increasing ids, then right padding (a packer's row)
            pieces = [(i + 1, n) for i, (_, n) in enumerate(pieces)] + [(0, length)]
        row = [sid for sid, n in pieces for _ in range(n)]
        rows.append((row + [row[-1]] * length)[:length])
    return np.array(rows, np.int32)


def _qkv(seed, b, t, s, hq, hkv, d, dtype=jnp.float32):
    """q, k, v and an output cotangent, drawn with NumPy (eager jax.random would compile per shape)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                 for shape in ((b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d), (b, t, hq, d)))


@functools.lru_cache(maxsize=None)
def _value_and_grads(implementation: str, block_q: int = 8, block_kv: int = 16, mesh=None):
    """jit((q, k, v, ct, q_seg, kv_seg, q_slots, kv_slots[, kv_len]) -> (out, (dq, dk, dv))), cached per config."""

    def run(q, k, v, ct, q_seg, kv_seg, q_slots, kv_slots, kv_len=None):
        def loss(q, k, v):
            out = attention(q, k, v, q_seg, kv_seg, q_slots, kv_slots, implementation=implementation,
                            block_q=block_q, block_kv=block_kv, kv_valid_len=kv_len, mesh=mesh)
            return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32)), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    return jax.jit(run)


def _assert_same(got, want, tol=TOL):
    out_g, grads_g = got
    out_w, grads_w = want
    np.testing.assert_allclose(out_g, out_w, **tol)
    for name, a, b in zip("qkv", grads_g, grads_w):
        np.testing.assert_allclose(a, b, err_msg=f"d{name}", **tol)


def _check_pads(q_seg, out, dq):
    """Pad query rows output exactly 0 and get exactly 0 gradient."""
    pads = np.asarray(q_seg) == 0
    assert np.all(np.asarray(out)[pads] == 0)
    assert np.all(np.asarray(dq)[pads] == 0)


# ------------------------------------------------------------------------------------------------ dense


@functools.lru_cache(maxsize=None)
def _forward(implementation: str, block_q: int = 8, block_kv: int = 16):
    return jax.jit(functools.partial(attention, implementation=implementation, block_q=block_q, block_kv=block_kv))


@settings(max_examples=10)
@given(data=st.data())
def test_dense_matches_numpy_oracle(data):
    b, t, s, hq, hkv, d = 2, 6, 9, 4, 2, 8
    q_seg = data.draw(segment_rows(b, t))
    kv_seg = data.draw(segment_rows(b, s))
    q_slots = np.array([data.draw(st.lists(st.integers(0, 10), min_size=t, max_size=t)) for _ in range(b)],
                       np.int32)
    kv_slots = np.array(data.draw(st.lists(st.integers(0, 10), min_size=s, max_size=s)), np.int32)
    q, k, v, _ = _qkv(data.draw(st.integers(0, 100)), b, t, s, hq, hkv, d)
    got = _forward("dense")(q, k, v, q_seg, kv_seg, q_slots, kv_slots)
    np.testing.assert_allclose(got, np_attention(q, k, v, q_seg, kv_seg, q_slots, kv_slots), **TOL)


def test_dense_one_query_decode_step_matches_numpy_oracle():
    """T = 1 (a decode step) takes the transpose-free path: the same attention, pads and kv_valid_len included."""
    b, s, hq, hkv, d = 3, 11, 4, 2, 8
    q_seg = np.array([[1], [1], [0]], np.int32)
    kv_seg = np.array([[1] * 6 + [0] * 5, [1] * 11, [1] * 11], np.int32)
    q_slots = np.array([[5], [9], [3]], np.int32)
    kv_slots = np.arange(s, dtype=np.int32)
    q, k, v, _ = _qkv(3, b, 1, s, hq, hkv, d)
    for kv_len in (None, 8):
        extra = {} if kv_len is None else {"kv_valid_len": jnp.int32(kv_len)}
        got = _forward("dense")(q, k, v, q_seg, kv_seg, q_slots, kv_slots, **extra)
        np.testing.assert_allclose(got, np_attention(q, k, v, q_seg, kv_seg, q_slots, kv_slots, kv_len=kv_len),
                                   **TOL)
        assert np.all(np.asarray(got)[2] == 0)


def test_dense_kv_valid_len_and_pad_rows_match_oracle():
    b, t, s, hq, hkv, d = 2, 3, 7, 2, 1, 4
    q_seg = np.array([[1, 1, 0], [0, 0, 0]], np.int32)
    kv_seg = np.array([[1, 1, 1, 1, 1, 0, 1], [1] * 7], np.int32)
    q_slots = np.array([[4, 5, 6], [4, 5, 6]], np.int32)
    kv_slots = np.arange(s, dtype=np.int32)
    q, k, v, _ = _qkv(1, b, t, s, hq, hkv, d)
    got = _forward("dense")(q, k, v, q_seg, kv_seg, q_slots, kv_slots, kv_valid_len=jnp.int32(3))
    np.testing.assert_allclose(got, np_attention(q, k, v, q_seg, kv_seg, q_slots, kv_slots, kv_len=3), **TOL)
    assert np.all(np.asarray(got)[1] == 0) and np.all(np.asarray(got)[0, 2] == 0)


# ---------------------------------------------------------------------------------------------- chunked


@settings(max_examples=12)
@given(data=st.data())
def test_chunked_equals_dense_self_attention(data):
    """Training layout: T == S, slots = arange; 23 tokens over tiles of 8 x 16 (neither divides), GQA 2."""
    b, t, hq, hkv, d = 3, 23, 4, 2, 8
    seg = data.draw(segment_rows(b, t))
    slots = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    q, k, v, ct = _qkv(data.draw(st.integers(0, 100)), b, t, t, hq, hkv, d)
    args = (q, k, v, ct, seg, seg, slots, slots[0])
    got = _value_and_grads("chunked")(*args)
    _assert_same(got, _value_and_grads("dense")(*args))
    _check_pads(seg, got[0], got[1][0])
    np.testing.assert_allclose(got[0], np_attention(q, k, v, seg, seg, slots, slots[0]), **TOL)


@settings(max_examples=12)
@given(data=st.data())
def test_chunked_equals_dense_kv_cache_offsets(data):
    """Prefill/decode layout: T=5 queries at slots start..start+4 of an S=29 cache, MQA (3 query heads, 1 kv)."""
    b, t, s, hq, hkv, d = 2, 5, 29, 3, 1, 8
    q_seg = data.draw(segment_rows(b, t, max_id=2))
    prefix = data.draw(segment_rows(b, s, max_id=2))
    starts = [data.draw(st.integers(0, s - t)) for _ in range(b)]
    kv_seg = np.zeros((b, s), np.int32)
    q_slots = np.zeros((b, t), np.int32)
    for r, start in enumerate(starts):
        kv_seg[r, :start] = prefix[r, :start]
        kv_seg[r, start:start + t] = q_seg[r]
        q_slots[r] = start + np.arange(t)
    per_row = data.draw(st.booleans())
    kv_slots = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)) if per_row else np.arange(s, dtype=np.int32)
    q, k, v, ct = _qkv(data.draw(st.integers(0, 100)), b, t, s, hq, hkv, d)
    # kv_valid_len = S changes nothing; passing it shares one compile with the kv_valid_len test below.
    args = (q, k, v, ct, q_seg, kv_seg, q_slots, kv_slots, jnp.int32(s))
    got = _value_and_grads("chunked", 4, 8)(*args)
    _assert_same(got, _value_and_grads("dense", 4, 8)(*args))
    _check_pads(q_seg, got[0], got[1][0])


@settings(max_examples=12)
@given(data=st.data())
def test_chunked_equals_dense_arbitrary_slots(data):
    """Unordered slots and ids: tile skipping must judge from min/max, never assume order. (The shapes of the
    self-attention test, so that both share one compile.)"""
    b, t, s, hq, hkv, d = 3, 23, 23, 4, 2, 8
    q_seg = data.draw(segment_rows(b, t, max_id=2))
    kv_seg = data.draw(segment_rows(b, s, max_id=2))
    # A narrow slot range makes ties between a tile's smallest key slot and largest query slot common.
    q_slots = np.array(data.draw(st.lists(st.lists(st.integers(-2, 6), min_size=t, max_size=t), min_size=b,
                                          max_size=b)), np.int32)
    kv_slots = np.array(data.draw(st.lists(st.lists(st.integers(-2, 6), min_size=s, max_size=s), min_size=b,
                                           max_size=b)), np.int32)
    q, k, v, ct = _qkv(data.draw(st.integers(0, 100)), b, t, s, hq, hkv, d)
    args = (q, k, v, ct, q_seg, kv_seg, q_slots, kv_slots)
    got = _value_and_grads("chunked")(*args)
    _assert_same(got, _value_and_grads("dense")(*args))
    _check_pads(q_seg, got[0], got[1][0])


@settings(max_examples=10)
@given(data=st.data())
def test_kv_valid_len_equals_dense_on_the_filled_prefix(data):
    """Decode: keys at index >= kv_valid_len (traced: one compile) are ignored whatever they hold."""
    b, t, s, hq, hkv, d = 2, 5, 29, 3, 1, 8  # the KV-cache test's shapes: one compile for both
    length = data.draw(st.integers(0, s))
    kv_seg = data.draw(segment_rows(b, s, max_id=2))
    q_seg = data.draw(segment_rows(b, t, max_id=2))
    q_slots = np.full((b, t), s, np.int32)  # after every slot: only kv_valid_len hides the garbage beyond it
    kv_slots = np.arange(s, dtype=np.int32)
    q, k, v, ct = _qkv(data.draw(st.integers(0, 100)), b, t, s, hq, hkv, d)
    args = (q, k, v, ct, q_seg, kv_seg, q_slots, kv_slots, jnp.int32(length))
    got = _value_and_grads("chunked", 4, 8)(*args)
    want = np_attention(q, k[:, :length], v[:, :length], q_seg, kv_seg[:, :length], q_slots, kv_slots[:length])
    np.testing.assert_allclose(got[0], want, **TOL)
    _assert_same(got, _value_and_grads("dense", 4, 8)(*args))
    _check_pads(q_seg, got[0], got[1][0])
    assert np.all(np.asarray(got[1][1])[:, length:] == 0) and np.all(np.asarray(got[1][2])[:, length:] == 0)


def test_chunked_bf16_close_to_dense_and_keeps_dtype():
    b, t, hq, hkv, d = 2, 40, 4, 2, 16
    seg = np.array([[0] * 7 + [1] * 33, [1] * 20 + [2] * 15 + [0] * 5], np.int32)
    slots = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    q, k, v, _ = _qkv(3, b, t, t, hq, hkv, d, jnp.bfloat16)
    got = _forward("chunked", 16, 16)(q, k, v, seg, seg, slots, slots[0])
    want = _forward("dense")(q, k, v, seg, seg, slots, slots[0])
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)


_jit_tile_flags = jax.jit(attn_lib._tile_flags, static_argnums=(5, 6))


@settings(max_examples=60)
@given(data=st.data())
def test_tile_flags_never_skip_a_visible_pair(data):
    """Brute force: every (query tile, key tile) holding a visible pair is flagged, ties and kv_len included."""
    b, t, s, bq, bk = 2, 12, 12, 4, 3
    q_seg, kv_seg = data.draw(segment_rows(b, t, max_id=2)), data.draw(segment_rows(b, s, max_id=2))
    q_slots = np.array(data.draw(st.lists(st.lists(st.integers(0, 4), min_size=t, max_size=t), min_size=b,
                                          max_size=b)), np.int32)
    kv_slots = np.array(data.draw(st.lists(st.lists(st.integers(0, 4), min_size=s, max_size=s), min_size=b,
                                           max_size=b)), np.int32)
    kv_len = data.draw(st.integers(0, s))
    flags = np.asarray(_jit_tile_flags(q_seg, q_slots, kv_seg, kv_slots, kv_len, bq, bk))
    vis = ((q_seg != 0)[:, :, None] & (q_seg[:, :, None] == kv_seg[:, None, :])
           & (kv_slots[:, None, :] <= q_slots[:, :, None]) & (np.arange(s) < kv_len)[None, None, :])
    needed = vis.reshape(b, t // bq, bq, s // bk, bk).any(axis=(0, 2, 4))
    assert np.all(flags | ~needed)


def test_chunked_on_sharded_inputs_equals_dense():
    """Batch over fsdp, heads over tp (4 fake devices): XLA partitions the tile loops; values and grads hold."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tp"))
    b, t, hq, hkv, d = 4, 23, 4, 2, 8
    seg = np.array([[0] * 7 + [1] * 16, [1] * 15 + [2] * 8, [1] * 23, [0] * 23], np.int32)
    slots = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    q, k, v, ct = _qkv(7, b, t, t, hq, hkv, d)
    heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None, "tp", None))
    sharded = [jax.device_put(x, heads) for x in (q, k, v, ct)]
    got = _value_and_grads("chunked")(*sharded, seg, seg, slots, slots[0])
    assert got[1][0].sharding.is_equivalent_to(heads, 4)  # dq stays sharded like q: nothing was replicated
    _assert_same(got, _value_and_grads("dense")(q, k, v, ct, seg, seg, slots, slots[0]))


def test_causal_tiles_skip_the_upper_triangle():
    """Plain causal self-attention visits exactly the tiles on or below the diagonal (about half)."""
    t, block = 64, 16
    seg = np.ones((2, t), np.int32)
    slots = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t))
    tile_flags = _jit_tile_flags
    flags = tile_flags(seg, slots, seg, slots, t, block, block)
    np.testing.assert_array_equal(flags, np.tril(np.ones((t // block, t // block), bool)))
    # kv_valid_len cuts the columns at or beyond it; a left-padded block of pads is never visited.
    flags = tile_flags(seg, slots, seg, slots, 20, block, block)
    assert not np.any(np.asarray(flags)[:, 2:]) and np.all(np.asarray(flags)[1:, :2])
    left = np.array([[0] * 16 + [1] * 48] * 2, np.int32)
    flags = tile_flags(left, slots, left, slots, t, block, block)
    assert not np.any(np.asarray(flags)[0]) and not np.any(np.asarray(flags)[:, 0])


def test_chunked_memory_is_linear_in_length():
    """Compile only: forward + backward temp memory of chunked stays below one [T, S] float32 score matrix."""
    b, t, hq, hkv, d = 1, 2048, 2, 1, 16
    spec = jax.ShapeDtypeStruct

    def temp_bytes(implementation):
        def loss(q, k, v, seg):
            slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            out = attention(q, k, v, seg, seg, slots, slots[0], implementation=implementation, block_q=128,
                            block_kv=128)
            return jnp.sum(out)

        args = (spec((b, t, hq, d), jnp.float32), spec((b, t, hkv, d), jnp.float32),
                spec((b, t, hkv, d), jnp.float32), spec((b, t), jnp.int32))
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    one_score_matrix = t * t * 4
    assert temp_bytes("dense") > one_score_matrix  # the measurement sees O(T x S) when it is there
    assert temp_bytes("chunked") < one_score_matrix / 4


# ----------------------------------------------------------------------------------------------- splash


def _self_attention_case(data, b, t, hq, hkv, d):
    seg = data.draw(segment_rows(b, t))
    slots = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    q, k, v, ct = _qkv(data.draw(st.integers(0, 100)), b, t, t, hq, hkv, d)
    return q, k, v, ct, seg, seg, slots, slots[0]


@settings(max_examples=2)
@given(data=st.data())
def test_splash_interpret_equals_dense(data):
    """Pallas interpret mode on CPU; T=100 pads to one 128 tile, GQA 2."""
    args = _self_attention_case(data, 2, 100, 4, 2, 16)
    seg, slots = args[4], args[6]
    assert bool(jax.jit(attn_lib._self_attention_layout)(seg, seg, slots, slots))  # splash ran, not the fallback
    got = _value_and_grads("splash", 128, 128)(*args)
    _assert_same(got, _value_and_grads("dense")(*args))
    _check_pads(args[4], got[0], got[1][0])


def test_splash_falls_back_on_layouts_it_cannot_express():
    """T == S but the queries are a KV-cache block (their slots and ids differ from the keys'): splash's
    causal-by-index mask would be wrong, so the device check sends the call to chunked."""
    b, t, hq, hkv, d = 2, 100, 4, 2, 16  # the shapes of the test above: the same compiled function
    q_seg = np.ones((b, t), np.int32)
    kv_seg = np.array([[1] * 60 + [0] * 40, [1] * 100], np.int32)
    q_slots = np.broadcast_to(np.arange(t, dtype=np.int32) + 3, (b, t))
    kv_slots = np.arange(t, dtype=np.int32)
    q, k, v, ct = _qkv(6, b, t, t, hq, hkv, d)
    args = (q, k, v, ct, q_seg, kv_seg, q_slots, kv_slots)
    _assert_same(_value_and_grads("splash", 128, 128)(*args), _value_and_grads("dense")(*args))


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_splash_under_shard_map_equals_dense(axis_type):
    """Batch over fsdp=2, heads over tp=2 (4 fake CPU devices); meshes as `make_agent_meshes` builds them (Auto
    axes) and as `jax.make_mesh` does (Explicit axes)."""
    if axis_type == "auto":
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tp"))
    else:
        mesh = jax.make_mesh((2, 2), ("fsdp", "tp"), devices=jax.devices()[:4])
    b, t, hq, hkv, d = 2, 128, 4, 2, 16
    seg = np.array([[0] * 30 + [1] * 98, [1] * 50 + [2] * 60 + [0] * 18], np.int32)
    slots = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    q, k, v, ct = _qkv(5, b, t, t, hq, hkv, d)
    args = (q, k, v, ct, seg, seg, slots, slots[0])
    got = _value_and_grads("splash", 128, 128, mesh=mesh)(*args)
    _assert_same(got, _value_and_grads("dense")(*args))


# ------------------------------------------------------------------------------- cuDNN layout translation


def _runs_mask(seg, offsets, lengths):
    """[B, T, T]: causal within each packed run, as cuDNN's PADDING_CAUSAL packed layout computes."""
    b, t = seg.shape
    run_of = np.full((b, t), -1)
    for r in range(b):
        for i, (o, n) in enumerate(zip(offsets[r], lengths[r])):
            if o >= 0:
                run_of[r, o:o + n] = i
    assert np.all(run_of >= 0)  # every token (pads too) is in some run: cuDNN computes every row
    same = run_of[:, :, None] == run_of[:, None, :]
    return same & np.tril(np.ones((t, t), bool))[None]


_jit_visible = jax.jit(attn_lib._visible)
_jit_runs = jax.jit(functools.partial(attn_lib._runs, max_runs=4))
_jit_single_prefix_rows = jax.jit(attn_lib._single_prefix_rows)


@settings(max_examples=40)
@given(seg=segment_rows(3, 12))
def test_cudnn_layout_translation_means_the_same_mask(seg):
    """Whenever the device check says a cuDNN layout applies, its mask equals ours on every real query."""
    t = seg.shape[1]
    slots = np.broadcast_to(np.arange(t, dtype=np.int32), seg.shape)
    ours = np.asarray(_jit_visible(seg, slots, seg, slots))
    real = (seg != 0)[:, :, None]
    ok, offsets, lengths = (np.asarray(x) for x in _jit_runs(seg))
    assert offsets.shape == (3, 5) and lengths.shape == (3, 4) and np.all(offsets[:, -1] == -1)
    if ok:
        np.testing.assert_array_equal(_runs_mask(seg, offsets[:, :-1], lengths) & real, ours)
    ids_sorted = all(np.all(np.diff([s for i, s in enumerate(row) if s and (i == 0 or row[i - 1] != s)]) > 0)
                     for row in seg)
    n_runs = max(1 + np.count_nonzero(np.diff(row)) for row in seg)
    assert bool(ok) == (ids_sorted and n_runs <= 4)
    if bool(_jit_single_prefix_rows(seg)):
        causal = np.tril(np.ones((t, t), bool))[None]
        np.testing.assert_array_equal(causal & real, ours)


# ------------------------------------------------------------------------------------- selection, errors


def test_select_implementation_rules():
    q, k = (1, 64, 4, 128), (1, 64, 2, 128)
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert select_implementation("auto", q, k, f32, block_kv=32, backend="cpu") == "chunked"
    assert select_implementation("auto", q, k, f32, block_kv=64, backend="cpu") == "chunked"  # training: any T
    assert select_implementation("auto", q, k, f32, block_kv=64, backend="cpu", kv_valid_len_given=True) == "dense"
    assert select_implementation("auto", (1, 1, 4, 128), k, f32, block_kv=64, backend="cpu") == "dense"  # decode
    assert select_implementation("auto", q, k, bf16, backend="tpu") == "splash"
    assert select_implementation("auto", q, k, bf16, block_kv=32, backend="tpu", kv_valid_len_given=True) == "chunked"
    assert select_implementation("auto", (1, 1, 4, 128), k, bf16, block_kv=32, backend="tpu") == "chunked"
    assert select_implementation("splash", q, k, f32, backend="cpu") == "splash"
    assert select_implementation("splash", (1, 1, 4, 128), k, f32, backend="cpu") == "chunked"
    assert select_implementation("dense", q, k, f32, backend="tpu") == "dense"
    assert select_implementation("auto", q, k, bf16, backend="gpu") == "cudnn"
    assert select_implementation("auto", q, k, f32, block_kv=32, backend="gpu") == "chunked"  # cuDNN: bf16/fp16
    assert select_implementation("cudnn", q, k, f32, backend="gpu") == "chunked"
    assert select_implementation("auto", q, k, bf16, block_kv=32, backend="gpu", kv_valid_len_given=True) == "chunked"
    with pytest.raises(ValueError, match="head_dim a multiple of 8"):
        select_implementation("cudnn", (1, 64, 4, 12), (1, 64, 2, 12), bf16, backend="gpu")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        select_implementation("cudnn", q, k, bf16, backend="cpu")
    mesh = jax.make_mesh((2, 2), ("fsdp", "tp"), devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="batch 1 is not a multiple"):
        select_implementation("splash", q, k, bf16, mesh=mesh)
    assert select_implementation("auto", q, k, bf16, block_kv=32, mesh=mesh) == "chunked"  # CPU mesh


def test_invalid_arguments_are_named():
    q = jnp.zeros((1, 4, 3, 8))
    k = jnp.zeros((1, 4, 2, 8))
    seg = jnp.ones((1, 4), jnp.int32)
    slots = jnp.arange(4, dtype=jnp.int32)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k, k, seg, seg, slots[None], slots)
    q = jnp.zeros((1, 4, 4, 8))
    with pytest.raises(ValueError, match="implementation='flash' is unknown"):
        attention(q, k, k, seg, seg, slots[None], slots, implementation="flash")
    with pytest.raises(ValueError, match="kv_segment_ids must have shape"):
        attention(q, k, k, seg, seg[:, :3], slots[None], slots)
    with pytest.raises(ValueError, match="kv_slots must have shape"):
        attention(q, k, k, seg, seg, slots[None], slots[:3])
    with pytest.raises(ValueError, match="block_q must be a positive integer"):
        attention(q, k, k, seg, seg, slots[None], slots, block_q=0)
    with pytest.raises(ValueError, match="integer array"):
        attention(q, k, k, seg.astype(jnp.float32), seg, slots[None], slots)
    assert set(IMPLEMENTATIONS) == {"auto", "dense", "chunked", "cudnn", "splash"}
