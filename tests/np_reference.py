"""NumPy oracles for the kernels, written from MGRPO.md's formulas independently of the JAX code.

They are deliberately plain: float64, explicit loops over groups, sequences and tokens.
"""
from __future__ import annotations

import itertools

import numpy as np


def group_advantages(rewards, mask, axes, scale="std", eps=1e-6, ddof=0):
    """Loops over every group (an index of the non-group axes) and normalizes its valid entries."""
    r = np.asarray(rewards, np.float64)
    m = np.ones(r.shape, bool) if mask is None else np.asarray(mask) != 0
    axes = tuple(a % r.ndim for a in ((axes,) if isinstance(axes, int) else axes))
    other = [a for a in range(r.ndim) if a not in axes]
    out = np.zeros(r.shape, np.float64)
    for outer in itertools.product(*(range(r.shape[a]) for a in other)):
        members = []
        for inner in itertools.product(*(range(r.shape[a]) for a in axes)):
            idx = [0] * r.ndim
            for a, i in zip(other, outer):
                idx[a] = i
            for a, i in zip(axes, inner):
                idx[a] = i
            if m[tuple(idx)]:
                members.append(tuple(idx))
        values = np.array([r[i] for i in members])
        if len(values) == 0 or np.all(values == values[0]):
            continue  # empty or zero-variance group: advantages stay 0
        mean = values.mean()
        std = values.std(ddof=ddof) if len(values) > ddof else 0.0
        for i in members:
            out[i] = (r[i] - mean) / (std + eps) if scale == "std" else r[i] - mean
    return out


def log_softmax(z):
    z = np.asarray(z, np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_logprobs(logits, targets, temperature=1.0):
    lp = log_softmax(np.asarray(logits, np.float64) / temperature)
    return np.take_along_axis(lp, np.asarray(targets)[..., None], axis=-1)[..., 0]


def token_entropy(logits, temperature=1.0):
    lp = log_softmax(np.asarray(logits, np.float64) / temperature)
    return -(np.exp(lp) * lp).sum(axis=-1)


def kl(logp, ref, kind, clamp=None):
    logp, ref = np.asarray(logp, np.float64), np.asarray(ref, np.float64)
    if kind == "k1":
        v = logp - ref
    elif kind == "k2":
        v = 0.5 * (logp - ref) ** 2
    else:
        v = np.exp(ref - logp) - (ref - logp) - 1.0
    return v if clamp is None else np.minimum(np.maximum(v, -clamp), clamp)


def aggregate(per_token, mask, mode, max_len=None, weights=None):
    """Loops over sequences; returns (total, denominator)."""
    per_token, mask = np.asarray(per_token, np.float64), np.asarray(mask, np.float64)
    n_seq, seq_len = per_token.shape
    w = np.ones(n_seq) if weights is None else np.asarray(weights, np.float64)
    max_len = seq_len if max_len is None else max_len
    total = denom = 0.0
    for b in range(n_seq):
        tokens = mask[b].sum()
        token_sum = sum(per_token[b, t] * mask[b, t] for t in range(seq_len))
        if mode == "token-mean":
            total += w[b] * token_sum
            denom += w[b] * tokens
            continue
        if tokens == 0:
            continue  # a sequence with no valid token does not count
        if mode == "seq-mean-token-mean":
            total += w[b] * token_sum / tokens
            denom += w[b]
        elif mode == "seq-mean-token-sum":
            total += w[b] * token_sum
            denom += w[b]
        elif mode == "seq-mean-token-sum-norm":
            total += w[b] * token_sum
            denom += w[b] * max_len
        else:
            raise AssertionError(mode)
    return total, denom


def per_token_policy_loss(logp, old_logp, adv, *, eps_low, eps_high, dual_clip=None, ref_logp=None,
                          kl_coef=0.0, kl_kind="k3", kl_clamp=None, entropy=None, entropy_coef=0.0):
    """The clipped surrogate token by token, with scalar branches as a reader would write them by hand."""
    logp, old_logp = np.asarray(logp, np.float64), np.asarray(old_logp, np.float64)
    adv = np.asarray(adv, np.float64)
    if adv.ndim == 1:
        adv = np.repeat(adv[:, None], logp.shape[1], axis=1)
    out = np.zeros(logp.shape)
    for b, t in np.ndindex(logp.shape):
        ratio = np.exp(logp[b, t] - old_logp[b, t])
        a = adv[b, t]
        clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
        loss = max(-a * ratio, -a * clipped)
        if dual_clip is not None and a < 0:
            loss = min(loss, -dual_clip * a)
        if kl_coef:
            loss += kl_coef * kl(logp[b, t], ref_logp[b, t], kl_kind, kl_clamp)
        if entropy_coef:
            loss -= entropy_coef * entropy[b, t]
        out[b, t] = loss
    return out


def policy_loss(logp, old_logp, adv, mask, *, agg, max_len=None, weights=None, **kw):
    return aggregate(per_token_policy_loss(logp, old_logp, adv, **kw), mask, agg, max_len, weights)


def filter_keep(logits, temperature=1.0, top_k=0, top_p=1.0):
    """bool [..., V]: the sampler's top-k then top-p set, by an explicit sort and a running sum per row.

    top-k: every token whose logit is >= the k-th largest (ties at the k-th value all stay). top-p: over the
    distribution renormalized on that set, tokens in descending logit order (ties in index order), a token
    stays when the mass strictly before it is < top_p.
    """
    z = np.asarray(logits, np.float64) / temperature
    keep = np.zeros(z.shape, bool)
    for row in np.ndindex(z.shape[:-1]):
        v = z[row]
        allowed = np.ones(v.shape, bool)
        if top_k:
            kth = sorted(v, reverse=True)[top_k - 1]
            allowed = v >= kth
        if top_p < 1.0:
            p = np.where(allowed, np.exp(v - v.max()), 0.0)
            p /= p.sum()
            order = sorted(range(len(v)), key=lambda i: (-v[i], i))
            before = 0.0
            for i in order:
                if before >= top_p:
                    allowed[i] = False
                before += p[i]
        keep[row] = allowed
    return keep


def filtered_token_logprobs(logits, targets, temperature=1.0, top_k=0, top_p=1.0):
    """Log-probs under the filtered tempered distribution; -inf for a target outside the kept set."""
    z = np.asarray(logits, np.float64) / temperature
    keep = filter_keep(logits, temperature, top_k, top_p)
    lp = log_softmax(np.where(keep, z, -np.inf))
    return np.take_along_axis(lp, np.asarray(targets)[..., None], axis=-1)[..., 0]


def filtered_token_entropy(logits, temperature=1.0, top_k=0, top_p=1.0):
    z = np.asarray(logits, np.float64) / temperature
    keep = filter_keep(logits, temperature, top_k, top_p)
    lp = log_softmax(np.where(keep, z, -np.inf))
    return -np.where(keep, np.exp(lp) * np.where(keep, lp, 0.0), 0.0).sum(axis=-1)


def grouped_advantages(rewards, group_ids, mask=None, scale="std", eps=1e-6, ddof=0):
    """Loops over the distinct ids of the valid entries; each id's valid entries are one group."""
    r = np.asarray(rewards, np.float64)
    ids = np.asarray(group_ids)
    m = np.ones(r.shape, bool) if mask is None else np.asarray(mask) != 0
    out = np.zeros(r.shape, np.float64)
    for g in sorted(set(ids[m].tolist())):
        members = [i for i in np.ndindex(r.shape) if m[i] and ids[i] == g]
        values = np.array([r[i] for i in members])
        if np.all(values == values[0]):
            continue
        mean = values.mean()
        std = values.std(ddof=ddof) if len(values) > ddof else 0.0
        for i in members:
            out[i] = (r[i] - mean) / (std + eps) if scale == "std" else r[i] - mean
    return out
