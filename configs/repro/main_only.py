"""Only the main agent trains; the sub-agent stays frozen at its warm start.

    python launch/train.py --config configs/repro/main_only.py:runs/repro \
        --workdir runs/repro/main_only/seed0 --config.seed=0

The argument is the repro root holding the warm starts (configs/repro/common.py); launch/repro.py runs every
setting and seed.
"""
from configs.repro.common import DEFAULT_ROOT, rl_config


def get_config(root: str = DEFAULT_ROOT):
    return rl_config("main_only", root)
