"""M-GRPO co-training with a judge of the main agent's delegations in the main agent's reward: each hop's
sub-question against the one it should have written (configs/repro/common.py, DELEGATION_WEIGHT).

    python launch/train.py --config configs/repro/co_train_delegation.py:runs/repro \
        --workdir runs/repro/co_train_delegation/seed0 --config.seed=0

The argument is the repro root holding the warm starts (configs/repro/common.py); launch/repro.py runs every
setting and seed.
"""
from configs.repro.common import DEFAULT_ROOT, rl_config


def get_config(root: str = DEFAULT_ROOT):
    return rl_config("co_train_delegation", root)
