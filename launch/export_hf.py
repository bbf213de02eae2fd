"""Export one agent of a run's checkpoint as a Hugging Face directory (safetensors + config + tokenizer).

    python launch/export_hf.py --config configs/tiny_cpu.py --workdir /tmp/mgrpo_tiny --agent main \
        --output /tmp/main_hf [--step 20]

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained(output)` and in serving engines.
An agent trained with LoRA (`agents.<role>.lora`) exports `--format merged` (the default: the adapters folded
into the base kernels, a plain checkpoint) or `--format peft` (the adapters alone, in PEFT's layout, for
`peft.PeftModel.from_pretrained` on the base checkpoint; dense projections only).
"""
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mgrpo_jax.models import lora  # noqa: E402
from mgrpo_jax.models.hf import save_hf  # noqa: E402
from mgrpo_jax.train.run import configure_logging, load_trained  # noqa: E402

config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "The run's workdir (holds checkpoints/).")
flags.DEFINE_string("agent", "main", "Which agent to export: main or sub.")
flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
flags.DEFINE_string("output", None, "The Hugging Face directory to write.")
flags.DEFINE_enum("format", "merged", ["merged", "peft"],
                  "LoRA agents: merged = adapters folded into the base weights; peft = the adapters in PEFT's "
                  "layout. A full fine-tune is always written whole.")
flags.mark_flags_as_required(["config", "workdir", "output"])


def main(argv):
    del argv
    configure_logging()
    f = flags.FLAGS
    exp, step = load_trained(f.config, f.workdir, f.step)
    if f.agent not in exp.agents:
        raise app.UsageError(f"--agent={f.agent!r}: this run has agents {sorted(exp.agents)}")
    agent = exp.agents[f.agent]
    params, config = agent.policy.params, agent.model_config
    if f.format == "peft":
        base = exp.config.agents[f.agent].get("checkpoint", "") or ""
        lora.save_peft(params, config, f.output, base_model=base)
        print(f"exported {f.agent}'s adapters (step {step}) in PEFT's layout to {os.path.abspath(f.output)}")
        return
    params, config = lora.merge(params, config)  # a no-op without adapters
    save_hf(params, config, f.output, tokenizer=exp.tokenizer)
    print(f"exported {f.agent} (step {step}, policy version {agent.policy.version}) to {os.path.abspath(f.output)}")


if __name__ == "__main__":
    app.run(main)
