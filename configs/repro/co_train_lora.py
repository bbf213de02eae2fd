"""M-GRPO with LoRA: co_train from the same warm start, each agent training rank-8 adapters on every projection
while its base weights stay frozen (configs/repro/common.py: LORA_RANK, LORA_LEARNING_RATE).

    python launch/train.py --config configs/repro/co_train_lora.py:runs/repro \
        --workdir runs/repro/co_train_lora/seed0 --config.seed=0
    python launch/repro.py --group lora --jobs 2   # beside co_train -> docs/results/lora/
"""
from configs.repro.common import DEFAULT_ROOT, rl_config


def get_config(root: str = DEFAULT_ROOT):
    return rl_config("co_train_lora", root)
