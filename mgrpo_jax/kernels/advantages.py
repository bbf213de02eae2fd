"""Group-relative advantages (GRPO), and M-GRPO's per-agent grouping of main and sub-agent rewards.

A *group* is the set of entries of `rewards` along `axis` that `mask` marks valid (for GRPO: the K rollouts
of one query). Statistics are always taken in float32, whatever the input dtype.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mgrpo_jax.kernels._checks import check_option, check_same_shape, normalize_axes

SCALES = ("std", "none")
SUB_GROUPS = ("per_query", "per_rollout", "per_call_index")

# Which axes of the aligned sub rewards [Q, K, D] form one group, for each `sub_group`.
_SUB_GROUP_AXES = {"per_query": (1, 2), "per_rollout": (2,), "per_call_index": (1,)}


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
    dof = count - ddof
    var = jnp.where(dof > 0, sq_dev / jnp.where(dof > 0, dof, 1.0), 0.0)
    # sqrt has an infinite derivative at 0; route zero variance around it so jax.grad stays finite.
    has_var = var > 0
    std = jnp.where(has_var, jnp.sqrt(jnp.where(has_var, var, 1.0)), 0.0)
    # Exact equality, not var < tol: rewards like 0.1 repeated are bit-equal, yet their float mean is not.
    big = jnp.finfo(jnp.float32).max
    hi = jnp.max(jnp.where(valid, r, -big), axis=axes, keepdims=True)
    lo = jnp.min(jnp.where(valid, r, big), axis=axes, keepdims=True)
    zero_var = (count > 0) & (hi == lo)
    return GroupStats(mean, std, count.astype(jnp.int32), zero_var), r, valid


def _check_group_args(rewards, mask, axis, scale, eps, ddof) -> tuple[int, ...]:
    check_option("scale", scale, SCALES)
    check_same_shape(rewards=rewards, mask=mask)
    if not isinstance(ddof, int) or ddof < 0:
        raise ValueError(f"ddof must be a non-negative int, got {ddof!r}")
    if isinstance(eps, (int, float)) and eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    return normalize_axes(axis, jnp.ndim(rewards))


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


def mgrpo_advantages(
    main_rewards,
    sub_rewards,
    sub_mask,
    *,
    sub_group: str = "per_query",
    scale: str = "std",
    eps: float = 1e-6,
    ddof: int = 0,
    main_mask=None,
) -> tuple[jax.Array, jax.Array]:
    """M-GRPO advantages: each agent normalized within its own groups, never one baseline across agents.

    Main: rewards [Q, K], grouped over the K rollouts of each query.
    Sub: aligned rewards [Q, K, D] (D = D_max slots per rollout), grouped by `sub_group`:
      "per_query" over (K, D) (all slots of the query), "per_rollout" over D (the slots of one rollout),
      "per_call_index" over K (slot i across the K rollouts of the query).
    `sub_mask` [Q, K, D] marks the valid slots; `main_mask` [Q, K] (optional) the valid rollouts.

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
    adv_sub = group_relative_advantages(sub_rewards, sub_mask, axis=_SUB_GROUP_AXES[sub_group], **opts)
    return adv_main, adv_sub
