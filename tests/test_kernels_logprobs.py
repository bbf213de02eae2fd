"""token_logprobs / token_entropy / chunked_token_logprobs against NumPy, and chunked == naive (values, grads)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_reference as ref
from mgrpo_jax.kernels import chunked_token_logprobs, filter_logits, token_entropy, token_logprobs

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


# ---- the sampler's top-k / top-p filter (issue 17: the trainer must score under the distribution sampled) --

_FILTERS = [(8, 1.0), (0, 0.5), (5, 0.7), (1, 1.0), (0, 0.95), (3, 0.3)]


def _tied_logits(rng, shape):
    # Integer-valued logits: many exact ties, including at the k-th value and inside the top-p prefix.
    return rng.integers(-3, 4, size=shape).astype(np.float32)


@pytest.mark.parametrize("top_k,top_p", _FILTERS)
def test_filter_logits_matches_numpy_incl_ties(top_k, top_p):
    rng = np.random.default_rng(top_k * 7 + int(top_p * 10))
    for logits in (_tied_logits(rng, (6, V)), rng.normal(scale=2.0, size=(6, V)).astype(np.float32)):
        z = np.asarray(filter_logits(jnp.asarray(logits), 0.8, top_k, top_p))
        keep = ref.filter_keep(logits, 0.8, top_k, top_p)
        np.testing.assert_array_equal(z > -1e30, keep)
        np.testing.assert_allclose(z[keep], (logits / np.float32(0.8))[keep], rtol=1e-6)
        assert (keep.sum(-1) >= 1).all()
        if top_k and top_p == 1.0:
            assert (keep.sum(-1) >= top_k).all()  # ties at the k-th value are kept, never cut arbitrarily


def test_filter_ties_at_the_kth_value_and_in_the_top_p_prefix():
    # Three tokens tie for 2nd place: top_k=2 keeps all four of the top; top_p keeps ties in index order.
    logits = np.log(np.array([[0.1, 0.3, 0.1, 0.1, 0.4, 0.0001]], np.float32))
    z = np.asarray(filter_logits(jnp.asarray(logits), 1.0, 2, 1.0))
    np.testing.assert_array_equal(z[0] > -1e30, [False, True, False, False, True, False])
    z = np.asarray(filter_logits(jnp.asarray(logits), 1.0, 3, 1.0))  # k-th value 0.1 is tied three ways
    np.testing.assert_array_equal(z[0] > -1e30, [True, True, True, True, True, False])
    # top_p=0.75: order 4 (0.4), 1 (0.3), then the 0.1s by index: 0, 2, 3. Mass before 0 is 0.7 < 0.75: kept;
    # before 2 it is 0.8: cut, although 2 ties with 0.
    z = np.asarray(filter_logits(jnp.asarray(logits), 1.0, 0, 0.75))
    np.testing.assert_array_equal(z[0] > -1e30, [True, True, False, False, True, False])


@pytest.mark.parametrize("top_k,top_p", _FILTERS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_filtered_logprobs_and_entropy_match_numpy(top_k, top_p, temperature):
    rng = np.random.default_rng(11)
    logits = np.concatenate([rng.normal(scale=2.0, size=(1, T, V)), _tied_logits(rng, (1, T, V))]).astype(np.float32)
    keep = ref.filter_keep(logits, temperature, top_k, top_p)
    # Half the targets inside the kept set, half anywhere (mostly outside for small k / p).
    inside = np.array([[rng.choice(np.flatnonzero(keep[b, t])) for t in range(T)] for b in range(B)])
    anywhere = rng.integers(0, V, size=(B, T))
    targets = np.where(rng.random((B, T)) < 0.5, inside, anywhere)
    got = np.asarray(token_logprobs(logits, targets, temperature=temperature, top_k=top_k, top_p=top_p))
    want = ref.filtered_token_logprobs(logits, targets, temperature, top_k, top_p)
    finite = np.isfinite(want)
    assert finite.any() and np.all(np.isfinite(got))
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    assert np.all(got[~finite] < -1e30)  # probability 0: a huge finite negative, never NaN or -inf
    np.testing.assert_allclose(token_entropy(logits, temperature=temperature, top_k=top_k, top_p=top_p),
                               ref.filtered_token_entropy(logits, temperature, top_k, top_p), rtol=1e-5, atol=1e-5)


def test_filtered_gradient_matches_finite_differences():
    # The kept set is constant under small perturbations away from its boundary, so central differences in
    # float64 (the NumPy oracle) give the exact derivative; JAX differentiates with the mask held constant.
    rng = np.random.default_rng(12)
    logits = rng.normal(scale=2.0, size=(2, 3, 11))
    for top_k, top_p in [(4, 1.0), (0, 0.6), (5, 0.8)]:
        keep = ref.filter_keep(logits, 0.9, top_k, top_p)
        targets = np.array([[rng.choice(np.flatnonzero(keep[b, t])) for t in range(3)] for b in range(2)])
        w_lp, w_ent = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))

        def oracle(x):
            return (np.sum(w_lp * ref.filtered_token_logprobs(x, targets, 0.9, top_k, top_p))
                    + np.sum(w_ent * ref.filtered_token_entropy(x, 0.9, top_k, top_p)))

        fd = np.zeros_like(logits)
        for i in np.ndindex(logits.shape):
            step = np.zeros_like(logits)
            step[i] = 1e-5
            assert (ref.filter_keep(logits + step, 0.9, top_k, top_p) == keep).all()
            fd[i] = (oracle(logits + step) - oracle(logits - step)) / 2e-5

        def loss(x):
            return (jnp.sum(w_lp * token_logprobs(x, targets, temperature=0.9, top_k=top_k, top_p=top_p))
                    + jnp.sum(w_ent * token_entropy(x, temperature=0.9, top_k=top_k, top_p=top_p)))

        got = jax.grad(loss)(jnp.asarray(logits, jnp.float32))
        np.testing.assert_allclose(got, fd, rtol=1e-4, atol=1e-4)
        assert np.all(np.asarray(got)[~keep] == 0.0)  # filtered-out logits get no gradient


@pytest.mark.parametrize("top_k,top_p", [(8, 1.0), (0, 0.5), (5, 0.7)])
@pytest.mark.parametrize("chunk_size", [3, 14])
def test_chunked_filtered_equals_naive_values_and_grads(top_k, top_p, chunk_size):
    hidden, unembed, targets = _inputs(seed=21, scale=3.0)
    opts = dict(temperature=0.8, top_k=top_k, top_p=top_p)
    keep = ref.filter_keep(np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64), 0.8, top_k, top_p)
    # Some targets outside the kept set (ratio 0 in training), most inside.
    inside = np.array([[np.flatnonzero(keep[b, t])[0] for t in range(T)] for b in range(B)])
    targets = jnp.asarray(np.where(np.arange(T) % 3 == 0, np.asarray(targets), inside))
    weights = jax.random.normal(jax.random.key(9), (B, T))
    ent_weights = jax.random.normal(jax.random.key(10), (B, T))

    def naive(h, w):
        logits = h @ w
        return token_logprobs(logits, targets, **opts), token_entropy(logits, **opts)

    def chunked(h, w):
        return chunked_token_logprobs(h, w, targets, chunk_size=chunk_size, return_entropy=True, **opts)

    (lp_n, ent_n), (lp_c, ent_c) = naive(hidden, unembed), chunked(hidden, unembed)
    finite = np.asarray(lp_n) > -1e30
    assert finite.any() and not finite.all()
    np.testing.assert_array_equal(np.asarray(lp_c) > -1e30, finite)
    np.testing.assert_allclose(np.asarray(lp_c)[finite], np.asarray(lp_n)[finite], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent_c, ent_n, rtol=1e-5, atol=1e-5)

    def scalarize(fn):  # out-of-set log-probs are constants (~finfo.min); weight only the finite ones
        return lambda h, w: (jnp.sum(jnp.where(finite, fn(h, w)[0], 0.0) * weights)
                             + jnp.sum(fn(h, w)[1] * ent_weights))

    g_naive = jax.grad(scalarize(naive), argnums=(0, 1))(hidden, unembed)
    g_chunk = jax.jit(jax.grad(scalarize(chunked), argnums=(0, 1)))(hidden, unembed)
    for a, b in zip(g_chunk, g_naive):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The out-of-set targets' own cotangent must not leak a +1 onto their (filtered-out) logit either.
    g_all = jax.grad(lambda h, w: jnp.sum(chunked(h, w)[0] * weights), argnums=(0, 1))(hidden, unembed)
    g_all_n = jax.grad(lambda h, w: jnp.sum(naive(h, w)[0] * weights), argnums=(0, 1))(hidden, unembed)
    for a, b in zip(g_all, g_all_n):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_filters_off_leave_the_kernels_unchanged():
    hidden, unembed, targets = _inputs(seed=22)
    a = chunked_token_logprobs(hidden, unembed, targets, chunk_size=4, return_entropy=True)
    b = chunked_token_logprobs(hidden, unembed, targets, chunk_size=4, return_entropy=True, top_k=V, top_p=1.0)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_bad_filter_arguments_raise():
    hidden, unembed, targets = _inputs()
    logits = hidden @ unembed
    with pytest.raises(ValueError, match=r"top_k=38 exceeds the vocabulary size 37"):
        chunked_token_logprobs(hidden, unembed, targets, chunk_size=4, top_k=V + 1)
    with pytest.raises(ValueError, match=r"top_k must be an int >= 0"):
        token_logprobs(logits, targets, top_k=-1)
    with pytest.raises(ValueError, match=r"top_p must be a Python float in \(0, 1\]"):
        token_entropy(logits, top_p=0.0)
    with pytest.raises(ValueError, match=r"top_p must be a Python float in \(0, 1\]"):
        filter_logits(logits, 1.0, 0, 1.5)


# ---- end to end: what the sampler records is what the trainer's kernel recomputes -----------------------

@pytest.mark.parametrize("top_k,top_p", [(8, 1.0), (0, 0.5)])
def test_first_epoch_ratio_is_one_under_top_k_and_top_p(top_k, top_p):
    """Issue 17: sample with the Sampler at top_k=8 / top_p=0.5 on a tiny random model, rescore through the
    model's hidden states with the chunked kernel and the same settings: exp(trainer - behaviour) == 1."""
    from flax import nnx

    from mgrpo_jax.models import ModelConfig, init_model
    from mgrpo_jax.rollout.sampler import Sampler, SamplerConfig

    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, architecture="qwen3", qk_norm=True)
    graphdef, state = nnx.split(init_model(cfg, seed=3))
    state = jax.tree.map(lambda x: x * 8.0 if x.ndim >= 2 else x, state)  # a peaked, non-uniform distribution
    temperature = 0.9
    sampler = Sampler(graphdef, cfg, SamplerConfig(batch_size=4, max_new_tokens=12, prompt_buckets=(8,),
                                                   temperature=temperature, top_k=top_k, top_p=top_p))
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 12, 4], [11], [2, 4, 6, 8, 10]]
    samples = sampler.generate(state, prompts, jax.random.key(4))
    model = nnx.merge(graphdef, state)
    # One right-padded batch (causal attention: real tokens never see the pads), one forward, one kernel call.
    seqs = [prompt + sample.tokens.tolist() for prompt, sample in zip(prompts, samples)]
    width = max(map(len, seqs))
    tokens = jnp.asarray([s + [0] * (width - len(s)) for s in seqs], jnp.int32)
    mask = jnp.asarray([[1] * len(s) + [0] * (width - len(s)) for s in seqs], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(width - 1), (len(seqs), width - 1))
    hidden = model(tokens[:, :-1], positions, mask[:, :-1], return_hidden=True)
    opts = dict(chunk_size=16, temperature=temperature)
    lp = np.asarray(chunked_token_logprobs(hidden, model.unembedding(), tokens[:, 1:], top_k=top_k, top_p=top_p,
                                           **opts))
    full = np.asarray(chunked_token_logprobs(hidden, model.unembedding(), tokens[:, 1:], **opts))
    ratios, full_ratios = [], []
    for i, (prompt, sample) in enumerate(zip(prompts, samples)):
        new = slice(len(prompt) - 1, len(prompt) - 1 + len(sample.tokens))
        ratios.append(np.exp(lp[i, new] - sample.logprobs))
        full_ratios.append(np.exp(full[i, new] - sample.logprobs))
    ratios, full_ratios = np.concatenate(ratios), np.concatenate(full_ratios)
    assert ratios.size == 4 * 12
    # The sampler's cached, scanned decode and this one full forward sum in different orders: with logits scaled
    # up 8x, float32 noise reaches ~1.5e-5 nats. The bug this guards against is a ratio of 0.15-0.5.
    np.testing.assert_allclose(ratios, 1.0, atol=1e-4)
    # The test can fail: scoring under the full softmax (the old trainer) is far from 1 on these samples.
    assert np.mean(full_ratios) < 0.9
