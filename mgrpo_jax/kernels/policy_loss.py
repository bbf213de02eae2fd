"""The clipped policy-gradient loss of (M-)GRPO, KL estimators, and loss aggregation.

Losses are returned as `(total, denominator)`: the loss is total / denominator, and micro-batches of one
global batch accumulate *exactly* by summing both, so no micro-batch weighs more than its tokens or
sequences do (LESSONS.md, item 4).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mgrpo_jax.kernels._checks import check_option, check_rank, check_same_shape

KL_KINDS = ("k1", "k2", "k3")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

_f32 = jnp.float32


def _static_zero(x) -> bool:
    """True for a Python 0; a traced coefficient (e.g. from a schedule) is never treated as zero."""
    return isinstance(x, (int, float)) and x == 0


def kl_estimate(logp, ref_logp, *, kind: str = "k3", clamp: float | None = None) -> jax.Array:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs, float32.

        k1 = logp - ref
        k2 = 0.5 (logp - ref)^2
        k3 = exp(ref - logp) - (ref - logp) - 1      (unbiased, non-negative, low variance)

    k1 has zero expected gradient on-policy when used as a loss (LESSONS.md, item 9): k3 is the default.
    `clamp` bounds the estimate to [-clamp, clamp].
    """
    check_option("kind", kind, KL_KINDS)
    check_same_shape(logp=logp, ref_logp=ref_logp)
    if clamp is not None and not clamp > 0:
        raise ValueError(f"clamp must be > 0 or None, got {clamp!r}")
    log_ratio = jnp.asarray(logp).astype(_f32) - jnp.asarray(ref_logp).astype(_f32)
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * jnp.square(log_ratio)
    else:
        kl = jnp.expm1(-log_ratio) + log_ratio
    return kl if clamp is None else jnp.clip(kl, -clamp, clamp)


def aggregate_denominator(token_count, weights=None, *, mode: str, max_len: int):
    """The loss denominator that sequences with `token_count` valid tokens contribute (see `aggregate_loss`).

        token-mean: sum w n;  seq-mean-token-mean, seq-mean-token-sum: sum w [n > 0];
        seq-mean-token-sum-norm: max_len sum w [n > 0]

    Args:
      token_count: [N] valid tokens (or summed mask weights) per sequence.
      weights: [N] per-sequence weights, or None (all 1).
    Returns a float32 scalar. A trainer that leaves sequences out of a pass (e.g. their per-token loss is exactly
    zero) adds their denominator with this, so the loss of the sequences it does run keeps its exact scale.
    """
    check_option("mode", mode, AGG_MODES)
    # NumPy in, NumPy out: a trainer calls this on the host for every batch, where jnp would compile per shape.
    xp = np if isinstance(token_count, np.ndarray) and (weights is None or isinstance(weights, np.ndarray)) else jnp
    n = xp.asarray(token_count).astype(_f32)
    w = xp.ones(n.shape, _f32) if weights is None else xp.asarray(weights).astype(_f32)
    if mode == "token-mean":
        return xp.sum(w * n)
    seqs = xp.sum(w * (n > 0).astype(_f32))
    return max_len * seqs if mode == "seq-mean-token-sum-norm" else seqs


def _per_segment(reduce, values, segment_ids):
    """reduce (jax.ops.segment_sum / segment_max) of [B, T] `values` per (row, segment): a flat [B * (T + 1)]
    array, entry b * (T + 1) + s for segment s of row b (segment ids lie in [0, T])."""
    rows, row_len = values.shape
    flat_ids = (jnp.arange(rows, dtype=jnp.int32)[:, None] * (row_len + 1) + segment_ids).reshape(-1)
    return reduce(values.reshape(-1), flat_ids, num_segments=rows * (row_len + 1))


def aggregate_loss(per_token, mask, *, mode: str, max_len: int | None = None, weights=None, segment_ids=None):
    """Reduces a per-token loss to `(total, denominator)`; the loss is total / denominator.

    With per-sequence weights w (default 1), m the token mask, and only sequences with a valid token
    counting (s_b = 1 if sum_t m_bt > 0):
        token-mean:              total = sum_b w_b sum_t m l          denom = sum_b w_b sum_t m
        seq-mean-token-mean:     total = sum_b w_b sum_t m l / sum_t m denom = sum_b w_b s_b
        seq-mean-token-sum:      total = sum_b w_b sum_t m l          denom = sum_b w_b s_b
        seq-mean-token-sum-norm: total = sum_b w_b sum_t m l          denom = max_len sum_b w_b s_b
    (Dr. GRPO; `max_len` is a constant, by default T, the padded length of the batch.)

    A *sequence* is a row, or, with `segment_ids`, one segment of a packed row: rows then hold several
    sequences side by side (segment ids 1, 2, ...; 0 marks padding that belongs to none), and the sums above
    run per (row, segment), so packing trajectories into rows changes nothing but the layout.

    Args:
      per_token: [B, T] loss per token, any float dtype (reduced in float32).
      mask: [B, T] token mask (bool or float weights).
      weights: [B] per-sequence weights, or None; with `segment_ids`, [B, T]: each segment's weight on its
        tokens (constant within a segment; weights must be >= 0).
      segment_ids: None, or [B, T] int segment ids in [0, T].
    Returns:
      (total, denominator): float32 scalars. Summing both over micro-batches gives the global loss.
    """
    check_option("mode", mode, AGG_MODES)
    check_rank("per_token", per_token, 2, "[B, T]")
    check_same_shape(per_token=per_token, mask=mask, segment_ids=segment_ids)
    shape = tuple(jnp.shape(per_token))
    want_weights = shape if segment_ids is not None else shape[:1]
    if weights is not None and tuple(jnp.shape(weights)) != want_weights:
        layout = "[B, T] per token of each segment" if segment_ids is not None else "[B] per sequence"
        raise ValueError(f"weights must be {layout}; got weights {tuple(jnp.shape(weights))} "
                         f"for per_token {shape}")
    if max_len is None:
        max_len = shape[1]
    elif not max_len > 0:
        raise ValueError(f"max_len must be > 0, got {max_len!r}")

    m = jnp.asarray(mask).astype(_f32)
    loss = jnp.asarray(per_token).astype(_f32) * m
    if segment_ids is None:
        w = jnp.ones(shape[:1], _f32) if weights is None else jnp.asarray(weights).astype(_f32)
        token_sum, token_count = jnp.sum(loss, axis=1), jnp.sum(m, axis=1)  # [B]
    else:
        seg = jnp.asarray(segment_ids).astype(jnp.int32)
        m = jnp.where(seg > 0, m, 0.0)
        token_sum = _per_segment(jax.ops.segment_sum, jnp.where(seg > 0, loss, 0.0), seg)
        token_count = _per_segment(jax.ops.segment_sum, m, seg)
        w_tok = jnp.ones(shape, _f32) if weights is None else jnp.asarray(weights).astype(_f32)
        # A segment's weight is constant over its tokens: the max over them reads it without round-off.
        w = jnp.where(token_count > 0, _per_segment(jax.ops.segment_max, w_tok, seg), 0.0)

    denominator = aggregate_denominator(token_count, w, mode=mode, max_len=max_len)
    if mode == "seq-mean-token-mean":
        return jnp.sum(w * token_sum / jnp.where(token_count > 0, token_count, 1.0)), denominator
    return jnp.sum(w * token_sum), denominator


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
    agg: str = "seq-mean-token-mean",
    max_len: int | None = None,
    weights=None,
    ref_logp=None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    kl_clamp: float | None = None,
    entropy=None,
    entropy_coef: float = 0.0,
    segment_ids=None,
):
    """The clipped surrogate loss with optional dual clip, KL penalty and entropy bonus.

    Per token, with ratio = exp(logp - old_logp) and A the advantage:
        l = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))
        l = min(l, -c A)            where A < 0, with dual_clip = c > 1 (bounds the loss of a huge ratio)
        l = l + kl_coef KL_est(logp, ref_logp) - entropy_coef entropy
    then aggregated over `mask` by `agg` (see `aggregate_loss`).

    Args:
      logp: [B, T] log-probs of the sampled tokens under the policy being trained.
      old_logp: [B, T] log-probs under the behaviour policy (the sampler's).
      advantages: [B] (broadcast over tokens) or [B, T].
      mask: [B, T], 1 on the agent's own sampled tokens.
      ref_logp: [B, T] reference log-probs; required when kl_coef != 0.
      entropy: [B, T] per-token entropy; required when entropy_coef != 0.
      segment_ids: None, or [B, T] segment ids of packed rows (several sequences per row); `weights` is then
        [B, T] and `agg` reduces per segment (see `aggregate_loss`).
    Returns:
      (total, denominator, metrics): float32 scalars and a dict of token means over the mask:
      clip_frac_low (A < 0, ratio < 1 - eps_low), clip_frac_high (A > 0, ratio > 1 + eps_high),
      dual_clip_frac, ratio_mean, and kl_mean / entropy_mean when those inputs are given.
    """
    check_option("agg", agg, AGG_MODES)
    check_option("kl_kind", kl_kind, KL_KINDS)
    check_rank("logp", logp, 2, "[B, T]")
    check_same_shape(logp=logp, old_logp=old_logp, mask=mask, ref_logp=ref_logp, entropy=entropy)
    adv_shape, tok_shape = tuple(jnp.shape(advantages)), tuple(jnp.shape(logp))
    if adv_shape not in (tok_shape[:1], tok_shape):
        raise ValueError(f"advantages must be [B] or [B, T]; got advantages {adv_shape} for logp {tok_shape}")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0; got eps_low={eps_low}, eps_high={eps_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (the paper's c = 3) or None, got {dual_clip!r}")
    if not _static_zero(kl_coef) and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp (reference-model log-probs); pass it or set kl_coef=0")
    if not _static_zero(entropy_coef) and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy (per-token entropies); pass it or set entropy_coef=0")

    logp = jnp.asarray(logp).astype(_f32)
    adv = jnp.asarray(advantages).astype(_f32)
    if adv.ndim == 1:
        adv = adv[:, None]
    adv = jnp.broadcast_to(adv, logp.shape)
    ratio = jnp.exp(logp - jnp.asarray(old_logp).astype(_f32))
    clipped_ratio = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(-adv * ratio, -adv * clipped_ratio)
    dual_clipped = jnp.zeros(logp.shape, bool)
    if dual_clip is not None:
        dual_clipped = (adv < 0) & (loss > -dual_clip * adv)
        loss = jnp.where(adv < 0, jnp.minimum(loss, -dual_clip * adv), loss)

    metric_terms = {
        "clip_frac_low": (adv < 0) & (ratio < 1.0 - eps_low),
        "clip_frac_high": (adv > 0) & (ratio > 1.0 + eps_high),
        "dual_clip_frac": dual_clipped,
        "ratio_mean": ratio,
    }
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, kind=kl_kind, clamp=kl_clamp)
        metric_terms["kl_mean"] = kl
        if not _static_zero(kl_coef):
            loss = loss + kl_coef * kl
    if entropy is not None:
        ent = jnp.asarray(entropy).astype(_f32)
        metric_terms["entropy_mean"] = ent
        if not _static_zero(entropy_coef):
            loss = loss - entropy_coef * ent

    total, denominator = aggregate_loss(loss, mask, mode=agg, max_len=max_len, weights=weights,
                                        segment_ids=segment_ids)
    m = jnp.asarray(mask).astype(_f32)
    n_tokens = jnp.sum(m)
    safe_n = jnp.where(n_tokens > 0, n_tokens, 1.0)
    metrics = {name: jnp.sum(jax.lax.stop_gradient(x).astype(_f32) * m) / safe_n for name, x in metric_terms.items()}
    metrics["num_tokens"] = n_tokens
    return total, denominator, metrics
