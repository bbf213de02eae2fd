"""Grouped-query attention with segment/slot masking: one meaning, several implementations.

    out[b, t, h] = sum_s softmax_s(q[b,t,h] . k[b,s,h//G] * D**-0.5 | visible) v[b,s,h//G]

    visible(b, t, s) = q_seg[b,t] != 0  and  q_seg[b,t] == kv_seg[b,s]  and  kv_slots[b,s] <= q_slots[b,t]

Segment ids are int32, 0 = pad, equal positive ids = one sequence (a packed row holds several); slots order
tokens causally (a KV cache: queries at slots start..start+T-1 attend cache slots 0..S-1). A query with no
visible key (a pad) outputs exactly 0 and passes no gradient. This is `Transformer`'s historical dense math
(`attention_mask_from_segments` + softmax), moved here so that every implementation is checked against it.

Implementations (`attention(..., implementation=...)`, `IMPLEMENTATIONS`):

- `dense`: the reference. Builds float32 scores [B, Hkv, G, T, S] and a [B, T, S] mask: O(T x S) memory.
- `chunked`: blockwise attention with an online softmax in pure JAX (FlashAttention-2 style), every backend.
  Peak extra memory is a few [B, H, block_q, block_kv] tiles: the forward keeps only the output and the
  per-query logsumexp, the backward (a `jax.custom_vjp`) recomputes each tile. Tiles that no (query, key)
  pair of the batch can see, judged from per-tile min/max of slots and segment ids, are skipped (loop bounds
  plus a `lax.cond`), so causal self-attention visits about half of them. Key tiles are sliced from k/v in
  place (never copied or padded). With `kv_valid_len` (a traced int32 scalar) keys at index >= kv_valid_len
  are masked and their tiles never visited: decode cost follows the filled length of the cache, not its size.
  With `kv_layer` (forward only) k and v are a KV cache's stacked arrays [L, B, S, Hkv, D] and the tiles of
  layer `kv_layer` are read straight from them, so a cached step never copies a whole layer of the cache.
- `cudnn`: cuDNN flash attention (GPU, bf16/fp16) through jax's fused-attention custom call. cuDNN knows
  causal-by-index masks, per-sequence lengths and (Hopper+) packed segments given as offsets, not segment ids
  and slots, so a layout is translated when it is expressible, checked on the device each call:
    * self-attention only (T == S, q_seg == kv_seg, q_slots == kv_slots and strictly increasing per row),
      where causal-by-index equals causal-by-slot;
    * a row whose real tokens are one prefix of one id (right padding or none): cuDNN's plain causal mask;
    * otherwise (Hopper or newer) every maximal run of equal ids, pads included, becomes one packed segment
      (`q_offsets`/`q_seqlen`, at most `CUDNN_MAX_RUNS` runs per row); a positive id must form a single run
      (ids increasing along the row, the packer's convention) or runs would split a sequence.
  Pad queries then attend only their own pad run; their outputs are zeroed and their cotangents are zero, so
  they change nothing. Any other layout (KV-cache offsets, T != S, float32, unsorted or too many segments,
  `kv_valid_len`) runs `chunked` instead: statically when the shapes say so, else through a `lax.switch` on the
  device check, so the result always means the same thing. UNTESTED until `bench/gpu_attention_check.py` has
  run on a GPU.
- `splash`: Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) with segment ids
  and a causal mask, under `shard_map` over `mesh` (batch over "fsdp", heads over "tp"). Splash's mask is
  causal by index and equal-segment-id, so it too needs the self-attention layout above (checked on device,
  else `chunked`); pad queries see their own pads and are zeroed afterwards. Off TPU it runs in Pallas
  interpret mode (how the tests check it on CPU; slow, for testing only).
- `auto`: TPU -> splash when T == S and the mesh divides batch and heads; GPU -> cudnn for bf16/fp16 with a
  supported head_dim and T == S; CPU -> chunked for self-attention (T == S, no cache) at any length: its
  forward + custom backward beat dense's autodiff even in one tile (bench/warm_start.py: SFT updates 1.2x
  faster at rows of 112 and 288 tokens, 1.4x at 480); otherwise chunked when S > block_kv, else dense.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

IMPLEMENTATIONS = ("auto", "dense", "chunked", "cudnn", "splash")

# Packed cuDNN attention takes a static number of segments (runs of equal ids, pads included) per row; rows
# with more runs than this use `chunked`. Every run costs cuDNN an (early-exiting) sequence slot.
CUDNN_MAX_RUNS = 32

_F32 = jnp.float32
_SPLASH_LANES = 128  # splash tiles are multiples of the TPU lane width


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


# ------------------------------------------------------------------------------------------- validation


def _validate(q, k, v, q_segment_ids, kv_segment_ids, q_slots, kv_slots, implementation, block_q, block_kv,
              kv_valid_len) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention: implementation={implementation!r} is unknown; use one of "
                         f"{', '.join(IMPLEMENTATIONS)}")
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or block <= 0:
            raise ValueError(f"attention: {name} must be a positive integer, got {block!r}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: q [B, T, Hq, D], k and v [B, S, Hkv, D] must be rank 4; got q "
                         f"{q.shape}, k {k.shape}, v {v.shape}")
    b, t, hq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape [B, S, Hkv, D]; got k {k.shape}, v "
                         f"{v.shape}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: q {q.shape} and k {k.shape} must agree on batch (dim 0) and head_dim "
                         "(dim 3)")
    s, hkv = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"attention: query heads ({hq}) must be a multiple of key/value heads ({hkv}) for "
                         "grouped-query attention")
    for name, x, shape in (("q_segment_ids", q_segment_ids, (b, t)), ("kv_segment_ids", kv_segment_ids, (b, s)),
                           ("q_slots", q_slots, (b, t))):
        if tuple(jnp.shape(x)) != shape:
            raise ValueError(f"attention: {name} must have shape {shape} ([B, T] for queries, [B, S] for "
                             f"keys); got {tuple(jnp.shape(x))}")
    if tuple(jnp.shape(kv_slots)) not in ((s,), (b, s)):
        raise ValueError(f"attention: kv_slots must have shape ({s},) or ({b}, {s}); got "
                         f"{tuple(jnp.shape(kv_slots))}")
    for name, x in (("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids), ("q_slots", q_slots),
                    ("kv_slots", kv_slots)):
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise ValueError(f"attention: {name} must be an integer array (int32), got {jnp.result_type(x)}")
    if kv_valid_len is not None and jnp.ndim(kv_valid_len) != 0:
        raise ValueError(f"attention: kv_valid_len must be a scalar, got shape {jnp.shape(kv_valid_len)}")


def _backend(mesh) -> str:
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def _gpu_compute_capability(mesh) -> tuple[int, ...]:
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    return tuple(int(x) for x in str(capability).split(".")) if capability else (0,)


def _splash_mesh_problem(mesh, batch: int, q_heads: int, kv_heads: int) -> str | None:
    """Why splash cannot shard these shapes over `mesh` (None when it can)."""
    if mesh is None:
        return None
    if "fsdp" not in mesh.axis_names or "tp" not in mesh.axis_names:
        return f"splash shards batch over 'fsdp' and heads over 'tp'; the mesh has axes {mesh.axis_names}"
    fsdp, tp = mesh.shape["fsdp"], mesh.shape["tp"]
    if batch % fsdp:
        return f"batch {batch} is not a multiple of the mesh's fsdp size {fsdp}"
    if q_heads % tp or kv_heads % tp:
        return f"query heads {q_heads} and kv heads {kv_heads} must be multiples of the mesh's tp size {tp}"
    return None


def _cudnn_head_dim_ok(head_dim: int, mesh) -> bool:
    limit = 256 if _gpu_compute_capability(mesh) >= (9, 0) else 128
    return head_dim % 8 == 0 and head_dim <= limit


def select_implementation(implementation: str, q_shape, k_shape, dtype, *, block_kv: int = 512,
                          kv_valid_len_given: bool = False, mesh=None, backend: str | None = None) -> str:
    """The concrete implementation `attention` runs for these static facts ("auto" resolved; deterministic).

    Static fall-backs of explicit requests happen here too: `cudnn` with float32, T != S or `kv_valid_len`
    runs `chunked`; `splash` with T != S or `kv_valid_len` runs `chunked`. Raises ValueError for `cudnn` off
    a CUDA GPU and for `splash` with a mesh that cannot shard batch and heads.
    """
    backend = backend or _backend(mesh)
    b, t, hq, d = q_shape
    s, hkv = k_shape[1], k_shape[2]
    fallback = "chunked" if s > block_kv else "dense"
    self_attention = t == s and not kv_valid_len_given
    cudnn_ok = (self_attention and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
                and backend == "gpu" and _cudnn_head_dim_ok(d, mesh))
    if implementation == "auto":
        if backend == "tpu" and self_attention and _splash_mesh_problem(mesh, b, hq, hkv) is None:
            return "splash"
        if backend == "gpu" and cudnn_ok:
            return "cudnn"
        if backend == "cpu" and self_attention:
            return "chunked"
        return fallback
    if implementation == "cudnn":
        if backend != "gpu":
            raise ValueError(f"attention: implementation='cudnn' needs a CUDA GPU; this backend is {backend!r} "
                             "(use 'auto' or 'chunked')")
        if not _cudnn_head_dim_ok(d, mesh):
            raise ValueError(f"attention: cuDNN flash attention needs head_dim a multiple of 8 and <= 128 "
                             f"(256 on Hopper+); got {d}")
        return "cudnn" if cudnn_ok else "chunked"
    if implementation == "splash":
        problem = _splash_mesh_problem(mesh, b, hq, hkv)
        if problem:
            raise ValueError(f"attention: implementation='splash': {problem}")
        return "splash" if self_attention else "chunked"
    return implementation


# ------------------------------------------------------------------------------------------------ dense


def _visible(q_seg, q_slots, kv_seg, kv_slots, kv_index=None, kv_len=None) -> Array:
    """[..., Tq] x [..., Sk] -> bool [..., Tq, Sk]: the mask of the module docstring (+ index < kv_len)."""
    vis = ((q_seg != 0)[..., :, None] & (q_seg[..., :, None] == kv_seg[..., None, :])
           & (kv_slots[..., None, :] <= q_slots[..., :, None]))
    if kv_len is not None:
        vis = vis & (kv_index < kv_len)[..., None, :]
    return vis


def _dense(q, k, v, q_seg, kv_seg, q_slots, kv_slots, kv_valid_len) -> Array:
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    kv_len = None if kv_valid_len is None else jnp.asarray(kv_valid_len, jnp.int32)
    mask = _visible(q_seg, q_slots, kv_seg, kv_slots, jnp.arange(s, dtype=jnp.int32), kv_len)
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    if t == 1:  # a decode step: see _one_query_scores
        scores = _one_query_scores(qg[:, 0], k)[:, :, :, None, :] * (d ** -0.5)
    else:
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=_F32) * (d ** -0.5)
    m = mask[:, None, None, :, :]
    # A finite fill keeps a fully masked row (a pad query) finite; zeroing its weights afterwards makes the
    # pad's output exactly 0, so nothing from it can leak anywhere.
    scores = jnp.where(m, scores, jnp.finfo(_F32).min)
    weights = jnp.where(m, jax.nn.softmax(scores, axis=-1), 0.0).astype(v.dtype)
    if t == 1:
        out = _one_query_values(weights[:, :, :, 0, :], v)[:, None]
    else:
        out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
    return out.reshape(b, t, hq, d).astype(q.dtype)


# One query per row (a decode step) against keys/values in the cache's [B, S, Hkv, D] layout: as an einsum, the
# CPU backend first transposes the whole [B, S, Hkv, D] layer into [B, Hkv, S, D] / [B, Hkv, D, S] to batch the
# matmul over (B, Hkv), which costs more than the attention itself (measured: 24 of 40 ms per decode step of a
# 0.7M-parameter model with a 1.4k cache). A broadcast product reduced over D (over S for the values) reads the
# layer once, in place; products are accumulated in float32 as the einsum's are.
def _one_query_scores(q, k) -> Array:
    """q [B, Hkv, G, D] . k [B, S, Hkv, D] -> float32 [B, Hkv, G, S]."""
    prod = k[:, :, :, None, :].astype(_F32) * q[:, None].astype(_F32)
    return jnp.transpose(jnp.sum(prod, axis=-1), (0, 2, 3, 1))


def _one_query_values(weights, v) -> Array:
    """weights [B, Hkv, G, S] x v [B, S, Hkv, D] -> [B, Hkv, G, D] in v's dtype."""
    prod = jnp.transpose(weights, (0, 3, 1, 2))[..., None].astype(_F32) * v[:, :, :, None, :].astype(_F32)
    return jnp.sum(prod, axis=1).astype(v.dtype)


# ---------------------------------------------------------------------------------------------- chunked
# Queries are cut into tiles once: qb [nq, B, Hkv, G, bq, D], q_segb/q_slotb [nq, B, bq] (T is padded to
# nq * bq with pad ids). Keys and values are never copied or padded (a decode step must not touch the whole
# cache): key tile j is sliced in place from [B, S, Hkv, D] at start min(j * bk, S - bk), so the last tile of
# an S that bk does not divide overlaps its neighbour, and keys below j * bk are masked out of it.
# flags [nq, nk]: the tile may hold a visible pair.


def _block_stats(seg, slots, block: int):
    """seg/slots [B, nb*block] -> per block (min id, max id, min slot, max slot) over real tokens, [B, nb].

    Blocks without a real token get an empty id range (min > max), so they never look visible.
    """
    b, n = seg.shape
    seg = seg.reshape(b, n // block, block)
    slots = slots.reshape(b, n // block, block)
    real = seg != 0
    big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
    return (jnp.min(jnp.where(real, seg, big), -1), jnp.max(jnp.where(real, seg, small), -1),
            jnp.min(jnp.where(real, slots, big), -1), jnp.max(jnp.where(real, slots, small), -1))


def _tile_flags(q_seg, q_slots, kv_seg, kv_slots, kv_len, bq: int, bk: int) -> Array:
    """bool [nq, nk]: some (query, key) pair of the tile, in some row of the batch, may be visible.

    Conservative (a superset of the truly visible tiles): ids must overlap as ranges, the smallest key slot
    must not exceed the largest query slot, and the tile must start below kv_len.
    """
    qmin, qmax, _, qslot_max = _block_stats(q_seg, q_slots, bq)
    kmin, kmax, kslot_min, _ = _block_stats(kv_seg, kv_slots, bk)
    ids_overlap = (jnp.maximum(qmin[:, :, None], kmin[:, None, :]) <= jnp.minimum(qmax[:, :, None],
                                                                                  kmax[:, None, :]))
    causal = kslot_min[:, None, :] <= qslot_max[:, :, None]
    starts = jnp.arange(kv_seg.shape[1] // bk, dtype=jnp.int32) * bk
    return jnp.any(ids_overlap & causal, axis=0) & (starts < kv_len)[None, :]


def _true_range(row: Array) -> tuple[Array, Array]:
    """[n] bool -> (first true index, last true index + 1), or (0, 0) when none is true."""
    n = row.shape[0]
    any_true = jnp.any(row)
    lo = jnp.argmax(row).astype(jnp.int32)
    hi = (n - jnp.argmax(row[::-1])).astype(jnp.int32)
    return jnp.where(any_true, lo, 0), jnp.where(any_true, hi, 0)


def _tile_scores(q_i, k_j, scale: float) -> Array:
    """[B, K, G, bq, D] x [B, bk, K, D] -> float32 [B, K, G, bq, bk] (products in the input dtype)."""
    return jnp.einsum("bkgqd,bskd->bkgqs", q_i, k_j, preferred_element_type=_F32) * scale


def _read_words(x: Array, dtype) -> Array:
    """Keys/values as `dtype`: unsigned integer words (how a KV cache may store them) are bitcast, floats cast."""
    if jnp.issubdtype(x.dtype, jnp.unsignedinteger):
        return lax.bitcast_convert_type(x, dtype)
    return x.astype(dtype)


def _key_tile(j, bk: int, k, v, kv_seg, kv_slots, layer=None, dtype=None):
    """Key tile j, sliced in place: (start, k_j, v_j [B, bk, K, D], kv_seg_j, kv_slot_j [B, bk]).

    With `layer`, k and v are stacked [L, B, S, K, D] and the tile is read from that layer as `dtype`."""
    start = jnp.minimum(j * bk, kv_seg.shape[1] - bk)
    seg_j, slot_j = (lax.dynamic_slice_in_dim(x, start, bk, axis=1) for x in (kv_seg, kv_slots))
    if layer is None:
        k_j, v_j = (lax.dynamic_slice_in_dim(x, start, bk, axis=1) for x in (k, v))
    else:
        zero = jnp.zeros((), jnp.int32)
        k_j, v_j = (_read_words(lax.dynamic_slice(x, (layer, zero, start, zero, zero),
                                                  (1, x.shape[1], bk) + x.shape[3:])[0], dtype) for x in (k, v))
    return start, k_j, v_j, seg_j, slot_j


def _tile_mask(j, start, bk: int, q_seg_i, q_slot_i, kv_seg_j, kv_slot_j, kv_len) -> Array:
    """-> bool [B, 1, 1, bq, bk]: visible pairs of the tile whose keys belong to it (index >= j * bk)."""
    index = start + jnp.arange(bk, dtype=jnp.int32)
    vis = _visible(q_seg_i, q_slot_i, kv_seg_j, kv_slot_j, index[None, :], kv_len)
    return (vis & (index >= j * bk)[None, None, :])[:, None, None]


def _flash_forward(qb, k, v, q_segb, q_slotb, kv_seg, kv_slots, kv_len, flags, bk: int, layer=None):
    """-> (out [nq, B, K, G, bq, D] in q's dtype, lse [nq, B, K, G, bq] float32; 0 for rows that see nothing).
    With `layer`, k and v are stacked caches (`_key_tile`)."""
    scale = qb.shape[-1] ** -0.5

    def one_q_block(xs):
        i, q_i, q_seg_i, q_slot_i = xs
        row = flags[i]
        lo, hi = _true_range(row)

        def visit(j, carry):
            m, l, acc = carry
            start, k_j, v_j, kv_seg_j, kv_slot_j = _key_tile(j, bk, k, v, kv_seg, kv_slots, layer, qb.dtype)
            s = _tile_scores(q_i, k_j, scale)
            s = jnp.where(_tile_mask(j, start, bk, q_seg_i, q_slot_i, kv_seg_j, kv_slot_j, kv_len), s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            # Rows with nothing visible so far keep m = -inf; a 0 reference keeps exp() finite (it gives 0).
            m_ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_ref[..., None])
            alpha = jnp.exp(m - m_ref)
            l = alpha * l + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_j.dtype), v_j, preferred_element_type=_F32)
            return m_new, l, alpha[..., None] * acc + pv

        def step(j, carry):
            return lax.cond(row[j], functools.partial(visit, j), lambda c: c, carry)

        shape = q_i.shape[:-1]
        init = (jnp.full(shape, -jnp.inf, _F32), jnp.zeros(shape, _F32), jnp.zeros(q_i.shape, _F32))
        m, l, acc = lax.fori_loop(lo, hi, step, init)
        seen = l > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return out.astype(q_i.dtype), lse

    return lax.map(one_q_block, (jnp.arange(qb.shape[0], dtype=jnp.int32), qb, q_segb, q_slotb))


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _flash(qb, k, v, q_segb, q_slotb, kv_seg, kv_slots, kv_len, flags, bk: int):
    return _flash_forward(qb, k, v, q_segb, q_slotb, kv_seg, kv_slots, kv_len, flags, bk)[0]


def _flash_fwd(qb, k, v, q_segb, q_slotb, kv_seg, kv_slots, kv_len, flags, bk):
    out, lse = _flash_forward(qb, k, v, q_segb, q_slotb, kv_seg, kv_slots, kv_len, flags, bk)
    return out, (qb, k, v, q_segb, q_slotb, kv_seg, kv_slots, kv_len, flags, out, lse)


def _flash_bwd(bk, res, dout):
    """FlashAttention-2 backward: per key tile, walk the query tiles that may see it; recompute p from lse.

    dv_j = sum_i p_ij^T do_i;  ds_ij = p_ij * (do_i v_j^T - delta_i);  dq_i += ds_ij k_j;  dk_j += ds_ij^T q_i
    with delta_i = rowsum(do_i * o_i) and p_ij = exp(s_ij - lse_i) on visible pairs, 0 elsewhere.
    """
    qb, k, v, q_segb, q_slotb, kv_seg, kv_slots, kv_len, flags, out, lse = res
    scale = qb.shape[-1] ** -0.5
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1)  # [nq, B, K, G, bq]
    b, s, hkv, d = k.shape
    nk = flags.shape[1]

    def one_kv_block(dq_acc, j):
        start, k_j, v_j, kv_seg_j, kv_slot_j = _key_tile(j, bk, k, v, kv_seg, kv_slots)
        col = flags[:, j]
        lo, hi = _true_range(col)
        zeros_q = jnp.zeros(qb.shape[1:], _F32)
        zeros_kv = jnp.zeros(k_j.shape, _F32)

        def tile_grads(i):
            q_i, do_i = qb[i], dout[i]
            s = _tile_scores(q_i, k_j, scale)
            mask = _tile_mask(j, start, bk, q_segb[i], q_slotb[i], kv_seg_j, kv_slot_j, kv_len)
            p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)
            dv = jnp.einsum("bkgqs,bkgqd->bskd", p.astype(do_i.dtype), do_i, preferred_element_type=_F32)
            dp = jnp.einsum("bkgqd,bskd->bkgqs", do_i, v_j, preferred_element_type=_F32)
            ds = (p * (dp - delta[i][..., None]) * scale).astype(q_i.dtype)
            dq = jnp.einsum("bkgqs,bskd->bkgqd", ds, k_j, preferred_element_type=_F32)
            dk = jnp.einsum("bkgqs,bkgqd->bskd", ds, q_i, preferred_element_type=_F32)
            return dq, dk, dv

        def step(i, carry):
            dk, dv, dq_acc = carry
            dq_i, dk_i, dv_i = lax.cond(col[i], tile_grads, lambda i: (zeros_q, zeros_kv, zeros_kv), i)
            # The accumulator update stays outside the cond so that only tile-sized values cross it.
            dq_acc = lax.dynamic_update_index_in_dim(dq_acc, dq_acc[i] + dq_i, i, 0)
            return dk + dk_i, dv + dv_i, dq_acc

        dk, dv, dq_acc = lax.fori_loop(lo, hi, step, (zeros_kv, zeros_kv, dq_acc))
        return dq_acc, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dk_tiles, dv_tiles) = lax.scan(one_kv_block, jnp.zeros(qb.shape, _F32), jnp.arange(nk, dtype=jnp.int32))

    def untile(tiles):  # [nk, B, bk, K, D] -> [B, S, K, D]; the last tile's leading rows belong to tile nk-2
        full = tiles[:-1].transpose(1, 0, 2, 3, 4).reshape(b, (nk - 1) * bk, hkv, d)
        return jnp.concatenate([full, tiles[-1][:, nk * bk - s:]], axis=1)

    return (dq.astype(qb.dtype), untile(dk_tiles), untile(dv_tiles)) + (None,) * 6


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_axis1(x: Array, length: int, value=0) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad, constant_values=value)


def _chunked(q, k, v, q_seg, kv_seg, q_slots, kv_slots, kv_valid_len, block_q: int, block_kv: int,
             kv_layer=None) -> Array:
    b, t, hq, d = q.shape
    s, hkv = k.shape[-3], k.shape[-2]
    g = hq // hkv
    bq, bk = min(block_q, t), min(block_kv, s)
    nq, nk = _cdiv(t, bq), _cdiv(s, bk)
    kv_len = jnp.int32(s) if kv_valid_len is None else jnp.minimum(jnp.asarray(kv_valid_len, jnp.int32), s)
    # Padded queries get segment id 0: they see nothing and come out 0. Only the small id/slot arrays of the
    # keys are padded, for the per-tile statistics.
    q_seg, q_slots = _pad_axis1(q_seg, nq * bq), _pad_axis1(q_slots, nq * bq)
    flags = _tile_flags(q_seg, q_slots, _pad_axis1(kv_seg, nk * bk), _pad_axis1(kv_slots, nk * bk), kv_len, bq, bk)
    qb = _pad_axis1(q, nq * bq).reshape(b, nq, bq, hkv, g, d).transpose(1, 0, 3, 4, 2, 5)
    q_segb, q_slotb = (x.reshape(b, nq, bq).transpose(1, 0, 2) for x in (q_seg, q_slots))
    if kv_layer is None:
        out = _flash(qb, k, v, q_segb, q_slotb, kv_seg, kv_slots, kv_len, flags, bk)
    else:  # reading a stacked cache: forward only (nothing differentiates through a KV cache)
        out = _flash_forward(qb, k, v, q_segb, q_slotb, kv_seg, kv_slots, kv_len, flags, bk, kv_layer)[0]
    return out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, hq, d)[:, :t]


# ----------------------------------------------------------------------------- cuDNN and splash layouts


def _self_attention_layout(q_seg, kv_seg, q_slots, kv_slots) -> Array:
    """Scalar bool: index order is slot order and queries and keys are the same tokens (T == S).

    Then kv_slots[s] <= q_slots[t] iff s <= t, so a causal-by-index kernel means what our slots mean.
    """
    increasing = jnp.all(q_slots[:, 1:] > q_slots[:, :-1])
    return jnp.all(q_seg == kv_seg) & jnp.all(q_slots == kv_slots) & increasing


def _zero_pad_queries(out: Array, q_seg: Array) -> Array:
    return jnp.where((q_seg != 0)[:, :, None, None], out, jnp.zeros((), out.dtype))


def _single_prefix_rows(seg: Array) -> Array:
    """Scalar bool: in every row the real tokens are one prefix of one id ([a, a, ..., a, 0, ..., 0])."""
    real = seg != 0
    prev_real = jnp.concatenate([jnp.ones_like(real[:, :1]), real[:, :-1]], axis=1)
    return jnp.all(~real | ((seg == seg[:, :1]) & prev_real))


def _runs(seg: Array, max_runs: int) -> tuple[Array, Array, Array]:
    """Maximal runs of equal ids (pads included) -> (ok, offsets [B, M+1], lengths [B, M]) for cuDNN packing.

    Unused entries are -1, as jax's packed cuDNN layout wants. ok (scalar) says every row has <= M runs and
    every positive id forms a single run (ids increase along the row).
    """
    b, t = seg.shape
    start = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    seen_max = lax.cummax(seg, axis=1)
    prev_max = jnp.concatenate([jnp.full((b, 1), jnp.iinfo(jnp.int32).min, seg.dtype), seen_max[:, :-1]], axis=1)
    fresh = jnp.all(~(start & (seg != 0)) | (seg > prev_max))
    ok = fresh & jnp.all(jnp.sum(start, axis=1) <= max_runs)
    offsets = jax.vmap(lambda r: jnp.nonzero(r, size=max_runs, fill_value=-1)[0])(start).astype(jnp.int32)
    ends = jnp.concatenate([offsets[:, 1:], jnp.full((b, 1), -1, jnp.int32)], axis=1)
    ends = jnp.where(ends < 0, t, ends)
    lengths = jnp.where(offsets >= 0, ends - offsets, -1).astype(jnp.int32)
    return ok, jnp.concatenate([offsets, jnp.full((b, 1), -1, jnp.int32)], axis=1), lengths


def _cudnn(q, k, v, q_seg, kv_seg, q_slots, kv_slots, block_q: int, block_kv: int, mesh) -> Array:
    scale = q.shape[-1] ** -0.5
    same = _self_attention_layout(q_seg, kv_seg, q_slots, kv_slots)
    packed_supported = _gpu_compute_capability(mesh) >= (9, 0)  # cuDNN's packed layout needs Hopper

    def plain_causal(q, k, v, q_seg):
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
        return _zero_pad_queries(out, q_seg)

    def packed(q, k, v, q_seg):
        from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
        _, offsets, lengths = _runs(q_seg, CUDNN_MAX_RUNS)
        out = dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                    kv_offsets=offsets, scale=scale, mask_type=MaskType.PADDING_CAUSAL,
                                    qkv_layout="BTNH")
        return _zero_pad_queries(out, q_seg)

    def fallback(q, k, v, q_seg):
        return _chunked(q, k, v, q_seg, kv_seg, q_slots, kv_slots, None, block_q, block_kv)

    branches = [plain_causal, fallback]
    index = jnp.where(same & _single_prefix_rows(q_seg), 0, 1)
    if packed_supported:
        branches = [plain_causal, packed, fallback]
        index = jnp.where(index == 0, 0, jnp.where(same & _runs(q_seg, CUDNN_MAX_RUNS)[0], 1, 2))
    return lax.switch(index, branches, q, k, v, q_seg)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, length: int, bq: int, bkv: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    mask = sa.MultiHeadMask([sa.CausalMask((length, length)) for _ in range(heads)])
    blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                           block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)
    # Built eagerly (its mask tables are constants), so that the cached kernel holds no tracer of the first
    # trace that asked for it.
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha_single_device(mask, block_sizes=blocks, interpret=interpret)


def _splash(q, k, v, q_seg, kv_seg, q_slots, kv_slots, block_q: int, block_kv: int, mesh) -> Array:
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    b, t, hq, d = q.shape
    interpret = _backend(mesh) != "tpu"
    bq = min(_round_up(block_q, _SPLASH_LANES), _round_up(t, _SPLASH_LANES))
    bkv = min(_round_up(block_kv, _SPLASH_LANES), _round_up(t, _SPLASH_LANES))
    length = _round_up(t, math.lcm(bq, bkv))

    def run(q, k, v, q_seg, kv_seg):
        # Padding tokens get id -1 on both sides: they see only each other (never a real token) and are
        # sliced off. Real pads (id 0) see only pads and are zeroed by the caller.
        q_seg, kv_seg = _pad_axis1(q_seg, length, -1), _pad_axis1(kv_seg, length, -1)
        qt, kt, vt = (_pad_axis1(x, length).transpose(0, 2, 1, 3) for x in (q * jnp.asarray(d ** -0.5, q.dtype),
                                                                            k, v))
        kernel = _splash_kernel(qt.shape[1], length, bq, bkv, interpret)
        out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=sa.SegmentIds(q=qs, kv=ks)))(
            qt, kt, vt, q_seg, kv_seg)
        return out.transpose(0, 2, 1, 3)[:, :t]

    call = run
    if mesh is not None:
        heads = jax.sharding.PartitionSpec("fsdp", None, "tp", None)
        rows = jax.sharding.PartitionSpec("fsdp", None)
        specs = (heads, heads, heads, rows, rows)
        sharded = jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=heads, check_vma=False)
        call = sharded
        if jax.sharding.AxisType.Explicit in mesh.axis_types:
            # shard_map takes explicitly sharded inputs only in its own layout: move them there first.
            def call(*xs):
                return sharded(*(jax.reshard(x, jax.sharding.NamedSharding(mesh, p)) for x, p in zip(xs, specs)))

    def splash(q, k, v, q_seg):
        return _zero_pad_queries(call(q, k, v, q_seg, kv_seg).astype(q.dtype), q_seg)

    def fallback(q, k, v, q_seg):
        return _chunked(q, k, v, q_seg, kv_seg, q_slots, kv_slots, None, block_q, block_kv)

    same = _self_attention_layout(q_seg, kv_seg, q_slots, kv_slots)
    return lax.cond(same, splash, fallback, q, k, v, q_seg)


# ------------------------------------------------------------------------------------------------ entry


def attention(q, k, v, q_segment_ids, kv_segment_ids, q_slots, kv_slots, *, implementation: str = "auto",
              block_q: int = 512, block_kv: int = 512, kv_valid_len: Any = None, kv_layer: Any = None,
              mesh=None) -> Array:
    """Grouped-query attention under segment + slot masking (see the module docstring for the exact mask).

    Args:
      q: [B, T, Hq, D], already RoPE'd; k, v: [B, S, Hkv, D], Hq a multiple of Hkv (query head h uses kv head
        h // (Hq // Hkv)). Scaled by D**-0.5 here; softmax statistics in float32, products in the input dtype
        with float32 accumulation.
      q_segment_ids [B, T], kv_segment_ids [B, S]: int32, 0 = pad, equal positive ids = one sequence.
      q_slots [B, T], kv_slots [S] or [B, S]: int32 causal order (key s is visible iff kv_slot <= q_slot).
      implementation: one of IMPLEMENTATIONS (module docstring; `select_implementation` resolves it).
      block_q, block_kv: tile sizes of `chunked` (and `splash`, rounded up to multiples of 128).
      kv_valid_len: optional int32 scalar (may be traced): keys at index >= kv_valid_len are invisible and,
        with `chunked`, their tiles are never visited (forward and backward). Forces `chunked` or `dense`.
      kv_layer: optional int32 scalar (may be traced): k and v are a KV cache's stacked arrays [L, B, S, Hkv, D]
        (floats, or unsigned integer words of q.dtype's width, bitcast as read) and layer kv_layer is attended;
        `chunked` reads only the key tiles it visits. Forward only; forces `chunked` or `dense`.
      mesh: the Mesh (axes "fsdp", "tp") that `splash` shards over; also tells `auto` the backend.
    Returns:
      [B, T, Hq, D] in q.dtype; exactly 0 on query rows that see no key.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    k_view, v_view = k, v
    if kv_layer is not None:
        if k.ndim != 5 or k.shape != v.shape or jnp.ndim(kv_layer) != 0:
            raise ValueError(f"attention: with kv_layer (a scalar, got shape {jnp.shape(kv_layer)}), k and v are "
                             f"stacked caches [L, B, S, Hkv, D] of one shape; got k {k.shape}, v {v.shape}")
        if jnp.dtype(k.dtype).itemsize != jnp.dtype(q.dtype).itemsize and not jnp.issubdtype(k.dtype, jnp.floating):
            raise ValueError(f"attention: cache words {k.dtype} must have the width of q's dtype {q.dtype}")
        k_view = v_view = jax.ShapeDtypeStruct(k.shape[1:], q.dtype)
    _validate(q, k_view, v_view, q_segment_ids, kv_segment_ids, q_slots, kv_slots, implementation, block_q,
              block_kv, kv_valid_len)
    b, s = k_view.shape[:2]
    q_seg = jnp.asarray(q_segment_ids, jnp.int32)
    kv_seg = jnp.asarray(kv_segment_ids, jnp.int32)
    q_slots = jnp.asarray(q_slots, jnp.int32)
    kv_slots = jnp.broadcast_to(jnp.asarray(kv_slots, jnp.int32), (b, s))
    chosen = select_implementation(implementation, q.shape, k_view.shape, q.dtype, block_kv=block_kv,
                                   kv_valid_len_given=kv_valid_len is not None or kv_layer is not None, mesh=mesh)
    if chosen == "dense":
        if kv_layer is not None:
            k, v = (_read_words(lax.dynamic_index_in_dim(x, kv_layer, 0, keepdims=False), q.dtype) for x in (k, v))
        return _dense(q, k, v, q_seg, kv_seg, q_slots, kv_slots, kv_valid_len)
    if chosen == "chunked":
        return _chunked(q, k, v, q_seg, kv_seg, q_slots, kv_slots, kv_valid_len, int(block_q), int(block_kv),
                        kv_layer)
    if chosen == "cudnn":
        return _cudnn(q, k, v, q_seg, kv_seg, q_slots, kv_slots, int(block_q), int(block_kv), mesh)
    return _splash(q, k, v, q_seg, kv_seg, q_slots, kv_slots, int(block_q), int(block_kv), mesh)
