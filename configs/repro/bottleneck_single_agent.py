"""The bottleneck setting's single agent: one agent with the tools, warm-started on demonstrations whose shortcuts are
where the bottleneck setting's sub teacher takes them (reporting without reading).

    python launch/train.py --config configs/repro/bottleneck_single_agent.py:runs/repro \
        --workdir runs/repro/bottleneck_single_agent/seed0 --config.seed=0

The argument is the repro root holding the warm starts (configs/repro/common.py); launch/repro.py runs every
setting and seed.
"""
from configs.repro.common import DEFAULT_ROOT, rl_config


def get_config(root: str = DEFAULT_ROOT):
    return rl_config("bottleneck_single_agent", root)
