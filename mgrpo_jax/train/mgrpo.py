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

from mgrpo_jax.kernels import SCALES, SUB_GROUPS, group_relative_advantages, group_statistics, mgrpo_advantages
from mgrpo_jax.rollout.controller import Controller, RolloutBatch
from mgrpo_jax.rollout.rewards import RewardConfig, group_rewards
from mgrpo_jax.train.agent import AgentTrainer
from mgrpo_jax.train.alignment import AlignmentConfig, DMaxEstimator, align
from mgrpo_jax.train.batch import build_batch, concat_batches

MODES = ("co_train", "main_only", "single_agent", "shared_model")


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
    main_max_len: int = 2048
    sub_max_len: int = 1024
    pad_id: int = 0
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
        if self.mode == "shared_model" and self.alignment.d_max == "auto":
            raise ValueError("mode='shared_model' needs a fixed alignment.d_max (its one update holds both agents' "
                             "rows, so the row count must be known up front)")
        if self.mode == "shared_model" and self.main_max_len != self.sub_max_len:
            raise ValueError("mode='shared_model' trains one model on both agents' rows, which must share one length: "
                             f"set mgrpo.main_max_len == mgrpo.sub_max_len (got {self.main_max_len}, "
                             f"{self.sub_max_len})")

    @property
    def has_sub_agent(self) -> bool:
        return self.mode != "single_agent"


@dataclasses.dataclass
class StepResult:
    """What one step produced: the rollouts, the reward arrays and the host batches (for tests, stores,
    and the decoupled mode), and the step's metrics."""

    rollouts: RolloutBatch
    main_rewards: np.ndarray  # [Q, K]
    sub_rewards: np.ndarray  # [sum d_k], the flat (query, rollout, call) order
    batches: dict[str, dict[str, np.ndarray]]
    metrics: dict[str, float]


def compute_rewards(rollouts: RolloutBatch, golds: Sequence[Any], num_rollouts: int, config: RewardConfig):
    """Main rewards [Q, K], flat sub rewards [sum d_k] and the mean reward parts for logging."""
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
                             [[t.format_ok for t in row] for row in subs], config,
                             subs if config.sub_judge else None)
        main_r[q] = m.reward
        sub_r.append(s.reward)
        for prefix, group in (("main", m), ("sub", s)):
            for key, value in group.means().items():
                parts.setdefault(f"{prefix}/reward_{key}", []).append(value)
    means = {k: float(np.mean(v)) for k, v in parts.items()}
    means["main/accuracy"] = means["main/reward_correct_score"]
    return main_r, np.concatenate(sub_r) if sub_r else np.zeros(0, np.float32), means


class MGRPOTrainer:
    """Runs M-GRPO steps. `trainers` maps "main" (and "sub" in co_train; the same object twice in
    shared_model) to `AgentTrainer`s; a "sub" entry may be a factory `num_rows -> AgentTrainer`, called once
    D_max is known (`alignment.d_max="auto"`: the sub-agent does not train during the warm-up)."""

    def __init__(self, config: MGRPOConfig, controller: Controller,
                 trainers: dict[str, AgentTrainer | Callable[[int], AgentTrainer]]):
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

    def _sub_trainer(self) -> AgentTrainer | None:
        sub = self.trainers.get("sub")
        if sub is None or isinstance(sub, AgentTrainer):
            return sub
        if not self.d_max.frozen:
            return None
        rows = self.controller_rows * self.d_max.value
        self.trainers["sub"] = sub(rows)
        return self.trainers["sub"]

    def step(self, questions: Sequence[str], golds: Sequence[Any]) -> StepResult:
        cfg, k_n = self.config, self.config.num_rollouts
        if len(questions) != len(golds):
            raise ValueError(f"{len(questions)} questions but {len(golds)} gold answers")
        self.controller_rows = len(questions) * k_n
        rng = jax.random.fold_in(jax.random.key(cfg.seed), self.step_count)
        timings = {}
        t0 = time.perf_counter()
        rollouts = self.controller.run(questions, k_n, rng)
        timings["time/rollout_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        main_r, sub_r, reward_means = compute_rewards(rollouts, golds, k_n, cfg.rewards)
        timings["time/rewards_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        adv_opts = dict(scale=cfg.advantage_scale, eps=cfg.advantage_eps, ddof=cfg.advantage_ddof)
        metrics: dict[str, float] = {}
        batches = {}
        sub_trainer = None
        if cfg.has_sub_agent:
            self.d_max.observe(rollouts.sub_counts)
            sub_trainer = self._sub_trainer()
        if sub_trainer is not None:
            d_max = self.d_max.value
            alignment = align(rollouts.sub_counts, d_max, cfg.alignment,
                              np.random.default_rng([cfg.seed, self.step_count]))
            valid = alignment.valid
            sub_aligned = np.where(valid, sub_r[np.where(valid, alignment.index, 0)] if len(sub_r) else 0.0, 0.0)
            adv_main, adv_sub = mgrpo_advantages(main_r, sub_aligned, valid, sub_group=cfg.sub_group, **adv_opts)
            adv_main, adv_sub = np.asarray(adv_main), np.asarray(adv_sub)
            flat = alignment.index.reshape(-1)
            batches["sub"] = build_batch([rollouts.sub[i] if i >= 0 else None for i in flat], adv_sub.reshape(-1),
                                         alignment.weight.reshape(-1), cfg.sub_max_len, cfg.pad_id)
            metrics.update({f"align/{k}": float(v) for k, v in alignment.stats.items()})
            metrics["align/d_max"] = float(d_max)
            metrics["sub/zero_variance_frac"] = _zero_variance_fraction(sub_aligned, valid, cfg.sub_group)
        else:
            adv_main = np.asarray(group_relative_advantages(main_r, axis=1, **adv_opts))
            if cfg.mode in ("co_train", "shared_model"):
                metrics["sub/warmup_skipped"] = 1.0
        metrics["main/zero_variance_frac"] = _zero_variance_fraction(main_r, None, None)
        batches["main"] = build_batch(rollouts.main, adv_main.reshape(-1), np.ones(main_r.size), cfg.main_max_len,
                                      cfg.pad_id)
        timings["time/alignment_s"] = time.perf_counter() - t0

        metrics.update(self._update(batches, sub_trainer, timings))
        metrics.update(timings)
        metrics.update(reward_means)
        metrics.update(_rollout_metrics(rollouts, main_r, sub_r))
        self.step_count += 1
        return StepResult(rollouts, main_r, sub_r, batches, metrics)

    def _update(self, batches, sub_trainer, timings) -> dict[str, float]:
        """Dispatches every agent's update back to back, then collects; hands new weights to the samplers."""
        main_trainer = self.trainers["main"]
        t0 = time.perf_counter()
        if self.config.mode == "shared_model":
            if "sub" not in batches:
                out = {"shared": main_trainer.update(batches["main"])}
            else:
                out = {"shared": main_trainer.update(concat_batches([batches["main"], batches["sub"]]))}
        else:
            pending = {"main": (main_trainer, main_trainer.dispatch(batches["main"]))}
            if sub_trainer is not None and self.config.mode == "co_train":
                pending["sub"] = (sub_trainer, sub_trainer.dispatch(batches["sub"]))
            out = {name: trainer.collect(m) for name, (trainer, m) in pending.items()}
        timings["time/update_s"] = time.perf_counter() - t0
        self.controller.main_policy.update(main_trainer.params, main_trainer.version)
        if self.config.mode == "shared_model":
            self.controller.sub_policy.update(main_trainer.params, main_trainer.version)
        elif "sub" in out:
            self.controller.sub_policy.update(sub_trainer.params, sub_trainer.version)
        tokens = {name: (batches["main"] if name != "sub" else batches["sub"])["loss_mask"].sum() for name in out}
        flat = {}
        for name, metrics in out.items():
            metrics["tokens_per_s"] = float(tokens[name]) / max(timings["time/update_s"], 1e-9)
            flat.update({f"{name}/{k}": v for k, v in metrics.items()})
        return flat


def _zero_variance_fraction(rewards, mask, sub_group) -> float:
    """Fraction of non-empty groups whose rewards are all equal (advantage 0: no learning signal)."""
    axis = {None: 1, "per_query": (1, 2), "per_rollout": 2, "per_call_index": 1}[sub_group]
    stats = group_statistics(rewards, mask, axis=axis)
    nonempty = np.asarray(stats.count) > 0
    return float(np.asarray(stats.zero_variance)[nonempty].mean()) if nonempty.any() else 0.0


def _rollout_metrics(rollouts: RolloutBatch, main_r, sub_r) -> dict[str, float]:
    main, sub = rollouts.main, rollouts.sub
    out = {
        "main/reward_mean": float(main_r.mean()), "main/reward_std": float(main_r.std()),
        "main/format_error_rate": float(np.mean([not t.format_ok for t in main])),
        "main/response_tokens": float(np.mean([t.num_sampled for t in main])),
        "main/turns": float(np.mean([len(t.turns) for t in main])),
        "sub/calls_per_rollout": float(rollouts.sub_counts.mean()),
    }
    if sub:
        out.update({
            "sub/reward_mean": float(sub_r.mean()), "sub/reward_std": float(sub_r.std()),
            "sub/format_error_rate": float(np.mean([not t.format_ok for t in sub])),
            "sub/response_tokens": float(np.mean([t.num_sampled for t in sub])),
            "sub/turns": float(np.mean([len(t.turns) for t in sub])),
        })
    out.update({f"rollout/{k}": float(v) for k, v in rollouts.stats.items()})
    return out
