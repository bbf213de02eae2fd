"""Per-phase time of M-GRPO steps on the tiny CPU config: rollout, rewards, alignment, each agent's update.

    python bench/train_step.py [--steps 6] [--mode co_train] [--workdir /tmp/mgrpo_bench]
    python bench/train_step.py --config configs/warm_start_tiny.py \
        --set agents.main.checkpoint=/tmp/warm/warm_start/main --set agents.sub.checkpoint=/tmp/warm/warm_start/sub \
        --set tokenizer.path=/tmp/warm/warm_start/main           # warm-started agents: real delegations

Builds the run exactly as `launch/train.py` does (default configs/tiny_cpu.py), runs `--steps` steps, and prints
each phase's median time over the steps after the first (which compiles) and, per agent: how full its packed
batches are (real tokens / positions, and loss tokens / positions), the update time per real token, how many
updates were skipped for want of signal, and its compile count. Prints; asserts nothing.
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
import importlib.util  # noqa: E402
from mgrpo_jax.compilation import CompileCounter  # noqa: E402
from mgrpo_jax.data.synthetic import read_questions_jsonl  # noqa: E402
from mgrpo_jax.experiment import build_experiment  # noqa: E402


def apply_override(config, item: str) -> None:
    """`--set KEY=VALUE`: the value converted to the type of the key's current value (a string when it is None)."""
    key, value = item.split("=", 1)
    *path, last = key.split(".")
    node = config
    for p in path:
        node = node[p]
    node[last] = type(node[last])(value) if node[last] is not None else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--mode", default="co_train")
    parser.add_argument("--workdir", default="/tmp/mgrpo_bench_train_step")
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny_cpu.py"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override (string values; repeatable)")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("bench_config", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.mode = args.mode
    for item in args.set:
        apply_override(config, item)
    start = time.perf_counter()
    exp = build_experiment(config, args.workdir)
    print(f"built the {args.mode} run in {time.perf_counter() - start:.1f} s "
          f"(Q={config.mgrpo.num_queries}, K={config.mgrpo.num_rollouts}, D_max={config.mgrpo.alignment.d_max})")
    # The questions RL trains on (a warm-started config leaves out the ones its warm start demonstrated).
    questions = read_questions_jsonl(exp.data.train_files[0])[int(config.task.get("skip_train_questions", 0)):]
    q = config.mgrpo.num_queries
    rows = []
    with CompileCounter() as compiles:
        for step in range(args.steps):
            batch = questions[step * q:(step + 1) * q]
            t0 = time.perf_counter()
            metrics = exp.loop.step([x.question for x in batch], [x.answer for x in batch]).metrics
            metrics["time/step_s"] = time.perf_counter() - t0
            rows.append(metrics)
            if step == 0:
                first_compiles = compiles.count
    steady = rows[1:] or rows
    phases = ["time/rollout_s", "time/rewards_s", "time/alignment_s", "time/update_s", "time/step_s",
              "rollout/main_generate_s", "rollout/sub_generate_s", "rollout/tool_s"]
    print(f"\nmedian over steps 2..{args.steps} (step 1 compiles: {rows[0]['time/step_s']:.1f} s)")
    for key in phases:
        values = [r[key] for r in steady if key in r]
        if values:
            print(f"  {key:26s} {statistics.median(values):8.3f} s")
    real_tokens = 0.0
    for agent in ("main", "sub", "shared"):
        ran = [r for r in steady if r.get(f"{agent}/skipped_empty") == 0.0]
        skipped = sum(1 for r in steady if r.get(f"{agent}/skipped_empty") == 1.0)
        if not ran:
            if skipped:
                print(f"  {agent:6s} update: skipped (no signal) in all {skipped} steady steps")
            continue
        positions = sum(r[f"{agent}/batch/tokens"] / max(r[f"{agent}/batch/useful_fraction"], 1e-12) for r in ran)
        real = sum(r[f"{agent}/batch/tokens"] for r in ran)
        loss = sum(r[f"{agent}/batch/loss_tokens"] for r in ran)
        real_tokens += real
        print(f"  {agent:6s} batch: real tokens / positions {real / positions:6.1%}, loss tokens / positions "
              f"{loss / positions:6.1%}, {statistics.median(r[f'{agent}/batch/micro_batches'] for r in ran):.0f} "
              f"micro-batches (median), {skipped} of {len(steady)} updates skipped (no signal), compile count "
              f"{int(steady[-1][f'{agent}/compile_count'])}")
    if real_tokens:
        update_s = sum(r["time/update_s"] for r in steady)
        print(f"  update phase: {1e6 * update_s / real_tokens:.1f} us per real token trained (all agents)")
    print(f"  XLA compilations in the process: {first_compiles} during step 1, "
          f"{compiles.count - first_compiles} during steps 2..{args.steps}")


if __name__ == "__main__":
    main()
