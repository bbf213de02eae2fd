"""`make demo`: M-GRPO co-training of the warm-started tiny agents, with held-out accuracy measured as it trains.

    python launch/warm_start.py --config configs/repro/warm_start.py:multi --workdir runs/repro/warm_multi
    python launch/train.py --config configs/demo.py:runs/repro --workdir runs/demo

The agents come from the comparisons' warm start (configs/repro/common.py; the argument is its root): SFT on a
mixed-quality teacher's demonstrations, so the agents sample shortcuts that never earn the reward. RL trains on
questions about head entities the warm start never saw, and greedy accuracy on held-out questions (other unseen
heads) is measured before the first step and every `eval_every` steps: the curve shows RL carrying over to new
questions within the run. The comparisons (launch/repro.py, docs/results/) run the same with more steps and seeds.
"""
from configs.repro.common import DEFAULT_ROOT, rl_config

STEPS = 40


def get_config(root: str = DEFAULT_ROOT):
    c = rl_config("co_train", root)
    c.total_steps = STEPS
    c.eval_every = 10
    c.eval_questions = 64
    c.eval_train_questions = 0
    c.checkpoint.save_interval_steps = STEPS
    return c
