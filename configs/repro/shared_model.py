"""One model plays both roles and trains on both agents' tokens.

    python launch/train.py --config configs/repro/shared_model.py:runs/repro \
        --workdir runs/repro/shared_model/seed0 --config.seed=0

The argument is the repro root holding the warm starts (configs/repro/common.py); launch/repro.py runs every
setting and seed.
"""
from configs.repro.common import DEFAULT_ROOT, rl_config


def get_config(root: str = DEFAULT_ROOT):
    return rl_config("shared_model", root)
