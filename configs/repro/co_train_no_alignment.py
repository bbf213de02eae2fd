"""M-GRPO co-training without trajectory alignment: missing sub-agent slots are masked, not duplicated.

    python launch/train.py --config configs/repro/co_train_no_alignment.py:runs/repro \
        --workdir runs/repro/co_train_no_alignment/seed0 --config.seed=0

The argument is the repro root holding the warm starts (configs/repro/common.py); launch/repro.py runs every
setting and seed.
"""
from configs.repro.common import DEFAULT_ROOT, rl_config


def get_config(root: str = DEFAULT_ROOT):
    return rl_config("co_train_no_alignment", root)
