"""The KV-cache sampler against full recompute, the model's own log-probs, compile counts and stops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mgrpo_jax.compilation import CompileCounter
from mgrpo_jax.kernels import token_logprobs
from mgrpo_jax.models import ModelConfig, init_model
from mgrpo_jax.rollout.sampler import Sampler, SamplerConfig, filter_logits

CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, architecture="qwen3", qk_norm=True)
PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 12, 4], [11], [2, 4, 6, 8, 10]]


@pytest.fixture(scope="module")
def model():
    m = init_model(CFG, seed=1)
    # Larger weights than the 0.02 init so that the greedy choice is decisive (no near-ties) in the comparisons.
    graphdef, state = nnx.split(m)
    state = jax.tree.map(lambda x: x * 25.0 if x.ndim >= 2 else x, state)
    return graphdef, state


_BUFFER = 32


@jax.jit
def _next_token_without_cache(graphdef_state, tokens, length):
    """Reference: the whole sequence through the model (no cache), a fixed buffer so it compiles once."""
    model = nnx.merge(*graphdef_state)
    positions = jnp.arange(_BUFFER)[None]
    logits = model(tokens[None], positions, (positions < length).astype(jnp.int32))
    return jnp.argmax(logits[0, length - 1])


def _full_recompute_greedy(graphdef, state, prompt, n_new):
    """Reference: re-run the whole sequence for every new token; no cache, no padding."""
    seq = list(prompt)
    for _ in range(n_new):
        buffer = jnp.zeros(_BUFFER, jnp.int32).at[: len(seq)].set(jnp.asarray(seq, jnp.int32))
        seq.append(int(_next_token_without_cache((graphdef, state), buffer, len(seq))))
    return seq[len(prompt):]


def test_greedy_with_cache_equals_full_recompute(model):
    graphdef, state = model
    sampler = Sampler(graphdef, CFG, SamplerConfig(batch_size=4, max_new_tokens=6, prompt_buckets=(4, 8),
                                                   temperature=0.0))
    samples = sampler.generate(state, PROMPTS, jax.random.key(0))
    for prompt, sample in zip(PROMPTS, samples):
        assert sample.tokens.tolist() == _full_recompute_greedy(graphdef, state, prompt, 6)
        assert sample.finish_reason == "length"


def test_logprobs_equal_the_models_logprobs(model):
    graphdef, state = model
    temperature = 0.7
    sampler = Sampler(graphdef, CFG, SamplerConfig(batch_size=4, max_new_tokens=5, prompt_buckets=(8,),
                                                   temperature=temperature))
    samples = sampler.generate(state, PROMPTS, jax.random.key(1))
    m = nnx.merge(graphdef, state)
    for prompt, sample in zip(PROMPTS, samples):
        seq = jnp.asarray([prompt + sample.tokens.tolist()], jnp.int32)
        logits = m(seq, jnp.arange(seq.shape[1])[None], jnp.ones_like(seq))
        want = token_logprobs(logits[:, :-1], seq[:, 1:], temperature=temperature)[0, len(prompt) - 1:]
        np.testing.assert_allclose(sample.logprobs, want, atol=1e-4)
        assert sample.logprobs.dtype == np.float32


def test_one_compile_per_bucket(model):
    graphdef, state = model
    sampler = Sampler(graphdef, CFG, SamplerConfig(batch_size=2, max_new_tokens=3, prompt_buckets=(4, 8)))
    short, long = [[1, 2], [3]], [[1, 2, 3, 4, 5, 6], [7]]
    key = jax.random.key(2)
    with CompileCounter() as compiles:
        for i in range(3):
            sampler.generate(state, short, jax.random.fold_in(key, i))
            sampler.generate(state, long, jax.random.fold_in(key, 10 + i))
            sampler.generate(state, short + long + short[:1], jax.random.fold_in(key, 20 + i))  # 3 fixed-size calls
    assert sampler.compiled_buckets == 2
    assert compiles.count <= 2 + 4  # two programs, plus at most a few tiny host->device helper ops
    with CompileCounter() as again:
        sampler.generate(state, long, jax.random.fold_in(key, 99))
    assert again.count == 0


def test_stop_sequences_and_eos(model):
    graphdef, state = model
    base = SamplerConfig(batch_size=1, max_new_tokens=8, prompt_buckets=(8,), temperature=0.0)
    reference = _full_recompute_greedy(graphdef, state, PROMPTS[1], 8)
    # A stop sequence = two tokens that first occur at positions 3-4 of the greedy continuation.
    j = next(i for i in range(1, 7) if tuple(reference[i:i + 2]) not in
             {tuple(reference[a:a + 2]) for a in range(i)})
    stopped = Sampler(graphdef, CFG, base).generate(state, [PROMPTS[1]], jax.random.key(0),
                                                     stop_sequences=[[60, 60, 60], reference[j:j + 2]])[0]
    assert stopped.tokens.tolist() == reference[: j + 2] and stopped.finish_reason == "stop"
    first_new = next(i for i, t in enumerate(reference) if t not in reference[:i] and i > 0)
    eos = Sampler(graphdef, CFG, SamplerConfig(**{**base.__dict__, "eos_ids": (reference[first_new],)}))
    ended = eos.generate(state, [PROMPTS[1]], jax.random.key(0))[0]
    assert ended.tokens.tolist() == reference[: first_new + 1] and ended.finish_reason == "eos"


def test_prompt_overflow(model):
    graphdef, state = model
    long_prompt = list(range(1, 12))
    cfg = SamplerConfig(batch_size=1, max_new_tokens=2, prompt_buckets=(4, 8), temperature=0.0)
    sample = Sampler(graphdef, CFG, cfg).generate(state, [long_prompt], jax.random.key(0))[0]
    assert sample.prompt_truncated == 3
    assert sample.tokens.tolist() == _full_recompute_greedy(graphdef, state, long_prompt[3:], 2)
    strict = Sampler(graphdef, CFG, SamplerConfig(**{**cfg.__dict__, "overflow": "error"}))
    with pytest.raises(ValueError, match="11 tokens, more than the largest prompt bucket 8"):
        strict.generate(state, [long_prompt], jax.random.key(0))


def test_filter_logits_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 20)).astype(np.float32)
    for top_k, top_p in [(5, 1.0), (0, 0.6), (4, 0.5), (0, 1.0)]:
        z = np.asarray(filter_logits(jnp.asarray(logits), 0.8, top_k, top_p))
        for b in range(3):
            t = logits[b] / 0.8
            order = np.argsort(-t)
            allowed = set(order[:top_k]) if top_k else set(range(20))
            # top-p acts on the distribution renormalized over the top-k set (as transformers' warpers do).
            p = np.where([i in allowed for i in order], np.exp(t[order] - t.max()), 0.0)
            p /= p.sum()
            before = np.cumsum(p) - p
            allowed &= {order[i] for i in range(20) if before[i] < top_p}
            kept = set(np.flatnonzero(z[b] > -1e30))
            assert kept == allowed and len(kept) >= 1
            np.testing.assert_allclose(z[b][list(kept)], t[list(kept)], rtol=1e-6)


def test_top_k_samples_stay_in_the_top_k(model):
    graphdef, state = model
    sampler = Sampler(graphdef, CFG, SamplerConfig(batch_size=4, max_new_tokens=4, prompt_buckets=(8,), top_k=1,
                                                   temperature=1.0))
    greedy = Sampler(graphdef, CFG, SamplerConfig(batch_size=4, max_new_tokens=4, prompt_buckets=(8,),
                                                  temperature=0.0))
    a = sampler.generate(state, PROMPTS, jax.random.key(5))
    b = greedy.generate(state, PROMPTS, jax.random.key(6))
    for x, y in zip(a, b):
        assert x.tokens.tolist() == y.tokens.tolist()
        np.testing.assert_allclose(x.logprobs, 0.0, atol=1e-6)  # top-1: the sampled distribution is a point mass


def test_bad_config():
    with pytest.raises(ValueError, match="ascending"):
        SamplerConfig(batch_size=1, max_new_tokens=1, prompt_buckets=(8, 4))
    with pytest.raises(ValueError, match="overflow='drop'"):
        SamplerConfig(batch_size=1, max_new_tokens=1, overflow="drop")
