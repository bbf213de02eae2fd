"""Per-token log-probabilities and entropies of sampled tokens, from logits or, chunked, from hidden states.

Everything is computed in float32 under the distribution a sampler draws from: softmax(logits / temperature),
restricted to the top-k / top-p set when `top_k` / `top_p` are on (`filter_logits`, the one definition the
sampler uses too). The trainer must use the sampler's temperature, top_k and top_p, or the importance ratio
pi_theta / pi_old is biased (LESSONS.md, item 8): with top_k=8 the first-epoch ratio under the full softmax
was about 0.15 instead of 1 (bench/fidelity.py).

The kept set is a function of the logits, recomputed exactly from them; in the gradient it is held constant
(it is piecewise constant in the logits, so this is the exact derivative almost everywhere). A target outside
the kept set (possible once the policy has moved, or on a near-tie that the sampler's and the trainer's
forward passes round differently) has probability 0: its log-prob is about `jnp.finfo(jnp.float32).min`,
finite so that gradients stay finite (its ratio exp(logp - old) is 0), and detectable as logp < -1e30.

Cost of the filters: top-k is one `lax.top_k` per token; top-p sorts the vocabulary per token (O(V log V)),
and the chunked backward recomputes the kept set, so it sorts again. With both off nothing extra runs.
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from mgrpo_jax.kernels._checks import check_positive, check_rank

_NEG = float(jnp.finfo(jnp.float32).min)  # what filtered-out logits become (finite, unlike -inf: no NaN in grads)


def _check_filter(top_k, top_p, vocab: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if top_k > vocab:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab}; use top_k <= {vocab} (0 = off)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a Python float in (0, 1] (1.0 = off), got {top_p!r}")


def _filtering(top_k: int, top_p: float) -> bool:
    return bool(top_k) or top_p < 1.0


def _kept_mask(z, top_k: int, top_p: float) -> jax.Array:
    """bool [..., V]: the tokens of the top-k / top-p set of the (tempered, float32) logits `z` [..., V].

    top-k keeps every token whose logit is >= the k-th largest (so ties at the k-th value are all kept);
    top-p then acts on the distribution renormalized over that set: tokens sorted by logit (a stable sort,
    ties in index order), a token is kept when the probability mass strictly before it is < top_p (the
    smallest prefix reaching top_p, at least one token). The mask is computed on stop_gradient(z).
    """
    shape = jnp.shape(z)
    z = jax.lax.stop_gradient(z).reshape(-1, shape[-1])
    keep = jnp.ones(z.shape, bool)
    if top_k:
        kth = jax.lax.top_k(z, top_k)[0][:, -1:]
        keep = ~(z < kth)
        z = jnp.where(keep, z, _NEG)
    if top_p < 1.0:
        order = jnp.argsort(-z, axis=-1)
        sorted_z = jnp.take_along_axis(z, order, axis=-1)
        probs = jax.nn.softmax(sorted_z, axis=-1)
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        keep = keep & jnp.zeros_like(keep_sorted).at[jnp.arange(z.shape[0])[:, None], order].set(keep_sorted)
    return keep.reshape(shape)


def _filtered(z, top_k: int, top_p: float) -> jax.Array:
    """z with everything outside the top-k / top-p set at _NEG; z itself when both filters are off."""
    if not _filtering(top_k, top_p):
        return z
    return jnp.where(_kept_mask(z, top_k, top_p), z, _NEG)


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Tempered logits [..., V] float32 with everything outside the top-k / top-p set at finfo(float32).min.

    The sampler draws from softmax of this and records log_softmax of it; `token_logprobs`,
    `token_entropy` and `chunked_token_logprobs` with the same temperature, top_k and top_p score under the
    same distribution. See `_kept_mask` for the rule (top-k first, then top-p on the renormalized top-k set).
    """
    _check_filter(top_k, top_p, jnp.shape(logits)[-1])
    return _filtered(logits.astype(jnp.float32) / max(temperature, 1e-6), top_k, top_p)


def _check_logits_targets(logits, targets) -> None:
    if jnp.ndim(logits) < 1 or tuple(jnp.shape(targets)) != tuple(jnp.shape(logits))[:-1]:
        raise ValueError(
            f"logits [B, T, V] and targets [B, T] must agree on the leading dims; "
            f"got logits {tuple(jnp.shape(logits))}, targets {tuple(jnp.shape(targets))}"
        )


def _tempered(logits, temperature) -> jax.Array:
    check_positive("temperature", temperature)
    return jnp.asarray(logits).astype(jnp.float32) / temperature


def token_logprobs(logits, targets, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """log pi(target) under log_softmax(logits / temperature), restricted to the top-k / top-p set.

    Args:
      logits: [B, T, V] (any leading dims), any float dtype; upcast to float32.
      targets: [B, T] integer token ids in [0, V).
      top_k: 0 = off; top_p: 1.0 = off (static); the sampler's values (see `filter_logits`).
    Returns:
      [B, T] float32: z[target] - logsumexp_{kept}(z), z = logits / temperature.
    """
    _check_logits_targets(logits, targets)
    _check_filter(top_k, top_p, jnp.shape(logits)[-1])
    z = _filtered(_tempered(logits, temperature), top_k, top_p)
    target_z = jnp.take_along_axis(z, jnp.asarray(targets)[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_z - jax.nn.logsumexp(z, axis=-1)


def token_entropy(logits, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Entropy of softmax(logits / temperature) restricted to the top-k / top-p set:
    H = logsumexp_{kept}(z) - sum_{v kept} p_v z_v.

    Args:
      logits: [B, T, V] (any leading dims), any float dtype.
    Returns:
      [B, T] float32.
    """
    _check_filter(top_k, top_p, jnp.shape(logits)[-1])
    z = _tempered(logits, temperature)
    zf = _filtered(z, top_k, top_p)
    p = jax.nn.softmax(zf, axis=-1)  # exactly 0 outside the kept set
    # p * z, not p * zf: z is O(1) where p is 0, while the gradient of p * zf there would be 0 * (finfo.min * g).
    return jax.nn.logsumexp(zf, axis=-1) - jnp.sum(p * z, axis=-1)


# ---------------------------------------------------------------------------------------------------------
# Chunked: logits = hidden @ unembed, one chunk of tokens at a time. The forward keeps only logsumexp (and
# the entropy) per token; the backward recomputes each chunk's logits. Peak extra memory is a few
# [chunk_size, V] float32 buffers instead of the full [B*T, V] logits (and their copies for the gradient).
# ---------------------------------------------------------------------------------------------------------


def _chunk_logits(h_chunk, unembed, inv_temperature: float) -> jax.Array:
    """[C, H] @ [H, V] -> [C, V] float32 tempered logits (the matmul accumulates in float32)."""
    return jnp.dot(h_chunk, unembed, preferred_element_type=jnp.float32) * inv_temperature


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _chunked_logp_entropy(h_chunks, unembed, t_chunks, temperature: float, with_entropy: bool, top_k: int,
                          top_p: float):
    """h_chunks [N, C, H], unembed [H, V], t_chunks [N, C] -> (logp [N, C], entropy [N, C] or zeros)."""
    (logp, entropy), _ = _chunked_fwd(h_chunks, unembed, t_chunks, temperature, with_entropy, top_k, top_p)
    return logp, entropy


def _chunked_fwd(h_chunks, unembed, t_chunks, temperature, with_entropy, top_k, top_p):
    inv_t = 1.0 / temperature

    def one_chunk(_, xs):
        h, t = xs
        z = _chunk_logits(h, unembed, inv_t)
        zf = _filtered(z, top_k, top_p)
        lse = jax.nn.logsumexp(zf, axis=-1)
        logp = jnp.take_along_axis(zf, t[:, None], axis=-1)[:, 0] - lse
        if with_entropy:
            # Filtered-out tokens have exp(zf - lse) == 0 exactly, so they add 0 (z is finite there).
            entropy = lse - jnp.sum(jnp.exp(zf - lse[:, None]) * z, axis=-1)
        else:
            entropy = jnp.zeros_like(lse)
        return None, (logp, lse, entropy)

    _, (logp, lse, entropy) = jax.lax.scan(one_chunk, None, (h_chunks, t_chunks))
    return (logp, entropy), (h_chunks, unembed, t_chunks, lse, entropy)


def _chunked_bwd(temperature, with_entropy, top_k, top_p, residuals, cotangents):
    h_chunks, unembed, t_chunks, lse, entropy = residuals
    g_logp, g_entropy = cotangents
    inv_t = 1.0 / temperature
    filtering = _filtering(top_k, top_p)

    def one_chunk(d_unembed, xs):
        h, t, lse_c, ent_c, g_lp, g_ent = xs
        z = _chunk_logits(h, unembed, inv_t)
        rows = jnp.arange(t.shape[0])
        # The kept set is recomputed (not stored: it would be [B*T, V]) and held constant in the gradient.
        keep = _kept_mask(z, top_k, top_p) if filtering else None
        p = jnp.exp((jnp.where(keep, z, _NEG) if filtering else z) - lse_c[:, None])  # 0 outside the kept set
        # d logp / d z = onehot(t) [t kept] - p
        g_z = -g_lp[:, None] * p
        g_z = g_z.at[rows, t].add(g_lp * keep[rows, t] if filtering else g_lp)
        if with_entropy:
            # d H / d z_v = -p_v (z_v - E_p[z]),  E_p[z] = lse - H
            g_z = g_z - g_ent[:, None] * p * (z - (lse_c - ent_c)[:, None])
        g_logits = g_z * inv_t
        d_h = jnp.dot(g_logits.astype(unembed.dtype), unembed.T, preferred_element_type=jnp.float32)
        d_unembed = d_unembed + jnp.dot(h.T, g_logits.astype(h.dtype), preferred_element_type=jnp.float32)
        return d_unembed, d_h.astype(h.dtype)

    d_unembed0 = jnp.zeros(unembed.shape, jnp.float32)
    xs = (h_chunks, t_chunks, lse, entropy, g_logp, g_entropy)
    d_unembed, d_h = jax.lax.scan(one_chunk, d_unembed0, xs)
    return d_h, d_unembed.astype(unembed.dtype), None


_chunked_logp_entropy.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_token_logprobs(
    hidden,
    unembed,
    targets,
    *,
    chunk_size: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """`token_logprobs(hidden @ unembed, targets, temperature=, top_k=, top_p=)` without materializing the
    [B, T, V] float32 logits.

    Tokens are processed `chunk_size` at a time (a `lax.scan`); a custom VJP recomputes each chunk's logits
    in the backward pass, so forward and backward both hold O(chunk_size * V) float32, not O(B * T * V).
    bf16 inputs are multiplied with float32 accumulation.

    Args:
      hidden: [B, T, H] final hidden states.
      unembed: [H, V] unembedding matrix (the transposed embedding when tied).
      targets: [B, T] integer token ids in [0, V).
      chunk_size: tokens per chunk (static); B * T need not divide it.
      temperature: static Python float > 0; logits are divided by it.
      return_entropy: also return the per-token entropy of softmax(logits / temperature) (of the filtered
        distribution when top_k / top_p are on).
      top_k: static int, 0 = off; top_p: static float in (0, 1], 1.0 = off: each chunk's tempered logits are
        filtered as the sampler filters them (`filter_logits`) before the logsumexp. top-p sorts each chunk's
        [chunk_size, V] logits, in the forward and again in the backward (module docstring: cost).
    Returns:
      logp [B, T] float32, or (logp, entropy), both [B, T] float32.
    """
    check_rank("hidden", hidden, 3, "[B, T, H]")
    check_rank("unembed", unembed, 2, "[H, V]")
    batch, seq, width = jnp.shape(hidden)
    if jnp.shape(unembed)[0] != width or tuple(jnp.shape(targets)) != (batch, seq):
        raise ValueError(
            f"expected hidden [B, T, H], unembed [H, V], targets [B, T]; got hidden {tuple(jnp.shape(hidden))}, "
            f"unembed {tuple(jnp.shape(unembed))}, targets {tuple(jnp.shape(targets))}"
        )
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    check_positive("temperature", temperature)
    _check_filter(top_k, top_p, jnp.shape(unembed)[1])

    n_tokens = batch * seq
    chunk = min(chunk_size, max(n_tokens, 1))
    n_chunks = -(-n_tokens // chunk)
    pad = n_chunks * chunk - n_tokens
    h = jnp.pad(jnp.reshape(hidden, (n_tokens, width)), ((0, pad), (0, 0)))
    t = jnp.pad(jnp.reshape(jnp.asarray(targets).astype(jnp.int32), (n_tokens,)), (0, pad))
    logp, entropy = _chunked_logp_entropy(
        h.reshape(n_chunks, chunk, width), unembed, t.reshape(n_chunks, chunk), float(temperature),
        bool(return_entropy), int(top_k), float(top_p),
    )
    logp = logp.reshape(-1)[:n_tokens].reshape(batch, seq)
    if not return_entropy:
        return logp
    return logp, entropy.reshape(-1)[:n_tokens].reshape(batch, seq)
