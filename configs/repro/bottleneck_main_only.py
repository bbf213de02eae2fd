"""The bottleneck setting, main agent only: the sub-agent's warm start is the weak one (its teacher, not the main
agent's, took shortcuts), and it stays frozen while the main agent trains.

    python launch/train.py --config configs/repro/bottleneck_main_only.py:runs/repro \
        --workdir runs/repro/bottleneck_main_only/seed0 --config.seed=0

The argument is the repro root holding the warm starts (configs/repro/common.py); launch/repro.py runs every
setting and seed.
"""
from configs.repro.common import DEFAULT_ROOT, rl_config


def get_config(root: str = DEFAULT_ROOT):
    return rl_config("bottleneck_main_only", root)
