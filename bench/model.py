"""Forward+backward throughput of a small Qwen3-like decoder: one device vs sharded, XLA FLOPs per token, MFU.

    python bench/model.py [--cpu-devices 8] [--tp 2] [--batch 8] [--seq 256] [--repeats 5]
                          [--dtype float32|bfloat16] [--remat none|full|dots|...] [--peak-tflops 989]

The step is `jax.value_and_grad` of the mean token cross-entropy (full logits, no optimizer), jitted:
- "1 device": parameters and batch on `jax.devices()[0]`;
- "sharded": parameters born sharded over all devices (mesh fsdp = n / tp x tp, `DEFAULT_RULES`), the batch
  over fsdp, gradients returned in the parameters' shardings (`mgrpo_jax.sharding`).
Tokens/s is batch * seq / median wall time of `--repeats` calls after a warm-up call. FLOPs per token come
from XLA's cost analysis of the compiled step (`jit(f).lower(...).compile().cost_analysis()["flops"]`, counted
on the step with its layer scan unrolled because XLA counts a loop body once; for the sharded program that
figure is per device, so it is multiplied by the device count), next to the analytic
6 * matmul params + attention estimate. MFU = tokens/s * FLOPs/token / (peak TFLOP/s per device * devices),
printed when `--peak-tflops` is given (e.g. 989 for an H100 SXM in bf16 dense), so the same script gives MFU
on an accelerator. `--cpu-devices N` sets `--xla_force_host_platform_device_count=N` before jax is imported
(0 leaves XLA_FLAGS alone); fake CPU devices share the host's cores, so "sharded" on CPU measures the
partitioning overhead, not a speed-up. This script prints figures; it asserts nothing.
"""
from __future__ import annotations

import argparse
import os


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-devices", type=int, default=8, help="fake host devices (0: leave XLA_FLAGS alone)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the sharded mesh")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="parameter and compute dtype")
    parser.add_argument("--remat", default="none", help="remat policy of the scanned layers (REMAT_POLICIES)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of one device, for MFU")
    return parser.parse_args()


ARGS = parse_args()
if ARGS.cpu_devices:
    # Must happen before jax is imported: the host platform's device count is fixed when the backend starts.
    os.environ["XLA_FLAGS"] = " ".join(
        [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
        + [f"--xla_force_host_platform_device_count={ARGS.cpu_devices}"])

import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mgrpo_jax import sharding  # noqa: E402
from mgrpo_jax.kernels import token_logprobs  # noqa: E402
from mgrpo_jax.models import ModelConfig, abstract_model, init_model, positions_from_mask  # noqa: E402


def bench_config(dtype: str, remat: str = "none") -> ModelConfig:
    """Qwen3-like: hidden 256, 4 layers, 8 heads / 4 kv heads of 32, SwiGLU 768, vocab 8192, q/k norm."""
    return ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                       num_kv_heads=4, head_dim=32, qk_norm=True, architecture="qwen3", param_dtype=dtype,
                       dtype=dtype, remat=remat)


def analytic_flops_per_token(c: ModelConfig, seq: int) -> float:
    """Forward + backward = 3 x forward; forward = 2 x matmul params (q,k,v,o, MLP, lm_head; the embedding is
    a gather) + the attention scores and mixing, 2 x 2 x seq x heads x head_dim per layer (the full [T, S]
    product, as the einsums compute it; the causal mask does not skip work)."""
    per_layer = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * \
        c.intermediate_size
    matmul_params = c.num_layers * per_layer + c.hidden_size * c.vocab_size
    attention = c.num_layers * 2 * 2 * seq * c.num_heads * c.head_dim
    return 3 * (2 * matmul_params + attention)


def make_batch(c: ModelConfig, batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, c.vocab_size, (batch, seq + 1)).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "attention_mask": np.ones((batch, seq), np.int32)}


def make_step(graphdef: nnx.GraphDef, param_shardings, batch_sharding):
    """(params, batch) -> (mean cross-entropy, grads), jitted with explicit shardings."""

    def loss_and_grads(params, batch):
        def loss(p):
            model = nnx.merge(graphdef, p)
            mask = batch["attention_mask"]
            logits = model(batch["tokens"], positions_from_mask(mask), mask)
            return -jnp.mean(token_logprobs(logits, batch["targets"]))

        return jax.value_and_grad(loss)(params)

    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(loss_and_grads, in_shardings=(param_shardings, batch_sharding),
                   out_shardings=(replicated, param_shardings))


def xla_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per program
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def run(name: str, devices: list, tp: int, c: ModelConfig, host_batch, args) -> None:
    n = len(devices)
    tp = tp if n % tp == 0 and n > 1 else 1
    mesh = sharding.make_agent_meshes({name: {"devices": n, "tp": tp}}, devices=devices)[name]
    graphdef, params, param_shardings = sharding.born_sharded(lambda: init_model(c, seed=0), mesh)
    data = sharding.batch_sharding(mesh)
    batch = sharding.put_batch(host_batch, data)
    step = make_step(graphdef, param_shardings, data)
    start = time.perf_counter()
    compiled = step.lower(params, batch).compile()
    compile_s = time.perf_counter() - start
    # XLA's cost analysis counts a loop body once: count FLOPs on the same step with the layer scan unrolled.
    unrolled = nnx.split(abstract_model(c.replace(scan_unroll=c.num_layers)))[0]
    counted = make_step(unrolled, param_shardings, data).lower(params, batch).compile()
    flops_per_token = xla_flops(counted) * n / (args.batch * args.seq)  # per-device program x devices
    jax.block_until_ready(compiled(params, batch))  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, batch))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens_per_s = args.batch * args.seq / step_s
    line = (f"  {name:9s} devices {n} (fsdp {mesh.shape['fsdp']} x tp {mesh.shape['tp']})  compile {compile_s:5.1f} s"
            f"  step {step_s * 1e3:8.1f} ms  {tokens_per_s:10.0f} tokens/s"
            f"  XLA {flops_per_token / 1e6:7.2f} MFLOP/token"
            f"  {tokens_per_s * flops_per_token / 1e9 / n:7.2f} GFLOP/s/device")
    if args.peak_tflops:
        line += f"  MFU {tokens_per_s * flops_per_token / (args.peak_tflops * 1e12 * n):6.2%}"
    print(line)


def main() -> None:
    args = ARGS
    c = bench_config(args.dtype, args.remat)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: init_model(c)))))
    devices = jax.devices()
    print(f"jax {jax.__version__} on {devices[0].platform} ({devices[0].device_kind}), {len(devices)} devices, "
          f"{os.cpu_count()} host cores; {args.dtype}")
    print(f"model: hidden {c.hidden_size}, {c.num_layers} layers, {c.num_heads} heads / {c.num_kv_heads} kv heads "
          f"x {c.head_dim}, mlp {c.intermediate_size}, vocab {c.vocab_size}: {n_params / 1e6:.2f} M params; "
          f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens per step; remat {c.remat}, "
          f"attention {c.attention}")
    print(f"analytic forward+backward: {analytic_flops_per_token(c, args.seq) / 1e6:.2f} MFLOP/token "
          "(6 x matmul params + attention)")
    host_batch = make_batch(c, args.batch, args.seq)
    print(f"forward+backward (value_and_grad of mean cross-entropy), median of {args.repeats}:")
    run("1 device", devices[:1], 1, c, host_batch, args)
    if len(devices) > 1:
        run("sharded", devices, args.tp, c, host_batch, args)


if __name__ == "__main__":
    main()
