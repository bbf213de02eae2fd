"""The bottleneck setting (the sub-agent's warm start is the weak one), co-trained with a judge of the main
agent's delegations in the main agent's reward (configs/repro/common.py, DELEGATION_WEIGHT).

    python launch/train.py --config configs/repro/bottleneck_co_train_delegation.py:runs/repro \
        --workdir runs/repro/bottleneck_co_train_delegation/seed0 --config.seed=0

The argument is the repro root holding the warm starts (configs/repro/common.py); launch/repro.py runs every
setting and seed.
"""
from configs.repro.common import DEFAULT_ROOT, rl_config


def get_config(root: str = DEFAULT_ROOT):
    return rl_config("bottleneck_co_train_delegation", root)
