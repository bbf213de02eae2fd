"""Chunked vs naive token log-probs at Qwen3's vocabulary: XLA temporary memory and CPU time.

    python bench/kernels.py [--chunk-size 1024] [--repeats 3] [--entropy]

Memory: `jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes` at (B, T) = (8, 2048), compile
only (nothing is allocated). Time: median wall time at (B, T) = (2, 1024) on this machine, after a warm-up
call. "naive" is `token_logprobs(hidden @ unembed, targets)` (full [B, T, V] float32 logits); "chunked" is
`chunked_token_logprobs(hidden, unembed, targets, chunk_size=...)`. Targets (issue 2): chunked temporary
memory <= 25% of naive, time within 1.5x of naive. This script prints figures; it asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from mgrpo_jax.kernels import chunked_token_logprobs, token_entropy, token_logprobs

VOCAB, WIDTH = 151936, 1024  # Qwen3's vocabulary; a 0.6B-class hidden size


def make_fns(chunk_size: int, with_entropy: bool):
    """name -> (forward, forward + backward), each (hidden, unembed, targets) -> arrays."""

    def naive(h, w, t):
        logits = h @ w
        lp = token_logprobs(logits, t)
        return lp + token_entropy(logits) if with_entropy else lp

    def chunked(h, w, t):
        out = chunked_token_logprobs(h, w, t, chunk_size=chunk_size, return_entropy=with_entropy)
        return out[0] + out[1] if with_entropy else out

    def with_grad(fn):
        return jax.value_and_grad(lambda h, w, t: jnp.sum(fn(h, w, t)), argnums=(0, 1))

    return {"naive": (naive, with_grad(naive)), "chunked": (chunked, with_grad(chunked))}


def shapes(batch: int, seq: int, dtype):
    return (jax.ShapeDtypeStruct((batch, seq, WIDTH), dtype), jax.ShapeDtypeStruct((WIDTH, VOCAB), dtype),
            jax.ShapeDtypeStruct((batch, seq), jnp.int32))


def temp_gib(fn, args) -> float:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**30


def time_s(fn, args, repeats: int) -> float:
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))  # compile + warm up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--entropy", action="store_true", help="also compute (and differentiate) the entropy")
    args = parser.parse_args()
    fns = make_fns(args.chunk_size, args.entropy)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; V={VOCAB} H={WIDTH} chunk_size={args.chunk_size}"
          f" entropy={args.entropy}")

    print("\nXLA temporary memory at (B, T) = (8, 2048), GiB (compile only)")
    for dtype in (jnp.float32, jnp.bfloat16):
        mem = {name: [temp_gib(f, shapes(8, 2048, dtype)) for f in pair] for name, pair in fns.items()}
        for i, phase in enumerate(("forward", "forward+backward")):
            n, c = mem["naive"][i], mem["chunked"][i]
            print(f"  {jnp.dtype(dtype).name:8s} {phase:17s} naive {n:7.2f}  chunked {c:6.2f}  ratio {c / n:6.1%}")

    print(f"\nCPU time at (B, T) = (2, 1024), float32, median of {args.repeats}, seconds")
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    inputs = (jax.random.normal(k1, (2, 1024, WIDTH)), jax.random.normal(k2, (WIDTH, VOCAB)) / WIDTH**0.5,
              jax.random.randint(k3, (2, 1024), 0, VOCAB))
    for i, phase in enumerate(("forward", "forward+backward")):
        n = time_s(fns["naive"][i], inputs, args.repeats)
        c = time_s(fns["chunked"][i], inputs, args.repeats)
        print(f"  {phase:17s} naive {n:6.2f}  chunked {c:6.2f}  ratio {c / n:5.2f}x")


if __name__ == "__main__":
    main()
