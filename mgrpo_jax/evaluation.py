"""Held-out evaluation of a multi-agent system: accuracy and format-error rate, greedy or pass@k sampled.

The same controller, protocols and tools as training, with each agent's current parameters; greedy decoding
gets its own samplers (temperature 0), so training's samplers and their compiled programs are untouched.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mgrpo_jax.rollout.controller import Controller, SamplerPolicy, Trajectory
from mgrpo_jax.rollout.rewards import RewardConfig
from mgrpo_jax.rollout.sampler import Sampler
from mgrpo_jax.train.mgrpo import compute_rewards


def _greedy(policy: SamplerPolicy) -> SamplerPolicy:
    if not isinstance(policy, SamplerPolicy):  # scripted or remote policies decode as they do
        return policy
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
        sub = None
        if c.sub_policy is not None:
            sub = main if c.sub_policy is c.main_policy else self._greedy.setdefault("sub", _greedy(c.sub_policy))
        for greedy_policy, policy in ((main, c.main_policy), (sub, c.sub_policy)):
            if greedy_policy is not None and greedy_policy is not policy:  # the current parameters
                greedy_policy.update(policy.params, policy.version)
        return Controller(config=c.config, codec=c.codec, main_policy=main, main_protocol=c.main_protocol,
                          tools=c.tools, sub_policy=sub, sub_protocol=c.sub_protocol, delegate_action=c.delegate_action)

    def run(self, questions: Sequence[str], golds: Sequence[Any], *, greedy: bool = True, k: int = 1,
            rng: jax.Array | None = None, chains: Sequence[Any] | None = None) -> dict[str, float]:
        """Accuracy, format errors and rewards of `questions`; with `chains` (the same questions as generated
        `data.synthetic.Question`s, greedy only), also where the same episodes failed (`classify_batch`)."""
        if greedy and k != 1:
            raise ValueError("greedy evaluation is deterministic: use k=1 (pass@k needs greedy=False)")
        if chains is not None and (not greedy or [getattr(q, "question", q) for q in chains] != list(questions)):
            raise ValueError("chains must be the evaluated questions themselves (generated questions with hop "
                             "chains, in the same order), and the evaluation greedy")
        rng = jax.random.key(0) if rng is None else rng
        controller = self._controller(greedy)
        batch = controller.run(list(questions), k, rng)
        main_r, sub_r, _ = compute_rewards(batch, list(golds), k, self.rewards)
        correct = np.array([[batch.main[q * k + j].format_ok and _score(self.rewards, batch.main[q * k + j], golds[q])
                             for j in range(k)] for q in range(len(questions))], bool)
        prefix = "greedy" if greedy else f"pass@{k}"
        out = {
            f"{prefix}/accuracy": float(correct.any(axis=1).mean()),
            f"{prefix}/mean_accuracy": float(correct.mean()),
            f"{prefix}/format_error_rate": float(np.mean([not t.format_ok for t in batch.main])),
            f"{prefix}/reward_mean": float(main_r.mean()),
            f"{prefix}/delegations_per_rollout": float(batch.sub_counts.mean()),
            f"{prefix}/num_questions": float(len(questions)),
        }
        if not greedy:
            out.update(exploration_stats(batch, main_r, sub_r, prefix))
        if chains is not None:
            out.update(classify_batch(controller, self.rewards, chains, batch))
        return out


def exploration_stats(batch, main_rewards: np.ndarray, sub_rewards: np.ndarray, prefix: str) -> dict[str, float]:
    """How much a group-relative update could learn from sampled rollouts (the controller's samplers, k per
    question): `<prefix>/main_zero_variance_frac`, the share of questions whose k main rewards ([Q, k]) are all
    equal (advantage 0); `<prefix>/sub_zero_variance_frac`, the share of questions with sub-agent episodes whose
    sub rewards (flat, `batch.sub` order; all rollouts and calls of the question, the `per_query` group) are all
    equal; `<prefix>/<agent>_sampled_entropy`, the mean -log pi of every sampled token (an unbiased per-token
    entropy estimate). Alignment only copies or masks rewards within a query's group, so these are the fractions
    the first RL step sees with `sub_group="per_query"` when no call is dropped (d_k <= D_max)."""
    main_r = np.asarray(main_rewards, np.float64)
    out = {f"{prefix}/main_zero_variance_frac": float(np.mean(np.ptp(main_r, axis=1) == 0)),
           f"{prefix}/main_sampled_entropy": _sampled_entropy(batch.main)}
    if batch.sub:
        groups: dict[int, list[float]] = {}
        for t, r in zip(batch.sub, np.asarray(sub_rewards, np.float64)):
            groups.setdefault(t.query, []).append(float(r))
        out[f"{prefix}/sub_zero_variance_frac"] = float(np.mean([np.ptp(v) == 0 for v in groups.values()]))
        out[f"{prefix}/sub_sampled_entropy"] = _sampled_entropy(batch.sub)
    return out


def _sampled_entropy(trajectories: Sequence[Trajectory]) -> float:
    """Mean -log pi(a) over the sampled (loss-masked) tokens."""
    logps = [lp for t in trajectories for lp, m in zip(t.logprobs, t.loss_mask) if m]
    return float(-np.mean(logps)) if logps else 0.0


def _score(rewards: RewardConfig, traj, gold) -> bool:
    return rewards.correctness(traj.final, gold) >= 1.0


# ----------------------------------------------------------------------------------------- failure analysis

FAILURE_KINDS = ("correct", "format", "answered_early", "wrong_delegation", "missed_document", "wrong_fact",
                 "wrong_answer")
FAILURE_DOC = {
    "correct": "the final answer is right",
    "format": "the main (or single) agent's episode ended badly: a malformed action or a limit",
    "answered_early": "the main agent answered before every hop was delegated",
    "wrong_delegation": "a delegated sub-question does not name the hop's subject (e.g. a wrong earlier answer)",
    "missed_document": "the hop's document was never read (search missed it, or the agent read another)",
    "wrong_fact": "the sub-agent read the hop's document but reported a wrong (or no) fact",
    "wrong_answer": "every hop's document was read (and, with a sub-agent, its fact reported), yet the final "
                    "answer is wrong",
}


def _actions(traj: Trajectory, controller: Controller, protocol) -> list:
    return [protocol.parse(controller.codec.decode(traj.tokens[s:e])) for s, e in traj.turns]


def classify_episode(controller: Controller, rewards: RewardConfig, question, main: Trajectory,
                     subs: Sequence[Trajectory]) -> tuple[str, int | None]:
    """Where a generated question's episode first went wrong: (one of FAILURE_KINDS, the hop's index or None),
    from its token records and the question's hop chain (`data.synthetic.Question`). `subs`: the episode's sub
    trajectories in call order."""
    if main.format_ok and rewards.correctness(main.final, question.answer) >= 1.0:
        return "correct", None
    if controller.delegate_action is None:  # a single agent: it must read every hop's document itself
        read = controller.main_protocol.tool_actions[1]
        docs = {a.argument.strip() for a in _actions(main, controller, controller.main_protocol) if a.kind == read}
        for i, hop in enumerate(question.chain):
            if hop.doc_id not in docs:
                return ("missed_document" if main.format_ok else "format"), i
        return ("wrong_answer" if main.format_ok else "format"), None
    read = controller.sub_protocol.tool_actions[1]
    for i, hop in enumerate(question.chain):
        if i >= len(subs):
            return ("answered_early" if main.format_ok else "format"), i
        sub = subs[i]
        if hop.subject not in controller.codec.decode(sub.tokens[: sub.prompt_len]):
            return "wrong_delegation", i
        if not (sub.format_ok and rewards.correctness(sub.final or "", hop.answer) >= 1.0):
            docs = {a.argument.strip() for a in _actions(sub, controller, controller.sub_protocol) if a.kind == read}
            return ("wrong_fact" if hop.doc_id in docs else "missed_document"), i
    return ("wrong_answer" if main.format_ok else "format"), None


def failure_breakdown(evaluator: Evaluator, questions: Sequence[Any]) -> dict[str, float]:
    """Greedy episodes of generated questions (with hop chains), classified (`classify_batch`); only the
    `failures/...` keys. `Evaluator.run(..., chains=questions)` gives them with the accuracy of the same episodes."""
    _check_chains(questions)
    result = evaluator.run([q.question for q in questions], [q.answer for q in questions], chains=questions)
    return {k: v for k, v in result.items() if k.startswith("failures/")}


def _check_chains(questions: Sequence[Any]) -> None:
    if not questions or not all(hasattr(q, "chain") for q in questions):
        raise ValueError("failure_breakdown needs generated questions with hop chains "
                         "(data.synthetic.read_questions_jsonl of a synthetic task's files)")


def classify_batch(controller: Controller, rewards: RewardConfig, questions: Sequence[Any], batch) -> dict[str, float]:
    """One rollout per question of `batch` (a RolloutBatch of `questions`), classified by `classify_episode`: the
    fraction of questions of each of FAILURE_KINDS, as `failures/<kind>`, and of each kind at each hop, as
    `failures/<kind>@hop<i>` (hops counted from 1; only pairs that occur)."""
    _check_chains(questions)
    subs: dict[int, list[Trajectory]] = {}
    for t in batch.sub:
        subs.setdefault(t.query, []).append(t)
    found = [classify_episode(controller, rewards, q, batch.main[i], sorted(subs.get(i, []), key=lambda t: t.call))
             for i, q in enumerate(questions)]
    kinds = [k for k, _ in found]
    out = {f"failures/{k}": kinds.count(k) / len(kinds) for k in FAILURE_KINDS}
    for (kind, hop), count in sorted(Counter(f for f in found if f[1] is not None).items()):
        out[f"failures/{kind}@hop{hop + 1}"] = count / len(found)
    return out
