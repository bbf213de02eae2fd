"""Train a multi-agent system with M-GRPO.

    python launch/train.py --config configs/tiny_cpu.py --workdir /tmp/mgrpo_tiny
    python launch/train.py --config configs/tiny_cpu.py --config.mode=main_only --config.total_steps=50 \
        --workdir /tmp/mgrpo_main_only

Decoupled mode (MGRPO.md, "Decoupled pipeline"; mgrpo_jax/train/decoupled.py): the main agent and the
sub-agent train as two jobs that share a trajectory store, the sub job serving the sub-agent's generations:

    python launch/train.py --config configs/decoupled_cpu.py --workdir /tmp/mgrpo_dec --role sub &
    python launch/train.py --config configs/decoupled_cpu.py --workdir /tmp/mgrpo_dec --role main

The config is locked: a mistyped `--config.key=value` is an error naming the key. Rerunning the same command
with the same --workdir resumes from its latest checkpoint. SIGTERM / Ctrl-C finish the current step, save a
checkpoint and exit with status 0.

On a CPU-only machine the script exposes 8 host devices (XLA_FLAGS), so that per-agent meshes can be laid out
as on an accelerator; set XLA_FLAGS yourself to choose another count.
"""
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mgrpo_jax.comparison import evaluation_curve, read_metrics, reward_trend  # noqa: E402
from mgrpo_jax.train.decoupled import run_role  # noqa: E402
from mgrpo_jax.train.run import configure_logging  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file with get_config().", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and generated data go.")
flags.DEFINE_enum("role", "all", ["all", "main", "sub"],
                  "all: one program trains every agent. main / sub: the decoupled jobs (each writes under "
                  "<workdir>/<role>; they share config.decoupled.store_url and the sub job's service).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_logging()
    metrics = run_role(flags.FLAGS.role, flags.FLAGS.config, flags.FLAGS.workdir)
    workdir = os.path.abspath(flags.FLAGS.workdir)
    if flags.FLAGS.role != "all":
        workdir = os.path.join(workdir, flags.FLAGS.role)
    print(f"\ndone. metrics: {workdir}/metrics.jsonl (TensorBoard: {workdir}/tb); checkpoints: "
          f"{workdir}/checkpoints")
    keys = [k for k in ("main/reward_mean", "main/accuracy", "sub/reward_mean", "greedy/accuracy",
                        "greedy/format_error_rate") if k in metrics]
    if keys:
        print("final: " + ", ".join(f"{k}={metrics[k]:.3f}" for k in keys))
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    entries = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    for line in (reward_trend(entries), evaluation_curve(entries)):
        if line:
            print(line)


if __name__ == "__main__":
    app.run(main)
