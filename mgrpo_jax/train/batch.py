"""Trajectory records -> packed, fixed-shape training batches, one layout for every agent.

Whole trajectories are packed into rows of `row_len` tokens (first-fit decreasing), each with its own segment id
and RoPE positions that start at 0, so attention never crosses trajectories (the model masks by segment id)
and almost no trained position is padding (LESSONS.md, item 19). Rows are grouped into micro-batches of
`rows` rows: the shape `[rows, row_len]` is fixed for a whole run, and a step with more tokens gets more
micro-batches of that same shape, never a new shape (so never a recompile).

A trajectory's scalar advantage and weight ride along on each of its tokens, as do its behaviour log-probs and
loss mask; the loss aggregates per segment (`kernels.aggregate_loss(segment_ids=...)`), so packing changes the
layout and nothing else. Next-token prediction uses tokens[:, :-1] to score tokens[:, 1:]; `loss_mask` and
`old_logp` are stored aligned with `tokens` and shifted inside the loss, and a segment's first token never
carries loss (nothing of its own predicts it).

    tokens, positions, segment_ids, loss_mask: [N, L] int32;  old_logp, advantages, weights: [N, L] float32
    (N = micro-batches x rows; segment id 0 = padding, weight 0)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from mgrpo_jax.rollout.controller import Trajectory

FIELDS = ("tokens", "positions", "segment_ids", "loss_mask", "old_logp", "advantages", "weights")
_FLOAT_FIELDS = ("old_logp", "advantages", "weights")


@dataclasses.dataclass(frozen=True)
class Segment:
    """One trajectory's place in a batch: its scalar advantage and its loss weight (alignment's duplicate
    reweighting; a trajectory that fills several slots with one advantage is one segment with their summed
    weight, which is exactly the same loss for every aggregation mode)."""

    trajectory: Trajectory
    advantage: float = 0.0
    weight: float = 1.0


@dataclasses.dataclass
class PackedBatch:
    """A packed batch: `arrays` (FIELDS, each [num_micro_batches * rows, row_len]) plus bookkeeping.

    denominator_offset: the loss denominator of segments left out of the arrays because their loss is exactly
      zero (see `AgentTrainer.pack`); the update divides by the arrays' denominator plus this.
    segments: trajectories packed; skipped_segments: trajectories left out (zero loss), counted.
    """

    arrays: dict[str, np.ndarray]
    rows: int
    segments: int
    denominator_offset: float = 0.0
    skipped_segments: int = 0

    @property
    def row_len(self) -> int:
        return self.arrays["tokens"].shape[1]

    @property
    def num_micro_batches(self) -> int:
        return self.arrays["tokens"].shape[0] // self.rows

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) positions."""
        return int(np.count_nonzero(self.arrays["segment_ids"]))

    @property
    def num_loss_tokens(self) -> int:
        return int(self.arrays["loss_mask"].sum())

    @property
    def useful_fraction(self) -> float:
        """Real positions / all positions of the arrays (1.0 for an empty batch: nothing wasted)."""
        size = self.arrays["tokens"].size
        return self.num_tokens / size if size else 1.0

    def micro_batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.arrays["tokens"].shape[0], self.rows):
            yield {k: v[start:start + self.rows] for k, v in self.arrays.items()}

    def stats(self) -> dict[str, float]:
        return {"batch/micro_batches": float(self.num_micro_batches), "batch/segments": float(self.segments),
                "batch/skipped_segments": float(self.skipped_segments), "batch/tokens": float(self.num_tokens),
                "batch/loss_tokens": float(self.num_loss_tokens), "batch/useful_fraction": self.useful_fraction}


def empty_arrays(num_rows: int, row_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    arrays = {k: np.zeros((num_rows, row_len), np.float32 if k in _FLOAT_FIELDS else np.int32) for k in FIELDS}
    arrays["tokens"][:] = pad_id
    return arrays


def first_fit_decreasing(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Bins of item indices, each summing to <= row_len: items longest first, each into the first bin with room.

    Deterministic (ties keep input order). Every length must be in [1, row_len].
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(row_len - lengths[i])
    return bins


def pack(segments: Sequence[Segment], row_len: int, rows: int, pad_id: int = 0) -> PackedBatch:
    """Packs whole trajectories into micro-batches of `rows` rows of `row_len` tokens.

    A trajectory longer than `row_len` is an error naming it (never silently cut: the controller's context
    limit bounds trajectories, and the config check keeps `row_len` at least that). The last micro-batch is
    completed with empty rows (segment id 0, weight 0). No segments: zero micro-batches.
    """
    if row_len < 2 or rows < 1:
        raise ValueError(f"pack needs row_len >= 2 and rows >= 1, got row_len={row_len}, rows={rows}")
    lengths = [len(s.trajectory.tokens) for s in segments]
    for s, n in zip(segments, lengths):
        t = s.trajectory
        if n > row_len:
            raise ValueError(f"{t.agent} trajectory (query {t.query}, rollout {t.rollout}, call {t.call}) has {n} "
                             f"tokens, more than the packed row length {row_len}; raise loss.pack_len or lower the "
                             "controller's context limit so that they agree")
        if n == 0:
            raise ValueError(f"{t.agent} trajectory (query {t.query}, rollout {t.rollout}, call {t.call}) is empty")
    bins = first_fit_decreasing(lengths, row_len)
    num_rows = -(-len(bins) // rows) * rows
    arrays = empty_arrays(num_rows, row_len, pad_id)
    for row, members in enumerate(bins):
        start = 0
        for seg_id, i in enumerate(members, start=1):
            s, n = segments[i], lengths[i]
            cols = slice(start, start + n)
            t = s.trajectory
            arrays["tokens"][row, cols] = t.tokens
            arrays["positions"][row, cols] = np.arange(n)
            arrays["segment_ids"][row, cols] = seg_id
            arrays["loss_mask"][row, cols] = t.loss_mask
            arrays["loss_mask"][row, start] = 0  # a segment's first token is predicted by nothing of its own
            arrays["old_logp"][row, cols] = t.logprobs
            arrays["advantages"][row, cols] = s.advantage
            arrays["weights"][row, cols] = s.weight
            start += n
    return PackedBatch(arrays, rows, len(segments))


def merge_copies(slots: Sequence[tuple[int, float, float]]) -> list[tuple[int, float, float]]:
    """(record index, advantage, weight) slots -> one entry per distinct (record, advantage), weights summed.

    Alignment fills a rollout's D_max slots with copies of its trajectories; copies that share an advantage are
    one segment of summed weight (the same loss, computed once). Slots with weight 0 (empty, masked) drop out.
    Order: first appearance.
    """
    merged: dict[tuple[int, float], float] = {}
    for index, advantage, weight in slots:
        if index < 0 or weight == 0:
            continue
        key = (int(index), float(advantage))
        merged[key] = merged.get(key, 0.0) + float(weight)
    return [(i, a, w) for (i, a), w in merged.items()]
