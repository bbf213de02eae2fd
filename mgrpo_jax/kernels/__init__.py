"""M-GRPO kernels: pure `jax.numpy` functions (no flax, no project state) to import into any JAX code.

Every function works under `jit`, `grad` and `vmap`, accepts bf16 inputs and accumulates in float32.

    from mgrpo_jax.kernels import group_relative_advantages, chunked_token_logprobs, policy_loss
"""
from mgrpo_jax.kernels.advantages import (
    SCALES,
    SUB_GROUPS,
    GroupStats,
    group_relative_advantages,
    group_statistics,
    grouped_advantages,
    grouped_statistics,
    mgrpo_advantages,
    sub_advantages,
    sub_group_ids,
)
from mgrpo_jax.kernels.logprobs import chunked_token_logprobs, filter_logits, token_entropy, token_logprobs
from mgrpo_jax.kernels.policy_loss import (
    AGG_MODES,
    KL_KINDS,
    aggregate_denominator,
    aggregate_loss,
    kl_estimate,
    policy_loss,
)

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "SCALES",
    "SUB_GROUPS",
    "GroupStats",
    "aggregate_denominator",
    "aggregate_loss",
    "chunked_token_logprobs",
    "filter_logits",
    "group_relative_advantages",
    "group_statistics",
    "grouped_advantages",
    "grouped_statistics",
    "kl_estimate",
    "mgrpo_advantages",
    "policy_loss",
    "sub_advantages",
    "sub_group_ids",
    "token_entropy",
    "token_logprobs",
]
