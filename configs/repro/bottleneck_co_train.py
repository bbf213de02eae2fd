"""The bottleneck setting, co-trained: the sub-agent's warm start is the weak one (its teacher, not the main agent's,
took shortcuts), and M-GRPO trains both agents.

    python launch/train.py --config configs/repro/bottleneck_co_train.py:runs/repro \
        --workdir runs/repro/bottleneck_co_train/seed0 --config.seed=0

The argument is the repro root holding the warm starts (configs/repro/common.py); launch/repro.py runs every
setting and seed.
"""
from configs.repro.common import DEFAULT_ROOT, rl_config


def get_config(root: str = DEFAULT_ROOT):
    return rl_config("bottleneck_co_train", root)
