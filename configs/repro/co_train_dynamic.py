"""M-GRPO co-training with dynamic sampling (DAPO): a step trains on queries whose main rewards differ, rolling out
fresh RL questions in place of all-equal groups (configs/repro/common.py, DYNAMIC_MAX_ROUNDS).

    python launch/train.py --config configs/repro/co_train_dynamic.py:runs/repro \
        --workdir runs/repro/co_train_dynamic/seed0 --config.seed=0

The argument is the repro root holding the warm starts (configs/repro/common.py); launch/repro.py runs every
setting and seed.
"""
from configs.repro.common import DEFAULT_ROOT, rl_config


def get_config(root: str = DEFAULT_ROOT):
    return rl_config("co_train_dynamic", root)
