"""Held-out evaluation of a multi-agent system: accuracy and format-error rate, greedy or pass@k sampled.

The same controller, protocols and tools as training, with each agent's current parameters; greedy decoding
gets its own samplers (temperature 0), so training's samplers and their compiled programs are untouched.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mgrpo_jax.rollout.controller import Controller, SamplerPolicy
from mgrpo_jax.rollout.rewards import RewardConfig
from mgrpo_jax.rollout.sampler import Sampler
from mgrpo_jax.train.mgrpo import compute_rewards


def _greedy(policy: SamplerPolicy) -> SamplerPolicy:
    sampler = policy.sampler
    greedy = Sampler(sampler.graphdef, sampler.model_config, dataclasses.replace(sampler.config, temperature=0.0))
    return SamplerPolicy(greedy, policy.params, policy.version)


class Evaluator:
    """Evaluates the controller's agents on questions; `greedy` (k = 1) or sampled pass@k."""

    def __init__(self, controller: Controller, rewards: RewardConfig = RewardConfig()):
        self.controller, self.rewards = controller, rewards
        self._greedy: dict[str, SamplerPolicy] = {}

    def _controller(self, greedy: bool) -> Controller:
        c = self.controller
        if not greedy:
            return c
        main = self._greedy.setdefault("main", _greedy(c.main_policy))
        main.update(c.main_policy.params, c.main_policy.version)
        sub = None
        if c.sub_policy is not None:
            sub = main if c.sub_policy is c.main_policy else self._greedy.setdefault("sub", _greedy(c.sub_policy))
            sub.update(c.sub_policy.params, c.sub_policy.version)
        return Controller(config=c.config, codec=c.codec, main_policy=main, main_protocol=c.main_protocol,
                          tools=c.tools, sub_policy=sub, sub_protocol=c.sub_protocol, delegate_action=c.delegate_action)

    def run(self, questions: Sequence[str], golds: Sequence[Any], *, greedy: bool = True, k: int = 1,
            rng: jax.Array | None = None) -> dict[str, float]:
        if greedy and k != 1:
            raise ValueError("greedy evaluation is deterministic: use k=1 (pass@k needs greedy=False)")
        rng = jax.random.key(0) if rng is None else rng
        batch = self._controller(greedy).run(list(questions), k, rng)
        main_r, _, parts = compute_rewards(batch, list(golds), k, self.rewards)
        correct = np.array([[batch.main[q * k + j].format_ok and _score(self.rewards, batch.main[q * k + j], golds[q])
                             for j in range(k)] for q in range(len(questions))], bool)
        prefix = "greedy" if greedy else f"pass@{k}"
        return {
            f"{prefix}/accuracy": float(correct.any(axis=1).mean()),
            f"{prefix}/mean_accuracy": float(correct.mean()),
            f"{prefix}/format_error_rate": float(np.mean([not t.format_ok for t in batch.main])),
            f"{prefix}/reward_mean": float(main_r.mean()),
            f"{prefix}/delegations_per_rollout": float(batch.sub_counts.mean()),
            f"{prefix}/num_questions": float(len(questions)),
        }


def _score(rewards: RewardConfig, traj, gold) -> bool:
    return rewards.correctness(traj.final, gold) >= 1.0
