"""Per-token log-probabilities and entropies of sampled tokens, from logits or, chunked, from hidden states.

Everything is computed in float32 under the *tempered* distribution softmax(logits / temperature), which is
the distribution a sampler at that temperature draws from: the trainer must use the sampler's temperature
or the importance ratio pi_theta / pi_old is biased (see LESSONS.md, item 8).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mgrpo_jax.kernels._checks import check_positive, check_rank


def _check_logits_targets(logits, targets) -> None:
    if jnp.ndim(logits) < 1 or tuple(jnp.shape(targets)) != tuple(jnp.shape(logits))[:-1]:
        raise ValueError(
            f"logits [B, T, V] and targets [B, T] must agree on the leading dims; "
            f"got logits {tuple(jnp.shape(logits))}, targets {tuple(jnp.shape(targets))}"
        )


def _tempered(logits, temperature) -> jax.Array:
    check_positive("temperature", temperature)
    return jnp.asarray(logits).astype(jnp.float32) / temperature


def token_logprobs(logits, targets, *, temperature: float = 1.0) -> jax.Array:
    """log pi(target) under log_softmax(logits / temperature).

    Args:
      logits: [B, T, V] (any leading dims), any float dtype; upcast to float32.
      targets: [B, T] integer token ids in [0, V).
    Returns:
      [B, T] float32: z[target] - logsumexp(z), z = logits / temperature.
    """
    _check_logits_targets(logits, targets)
    z = _tempered(logits, temperature)
    target_z = jnp.take_along_axis(z, jnp.asarray(targets)[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_z - jax.nn.logsumexp(z, axis=-1)


def token_entropy(logits, *, temperature: float = 1.0) -> jax.Array:
    """Entropy of softmax(logits / temperature): H = logsumexp(z) - sum_v p_v z_v.

    Args:
      logits: [B, T, V] (any leading dims), any float dtype.
    Returns:
      [B, T] float32.
    """
    z = _tempered(logits, temperature)
    p = jax.nn.softmax(z, axis=-1)
    return jax.nn.logsumexp(z, axis=-1) - jnp.sum(p * z, axis=-1)


# ---------------------------------------------------------------------------------------------------------
# Chunked: logits = hidden @ unembed, one chunk of tokens at a time. The forward keeps only logsumexp (and
# the entropy) per token; the backward recomputes each chunk's logits. Peak extra memory is a few
# [chunk_size, V] float32 buffers instead of the full [B*T, V] logits (and their copies for the gradient).
# ---------------------------------------------------------------------------------------------------------


def _chunk_logits(h_chunk, unembed, inv_temperature: float) -> jax.Array:
    """[C, H] @ [H, V] -> [C, V] float32 tempered logits (the matmul accumulates in float32)."""
    return jnp.dot(h_chunk, unembed, preferred_element_type=jnp.float32) * inv_temperature


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_logp_entropy(h_chunks, unembed, t_chunks, temperature: float, with_entropy: bool):
    """h_chunks [N, C, H], unembed [H, V], t_chunks [N, C] -> (logp [N, C], entropy [N, C] or zeros)."""
    (logp, entropy), _ = _chunked_fwd(h_chunks, unembed, t_chunks, temperature, with_entropy)
    return logp, entropy


def _chunked_fwd(h_chunks, unembed, t_chunks, temperature, with_entropy):
    inv_t = 1.0 / temperature

    def one_chunk(_, xs):
        h, t = xs
        z = _chunk_logits(h, unembed, inv_t)
        lse = jax.nn.logsumexp(z, axis=-1)
        logp = jnp.take_along_axis(z, t[:, None], axis=-1)[:, 0] - lse
        if with_entropy:
            entropy = lse - jnp.sum(jnp.exp(z - lse[:, None]) * z, axis=-1)
        else:
            entropy = jnp.zeros_like(lse)
        return None, (logp, lse, entropy)

    _, (logp, lse, entropy) = jax.lax.scan(one_chunk, None, (h_chunks, t_chunks))
    return (logp, entropy), (h_chunks, unembed, t_chunks, lse, entropy)


def _chunked_bwd(temperature, with_entropy, residuals, cotangents):
    h_chunks, unembed, t_chunks, lse, entropy = residuals
    g_logp, g_entropy = cotangents
    inv_t = 1.0 / temperature

    def one_chunk(d_unembed, xs):
        h, t, lse_c, ent_c, g_lp, g_ent = xs
        z = _chunk_logits(h, unembed, inv_t)
        p = jnp.exp(z - lse_c[:, None])
        # d logp / d z = onehot(t) - p
        g_z = -g_lp[:, None] * p
        g_z = g_z.at[jnp.arange(t.shape[0]), t].add(g_lp)
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
):
    """`token_logprobs(hidden @ unembed, targets)` without materializing the [B, T, V] float32 logits.

    Tokens are processed `chunk_size` at a time (a `lax.scan`); a custom VJP recomputes each chunk's logits
    in the backward pass, so forward and backward both hold O(chunk_size * V) float32, not O(B * T * V).
    bf16 inputs are multiplied with float32 accumulation.

    Args:
      hidden: [B, T, H] final hidden states.
      unembed: [H, V] unembedding matrix (the transposed embedding when tied).
      targets: [B, T] integer token ids in [0, V).
      chunk_size: tokens per chunk (static); B * T need not divide it.
      temperature: static Python float > 0; logits are divided by it.
      return_entropy: also return the per-token entropy of softmax(logits / temperature).
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

    n_tokens = batch * seq
    chunk = min(chunk_size, max(n_tokens, 1))
    n_chunks = -(-n_tokens // chunk)
    pad = n_chunks * chunk - n_tokens
    h = jnp.pad(jnp.reshape(hidden, (n_tokens, width)), ((0, pad), (0, 0)))
    t = jnp.pad(jnp.reshape(jnp.asarray(targets).astype(jnp.int32), (n_tokens,)), (0, pad))
    logp, entropy = _chunked_logp_entropy(
        h.reshape(n_chunks, chunk, width), unembed, t.reshape(n_chunks, chunk), float(temperature), bool(return_entropy)
    )
    logp = logp.reshape(-1)[:n_tokens].reshape(batch, seq)
    if not return_entropy:
        return logp
    return logp, entropy.reshape(-1)[:n_tokens].reshape(batch, seq)
