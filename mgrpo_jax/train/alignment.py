"""Trajectory alignment: every rollout gets exactly D_max sub-agent slots, so the sub-agent's batch has one
shape for the whole run and its update compiles once (MGRPO.md, "Trajectory alignment").

Rollout k of query q made d_k delegations, hence d_k sub trajectories, numbered in a flat list in
(query, rollout, call) order. Alignment maps each of the Q x K x D_max slots to one of them (or to none):

  d_k > D_max      keep D_max of them at random, drop the rest (counted);
  0 < d_k < D_max  keep all, fill the free slots with duplicates of random ones of the same rollout
                   (`pad_mode="duplicate"`, the paper's rule) or leave them empty (`pad_mode="mask"`);
  d_k = 0          fill from the sub trajectories of sibling rollouts of the same query
                   (`fill_empty_from_siblings`, our default where the paper is silent), else empty.

Empty slots have index -1 and weight 0. With `reweight_duplicates`, every distinct trajectory carries total
weight 1 across all the slots that hold it, so copies do not silently reweight the gradient (LESSONS.md,
item 3); otherwise every filled slot has weight 1. Everything is seeded and deterministic.

Every slot also records the call index of the trajectory it holds (its position among its own rollout's
calls), because drops, duplicates and borrowing move calls between slots: `per_call_index` groups must use
it, not the slot number (issue 17). Trajectories passed as `excluded` (infrastructure failures: a failed
generation, a rollout hit by a dead tool) are left out as if never made: they fill no slot, are lent to no
sibling and enter no statistics; they are counted.

`align_sub_slots` is the whole sub-agent side of one batch (alignment, slot rewards, advantages, weights,
metrics), shared by the single-program loop and the decoupled sub job.
"""
from __future__ import annotations

import dataclasses
import math

import functools

import jax
import numpy as np

from mgrpo_jax.kernels import grouped_statistics, sub_advantages, sub_group_ids

PAD_MODES = ("duplicate", "mask")


@dataclasses.dataclass(frozen=True)
class AlignmentConfig:
    """How sub trajectories are fitted into D_max slots per rollout.

    d_max: slots per rollout (an int >= 1), or "auto": the `auto_percentile` of d_k over the first
      `auto_warmup_rollouts` rollouts, then frozen (see `DMaxEstimator`).
    """

    d_max: int | str = 4
    pad_mode: str = "duplicate"
    fill_empty_from_siblings: bool = True
    reweight_duplicates: bool = False
    auto_percentile: float = 90.0
    auto_warmup_rollouts: int = 64
    auto_max: int = 16

    def __post_init__(self):
        if self.d_max != "auto" and not (isinstance(self.d_max, int) and self.d_max >= 1):
            raise ValueError(f"alignment.d_max must be an int >= 1 or 'auto', got {self.d_max!r}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"alignment.pad_mode={self.pad_mode!r} is not supported; choose one of {list(PAD_MODES)}")
        if not 0 < self.auto_percentile <= 100:
            raise ValueError(f"alignment.auto_percentile must be in (0, 100], got {self.auto_percentile!r}")
        if self.auto_warmup_rollouts < 1 or self.auto_max < 1:
            raise ValueError("alignment.auto_warmup_rollouts and alignment.auto_max must be >= 1")


@dataclasses.dataclass(frozen=True)
class Alignment:
    """The fixed-shape result of aligning one batch.

    index: [Q, K, D] int32, position in the flat (query, rollout, call)-ordered list of sub trajectories,
      -1 for an empty slot.
    call_index: [Q, K, D] int32, the call index of the slot's trajectory within the rollout that made it
      (0 = its first delegation), -1 for an empty slot.
    weight: [Q, K, D] float32 per-slot loss weight (0 for empty slots).
    borrowed: [Q, K, D] bool, the slot holds a sibling rollout's trajectory.
    stats: counts of trajectories: kept (in at least one slot), dropped (in no slot: what left the batch),
      excluded (passed as `excluded`), kept + dropped + excluded = all; and of slots: duplicated (copies
      within the own rollout), borrowed and masked (empty).
    """

    index: np.ndarray
    call_index: np.ndarray
    weight: np.ndarray
    borrowed: np.ndarray
    stats: dict

    @property
    def valid(self) -> np.ndarray:
        return self.index >= 0


def _flat_offsets(counts: np.ndarray) -> np.ndarray:
    """[Q, K] counts -> [Q, K] position of each rollout's first sub trajectory in the flat list."""
    return (np.cumsum(counts.reshape(-1)) - counts.reshape(-1)).reshape(counts.shape)


def align(counts, d_max: int, config: AlignmentConfig, rng: np.random.Generator, *,
          excluded=None) -> Alignment:
    """Aligns the sub trajectories of one batch to exactly `d_max` slots per rollout.

    Args:
      counts: [Q, K] ints, d_k: the number of sub trajectories of each rollout.
      d_max: slots per rollout (already resolved when config.d_max is "auto").
      rng: the source of randomness (seed it per step for determinism).
      excluded: None, or [N] bool over the N = counts.sum() sub trajectories in (query, rollout, call)
        order: trajectories to leave out entirely (a rollout whose trajectories are all excluded is aligned
        as one with d_k = 0). Call indices of the others do not change.
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or (counts.size and (counts.min() < 0 or not np.issubdtype(counts.dtype, np.integer))):
        raise ValueError(f"counts must be a [Q, K] array of non-negative ints, got {counts.dtype} {counts.shape}")
    if not (isinstance(d_max, (int, np.integer)) and d_max >= 1):
        raise ValueError(f"d_max must be an int >= 1, got {d_max!r}")
    n_records = int(counts.sum())
    if excluded is None:
        excluded = np.zeros(n_records, bool)
    excluded = np.asarray(excluded)
    if excluded.shape != (n_records,) or excluded.dtype != bool:
        raise ValueError(f"excluded must be a bool array [N] over the N={n_records} sub trajectories in "
                         f"(query, rollout, call) order, got {excluded.dtype} {excluded.shape}")
    n_queries, n_rollouts = counts.shape
    offsets = _flat_offsets(counts)
    index = np.full((n_queries, n_rollouts, d_max), -1, np.int64)
    borrowed = np.zeros(index.shape, bool)
    stats = dict(kept=0, dropped=0, excluded=int(excluded.sum()), duplicated=0, borrowed=0, masked=0)

    def usable(q, k):
        records = offsets[q, k] + np.arange(counts[q, k])
        return records[~excluded[records]]

    for q in range(n_queries):
        for k in range(n_rollouts):
            own = usable(q, k)
            slots = index[q, k]
            if len(own) >= d_max:
                slots[:] = np.sort(rng.choice(own, size=d_max, replace=False))
                continue
            slots[: len(own)] = own
            if len(own) > 0:
                if config.pad_mode == "duplicate":
                    slots[len(own):] = rng.choice(own, size=d_max - len(own), replace=True)
                    stats["duplicated"] += d_max - len(own)
                continue
            siblings = np.concatenate([usable(q, j) for j in range(n_rollouts) if j != k] or [np.zeros(0, int)])
            if config.fill_empty_from_siblings and config.pad_mode == "duplicate" and len(siblings):
                unique_first = min(d_max, len(siblings))
                chosen = list(rng.choice(siblings, size=unique_first, replace=False))
                chosen += list(rng.choice(siblings, size=d_max - unique_first, replace=True))
                slots[:] = chosen
                borrowed[q, k] = True
                stats["borrowed"] += d_max
    valid = index >= 0
    stats["masked"] = int((~valid).sum())
    # Dropped = what left the batch: a trajectory dropped from its own rollout's slots but borrowed back by a
    # sibling is still trained on.
    stats["kept"] = len(np.unique(index[valid]))
    stats["dropped"] = n_records - stats["excluded"] - stats["kept"]

    flat_call = np.arange(n_records) - np.repeat(offsets.reshape(-1), counts.reshape(-1))
    call_index = np.where(valid, flat_call[np.where(valid, index, 0)] if n_records else 0, -1)
    if config.reweight_duplicates:
        copies = np.bincount(index[valid], minlength=max(n_records, 1))
        weight = np.where(valid, 1.0 / np.maximum(copies[np.where(valid, index, 0)], 1), 0.0)
    else:
        weight = valid.astype(np.float64)
    return Alignment(index.astype(np.int32), call_index.astype(np.int32), weight.astype(np.float32), borrowed,
                     {k: int(v) for k, v in stats.items()})


@functools.partial(jax.jit, static_argnames=("sub_group", "scale", "eps", "ddof"))
def _sub_slot_kernel(rewards, valid, call_index, borrowed, *, sub_group, scale, eps, ddof):
    """One program per batch shape: the slots' advantages, and each sub group's count and zero-variance flag."""
    groups = dict(sub_call_index=call_index, sub_borrowed=borrowed)
    advantages = sub_advantages(rewards, valid, sub_group=sub_group, scale=scale, eps=eps, ddof=ddof, **groups)
    stats = grouped_statistics(rewards, *sub_group_ids(sub_group, valid, **groups))
    return advantages, stats.count, stats.zero_variance


@dataclasses.dataclass(frozen=True)
class SubSlots:
    """The sub-agent's side of one batch, [Q, K, D] per slot, ready for the batch builder.

    rewards: float32 R_S of each slot's trajectory (0 for empty slots).
    advantages: float32, grouped by `sub_group` (`mgrpo_jax.kernels.sub_group_ids`); copies of one
      trajectory all get the same advantage.
    weight: float32 loss weights (`alignment.weight`: 0 for empty slots).
    metrics: align/<stat> for every alignment count, align/d_max, sub/zero_variance_frac (the fraction of
      non-empty sub groups whose rewards are all equal).
    """

    alignment: Alignment
    rewards: np.ndarray
    advantages: np.ndarray
    weight: np.ndarray
    metrics: dict


def align_sub_slots(counts, sub_rewards, d_max: int, config: AlignmentConfig, rng: np.random.Generator, *,
                    sub_group: str = "per_query", scale: str = "std", eps: float = 1e-6, ddof: int = 0,
                    excluded=None) -> SubSlots:
    """Aligns one batch's sub trajectories and computes their advantages (MGRPO.md, sub-agent groups).

    Args:
      counts: [Q, K] ints, d_k per rollout; sub_rewards: [N] float rewards in (query, rollout, call) order.
      excluded: [N] bool, trajectories that must not become learning signal (infrastructure failures):
        they take no slot and count in no group (`align`).
      sub_group, scale, eps, ddof: as in `mgrpo_jax.kernels.sub_advantages`.

    Under sub_group="per_rollout" a rollout without a call of its own has no group, so its slots are not
    filled from siblings (`fill_empty_from_siblings` is ignored): a borrowed slot would get advantage 0 and
    only dilute the loss. Those slots stay empty (weight 0, counted as masked).
    """
    sub_rewards = np.asarray(sub_rewards, np.float32).reshape(-1)
    if sub_rewards.shape[0] != int(np.sum(counts)):
        raise ValueError(f"{sub_rewards.shape[0]} sub rewards for {int(np.sum(counts))} sub trajectories (counts)")
    if sub_group == "per_rollout" and config.fill_empty_from_siblings:
        config = dataclasses.replace(config, fill_empty_from_siblings=False)
    alignment = align(counts, d_max, config, rng, excluded=excluded)
    valid = alignment.valid
    rewards = np.where(valid, sub_rewards[np.where(valid, alignment.index, 0)] if len(sub_rewards) else 0.0, 0.0)
    rewards = rewards.astype(np.float32)
    advantages, count, zero_variance = jax.device_get(_sub_slot_kernel(
        rewards, valid, alignment.call_index, alignment.borrowed, sub_group=sub_group, scale=scale, eps=eps,
        ddof=ddof))
    nonempty = count > 0
    zero_var = float(zero_variance[nonempty].mean()) if nonempty.any() else 0.0
    metrics = {f"align/{k}": float(v) for k, v in alignment.stats.items()}
    metrics.update({"align/d_max": float(d_max), "sub/zero_variance_frac": zero_var})
    return SubSlots(alignment, rewards, advantages, alignment.weight, metrics)


class DMaxEstimator:
    """Resolves `d_max="auto"`: the percentile of d_k over warm-up rollouts, then frozen for the whole run."""

    def __init__(self, config: AlignmentConfig):
        self.config = config
        self._seen: list[int] = []
        self._frozen: int | None = config.d_max if isinstance(config.d_max, int) else None

    @property
    def frozen(self) -> bool:
        return self._frozen is not None

    @property
    def value(self) -> int:
        if self._frozen is None:
            raise RuntimeError(
                f"D_max is 'auto' and still warming up ({len(self._seen)} of "
                f"{self.config.auto_warmup_rollouts} rollouts seen); call observe() with more rollouts first"
            )
        return self._frozen

    def observe(self, counts) -> bool:
        """Adds the d_k of some rollouts; returns True once D_max is frozen."""
        if self._frozen is None:
            self._seen.extend(int(c) for c in np.asarray(counts).reshape(-1))
            if len(self._seen) >= self.config.auto_warmup_rollouts:
                estimate = math.ceil(np.percentile(self._seen, self.config.auto_percentile))
                self._frozen = int(min(max(estimate, 1), self.config.auto_max))
        return self.frozen

    def state_dict(self) -> dict:
        return {"seen": list(self._seen), "frozen": self._frozen}

    def load_state_dict(self, state: dict) -> None:
        self._seen, self._frozen = list(state["seen"]), state["frozen"]
