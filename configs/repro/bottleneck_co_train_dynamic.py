"""The bottleneck setting (the sub-agent's warm start is the weak one), co-trained with dynamic sampling (DAPO): a
step trains on queries whose main rewards differ (configs/repro/common.py, DYNAMIC_MAX_ROUNDS).

    python launch/train.py --config configs/repro/bottleneck_co_train_dynamic.py:runs/repro \
        --workdir runs/repro/bottleneck_co_train_dynamic/seed0 --config.seed=0

The argument is the repro root holding the warm starts (configs/repro/common.py); launch/repro.py runs every
setting and seed.
"""
from configs.repro.common import DEFAULT_ROOT, rl_config


def get_config(root: str = DEFAULT_ROOT):
    return rl_config("bottleneck_co_train_dynamic", root)
