"""Attention implementations: XLA temporary memory (compile only) and CPU time.

    python bench/attention.py [--lengths 4096 8192 32768] [--block 512] [--time-length 1024] [--repeats 3]

Memory: `jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes` of forward + backward (grads
w.r.t. q, k, v) for Qwen3-0.6B-like heads (16 query heads, 8 kv heads, head_dim 128, bf16), batch 1, causal
self-attention over one padded sequence, on abstract shapes (`jax.ShapeDtypeStruct`): nothing is allocated,
so 32k dense compiles even though it could never run here. Time: median CPU wall time of the forward at a
small size, and of one decode step (T=1) against a large cache with `kv_valid_len` filled slots (chunked
visits only the filled tiles). This script prints figures; it asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mgrpo_jax.models.attention import attention

Q_HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128  # Qwen3-0.6B


def _loss(implementation: str, block: int, length: int):
    def loss(q, k, v, seg):
        slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), seg.shape)
        out = attention(q, k, v, seg, seg, slots, slots[0], implementation=implementation, block_q=block,
                        block_kv=block)
        return jnp.sum(out.astype(jnp.float32))

    return loss


def train_temp_gib(implementation: str, length: int, block: int, batch: int = 1) -> tuple[float, float]:
    """(forward + backward temp GiB, compile seconds) on abstract bf16 inputs."""
    spec = jax.ShapeDtypeStruct
    args = (spec((batch, length, Q_HEADS, HEAD_DIM), jnp.bfloat16),
            spec((batch, length, KV_HEADS, HEAD_DIM), jnp.bfloat16),
            spec((batch, length, KV_HEADS, HEAD_DIM), jnp.bfloat16), spec((batch, length), jnp.int32))
    start = time.perf_counter()
    compiled = jax.jit(jax.grad(_loss(implementation, block, length), argnums=(0, 1, 2))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**30, time.perf_counter() - start


def _median_s(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def forward_time_s(implementation: str, length: int, block: int, repeats: int, heads=(4, 2), dim=64) -> float:
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, length, heads[0], dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, length, heads[1], dim)), jnp.float32)
    seg = jnp.asarray(np.r_[np.zeros(length // 8), np.ones(length - length // 8)][None], jnp.int32)  # left pad
    slots = jnp.arange(length, dtype=jnp.int32)

    @jax.jit
    def fwd(q, k, v, seg):
        return attention(q, k, v, seg, seg, slots[None], slots, implementation=implementation, block_q=block,
                         block_kv=block)

    return _median_s(fwd, (q, k, k, seg), repeats)


def decode_time_s(cache: int, filled: int, block: int, repeats: int, heads=(4, 2), dim=64) -> float:
    """One query (T=1) against a `cache`-slot cache whose first `filled` slots hold keys (chunked)."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 1, heads[0], dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, cache, heads[1], dim)), jnp.float32)
    kv_seg = jnp.asarray((np.arange(cache) < filled)[None], jnp.int32)
    slots = jnp.arange(cache, dtype=jnp.int32)

    @jax.jit
    def step(q, k, v, kv_seg, kv_len):
        return attention(q, k, v, jnp.ones((1, 1), jnp.int32), kv_seg, jnp.full((1, 1), filled, jnp.int32), slots,
                         implementation="chunked", block_q=block, block_kv=block, kv_valid_len=kv_len)

    return _median_s(step, (q, k, k, kv_seg, jnp.int32(filled)), repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 32768])
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--time-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"forward + backward temp memory, {Q_HEADS} q heads / {KV_HEADS} kv heads / head_dim {HEAD_DIM}, bf16, "
          f"batch 1, block {args.block} (compile only, {jax.default_backend()})")
    print(f"{'T':>7} | {'dense GiB':>10} | {'chunked GiB':>11} | {'ratio':>7} | compile dense / chunked")
    for length in args.lengths:
        dense, dense_s = train_temp_gib("dense", length, args.block)
        chunked, chunked_s = train_temp_gib("chunked", length, args.block)
        print(f"{length:>7} | {dense:>10.3f} | {chunked:>11.3f} | {dense / chunked:>6.0f}x | "
              f"{dense_s:.1f} s / {chunked_s:.1f} s")

    t = args.time_length
    print(f"\nCPU forward time, T={t}, 4 q heads / 2 kv heads / head_dim 64, float32, block 128 "
          f"(median of {args.repeats})")
    for implementation in ("dense", "chunked"):
        print(f"  {implementation:>8}: {forward_time_s(implementation, t, 128, args.repeats) * 1e3:8.1f} ms")

    cache = 8 * t
    print(f"\nCPU decode step (T=1), chunked, cache {cache} slots, block 128: cost follows kv_valid_len")
    for filled in (t // 8, t, cache):
        print(f"  kv_valid_len {filled:>6}: {decode_time_s(cache, filled, 128, args.repeats) * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
