"""Trajectory records -> fixed-shape training batches, one layout for every agent.

A batch holds N sequences of a fixed length L (right-padded; a longer trajectory is an error, never silently
cut: the controller's context limit bounds it). Next-token prediction uses tokens[:, :-1] to score
tokens[:, 1:]; `loss_mask` and `old_logp` are stored aligned with `tokens` and shifted inside the loss.

    tokens, loss_mask, attention_mask, positions: [N, L] int32; old_logp: [N, L] float32
    advantages, weights: [N] float32   (weight 0 = an empty slot that contributes nothing)
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mgrpo_jax.rollout.controller import Trajectory

FIELDS = ("tokens", "loss_mask", "attention_mask", "positions", "old_logp", "advantages", "weights")


def empty_batch(num_sequences: int, max_len: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.zeros((num_sequences, max_len), np.int32),
        "loss_mask": np.zeros((num_sequences, max_len), np.int32),
        "attention_mask": np.zeros((num_sequences, max_len), np.int32),
        "positions": np.zeros((num_sequences, max_len), np.int32),
        "old_logp": np.zeros((num_sequences, max_len), np.float32),
        "advantages": np.zeros((num_sequences,), np.float32),
        "weights": np.zeros((num_sequences,), np.float32),
    }


def build_batch(trajectories: Sequence[Trajectory | None], advantages, weights, max_len: int,
                pad_id: int = 0) -> dict[str, np.ndarray]:
    """One row per entry of `trajectories` (None = an empty slot: all zeros, weight 0).

    Args:
      trajectories: N records (or None).
      advantages: [N] scalar advantage per row (broadcast over the row's own sampled tokens by the loss).
      weights: [N] per-row loss weight (alignment's duplicate reweighting; 0 for empty slots).
      max_len: L, the fixed row length of this agent's batches.
    """
    advantages, weights = np.asarray(advantages, np.float32), np.asarray(weights, np.float32)
    if advantages.shape != (len(trajectories),) or weights.shape != (len(trajectories),):
        raise ValueError(f"advantages {advantages.shape} and weights {weights.shape} must be [{len(trajectories)}]")
    batch = empty_batch(len(trajectories), max_len)
    batch["tokens"][:] = pad_id
    for row, traj in enumerate(trajectories):
        if traj is None:
            continue
        n = len(traj.tokens)
        if n > max_len:
            raise ValueError(f"{traj.agent} trajectory (query {traj.query}, rollout {traj.rollout}, call {traj.call}) "
                             f"has {n} tokens, more than the batch length {max_len}; raise the batch max_len or "
                             f"lower the controller's context limit so that they agree")
        batch["tokens"][row, :n] = traj.tokens
        batch["loss_mask"][row, :n] = traj.loss_mask
        batch["attention_mask"][row, :n] = 1
        batch["positions"][row, :n] = np.arange(n)
        batch["old_logp"][row, :n] = traj.logprobs
        batch["advantages"][row] = advantages[row]
        batch["weights"][row] = weights[row]
    # The first token is never a target (nothing predicts it), so it can never carry loss.
    batch["loss_mask"][:, 0] = 0
    return batch


def concat_batches(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks batches of one row length along N (the shared-model mode trains on both agents' rows)."""
    lengths = {b["tokens"].shape[1] for b in batches}
    if len(lengths) != 1:
        raise ValueError(f"batches to concatenate must share one row length, got {sorted(lengths)}")
    return {k: np.concatenate([b[k] for b in batches]) for k in FIELDS}
