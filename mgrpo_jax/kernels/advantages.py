"""Group-relative advantages (GRPO), and M-GRPO's per-agent grouping of main and sub-agent rewards.

A *group* is the set of valid entries (`mask`) of `rewards` along `axis` (for GRPO: the K rollouts of one
query), or, for `grouped_*`, the valid entries that share a group id. Statistics are always taken in
float32, whatever the input dtype.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mgrpo_jax.kernels._checks import check_option, check_rank, check_same_shape, normalize_axes

SCALES = ("std", "none")
SUB_GROUPS = ("per_query", "per_rollout", "per_call_index")

# Which axes of the aligned sub rewards [Q, K, D] form one group, for the sub_groups that are slot-shaped.
_SUB_GROUP_AXES = {"per_query": (1, 2), "per_rollout": (2,)}


class GroupStats(NamedTuple):
    """Per-group statistics, shaped like `rewards` with the group axes removed."""

    mean: jax.Array  # float32; 0 for an empty group
    std: jax.Array  # float32; 0 for an empty group or one with count <= ddof
    count: jax.Array  # int32, valid entries in the group
    zero_variance: jax.Array  # bool, the group has valid entries and they are all equal


def _stats(rewards, mask, axes: tuple[int, ...], ddof: int):
    """GroupStats with the group axes kept (size 1), plus the float32 rewards and the bool mask."""
    r = jnp.asarray(rewards).astype(jnp.float32)
    valid = jnp.ones(r.shape, bool) if mask is None else jnp.asarray(mask) != 0
    m = valid.astype(jnp.float32)
    count = jnp.sum(m, axis=axes, keepdims=True)
    mean = jnp.sum(r * m, axis=axes, keepdims=True) / jnp.maximum(count, 1.0)
    sq_dev = jnp.sum(m * jnp.square(r - mean), axis=axes, keepdims=True)
    std = _std(sq_dev, count, ddof)
    # Exact equality, not var < tol: rewards like 0.1 repeated are bit-equal, yet their float mean is not.
    big = jnp.finfo(jnp.float32).max
    hi = jnp.max(jnp.where(valid, r, -big), axis=axes, keepdims=True)
    lo = jnp.min(jnp.where(valid, r, big), axis=axes, keepdims=True)
    zero_var = (count > 0) & (hi == lo)
    return GroupStats(mean, std, count.astype(jnp.int32), zero_var), r, valid


def _std(sq_dev, count, ddof: int):
    """sqrt(sq_dev / (count - ddof)), 0 where count <= ddof."""
    dof = count - ddof
    var = jnp.where(dof > 0, sq_dev / jnp.where(dof > 0, dof, 1.0), 0.0)
    # sqrt has an infinite derivative at 0; route zero variance around it so jax.grad stays finite.
    has_var = var > 0
    return jnp.where(has_var, jnp.sqrt(jnp.where(has_var, var, 1.0)), 0.0)


def _check_group_args(rewards, mask, axis, scale, eps, ddof) -> tuple[int, ...] | None:
    """Checks the common arguments; returns the normalized group axes (None when `axis` is None)."""
    check_option("scale", scale, SCALES)
    check_same_shape(rewards=rewards, mask=mask)
    if not isinstance(ddof, int) or ddof < 0:
        raise ValueError(f"ddof must be a non-negative int, got {ddof!r}")
    if isinstance(eps, (int, float)) and eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    return None if axis is None else normalize_axes(axis, jnp.ndim(rewards))


def group_statistics(rewards, mask=None, *, axis: int | Sequence[int] = -1, ddof: int = 0) -> GroupStats:
    """Mean, std, valid count and zero-variance flag of each group (the group axes are reduced away).

    mean = sum(m r) / n, std = sqrt(sum(m (r - mean)^2) / (n - ddof)), n = sum(m), over `axis`.
    """
    axes = _check_group_args(rewards, mask, axis, "std", 0.0, ddof)
    stats, _, _ = _stats(rewards, mask, axes, ddof)
    return GroupStats(*(jnp.squeeze(x, axis=axes) for x in stats))


def group_relative_advantages(
    rewards,
    mask=None,
    *,
    axis: int | Sequence[int] = -1,
    scale: str = "std",
    eps: float = 1e-6,
    ddof: int = 0,
) -> jax.Array:
    """Group-relative advantages, float32, shaped like `rewards`.

        scale="std":  A = (r - mean) / (std + eps)      (GRPO)
        scale="none": A = r - mean                      (Dr. GRPO)

    mean and std are taken over the valid entries of each group (the entries along `axis`, an int or a tuple
    of ints, where `mask` is nonzero), std with `ddof` delta degrees of freedom. Masked entries get 0; a
    group whose valid rewards are all equal gets exactly 0 (not float round-off); a group with no valid
    entry gives 0, never NaN.

    Args:
      rewards: any shape, any float dtype (accumulated in float32).
      mask: None (all valid) or the same shape as `rewards`; nonzero marks a valid entry.
    """
    axes = _check_group_args(rewards, mask, axis, scale, eps, ddof)
    stats, r, valid = _stats(rewards, mask, axes, ddof)
    centered = r - stats.mean
    adv = centered / (stats.std + eps) if scale == "std" else centered
    return jnp.where(valid & ~stats.zero_variance, adv, 0.0)


# ---- arbitrary groups ------------------------------------------------------------------------------------


def _segment_stats(rewards, group_ids, mask, ddof: int):
    """(GroupStats of [G] groups, dense group of every entry [N], float32 rewards [N], bool valid [N]).

    G = N = rewards.size (the most groups there can be; under jit the number of distinct ids is unknown).
    Valid entries' groups come first, in ascending id order; groups holding only masked entries and unused
    trailing groups have count 0.
    """
    if tuple(jnp.shape(group_ids)) != tuple(jnp.shape(rewards)):
        raise ValueError(f"group_ids must have the shape of rewards: got group_ids {tuple(jnp.shape(group_ids))}, "
                         f"rewards {tuple(jnp.shape(rewards))}")
    ids = jnp.asarray(group_ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"group_ids must be integers, got dtype {ids.dtype}")
    r = jnp.asarray(rewards).astype(jnp.float32).reshape(-1)
    valid = (jnp.ones(r.shape, bool) if mask is None else jnp.asarray(mask) != 0).reshape(-1)
    ids = ids.reshape(-1)
    n = r.shape[0]
    # Dense group numbers by a sort: valid entries first (by id), then the masked ones.
    order = jnp.lexsort((ids, ~valid))
    sorted_ids, sorted_valid = ids[order], valid[order]
    starts = jnp.concatenate([jnp.ones((min(n, 1),), bool),
                              (sorted_ids[1:] != sorted_ids[:-1]) | (sorted_valid[1:] != sorted_valid[:-1])])
    dense = jnp.zeros((n,), jnp.int32).at[order].set(jnp.cumsum(starts, dtype=jnp.int32) - 1)
    m = valid.astype(jnp.float32)
    count = jax.ops.segment_sum(m, dense, num_segments=n)
    mean = jax.ops.segment_sum(r * m, dense, num_segments=n) / jnp.maximum(count, 1.0)
    sq_dev = jax.ops.segment_sum(m * jnp.square(r - mean[dense]), dense, num_segments=n)
    big = jnp.finfo(jnp.float32).max
    hi = jax.ops.segment_max(jnp.where(valid, r, -big), dense, num_segments=n)
    lo = jax.ops.segment_min(jnp.where(valid, r, big), dense, num_segments=n)
    stats = GroupStats(mean, _std(sq_dev, count, ddof), count.astype(jnp.int32), (count > 0) & (hi == lo))
    return stats, dense, r, valid


def grouped_statistics(rewards, group_ids, mask=None, *, ddof: int = 0) -> GroupStats:
    """Mean, std, valid count and zero-variance flag of arbitrary groups: the valid entries with one group id.

    Args:
      rewards: any shape, any float dtype.
      group_ids: integers, the shape of `rewards` (any values: they are only compared for equality).
      mask: None (all valid) or the shape of `rewards`.
    Returns:
      GroupStats of [G] arrays, G = rewards.size: the groups of valid entries in ascending id order, then
      entries with count 0 (no valid member). The non-empty groups are those with count > 0.
    """
    _check_group_args(rewards, mask, None, "std", 0.0, ddof)
    return _segment_stats(rewards, group_ids, mask, ddof)[0]


def grouped_advantages(
    rewards,
    group_ids,
    mask=None,
    *,
    scale: str = "std",
    eps: float = 1e-6,
    ddof: int = 0,
) -> jax.Array:
    """`group_relative_advantages` for arbitrary groups: entries with equal `group_ids` form one group.

    A = (r - mean_g) / (std_g + eps) (scale="std") or r - mean_g (scale="none"), g the entry's group, the
    statistics over the group's valid entries. Masked entries get 0 and do not count; a group whose valid
    rewards are all equal gets exactly 0. Group statistics are segment sums after one sort of the ids, so
    the cost is O(N log N) for N = rewards.size, whatever the number of groups.

    Args:
      rewards: any shape, any float dtype (accumulated in float32).
      group_ids: integers, the shape of `rewards`.
      mask: None (all valid) or the shape of `rewards`; nonzero marks a valid entry.
    Returns:
      float32, the shape of `rewards`.
    """
    _check_group_args(rewards, mask, None, scale, eps, ddof)
    stats, dense, r, valid = _segment_stats(rewards, group_ids, mask, ddof)
    centered = r - stats.mean[dense]
    adv = centered / (stats.std[dense] + eps) if scale == "std" else centered
    return jnp.where(valid & ~stats.zero_variance[dense], adv, 0.0).reshape(jnp.shape(rewards))


# ---- M-GRPO: the sub-agent's groups over aligned slots ---------------------------------------------------


def _check_sub_arrays(**arrays) -> tuple[int, ...]:
    """The [Q, K, D] shape of the first array; raises ValueError unless all given arrays have it."""
    name, first = next(iter(arrays.items()))
    check_rank(name, first, 3, "[Q, K, D]")
    check_same_shape(**arrays)
    return tuple(jnp.shape(first))


def sub_group_ids(sub_group: str, sub_mask, *, sub_call_index=None, sub_borrowed=None) -> tuple[jax.Array, jax.Array]:
    """The sub-agent group of every aligned slot, and which slots count in the group statistics.

      "per_query":      (query): all the query's slots (borrowed ones included: same query).
      "per_rollout":    (query, rollout). Slots in `sub_borrowed` hold another rollout's trajectory: they
                        must neither form nor join a rollout's group, so they are masked (advantage 0).
      "per_call_index": (query, call index of the slot's record): the i-th call across the K rollouts of the
                        query, whichever slot alignment put it in (drops, duplicates and borrowing move calls
                        between slots). Needs `sub_call_index` (`Alignment.call_index`).

    Args:
      sub_mask: [Q, K, D], nonzero marks a filled slot.
      sub_call_index: [Q, K, D] ints, the call index (within its own rollout) of each slot's record.
      sub_borrowed: [Q, K, D] bool, the slot holds a sibling rollout's record (None: none does).
    Returns:
      (group_ids [Q, K, D] int32, stats_mask [Q, K, D] bool), for `grouped_advantages` / `grouped_statistics`.
    """
    check_option("sub_group", sub_group, SUB_GROUPS)
    q_n, k_n, d_n = _check_sub_arrays(sub_mask=sub_mask, sub_call_index=sub_call_index, sub_borrowed=sub_borrowed)
    mask = jnp.asarray(sub_mask) != 0
    q = jnp.broadcast_to(jnp.arange(q_n, dtype=jnp.int32)[:, None, None], (q_n, k_n, d_n))
    if sub_group == "per_query":
        return q, mask
    if sub_group == "per_rollout":
        k = jnp.broadcast_to(jnp.arange(k_n, dtype=jnp.int32)[None, :, None], (q_n, k_n, d_n))
        if sub_borrowed is not None:
            mask = mask & ~(jnp.asarray(sub_borrowed) != 0)
        return q * k_n + k, mask
    if sub_call_index is None:
        raise ValueError("sub_group='per_call_index' groups by each record's own call index, which alignment "
                         "moves between slots: pass sub_call_index (Alignment.call_index)")
    call = jnp.where(mask, jnp.asarray(sub_call_index).astype(jnp.int32), 0)
    return call * q_n + q, mask


def sub_advantages(
    sub_rewards,
    sub_mask,
    *,
    sub_group: str = "per_query",
    sub_call_index=None,
    sub_borrowed=None,
    scale: str = "std",
    eps: float = 1e-6,
    ddof: int = 0,
) -> jax.Array:
    """The sub-agent's advantages [Q, K, D] float32 over aligned slots, grouped as `sub_group_ids` says.

    Every copy of one record (duplicates, borrowed copies) gets the same advantage, except a borrowed copy
    under "per_rollout", which gets 0 (it is in no group; give it loss weight 0).
    """
    _check_sub_arrays(sub_rewards=sub_rewards, sub_mask=sub_mask)
    ids, mask = sub_group_ids(sub_group, sub_mask, sub_call_index=sub_call_index, sub_borrowed=sub_borrowed)
    opts = dict(scale=scale, eps=eps, ddof=ddof)
    if sub_group in _SUB_GROUP_AXES:  # slot-shaped groups: the axis reduction (per_query's numbers unchanged)
        return group_relative_advantages(sub_rewards, mask, axis=_SUB_GROUP_AXES[sub_group], **opts)
    return grouped_advantages(sub_rewards, ids, mask, **opts)


def mgrpo_advantages(
    main_rewards,
    sub_rewards,
    sub_mask,
    *,
    sub_group: str = "per_query",
    sub_call_index=None,
    sub_borrowed=None,
    scale: str = "std",
    eps: float = 1e-6,
    ddof: int = 0,
    main_mask=None,
) -> tuple[jax.Array, jax.Array]:
    """M-GRPO advantages: each agent normalized within its own groups, never one baseline across agents.

    Main: rewards [Q, K], grouped over the K rollouts of each query.
    Sub: aligned rewards [Q, K, D] (D = D_max slots per rollout), grouped by `sub_group` (`sub_group_ids`):
      "per_query" over all the query's slots, "per_rollout" over the slots of one rollout (borrowed slots
      masked), "per_call_index" over the records of the query with the same call index (`sub_call_index`).
    `sub_mask` [Q, K, D] marks the valid slots; `main_mask` [Q, K] (optional) the valid rollouts;
    `sub_call_index` / `sub_borrowed` [Q, K, D] come from the alignment (`Alignment.call_index`, `.borrowed`).

    Returns:
      (adv_main [Q, K], adv_sub [Q, K, D]), float32.
    """
    check_option("sub_group", sub_group, SUB_GROUPS)
    main_shape, sub_shape = tuple(jnp.shape(main_rewards)), tuple(jnp.shape(sub_rewards))
    if len(main_shape) != 2 or len(sub_shape) != 3 or sub_shape[:2] != main_shape:
        raise ValueError(
            f"main_rewards must be [Q, K] and sub_rewards [Q, K, D] with the same Q and K; "
            f"got main_rewards {main_shape}, sub_rewards {sub_shape}"
        )
    opts = dict(scale=scale, eps=eps, ddof=ddof)
    adv_main = group_relative_advantages(main_rewards, main_mask, axis=1, **opts)
    adv_sub = sub_advantages(sub_rewards, sub_mask, sub_group=sub_group, sub_call_index=sub_call_index,
                             sub_borrowed=sub_borrowed, **opts)
    return adv_main, adv_sub
