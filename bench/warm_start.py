"""SFT throughput of a comparison's warm start (configs/repro/warm_start.py:<kind>): the cost of `make repro`'s
longest jobs (the single agent's 24 epochs).

    python bench/warm_start.py --kind single [--updates 12] [--set warm_start.micro_batch_size=8]

Builds the warm start's experiment and its first epoch's demonstrations exactly as launch/warm_start.py does (in
--workdir, reused across invocations), then times `--updates` SFT updates per model after one that compiles, and
prints per model: micro-batches per update, how full the packed rows are (real tokens / positions), the update's
median seconds, real tokens per second, and the accumulate program's FLOPs per micro-batch (XLA's cost analysis)
with the FLOP rate they imply. Prints; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import jax  # noqa: E402

from configs.repro.common import warm_start_config  # noqa: E402
from mgrpo_jax.data.synthetic import read_questions_jsonl  # noqa: E402
from mgrpo_jax.experiment import build_experiment, make  # noqa: E402
from mgrpo_jax.train.demonstrations import make_demonstrations  # noqa: E402
from mgrpo_jax.train.warm_start import WarmStartConfig, _SFTAgent, sft_groups, sft_row_len  # noqa: E402

from bench.train_step import apply_override  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="single", help="multi | single | shared | weak_sub | single_weak_sub")
    parser.add_argument("--updates", type=int, default=12)
    parser.add_argument("--workdir", default="/tmp/mgrpo_bench_warm_start")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override (repeatable), e.g. warm_start.micro_batch_size=8")
    args = parser.parse_args()
    config = warm_start_config(args.kind)
    for item in args.set:
        apply_override(config, item)
    ws = make(WarmStartConfig, config.warm_start, "warm_start")
    exp = build_experiment(config, os.path.join(args.workdir, args.kind))
    questions = [q for f in exp.data.warm_start_files or exp.data.train_files for q in read_questions_jsonl(f)]
    demos = make_demonstrations(exp.controller, questions, query=ws.query, fallback_query=ws.fallback_query,
                                shortcuts=ws.shortcuts, seed=0)
    print(f"kind {args.kind}: backend {jax.default_backend()}, {os.cpu_count()} CPUs; batch_size {ws.batch_size}, "
          f"micro_batch_size {ws.micro_batch_size}")
    for name, (roles, rows) in sft_groups(config.mode, [demos]).items():
        max_len = sft_row_len(rows)
        agent = _SFTAgent(name, exp, roles, rows, max_len, ws, seed=0)
        agent.new_epoch(0)
        batches = [agent.next_batch() for _ in range(args.updates + 1)]
        batches = [b for b in batches if b is not None]
        t0 = time.perf_counter()
        agent.trainer.collect(agent.trainer.dispatch(batches[0]))
        compile_s = time.perf_counter() - t0
        seconds, real, positions = [], 0, 0
        for b in batches[1:]:
            t0 = time.perf_counter()
            agent.trainer.collect(agent.trainer.dispatch(b))
            seconds.append(time.perf_counter() - t0)
            real += b.num_tokens
            positions += b.arrays["tokens"].size
        micro = next(batches[0].micro_batches())
        acc = agent.trainer._zero_acc(agent.trainer.params, micro)
        cost = agent.trainer._accumulate.lower(agent.trainer.params, acc, micro).compile().cost_analysis()
        flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
        micro_per_update = positions / len(seconds) / micro["tokens"].size
        per_update = statistics.median(seconds)
        print(f"{name}: {len(rows[0])} demonstrations, rows of {max_len}, {micro_per_update:.2f} micro-batches of "
              f"{ws.micro_batch_size} rows per update; fill {real / positions:.3f}; first update {compile_s:.1f} s; "
              f"update {per_update:.3f} s (median of {len(seconds)}), {real / sum(seconds):.0f} real tokens/s; "
              f"accumulate {flops / 1e9:.2f} GFLOP per micro-batch, "
              f"{flops * micro_per_update / per_update / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
