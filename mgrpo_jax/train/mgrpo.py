"""The M-GRPO loop: Q queries -> K rollouts each -> rewards -> advantages -> alignment -> fixed-shape batches
-> each agent's update on its own mesh -> the samplers use the new parameters.

Modes (MGRPO.md, "Training modes"):
  co_train      M-GRPO: main and sub-agent both updated, each with its own group-relative advantages;
  main_only     the sub-agent is frozen (multi-agent GRPO with a frozen sub-agent);
  single_agent  one model, no delegation: it calls the tools itself (single-agent GRPO);
  shared_model  one model plays both roles and trains on both agents' data (the "unified LLM").
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from mgrpo_jax.kernels import SCALES, SUB_GROUPS, group_relative_advantages, group_statistics
from mgrpo_jax.multihost import check_agreement, digest, rollout_digest
from mgrpo_jax.rollout.controller import Controller, RolloutBatch
from mgrpo_jax.rollout.rewards import RewardConfig, group_rewards
from mgrpo_jax.train.agent import AgentTrainer
from mgrpo_jax.train.alignment import AlignmentConfig, DMaxEstimator, align_sub_slots
from mgrpo_jax.train.batch import PackedBatch, Segment, merge_copies

MODES = ("co_train", "main_only", "single_agent", "shared_model")


@dataclasses.dataclass(frozen=True)
class DynamicSamplingConfig:
    """Dynamic sampling (DAPO, Yu et al. 2025, "dynamic sampling"; verl's `filter_groups`): a query whose K main
    rewards are all equal gives the main agent no advantage, and in M-GRPO its sub-agent's rewards differ only by
    format (they share the main outcome), so such groups leave the update and more queries are rolled out in
    their place, until the step has Q groups whose main rewards differ or `max_rounds` rollout batches of Q
    queries were sampled (the first included). If still short, the step fills up to Q with the all-equal groups
    it sampled, in order (no worse than not filtering: they carry advantage 0), and counts them. Every agent's
    batch keeps Q queries' trajectories either way.

    Logged (`dynamic/...`): rounds, sampled and informative groups, filled groups (all-equal ones trained because
    the rounds ran out) and informative groups left over from the last round. `main/zero_variance_frac` stays the
    fraction over every sampled group (the policy's signal); `main/zero_variance_frac_trained` is the trained one.
    """

    enabled: bool = False
    max_rounds: int = 4

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"mgrpo.dynamic_sampling.enabled must be true or false, got {self.enabled!r}")
        if not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise ValueError(f"mgrpo.dynamic_sampling.max_rounds must be >= 1 (rollout batches per step, the first "
                             f"included), got {self.max_rounds}")


@dataclasses.dataclass(frozen=True)
class MGRPOConfig:
    """The loop's algorithmic settings (agents' optimizers and losses live in their `AgentTrainer`s)."""

    mode: str = "co_train"
    num_rollouts: int = 8
    advantage_scale: str = "std"
    advantage_eps: float = 1e-6
    advantage_ddof: int = 0
    sub_group: str = "per_query"
    alignment: AlignmentConfig = AlignmentConfig()
    rewards: RewardConfig = RewardConfig()
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mgrpo.mode={self.mode!r} is not supported; choose one of {list(MODES)}")
        if self.advantage_scale not in SCALES:
            raise ValueError(f"mgrpo.advantage_scale={self.advantage_scale!r}; choose one of {list(SCALES)}")
        if self.sub_group not in SUB_GROUPS:
            raise ValueError(f"mgrpo.sub_group={self.sub_group!r}; choose one of {list(SUB_GROUPS)}")
        if self.num_rollouts < 2:
            raise ValueError(f"mgrpo.num_rollouts must be >= 2 (a group needs at least two rollouts), "
                             f"got {self.num_rollouts}")

    @property
    def has_sub_agent(self) -> bool:
        return self.mode != "single_agent"


@dataclasses.dataclass
class StepResult:
    """What one step trained on: the rollouts of its Q queries, their gold answers, the reward arrays and the host
    batches (for tests, stores, and the decoupled mode), and the step's metrics. With dynamic sampling the queries
    are the ones kept from every round, numbered in that order."""

    rollouts: RolloutBatch
    golds: list[Any]
    main_rewards: np.ndarray  # [Q, K]
    sub_rewards: np.ndarray  # [sum d_k], the flat (query, rollout, call) order
    batches: dict[str, PackedBatch]  # per trainer ("main", "sub", or "shared")
    metrics: dict[str, float]


def compute_rewards(rollouts: RolloutBatch, golds: Sequence[Any], num_rollouts: int, config: RewardConfig):
    """Main rewards [Q, K], flat sub rewards [sum d_k] and the mean reward parts for logging."""
    main_r, sub_r, parts = _rewards_and_parts(rollouts, golds, num_rollouts, config)
    return main_r, sub_r, _reward_means(parts)


def _reward_means(parts: dict[str, list[float]]) -> dict[str, float]:
    """The logged reward parts: each the mean over queries of its per-query group mean."""
    means = {k: float(np.mean(v)) for k, v in parts.items()}
    means["main/accuracy"] = means["main/reward_correct_score"]
    return means


def _rewards_and_parts(rollouts: RolloutBatch, golds: Sequence[Any], num_rollouts: int, config: RewardConfig):
    """compute_rewards with the reward parts' per-query group means unreduced (rounds of dynamic sampling add
    up their queries')."""
    q_n = len(golds)
    main_r = np.zeros((q_n, num_rollouts), np.float32)
    sub_r, parts = [], {}
    by_rollout = [[[] for _ in range(num_rollouts)] for _ in range(q_n)]  # one pass, not one scan per rollout
    for t in rollouts.sub:
        by_rollout[t.query][t.rollout].append(t)
    for q in range(q_n):
        mains = rollouts.main[q * num_rollouts:(q + 1) * num_rollouts]
        subs = by_rollout[q]
        m, s = group_rewards([t.final if t.format_ok else None for t in mains], [t.format_ok for t in mains], golds[q],
                             [[t.format_ok for t in row] for row in subs], config, subs, mains)
        main_r[q] = m.reward
        sub_r.append(s.reward)
        for prefix, group in (("main", m), ("sub", s)):
            for key, value in group.means().items():
                parts.setdefault(f"{prefix}/reward_{key}", []).append(value)
    return main_r, np.concatenate(sub_r) if sub_r else np.zeros(0, np.float32), parts


class MGRPOTrainer:
    """Runs M-GRPO steps. `trainers` maps "main" (and "sub" in co_train; the same object twice in
    shared_model) to `AgentTrainer`s. With `alignment.d_max="auto"` the sub-agent does not train until D_max is
    frozen (its warm-up rollouts only measure d_k)."""

    def __init__(self, config: MGRPOConfig, controller: Controller, trainers: dict[str, AgentTrainer]):
        self.config, self.controller, self.trainers = config, controller, dict(trainers)
        expected = {"co_train": {"main", "sub"}, "main_only": {"main"}, "single_agent": {"main"},
                    "shared_model": {"main", "sub"}}[config.mode]
        if set(self.trainers) != expected:
            raise ValueError(f"mode={config.mode!r} needs trainers for {sorted(expected)}, got {sorted(self.trainers)}")
        if config.mode == "shared_model" and self.trainers["main"] is not self.trainers["sub"]:
            raise ValueError("mode='shared_model' trains one parameter set: pass the same AgentTrainer as main and sub")
        if config.has_sub_agent != bool(controller.delegate_action):
            raise ValueError(f"mode={config.mode!r} needs a controller {'with' if config.has_sub_agent else 'without'}"
                             " a delegate action (single_agent uses the single-agent protocol)")
        self.d_max = DMaxEstimator(config.alignment)
        self.step_count = 0

    def step(self, questions: Sequence[str], golds: Sequence[Any],
             more_questions: Callable[[], tuple[Sequence[str], Sequence[Any]]] | None = None) -> StepResult:
        """One step on Q = len(questions) queries. With dynamic sampling, `more_questions()` gives the next Q
        questions and their golds for each further round (the run's data iterator); without it the step filters
        the one round it has."""
        cfg, k_n = self.config, self.config.num_rollouts
        if len(questions) != len(golds):
            raise ValueError(f"{len(questions)} questions but {len(golds)} gold answers")
        rng = jax.random.fold_in(jax.random.key(cfg.seed), self.step_count)
        timings = {}
        metrics: dict[str, float] = {}
        everything, all_golds, all_main_r, all_sub_r, kept = self._sample(questions, golds, more_questions, rng,
                                                                           timings, metrics)
        if cfg.has_sub_agent:
            self.d_max.observe(everything.sub_counts)
        # Rollouts that an infrastructure failure touched (a dead tool, a failed generation) are no learning signal
        # for either agent: they leave the statistics and the batches, and are counted.
        all_ok = _main_ok(everything, k_n)
        metrics["main/zero_variance_frac"] = _zero_variance_fraction(all_main_r, all_ok)
        metrics.update(_rollout_metrics(everything, all_main_r, all_sub_r))
        if len(kept) == everything.num_queries:  # every sampled query trains (always, without dynamic sampling)
            rollouts, golds, main_r, sub_r, main_ok = everything, all_golds, all_main_r, all_sub_r, all_ok
        else:
            rollouts, golds = everything.select(kept), [all_golds[q] for q in kept]
            main_r, sub_r, main_ok = all_main_r[kept], all_sub_r[everything.sub_positions(kept)], all_ok[kept]

        t0 = time.perf_counter()
        adv_opts = dict(scale=cfg.advantage_scale, eps=cfg.advantage_eps, ddof=cfg.advantage_ddof)
        segments: dict[str, list[Segment]] = {}
        metrics["infra/excluded_rollouts"] = float((~main_ok).sum())
        if cfg.has_sub_agent and self.d_max.frozen:
            excluded = np.array([t.infra_failures > 0 or not main_ok[t.query, t.rollout] for t in rollouts.sub], bool)
            segments["sub"], sub_metrics = aligned_sub_segments(
                rollouts.sub_counts, rollouts.sub, sub_r, self.d_max.value, cfg.alignment, cfg.sub_group, adv_opts,
                np.random.default_rng([cfg.seed, self.step_count]), excluded=excluded)
            metrics.update(sub_metrics)
        elif cfg.mode in ("co_train", "shared_model"):
            metrics["sub/warmup_skipped"] = 1.0
        adv_main = np.asarray(group_relative_advantages(main_r, main_ok, axis=1, **adv_opts))
        if cfg.dynamic_sampling.enabled:
            metrics["main/zero_variance_frac_trained"] = _zero_variance_fraction(main_r, main_ok)
        segments["main"] = [Segment(t, a, float(ok)) for t, a, ok in
                            zip(rollouts.main, adv_main.reshape(-1), main_ok.reshape(-1))]
        timings["time/alignment_s"] = time.perf_counter() - t0

        batches, update_metrics = self._update(segments, timings)
        metrics.update(update_metrics)
        metrics.update(timings)
        self.step_count += 1
        return StepResult(rollouts, list(golds), main_r, sub_r, batches, metrics)

    def _sample(self, questions, golds, more_questions, rng, timings, metrics):
        """Rolls out and rewards one batch of queries, or with dynamic sampling as many rounds as it takes ->
        (every sampled query's rollouts, golds, main rewards [N, K] and flat sub rewards, the indices of the Q
        queries to train on). Logs the reward parts over every sampled query."""
        cfg, k_n, q_n = self.config, self.config.num_rollouts, len(questions)
        ds = cfg.dynamic_sampling
        rounds, informative, parts = [], [], {}
        timings["time/rollout_s"] = timings["time/rewards_s"] = 0.0
        while True:
            r = len(rounds)
            name = f"step {self.step_count}" + (f", round {r}" if r else "")
            # Multi-controller runs: every process must hold the same questions, then the same rollouts (a no-op
            # with one process; see mgrpo_jax.multihost).
            check_agreement(f"the questions of {name}", digest(list(questions), list(golds)))
            t0 = time.perf_counter()
            rollouts = self.controller.run(questions, k_n, jax.random.fold_in(rng, r) if r else rng)
            timings["time/rollout_s"] += time.perf_counter() - t0
            check_agreement(f"the rollouts' token records of {name}", rollout_digest(rollouts))
            t0 = time.perf_counter()
            main_r, sub_r, round_parts = _rewards_and_parts(rollouts, golds, k_n, cfg.rewards)
            timings["time/rewards_s"] += time.perf_counter() - t0
            for key, values in round_parts.items():
                parts.setdefault(key, []).extend(values)
            rounds.append((rollouts, list(golds), main_r, sub_r))
            stats = group_statistics(main_r, _main_ok(rollouts, k_n), axis=1)
            informative += list((np.asarray(stats.count) > 0) & ~np.asarray(stats.zero_variance))
            if not ds.enabled or sum(informative) >= q_n or r + 1 >= ds.max_rounds or more_questions is None:
                break
            questions, golds = more_questions()
            if len(questions) != len(golds):
                raise ValueError(f"more_questions gave {len(questions)} questions but {len(golds)} gold answers")
        metrics.update(_reward_means(parts))
        everything = RolloutBatch.concat([rollouts for rollouts, *_ in rounds])
        all_golds = [g for _, round_golds, *_ in rounds for g in round_golds]
        all_main_r = np.concatenate([main_r for _, _, main_r, _ in rounds])
        all_sub_r = np.concatenate([sub_r for *_, sub_r in rounds])
        if not ds.enabled:
            return everything, all_golds, all_main_r, all_sub_r, list(range(q_n))
        useful = [q for q, ok in enumerate(informative) if ok]
        kept = useful[:q_n]
        filled = [q for q, ok in enumerate(informative) if not ok][:q_n - len(kept)]
        metrics.update({"dynamic/rounds": float(len(rounds)), "dynamic/sampled_groups": float(len(informative)),
                        "dynamic/informative_groups": float(len(useful)), "dynamic/filled_groups": float(len(filled)),
                        "dynamic/left_over_groups": float(len(useful) - len(kept))})
        return everything, all_golds, all_main_r, all_sub_r, sorted(kept + filled)

    def _update(self, segments: dict[str, list[Segment]], timings) -> tuple[dict[str, PackedBatch], dict[str, float]]:
        """Packs each trained agent's segments, dispatches every agent's update back to back, then collects;
        hands new weights to the samplers."""
        t0 = time.perf_counter()
        if self.config.mode == "shared_model":  # one model trains on both agents' trajectories, packed together
            jobs = {"shared": (self.trainers["main"], segments["main"] + segments.get("sub", []))}
        else:
            jobs = {"main": (self.trainers["main"], segments["main"])}
            if self.config.mode == "co_train" and "sub" in segments:
                jobs["sub"] = (self.trainers["sub"], segments["sub"])
        batches = {name: trainer.pack(segs) for name, (trainer, segs) in jobs.items()}
        timings["time/pack_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pending = {name: trainer.dispatch(batches[name]) for name, (trainer, _) in jobs.items()}
        out = {name: jobs[name][0].collect(p) for name, p in pending.items()}
        timings["time/update_s"] = time.perf_counter() - t0
        main_trainer = self.trainers["main"]
        self.controller.main_policy.update(main_trainer.params, main_trainer.version)
        if self.config.mode == "shared_model":
            self.controller.sub_policy.update(main_trainer.params, main_trainer.version)
        elif "sub" in out:
            sub_trainer = self.trainers["sub"]
            self.controller.sub_policy.update(sub_trainer.params, sub_trainer.version)
        flat = {}
        for name, metrics in out.items():
            metrics["tokens_per_s"] = batches[name].num_loss_tokens / max(timings["time/update_s"], 1e-9)
            flat.update({f"{name}/{k}": v for k, v in metrics.items()})
        return batches, flat


def aligned_sub_segments(counts, sub_trajectories, sub_rewards, d_max: int, alignment_cfg: AlignmentConfig,
                         sub_group: str, adv_opts: dict, rng: np.random.Generator, *, excluded=None):
    """Alignment and the sub-agent's own group-relative advantages for one batch of Q queries (MGRPO.md) ->
    (its segments: copies of one trajectory with one advantage merged, alignment metrics).

    counts: [Q, K] d_k; sub_trajectories / sub_rewards: the flat (query, rollout, call)-ordered records and their
    rewards; excluded: [N] bool, records that must not become learning signal (infrastructure failures): they
    take no slot and join no group. The main agent's rewards never enter these statistics (one baseline per agent).
    """
    slots = align_sub_slots(counts, sub_rewards, d_max, alignment_cfg, rng, sub_group=sub_group, excluded=excluded,
                            **adv_opts)
    flat = zip(slots.alignment.index.reshape(-1), slots.advantages.reshape(-1), slots.weight.reshape(-1))
    return [Segment(sub_trajectories[i], a, w) for i, a, w in merge_copies(flat)], slots.metrics


def _main_ok(rollouts: RolloutBatch, num_rollouts: int) -> np.ndarray:
    """[Q, K] bool: the rollouts no infrastructure failure touched."""
    return np.array([t.infra_failures == 0 for t in rollouts.main], bool).reshape(-1, num_rollouts)


def _zero_variance_fraction(rewards, mask) -> float:
    """Fraction of a [Q, K] reward array's non-empty groups (queries) whose valid rewards are all equal
    (advantage 0: no learning signal)."""
    stats = group_statistics(rewards, mask, axis=1)
    nonempty = np.asarray(stats.count) > 0
    return float(np.asarray(stats.zero_variance)[nonempty].mean()) if nonempty.any() else 0.0


def _rollout_metrics(rollouts: RolloutBatch, main_r, sub_r) -> dict[str, float]:
    main, sub = rollouts.main, rollouts.sub
    out = {
        "main/sampled_entropy": _sampled_entropy(main),
        "main/reward_mean": float(main_r.mean()), "main/reward_std": float(main_r.std()),
        "main/format_error_rate": float(np.mean([not t.format_ok for t in main])),
        "main/response_tokens": float(np.mean([t.num_sampled for t in main])),
        "main/turns": float(np.mean([len(t.turns) for t in main])),
        "sub/calls_per_rollout": float(rollouts.sub_counts.mean()),
    }
    if sub:
        out.update({
            "sub/sampled_entropy": _sampled_entropy(sub),
            "sub/reward_mean": float(sub_r.mean()), "sub/reward_std": float(sub_r.std()),
            "sub/format_error_rate": float(np.mean([not t.format_ok for t in sub])),
            "sub/response_tokens": float(np.mean([t.num_sampled for t in sub])),
            "sub/turns": float(np.mean([len(t.turns) for t in sub])),
        })
    out.update({f"rollout/{k}": float(v) for k, v in rollouts.stats.items()})
    return out


def _sampled_entropy(trajectories) -> float:
    """Mean -log pi_old(a) over every sampled token of the step: an unbiased estimate of the sampling policy's
    per-token entropy (E_a~pi[-log pi(a)] = H(pi)), over all rollouts, whatever the update trained on."""
    logps = [lp for t in trajectories for lp, m in zip(t.logprobs, t.loss_mask) if m]
    return float(-np.mean(logps)) if logps else 0.0
