"""token_logprobs / token_entropy / chunked_token_logprobs against NumPy, and chunked == naive (values, grads)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_reference as ref
from mgrpo_jax.kernels import chunked_token_logprobs, token_entropy, token_logprobs

B, T, H, V = 2, 7, 16, 37


def _inputs(seed=0, dtype=jnp.float32, scale=1.0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden = (jax.random.normal(k1, (B, T, H)) * scale).astype(dtype)
    unembed = (jax.random.normal(k2, (H, V)) / np.sqrt(H)).astype(dtype)
    targets = jax.random.randint(k3, (B, T), 0, V)
    return hidden, unembed, targets


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_token_logprobs_and_entropy_match_numpy(temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    got = token_logprobs(logits, targets, temperature=temperature)
    assert got.dtype == jnp.float32 and got.shape == (B, T)
    np.testing.assert_allclose(got, ref.token_logprobs(logits, targets, temperature), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(token_entropy(logits, temperature=temperature), ref.token_entropy(logits, temperature),
                               rtol=1e-5, atol=1e-5)


def test_token_logprobs_bf16_logits():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(scale=3.0, size=(B, T, V)), jnp.bfloat16)
    targets = rng.integers(0, V, size=(B, T))
    got = token_logprobs(logits, targets)
    assert got.dtype == jnp.float32
    # The oracle sees the same bf16-rounded logits: the kernel must upcast, not compute in bf16.
    np.testing.assert_allclose(got, ref.token_logprobs(np.asarray(logits, np.float32), targets), atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 14, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_naive_values_and_grads(chunk_size, temperature):
    hidden, unembed, targets = _inputs()
    weights = jax.random.normal(jax.random.key(9), (B, T))
    ent_weights = jax.random.normal(jax.random.key(10), (B, T))

    def naive(h, w):
        logits = h @ w
        return token_logprobs(logits, targets, temperature=temperature), token_entropy(logits, temperature=temperature)

    def chunked(h, w):
        return chunked_token_logprobs(h, w, targets, chunk_size=chunk_size, temperature=temperature,
                                      return_entropy=True)

    (lp_n, ent_n), (lp_c, ent_c) = naive(hidden, unembed), chunked(hidden, unembed)
    np.testing.assert_allclose(lp_c, lp_n, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent_c, ent_n, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunked_token_logprobs(hidden, unembed, targets, chunk_size=chunk_size,
                                                      temperature=temperature), lp_n, rtol=1e-5, atol=1e-5)

    def scalarize(fn):  # a loss that uses both outputs, so both cotangents are exercised
        return lambda h, w: jnp.sum(fn(h, w)[0] * weights) + jnp.sum(fn(h, w)[1] * ent_weights)

    g_naive = jax.grad(scalarize(naive), argnums=(0, 1))(hidden, unembed)
    g_chunk = jax.jit(jax.grad(scalarize(chunked), argnums=(0, 1)))(hidden, unembed)
    for a, b in zip(g_chunk, g_naive):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_grads_without_entropy():
    hidden, unembed, targets = _inputs(seed=3)
    loss_n = lambda h, w: jnp.sum(token_logprobs(h @ w, targets))
    loss_c = lambda h, w: jnp.sum(chunked_token_logprobs(h, w, targets, chunk_size=5))
    for a, b in zip(jax.grad(loss_c, (0, 1))(hidden, unembed), jax.grad(loss_n, (0, 1))(hidden, unembed)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_matches_numpy_oracle():
    hidden, unembed, targets = _inputs(seed=4, scale=3.0)
    logits = np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64)
    np.testing.assert_allclose(chunked_token_logprobs(hidden, unembed, targets, chunk_size=3),
                               ref.token_logprobs(logits, np.asarray(targets)), atol=1e-4)


def test_chunked_bf16_inputs():
    hidden, unembed, targets = _inputs(seed=5, dtype=jnp.bfloat16)
    lp, ent = chunked_token_logprobs(hidden, unembed, targets, chunk_size=4, return_entropy=True)
    assert lp.dtype == jnp.float32 and ent.dtype == jnp.float32
    logits = np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64)
    np.testing.assert_allclose(lp, ref.token_logprobs(logits, np.asarray(targets)), atol=2e-3)
    grads = jax.grad(lambda h, w: jnp.sum(chunked_token_logprobs(h, w, targets, chunk_size=4)), (0, 1))(hidden, unembed)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    ref_grads = jax.grad(lambda h, w: jnp.sum(token_logprobs(h @ w, targets)), (0, 1))(
        hidden.astype(jnp.float32), unembed.astype(jnp.float32))
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=3e-2, rtol=3e-2)


def test_chunked_under_vmap():
    hidden, unembed, targets = _inputs(seed=6)
    stacked = jnp.stack([hidden, hidden * 0.5])
    out = jax.vmap(lambda h: chunked_token_logprobs(h, unembed, targets, chunk_size=4))(stacked)
    np.testing.assert_allclose(out[1], token_logprobs((hidden * 0.5) @ unembed, targets), rtol=1e-5, atol=1e-5)


def test_bad_shapes_raise():
    hidden, unembed, targets = _inputs()
    with pytest.raises(ValueError, match=r"logits \(2, 7, 37\), targets \(2, 6\)"):
        token_logprobs(hidden @ unembed, targets[:, :6])
    with pytest.raises(ValueError, match=r"unembed \(15, 37\)"):
        chunked_token_logprobs(hidden, unembed[:15], targets, chunk_size=4)
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, H\]"):
        chunked_token_logprobs(hidden[0], unembed, targets, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logprobs(hidden, unembed, targets, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden @ unembed, targets, temperature=0.0)
