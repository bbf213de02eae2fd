"""Single-agent GRPO: one agent searches and reads itself (no sub-agent), with as many parameters as the main and
sub-agent together.

    python launch/train.py --config configs/repro/single_agent.py:runs/repro \
        --workdir runs/repro/single_agent/seed0 --config.seed=0

The argument is the repro root holding the warm starts (configs/repro/common.py); launch/repro.py runs every
setting and seed.
"""
from configs.repro.common import DEFAULT_ROOT, rl_config


def get_config(root: str = DEFAULT_ROOT):
    return rl_config("single_agent", root)
