"""The bottleneck setting (the sub-agent's warm start is the weak one) with the sub-agent frozen (main_only) and
dynamic sampling (DAPO): a step trains on queries whose main rewards differ (configs/repro/common.py,
DYNAMIC_MAX_ROUNDS). The baseline that bottleneck_co_train_dynamic is read against.

    python launch/train.py --config configs/repro/bottleneck_main_only_dynamic.py:runs/repro \
        --workdir runs/repro/bottleneck_main_only_dynamic/seed0 --config.seed=0

The argument is the repro root holding the warm starts (configs/repro/common.py); launch/repro.py runs every
setting and seed.
"""
from configs.repro.common import DEFAULT_ROOT, rl_config


def get_config(root: str = DEFAULT_ROOT):
    return rl_config("bottleneck_main_only_dynamic", root)
