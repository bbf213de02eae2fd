"""The slot-cache sampler against full recompute and the model's own log-probs: multi-turn cache reuse, continuous
batching, the rollout copy of the weights, sharding on a mesh, compile counts and stops."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mgrpo_jax import sharding
from mgrpo_jax.compilation import CompileCounter
from mgrpo_jax.kernels import token_logprobs
from mgrpo_jax.models import ModelConfig, init_model
from mgrpo_jax.rollout.controller import SamplerPolicy
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


_BUFFER = 40


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


@jax.jit
def _logits_without_cache(graphdef_state, tokens, length):
    model = nnx.merge(*graphdef_state)
    positions = jnp.arange(_BUFFER)[None]
    return model(tokens[None], positions, (positions < length).astype(jnp.int32))


def _model_logprobs(graphdef, state, sequence, temperature):
    """The model's log-probs of sequence[1:] given what precedes each token (one full forward, no cache)."""
    buffer = jnp.zeros(_BUFFER, jnp.int32).at[: len(sequence)].set(jnp.asarray(sequence, jnp.int32))
    logits = _logits_without_cache((graphdef, state), buffer, len(sequence))
    lp = token_logprobs(logits[:, :-1], buffer[None, 1:], temperature=temperature)
    return np.asarray(lp)[0, :len(sequence) - 1]


def _observation(turn, row):
    return [(7 * turn + 3 * row + i) % 50 + 3 for i in range(2 + (row + turn) % 3)]


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
    for prompt, sample in zip(PROMPTS, samples):
        want = _model_logprobs(graphdef, state, prompt + sample.tokens.tolist(), temperature)[len(prompt) - 1:]
        np.testing.assert_allclose(sample.logprobs, want, atol=1e-4)
        assert sample.logprobs.dtype == np.float32


# ------------------------------------------------------------------------------------------ cache reuse


def _three_turns(sampler, state, prompts, seed):
    """Episodes of three turns: each turn's prompt is the previous prompt, its sample and an observation."""
    history, turns = [list(p) for p in prompts], []
    for turn in range(3):
        samples = sampler.generate(state, history, jax.random.key(seed + turn))
        turns.append(samples)
        history = [h + s.tokens.tolist() + _observation(turn, r) for r, (h, s) in enumerate(zip(history, samples))]
    return turns, history


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_multi_turn_reuse_prefills_only_new_tokens_and_matches_a_full_prefill(model, temperature):
    """An episode's next turn continues its row: only the observation (and the last sampled token, never fed) is
    prefilled, and the turn samples exactly what a sampler holding nothing samples from the whole prompt."""
    graphdef, state = model
    cfg = SamplerConfig(batch_size=4, max_new_tokens=4, prompt_buckets=(4, 8, 24), temperature=temperature)
    reusing, fresh = Sampler(graphdef, CFG, cfg), Sampler(graphdef, CFG, cfg)
    turns, history = _three_turns(reusing, state, PROMPTS, seed=10)
    prompt_tokens = reusing.stats["prompt_tokens"]
    # Turns 2 and 3 prefill the observation and the previous turn's last sample; everything else is reused.
    new_tokens = sum(len(p) for p in PROMPTS) + sum(1 + len(_observation(t, r)) for t in range(2) for r in range(4))
    assert reusing.stats["prefill_tokens"] == new_tokens
    assert reusing.stats["reused_tokens"] == prompt_tokens - new_tokens > 0
    # The same prompts from scratch: each call prefills everything (release() forgets the rows).
    prompts = [list(p) for p in PROMPTS]
    for turn, samples in enumerate(turns):
        fresh.release()
        want = fresh.generate(state, prompts, jax.random.key(10 + turn))
        for got, ref in zip(samples, want):
            assert got.tokens.tolist() == ref.tokens.tolist() and got.finish_reason == ref.finish_reason
            np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)
        prompts = [p + s.tokens.tolist() + _observation(turn, r) for r, (p, s) in enumerate(zip(prompts, samples))]
    assert fresh.stats["reused_tokens"] == 0
    if temperature:  # the recorded behaviour log-probs are the model's scores of the sampled tokens
        for r, full in enumerate(history):
            scores = _model_logprobs(graphdef, state, full, temperature)
            start = len(PROMPTS[r])
            for turn, samples in enumerate(turns):
                n = len(samples[r].tokens)
                np.testing.assert_allclose(samples[r].logprobs, scores[start - 1:start - 1 + n], atol=1e-4)
                start += n + len(_observation(turn, r))
    else:
        for r in range(4):
            first = turns[2][r].tokens.tolist()
            prompt = history[r][:len(history[r]) - len(first) - len(_observation(2, r))]
            assert first == _full_recompute_greedy(graphdef, state, prompt, 4)


@pytest.mark.parametrize("tiles", [{}, {"attention": "auto", "attention_block": 8}])  # auto: chunked on CPU
def test_prefill_row_blocks_sample_what_full_prefills_sample(model, tiles, temperature=0.8):
    """prefill_rows: a prefill admitting few prompts runs over a block of rows gathered from the cache and written
    back. Six three-turn episodes on four rows (refills beside running rows, evictions, continued rows) sample the
    same tokens and log-probs as with every prefill over every row, prefilling the same tokens in fewer slots.
    `tiles`: also with prefill and decode attending the 28-slot cache in tiles of 8 (the model's own attention is
    dense), up to its filled extent."""
    graphdef, state = model
    full = SamplerConfig(batch_size=4, max_new_tokens=4, prompt_buckets=(4, 8, 24), temperature=temperature)
    prompts = PROMPTS + [[3, 3, 9], [8, 1]]
    assert CFG.attention == "dense"
    whole = Sampler(graphdef, CFG, full)
    blocks = Sampler(graphdef, CFG, dataclasses.replace(full, prefill_rows=(1, 2), **tiles))
    want, _ = _three_turns(whole, state, prompts, seed=3)
    got, _ = _three_turns(blocks, state, prompts, seed=3)
    for samples, references in zip(got, want):
        for x, y in zip(samples, references):
            assert x.tokens.tolist() == y.tokens.tolist() and x.finish_reason == y.finish_reason
            # Tiles sum the softmax in another order: float32 rounding of these large (x25) logits, ~2e-5.
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4 if tiles else 1e-5)
    for key in ("prefill_tokens", "reused_tokens", "evictions"):
        assert blocks.stats[key] == whole.stats[key], key
    assert blocks.stats["evictions"] > 0 and blocks.stats["reused_tokens"] > 0
    assert blocks.stats["prefill_block_tokens"] < whole.stats["prefill_block_tokens"]
    assert blocks.compiled_buckets > whole.compiled_buckets  # blocks of 1 or 2 rows were used


@pytest.mark.parametrize("one_device_mesh", [False, True])
def test_warm_up_compiles_every_program_before_generation(model, one_device_mesh):
    """one_device_mesh: the parameters live on a 1 x 1 mesh (as an experiment places each agent); the fresh cache
    must take the sharding type the programs return, or a prefill after `release()` compiles again."""
    graphdef, state = model
    if one_device_mesh:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
        state = jax.device_put(state, jax.sharding.NamedSharding(mesh, P()))
    cfg = SamplerConfig(batch_size=4, max_new_tokens=3, prompt_buckets=(4, 8, 24), temperature=0.8, prefill_rows=(2,))
    sampler = Sampler(graphdef, CFG, cfg)
    assert sampler.warm_up(state) == sampler.compiled_programs > 0
    assert sampler.compiled_buckets == 2 * 3  # blocks of 2 and 4 rows x 3 prompt buckets
    compiled = sampler.compiled_programs
    history = [list(p) for p in PROMPTS + PROMPTS[:2]]
    for turn in range(2):  # every block size and bucket may be taken; nothing compiles any more
        sampler.release()  # a fresh cache for each call, as the controller's rollout batches get
        samples = sampler.generate(state, history, jax.random.key(turn))
        history = [h + s.tokens.tolist() + _observation(turn, r) for r, (h, s) in enumerate(zip(history, samples))]
    assert sampler.compiled_programs == compiled
    assert sampler.warm_up(state) == 0


def test_reuse_takes_the_right_rows_evicts_the_least_recent_and_forgets_old_weights(model):
    graphdef, state = model
    cfg = SamplerConfig(batch_size=2, max_new_tokens=3, prompt_buckets=(8, 24), temperature=0.0)
    sampler = Sampler(graphdef, CFG, cfg)
    a, b, c = [5, 9, 2], [7, 1, 3, 3], [11, 4]
    first = sampler.generate(state, [a, b], jax.random.key(0))
    # The continuations arrive in the other order; each finds its own row.
    a2, b2 = (p + s.tokens.tolist() + [30, 31] for p, s in zip((a, b), first))
    before = dict(sampler.stats)
    second = sampler.generate(state, [b2, a2], jax.random.key(1))
    assert sampler.stats["reused_tokens"] - before["reused_tokens"] == len(a) + 2 + len(b) + 2
    # A third episode evicts the least recently admitted row (b2's, admitted before a2's); a2's continuation
    # still finds its row.
    assert sampler.generate(state, [c], jax.random.key(2))[0].tokens.tolist() == \
        _full_recompute_greedy(graphdef, state, c, 3)
    assert sampler.stats["evictions"] == 1
    before = dict(sampler.stats)
    a3 = a2 + second[1].tokens.tolist() + [40]
    out = sampler.generate(state, [a3], jax.random.key(3))[0]
    assert sampler.stats["reused_tokens"] - before["reused_tokens"] == len(a2) + 2
    assert out.tokens.tolist() == _full_recompute_greedy(graphdef, state, a3, 3)
    # New weights (even equal ones, in a new object): nothing cached is reused.
    other = jax.tree.map(lambda x: x * 1.0, state)
    before = dict(sampler.stats)
    sampler.generate(other, [a3 + out.tokens.tolist()], jax.random.key(4))
    assert sampler.stats["reused_tokens"] == before["reused_tokens"]


# ----------------------------------------------------------------------------------- continuous batching


def test_continuous_batching_equals_one_at_a_time(model):
    """More prompts than rows: rows are refilled as they finish; greedy and sampled results equal each prompt run
    alone (each prompt has its own random stream), and stop/EOS rows free their slots early."""
    graphdef, state = model
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 12, 4], [11], [2, 4, 6, 8, 10], [3, 3], [9, 8, 7, 6, 5, 4], [1]]
    reference = {i: _full_recompute_greedy(graphdef, state, p, 6) for i, p in enumerate(prompts)}
    eos = reference[1][2]  # prompt 1 ends after 3 tokens, others may end early too
    for temperature in (0.0, 0.9):
        cfg = SamplerConfig(batch_size=2, max_new_tokens=6, prompt_buckets=(4, 8), temperature=temperature,
                            eos_ids=(eos,))
        sampler = Sampler(graphdef, CFG, cfg)
        batched = sampler.generate(state, prompts, jax.random.key(7))
        if temperature == 0:  # prompt 1 stops at its EOS while prompt 0 runs on: its row takes prompt 2 meanwhile
            assert sampler.stats["admitted_beside_running_rows"] > 0
        # One row: the prompts run one after the other (each with its own random stream, its index).
        alone = Sampler(graphdef, CFG, SamplerConfig(**{**cfg.__dict__, "batch_size": 1}))
        for i, one in enumerate(alone.generate(state, prompts, jax.random.key(7))):
            assert batched[i].tokens.tolist() == one.tokens.tolist(), (temperature, i)
            np.testing.assert_allclose(batched[i].logprobs, one.logprobs, atol=1e-5)
            assert batched[i].finish_reason == one.finish_reason
            if temperature == 0:
                cut = reference[i].index(eos) + 1 if eos in reference[i] else 6
                assert batched[i].tokens.tolist() == reference[i][:cut]
                assert batched[i].finish_reason == ("eos" if eos in reference[i] else "length")


def test_compiles_once_per_bucket_whatever_the_prompts(model):
    """Varied prompt lengths and counts (fewer and more than the rows), reused and fresh rows: one prefill program
    per bucket, one decode program; a second round compiles nothing."""
    graphdef, state = model
    sampler = Sampler(graphdef, CFG, SamplerConfig(batch_size=2, max_new_tokens=3, prompt_buckets=(4, 8)))
    rng = np.random.default_rng(0)
    key = jax.random.key(2)

    def round_(offset):
        for i in range(6):
            count = int(rng.integers(1, 6))
            prompts = [rng.integers(1, 60, size=int(rng.integers(1, 9))).tolist() for _ in range(count)]
            sampler.generate(state, prompts, jax.random.fold_in(key, offset + i))

    with CompileCounter() as compiles:
        round_(0)
        sampler.generate(state, [[1, 2, 3, 4, 5, 6, 7]], key)  # one long prompt: the 8-bucket for sure
    assert sampler.compiled_buckets == 2
    assert sampler.compiled_programs == 2 + 2  # prefill x 2 buckets, decode, cache creation
    assert compiles.count <= sampler.compiled_programs + 4  # plus at most a few tiny host->device helper ops
    with CompileCounter() as again:
        round_(100)
        sampler.release()
        round_(200)
    assert again.count == 0


# ---------------------------------------------------------------------------------- weights and devices


def test_rollout_copy_is_made_once_and_changes_nothing(model):
    """bf16 compute from float32 parameters: the rollout copy holds kernels in bf16 and norm scales in float32,
    made at the weight sync, not per step; the model computes bit-identical logits from it."""
    graphdef, state = model
    bf16 = CFG.replace(dtype="bfloat16")
    graphdef16 = nnx.split(nnx.eval_shape(lambda: init_model(bf16)))[0]
    sampler = Sampler(graphdef16, bf16, SamplerConfig(batch_size=4, max_new_tokens=4, prompt_buckets=(8,),
                                                      temperature=0.0))
    policy = SamplerPolicy(sampler, state, version=3)
    rollout = sampler.rollout  # the copy the policy's weight sync made
    assert rollout.layers.attn.q_kernel[...].dtype == jnp.bfloat16 and rollout.embed[...].dtype == jnp.bfloat16
    assert rollout.layers.input_norm.scale[...].dtype == jnp.float32
    assert policy.params is state  # the trainer's parameters stay as they are (export, warm start read them)
    seq = jnp.asarray([PROMPTS[1]], jnp.int32)
    args = (seq, jnp.arange(seq.shape[1])[None], jnp.ones_like(seq))
    np.testing.assert_array_equal(nnx.merge(graphdef16, rollout)(*args), nnx.merge(graphdef16, state)(*args))
    assert sampler.stats["rollout_copies"] == 1  # made when the policy got its weights
    samples = policy.generate(PROMPTS, jax.random.key(0), [])
    policy.generate(PROMPTS, jax.random.key(1), [])
    assert sampler.stats["rollout_copies"] == 1  # not per call, not per step
    for prompt, sample in zip(PROMPTS, samples):
        assert sample.tokens.tolist() == _full_recompute_greedy(graphdef16, state, prompt, 4)
    policy.update(jax.tree.map(lambda x: x * 1.0, state), 4)
    assert sampler.stats["rollout_copies"] == 2
    f32 = Sampler(graphdef, CFG, SamplerConfig(batch_size=4, max_new_tokens=4, prompt_buckets=(8,)))
    assert f32.rollout_params(state) is state  # nothing to cast or move: no copy


def test_sharded_sampler_on_a_mesh_equals_one_device(model):
    """fsdp 4 x tp 2 (8 fake devices): rows and cache over fsdp, kv heads over tp, tp-only rollout weights;
    the same tokens as on one device."""
    graphdef, state = model
    mesh = sharding.make_agent_meshes({"main": {"devices": 8, "tp": 2}})["main"]
    shardings = sharding.state_shardings(state, mesh)
    placed = jax.device_put(state, shardings)
    cfg = SamplerConfig(batch_size=4, max_new_tokens=5, prompt_buckets=(4, 8, 24), temperature=0.0)
    on_mesh, one = Sampler(graphdef, CFG, cfg), Sampler(graphdef, CFG, cfg)
    turns, _ = _three_turns(on_mesh, placed, PROMPTS, seed=0)
    want, _ = _three_turns(one, state, PROMPTS, seed=0)
    for got_turn, want_turn in zip(turns, want):
        assert [s.tokens.tolist() for s in got_turn] == [s.tokens.tolist() for s in want_turn]
    assert on_mesh.stats["reused_tokens"] > 0
    assert on_mesh._cache.k.sharding.spec == P(None, "fsdp", None, "tp", None)
    assert on_mesh._state.tokens.sharding.spec[0] == "fsdp"
    rollout = on_mesh.rollout
    assert rollout.layers.attn.q_kernel[...].sharding.spec == P(None, None, "tp", None)  # embed not over fsdp
    assert placed.layers.attn.q_kernel[...].sharding.spec == P(None, "fsdp", "tp", None)
    # The compiled programs themselves: cache in and out over (fsdp, tp), what the host reads replicated.
    for program in ("prefill", "decode"):
        compiled = on_mesh.lowered(placed, program, 8).compile()
        (args, _), outs = compiled.input_shardings, compiled.output_shardings
        for cache in (args[1], outs[0]):
            assert cache.k.spec == P(None, "fsdp", None, "tp", None) == cache.v.spec
            assert cache.segment_ids.spec == P("fsdp", None)
        assert args[3].spec == P("fsdp", *args[3].spec[1:])  # the prefill tokens / decode's live rows
        if program == "decode":
            assert all(x.is_fully_replicated for x in jax.tree.leaves(outs[2]))
    # The cache is donated from call to call: the previous call's buffers are gone, not copied.
    before = on_mesh._cache.k
    on_mesh.generate(placed, [[3, 4, 5]], jax.random.key(9))
    assert before.is_deleted() and not on_mesh._cache.k.is_deleted()


def test_greedy_and_logprobs_equal_transformers(tmp_path):
    """Oracle: transformers' Qwen3ForCausalLM (PyTorch). Greedy turns of ragged prompts (one longer than a
    512-key tile, so chunked attention walks several tiles) equal `generate`, the second turn continuing the
    first turn's cached rows; sampled tokens' log-probs equal log_softmax of its logits over the whole sequence."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mgrpo_jax.models import load_model

    hf_config = transformers.Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=1024)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    hf.save_pretrained(str(tmp_path))
    model, config = load_model(str(tmp_path), attention="chunked")
    graphdef, state = nnx.split(model)
    rng = np.random.RandomState(3)
    prompts = [rng.randint(3, 96, size=n).tolist() for n in (5, 530, 11)]
    n_new = 6

    def hf_greedy(prompt):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    # Two rows for three prompts: the third waits for a free row (continuous batching).
    cfg = SamplerConfig(batch_size=2, max_new_tokens=n_new, prompt_buckets=(16, 560), temperature=0.0)
    sampler = Sampler(graphdef, config, cfg)
    history = [list(p) for p in prompts]
    for turn in range(2):
        samples = sampler.generate(state, history, jax.random.key(turn))
        for h, sample in zip(history, samples):
            assert sample.tokens.tolist() == hf_greedy(h)
            assert sample.finish_reason == "length"
        history = [h + s.tokens.tolist() + _observation(turn, r) for r, (h, s) in enumerate(zip(history, samples))]
    assert sampler.stats["reused_tokens"] > 0

    sampling = Sampler(graphdef, config, dataclasses.replace(cfg, temperature=1.0))
    for prompt, sample in zip(prompts, sampling.generate(state, prompts, jax.random.key(7))):
        full = prompt + sample.tokens.tolist()
        with torch.no_grad():
            logits = hf(torch.tensor([full])).logits[0].double()
        want = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(
            -1, torch.tensor(sample.tokens, dtype=torch.long)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(sample.logprobs, want, atol=1e-4)


# ------------------------------------------------------------------------------------- stops and limits


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
    with pytest.raises(ValueError, match="rollout_weights='dp'"):
        SamplerConfig(batch_size=1, max_new_tokens=1, rollout_weights="dp")
    for rows in ((4,), (2, 1), (0,)):
        with pytest.raises(ValueError, match="prefill_rows must be ascending, distinct and in"):
            SamplerConfig(batch_size=4, max_new_tokens=1, prefill_rows=rows)
    with pytest.raises(ValueError, match="attention='flash' is not an attention implementation"):
        SamplerConfig(batch_size=1, max_new_tokens=1, attention="flash")
    for block in (0, 1.5, True):
        with pytest.raises(ValueError, match="attention_block must be a positive integer"):
            SamplerConfig(batch_size=1, max_new_tokens=1, attention_block=block)


def test_decode_flops_follow_the_length_not_the_cache_size(model):
    """XLA's cost analysis of one decode step (layers unrolled), 1k vs 16k cache: dense attention's FLOPs grow with
    the cache; chunked attention's grow by under 10% of that even in this tiny model (4 heads x 8 dims: little
    attention work per slot), the rest being per-slot bookkeeping (the tiles' segment statistics, ~7 FLOPs per
    slot and layer; for Qwen3-0.6B the whole step grows by < 0.1%, bench/scale.py --sections decode_flops).
    The analysis counts the tile loop's body once, so this pins that nothing outside that loop scales like
    attention over the whole cache (no fall-back to dense, no whole-layer reads); which tiles the loop visits
    (none at or beyond the filled extent) is test_attention's test_causal_tiles_skip_the_upper_triangle."""
    graphdef, state = model

    def flops(attention, max_len):
        cfg = CFG.replace(attention=attention, scan_unroll=CFG.num_layers)
        gd = nnx.split(nnx.eval_shape(lambda: init_model(cfg)))[0]
        sampler = Sampler(gd, cfg, SamplerConfig(batch_size=2, max_new_tokens=8, prompt_buckets=(max_len - 8,)))
        cost = sampler.lowered(state, "decode").compile().cost_analysis()
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

    chunked = [flops("chunked", n) for n in (1024, 16384)]
    dense = [flops("dense", n) for n in (1024, 16384)]
    assert dense[1] > 5 * dense[0]
    assert chunked[1] - chunked[0] < 0.1 * (dense[1] - dense[0])
