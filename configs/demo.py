"""`make demo`: M-GRPO co-training of the warm-started tiny agents on a small fixed set of training questions.

    python launch/warm_start.py --config configs/repro/warm_start.py:multi --workdir runs/repro/warm_multi
    python launch/train.py --config configs/demo.py:runs/repro --workdir runs/demo

The agents come from the comparisons' warm start (configs/repro/common.py; the argument is its root). They train
on 16 questions that the warm start never demonstrated, 8 per step (Q = 8, K = 4), so each question comes back
every other step: the training reward shows the optimization at work within a few minutes. Whether RL also
generalizes to new questions is what the comparisons (launch/repro.py, docs/results/) measure.
"""
from configs.repro.common import DEFAULT_ROOT, rl_config


def get_config(root: str = DEFAULT_ROOT):
    c = rl_config("co_train", root)
    c.task.max_train_questions = 16
    return c
