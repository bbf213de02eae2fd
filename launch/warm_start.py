"""Warm-start the agents: supervised fine-tuning on generated demonstrations of the protocol, before RL.

    python launch/warm_start.py --config configs/warm_start_tiny.py --workdir /tmp/mgrpo_warm
    python launch/warm_start.py --config configs/warm_start_tiny.py --config.warm_start.epochs=3 --workdir ...

Writes workdir/warm_start/{main,sub} (Hugging Face directories with the tokenizer) and
workdir/warm_start/summary.json (per-epoch NLL and held-out greedy accuracy, demonstration counts), and prints
the held-out accuracy. Start RL from them with the same config plus
`--config.agents.main.checkpoint=<workdir>/warm_start/main --config.agents.sub.checkpoint=<workdir>/warm_start/sub
--config.tokenizer.path=<workdir>/warm_start/main`. The SFT settings are the config's `warm_start` block.
"""
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mgrpo_jax.train.run import configure_logging  # noqa: E402
from mgrpo_jax.train.warm_start import warm_start  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file with get_config() (and a warm_start "
                                "block, e.g. configs/warm_start_tiny.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where the generated data, tokenizer and warm-started agents go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_logging()
    result = warm_start(flags.FLAGS.config, flags.FLAGS.workdir)
    nan = float("nan")
    print("\nepoch  main_nll  sub_nll  main_entropy  sub_entropy  held-out greedy accuracy  format errors  elapsed")
    for h in result.history:
        acc = f"{h['greedy/accuracy']:.3f}" if "greedy/accuracy" in h else "-"
        fmt = f"{h['greedy/format_error_rate']:.3f}" if "greedy/format_error_rate" in h else "-"
        print(f"{h['epoch']:>5}  {h.get('main/nll', nan):8.3f}  {h.get('sub/nll', nan):7.3f}  "
              f"{h.get('main/entropy', nan):12.3f}  {h.get('sub/entropy', nan):11.3f}  {acc:>25}  {fmt:>13}  "
              f"{h['elapsed_s']:6.0f}s")
    if "greedy/accuracy" in result.final:
        print(f"held-out greedy accuracy: {result.final['greedy/accuracy']:.3f} "
              f"({int(result.final['greedy/num_questions'])} questions)")
    explore = {k: v for k, v in result.final.items() if k.startswith("explore/")}
    if explore:
        print("room to explore (RL questions, sampled with the training samplers): "
              + ", ".join(f"{k.split('/', 1)[1]}={v:.3f}" for k, v in explore.items()))
    print("warm-started agents: " + ", ".join(f"{role}={path}" for role, path in result.checkpoints.items()))


if __name__ == "__main__":
    app.run(main)
