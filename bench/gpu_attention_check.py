"""cuDNN attention on a GPU: parity with dense (values and grads) and time/memory at long context.

    python bench/gpu_attention_check.py [--lengths 4096 8192 32768] [--repeats 3]

Needs one CUDA GPU (written for an H100/H200; about 1-2 minutes). It cannot run on this project's CPU
machines, so `implementation="cudnn"` stays UNTESTED until someone runs this and records its output.

1. Parity: `attention(..., implementation="cudnn")` against `dense` computed in float32 on the same
   (bf16-rounded) inputs, values and gradients w.r.t. q, k, v under a random cotangent, for layouts that take
   each route of the cuDNN path: right padding (cuDNN's plain causal mask), left padding and packed segments
   (packed cuDNN segments, Hopper+), a KV-cache offset layout (device check -> chunked), and float32 inputs
   (static fall-back to chunked). It also checks that pad query rows and their dq are exactly 0 and that
   nothing is NaN. Exit status 1 if any check fails.
2. Time and memory: forward + backward of Qwen3-0.6B-like heads (16 q heads, 8 kv heads, head_dim 128, bf16),
   batch 1, one left-padded sequence, for cudnn / chunked / dense at each length (dense only where its
   scores fit), plus cuDNN's plain-causal vs packed routes on the same unpadded data (the cost of
   `CUDNN_MAX_RUNS` packed segment slots). Memory is XLA's compiled temp size.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mgrpo_jax.models import attention as attn_lib
from mgrpo_jax.models.attention import attention

Q_HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128


def _route(q_seg, q_slots, kv_slots) -> str:
    """Which cuDNN route the device check takes for a self-attention call (mirrors `attn_lib._cudnn`)."""
    seg, q_slots = jnp.asarray(q_seg), jnp.asarray(q_slots)
    kv_slots = jnp.broadcast_to(jnp.asarray(kv_slots), q_slots.shape)
    same = bool(attn_lib._self_attention_layout(seg, seg, q_slots, kv_slots))
    if same and bool(attn_lib._single_prefix_rows(seg)):
        return "cudnn plain causal"
    hopper = attn_lib._gpu_compute_capability(None) >= (9, 0)
    if same and hopper and bool(attn_lib._runs(seg, attn_lib.CUDNN_MAX_RUNS)[0]):
        return "cudnn packed segments"
    return "chunked (device check)"


def _value_and_grads(implementation, q, k, v, ct, q_seg, q_slots, kv_slots):
    def loss(q, k, v):
        out = attention(q, k, v, q_seg, q_seg, q_slots, kv_slots, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def parity_cases(t: int):
    right = np.array([[1] * (t - 112) + [0] * 112, [1] * t], np.int32)
    left = np.array([[0] * 100 + [1] * (t - 100), [1] * t], np.int32)
    third = t // 3
    packed = np.array([[1] * third + [2] * third + [3] * (t - 2 * third - 72) + [0] * 72,
                       [0] * 20 + [1] * (t // 2 - 20) + [2] * (t - t // 2)], np.int32)
    arange = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t))
    return [
        ("right padding, bf16", right, arange, arange[0], jnp.bfloat16),
        ("left padding, bf16", left, arange, arange[0], jnp.bfloat16),
        ("packed segments, bf16", packed, arange, arange[0], jnp.bfloat16),
        ("KV-cache offset slots, bf16", left, arange + 5, arange[0], jnp.bfloat16),
        ("packed segments, float32", packed, arange, arange[0], jnp.float32),
    ]


def check_parity(t: int = 512) -> bool:
    rng = np.random.default_rng(0)
    shapes = ((2, t, Q_HEADS, HEAD_DIM), (2, t, KV_HEADS, HEAD_DIM), (2, t, KV_HEADS, HEAD_DIM), (2, t, Q_HEADS, HEAD_DIM))
    base = [rng.standard_normal(s, np.float32) for s in shapes]
    all_ok = True
    print(f"parity vs dense (float32 reference on the same rounded inputs), B=2, T={t}, "
          f"{Q_HEADS}/{KV_HEADS} heads, head_dim {HEAD_DIM}")
    for name, seg, q_slots, kv_slots, dtype in parity_cases(t):
        q, k, v, ct = (jnp.asarray(x, dtype) for x in base)
        route = _route(seg, q_slots, kv_slots) if dtype != jnp.float32 else "chunked (float32: static)"
        try:
            out, grads = _value_and_grads("cudnn", q, k, v, ct, seg, q_slots, kv_slots)
            ref_out, ref_grads = _value_and_grads("dense", *(x.astype(jnp.float32) for x in (q, k, v, ct)), seg,
                                                  q_slots, kv_slots)
        except Exception as e:  # report and go on: one unsupported route must not hide the others
            print(f"  FAIL {name:<30} [{route}] raised {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            all_ok = False
            continue
        tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
        errors = {}
        for label, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
            got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
            errors[label] = float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))
            if not np.all(np.isfinite(got)):
                errors[label] = float("inf")
        pads = seg == 0
        pads_zero = bool(np.all(np.asarray(out)[pads] == 0) and np.all(np.asarray(grads[0])[pads] == 0))
        ok = all(e <= tol for e in errors.values()) and pads_zero
        all_ok &= ok
        detail = " ".join(f"{key} {value:.1e}" for key, value in errors.items())
        print(f"  {'ok  ' if ok else 'FAIL'} {name:<30} [{route}] max rel err: {detail} (tol {tol:g}); "
              f"pad rows and their dq exactly 0: {pads_zero}")
    return all_ok


def _train_step(implementation: str, t: int):
    def loss(q, k, v, seg):
        slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), seg.shape)
        out = attention(q, k, v, seg, seg, slots, slots[0], implementation=implementation)
        return jnp.sum(out.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def _inputs(t: int, seg_row):
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, t, Q_HEADS, HEAD_DIM), np.float32), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((1, t, KV_HEADS, HEAD_DIM), np.float32), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((1, t, KV_HEADS, HEAD_DIM), np.float32), jnp.bfloat16)
    return q, k, v, jnp.asarray(np.array([seg_row], np.int32))


def time_and_memory(lengths, repeats: int) -> None:
    print(f"\nforward + backward, B=1, {Q_HEADS}/{KV_HEADS} heads, head_dim {HEAD_DIM}, bf16, one left-padded "
          f"sequence (1/16 pads); temp = XLA compiled temp memory")
    for t in lengths:
        args = _inputs(t, [0] * (t // 16) + [1] * (t - t // 16))
        for implementation in ("cudnn", "chunked", "dense"):
            fn = _train_step(implementation, t)
            temp = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**30
            if implementation == "dense" and temp > 0.6 * jax.devices()[0].memory_stats()["bytes_limit"] / 2**30:
                print(f"  T={t:>6} {implementation:>8}: temp {temp:8.2f} GiB (does not fit; not run)")
                continue
            try:
                seconds = _time(fn, args, repeats)
                print(f"  T={t:>6} {implementation:>8}: temp {temp:8.2f} GiB, {seconds * 1e3:9.1f} ms")
            except Exception as e:
                print(f"  T={t:>6} {implementation:>8}: temp {temp:8.2f} GiB, raised {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:160]}")

    t = 8192
    q, k, v, seg = _inputs(t, [1] * t)
    scale = HEAD_DIM ** -0.5
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
    _, offsets, lengths_ = attn_lib._runs(seg, attn_lib.CUDNN_MAX_RUNS)

    def plain(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")

    def packed(q, k, v):
        return dot_product_attention(q, k, v, q_seqlen=lengths_, kv_seqlen=lengths_, q_offsets=offsets,
                                     kv_offsets=offsets, scale=scale, mask_type=MaskType.PADDING_CAUSAL,
                                     qkv_layout="BTNH")

    print(f"\ncuDNN routes on the same unpadded T={t} row, forward + backward:")
    for name, fn in (("plain causal", plain), (f"packed ({attn_lib.CUDNN_MAX_RUNS} segment slots)", packed)):
        step = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
        try:
            print(f"  {name:>28}: {_time(step, (q, k, v), repeats) * 1e3:8.2f} ms")
        except Exception as e:
            print(f"  {name:>28}: raised {type(e).__name__}: {str(e).splitlines()[0][:160]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        print(f"needs a CUDA GPU; this backend is {jax.default_backend()!r}")
        return 2
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {device.device_kind}, compute capability {device.compute_capability}")
    start = time.perf_counter()
    ok = check_parity()
    time_and_memory(args.lengths, args.repeats)
    print(f"\nparity {'PASSED' if ok else 'FAILED'}; total {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
