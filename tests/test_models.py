"""The NNX decoder and its Hugging Face I/O against transformers' PyTorch models on random tiny configs.

Oracle: transformers' own LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM (float32, CPU), with every
parameter (norm scales and biases included) randomized so that a mis-mapped tensor cannot hide behind a default
init of ones or zeros.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from mgrpo_jax.models import (
    KVCache,
    ModelConfig,
    abstract_model,
    check_tokenizer,
    init_model,
    load_model,
    load_tokenizer,
    positions_from_mask,
    save_hf,
)
from mgrpo_jax.models import hf as hf_io
from model_oracles import checkpoint_builder, our_logits, padded_batch, random_torch_model, torch_logits

VOCAB = 256
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
FAMILIES = {
    # head_dim 16, theta 1e4, original context 32: the llama3 rule leaves dim-pair 0 alone, smooths pair 1 and
    # scales pairs 2..7, so every branch of the scaling is exercised.
    "llama3": lambda: transformers.LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, rope_parameters={"rope_type": "default",
                                                                        "rope_theta": 1000.0}),
    # attention_bias=True: q/k/v and o biases; head_dim 32 != hidden/heads.
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=32, attention_bias=True),
    "llama3_tied": lambda: transformers.LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True),
}

TOKENS, MASK, POSITIONS = padded_batch(VOCAB)


def _torch_model(hf_config, seed=0):
    return random_torch_model(hf_config, seed)


def _ours(model, tokens=TOKENS, mask=MASK, positions=POSITIONS):
    return our_logits(model, tokens, mask, positions)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (name, torch model, checkpoint dir, our model, our config, torch logits on TOKENS/MASK), built once."""
    return checkpoint_builder(tmp_path_factory, lambda name: _torch_model(FAMILIES[name]()), TOKENS, MASK, POSITIONS)


@pytest.fixture(params=sorted(FAMILIES))
def family(request, checkpoints):
    return checkpoints(request.param)


def test_logits_match_transformers(family):
    name, _, _, model, config, ref = family
    ours = _ours(model)
    real = MASK.astype(bool)
    assert ours.shape == (*TOKENS.shape, VOCAB) and ours.dtype == np.float32
    assert np.abs(ours[real] - ref[real]).max() < 1e-4, name
    assert np.isfinite(ours).all()  # pad queries: fully masked rows give finite (ignored) values, never NaN
    assert config.tie_word_embeddings == name.endswith("tied")
    assert (config.rope_scaling is not None) == name.startswith("llama3")


def test_hidden_states_times_unembedding_are_the_logits(family):
    _, _, _, model, config, _ = family
    hidden = model(jnp.asarray(TOKENS), jnp.asarray(POSITIONS), jnp.asarray(MASK), return_hidden=True)
    assert hidden.shape == (*TOKENS.shape, config.hidden_size)
    assert model.unembedding().shape == (config.hidden_size, config.vocab_size)
    np.testing.assert_allclose(np.asarray(hidden @ model.unembedding()), _ours(model), atol=1e-5)


def test_pads_never_attend_nor_are_attended(family):
    _, _, _, model, _, _ = family
    other_pads = np.where(MASK == 1, TOKENS, (TOKENS * 7 + 1) % VOCAB)  # same real tokens, different pads
    real = MASK.astype(bool)
    np.testing.assert_array_equal(_ours(model)[real], _ours(model, tokens=other_pads)[real])


def test_save_round_trip_through_transformers(family, tmp_path):
    name, torch_model, _, model, config, ref = family
    save_hf(model, config, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(reloaded) is type(torch_model)
    np.testing.assert_array_equal(torch_logits(reloaded, TOKENS, MASK, POSITIONS), ref)
    ours_again, config_again = load_model(str(tmp_path))
    assert config_again == config
    np.testing.assert_array_equal(_ours(ours_again), _ours(model))


def test_sharded_checkpoint_loads(checkpoints, tmp_path):
    _, torch_model, _, model, _, _ = checkpoints("qwen3")
    torch_model.save_pretrained(str(tmp_path), max_shard_size="40KB")
    assert os.path.isfile(tmp_path / hf_io.INDEX_FILE)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    sharded, _ = load_model(str(tmp_path))
    np.testing.assert_array_equal(_ours(sharded), _ours(model))


def test_our_sharded_save_loads_in_transformers(tmp_path):
    torch_model = _torch_model(FAMILIES["qwen2"]())
    src = str(tmp_path / "src")
    torch_model.save_pretrained(src)
    model, config = load_model(src)
    out = str(tmp_path / "out")
    save_hf(model, config, out, hf_config=transformers.AutoConfig.from_pretrained(src), max_shard_bytes=30_000)
    index = json.load(open(os.path.join(out, hf_io.INDEX_FILE)))
    assert len(set(index["weight_map"].values())) > 2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_array_equal(torch_logits(reloaded, TOKENS, MASK, POSITIONS),
                                  torch_logits(torch_model, TOKENS, MASK, POSITIONS))
    wrong = transformers.Qwen2Config(**{**TINY, "intermediate_size": 80})
    with pytest.raises(ValueError, match="hf_config .* describes"):
        save_hf(model, config, str(tmp_path / "bad"), hf_config=wrong)


def test_bf16_checkpoint_loads(tmp_path):
    """Real Qwen3/Llama checkpoints are stored in BF16, which numpy cannot read by itself."""
    torch_model = _torch_model(FAMILIES["qwen3"]()).to(torch.bfloat16)
    torch_model.save_pretrained(str(tmp_path))
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ours, _ = load_model(str(tmp_path))  # float32 parameters, exactly the BF16 values
    real = MASK.astype(bool)
    want = torch_logits(reference, TOKENS, MASK, POSITIONS)
    assert np.abs(_ours(ours)[real] - want[real]).max() < 1e-4
    bf16, _ = load_model(str(tmp_path), param_dtype="bfloat16")
    q = torch_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [n*d, h]
    np.testing.assert_array_equal(np.asarray(bf16.layers.attn.q_kernel[...][1], np.float32), q.T.reshape(64, 4, 32))


_LAYOUTS = [  # (layout, checkpoint tensor shape) with n heads of d, hidden h: every kind of conversion
    (hf_io.Layout(), (6, 10)), (hf_io.Layout("transpose"), (6, 10)), (hf_io.Layout("in_heads", 4, 3), (12, 10)),
    (hf_io.Layout("out_heads", 4, 3), (10, 12)), (hf_io.Layout("bias_heads", 4, 3), (12,)),
]


@given(st.sampled_from(_LAYOUTS), st.data())
def test_layout_reads_exactly_the_block(layout_shape, data):
    """A device's block read from the checkpoint tensor (touching only what it needs) equals the block of the
    whole converted tensor, for every layout and any block of whole heads."""
    layout, shape = layout_shape
    hf = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    ours = layout.to_ours(hf)
    np.testing.assert_array_equal(layout.to_hf(ours), hf)
    index = []
    for size in ours.shape:
        start = data.draw(st.integers(0, size - 1))
        index.append(slice(start, data.draw(st.integers(start + 1, size))))
    np.testing.assert_array_equal(layout.read(hf, tuple(index)), ours[tuple(index)])


# ------------------------------------------------------------------------------------------ cached decoding


# The cache path shares every layer with the forward checked against transformers above; two families suffice,
# one of them with the blockwise attention (which then skips the cache's empty slots: kv_valid_len).
@pytest.mark.parametrize("name, attention", [("qwen3", "dense"), ("llama3_tied", "chunked")])
def test_cached_decoding_equals_full_forward(checkpoints, name, attention):
    """Prefill a left/right-padded prompt, then decode (teacher-forced) tokens; compare with one full forward."""
    _, _, _, model, config, _ = checkpoints(name)
    prompt_mask, prompt = MASK, TOKENS
    steps = 3
    new_tokens = np.random.RandomState(1).randint(3, VOCAB, size=(len(prompt), steps)).astype(np.int32)
    lengths = prompt_mask.sum(1)
    full_tokens = np.concatenate([prompt, new_tokens], 1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(new_tokens)], 1)
    full_positions = np.concatenate([POSITIONS, lengths[:, None] + np.arange(steps)[None]], 1).astype(np.int32)
    want = _ours(model, full_tokens, full_mask, full_positions)  # the dense forward, checked against transformers

    config = config.replace(attention=attention)
    graphdef, state = nnx.split(abstract_model(config))[0], nnx.state(model)
    prefill = jax.jit(lambda s, t, p, m, c: nnx.merge(graphdef, s).prefill(t, p, m, c), donate_argnums=4)
    decode = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s).decode_step(t, p, c), donate_argnums=3)
    cache = KVCache.init(config, batch_size=len(prompt), max_len=prompt.shape[1] + steps + 2)
    logits, cache = prefill(state, jnp.asarray(prompt), jnp.asarray(POSITIONS), jnp.asarray(prompt_mask), cache)
    t = prompt.shape[1]
    last_real = np.array([t - 1, lengths[1] - 1, t - 1, t - 1])  # row 1 is right-padded
    np.testing.assert_allclose(np.asarray(logits), want[np.arange(len(prompt)), last_real], atol=1e-4)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    for i in range(steps):
        logits, cache = decode(state, jnp.asarray(new_tokens[:, i]), jnp.asarray(full_positions[:, t + i]), cache)
        np.testing.assert_allclose(np.asarray(logits), want[:, t + i], atol=1e-4)
    assert int(cache.end_index) == t + steps
    np.testing.assert_array_equal(np.asarray(cache.segment_ids)[:, :t + steps], full_mask)
    assert prefill._cache_size() == 1 and decode._cache_size() == 1  # one compile each across all steps


def test_cached_prefill_ignores_pad_contents(checkpoints):
    _, _, _, model, config, _ = checkpoints("qwen2")
    other_pads = np.where(MASK == 1, TOKENS, 0)
    outs = []
    for toks in (TOKENS, other_pads):
        cache = KVCache.init(config, batch_size=len(MASK), max_len=MASK.shape[1] + 1)
        logits, cache = model.prefill(jnp.asarray(toks), jnp.asarray(POSITIONS), jnp.asarray(MASK), cache)
        nxt, _ = model.decode_step(jnp.asarray([5, 6, 7, 8]), jnp.asarray(MASK.sum(1)), cache)
        outs.append((np.asarray(logits), np.asarray(nxt)))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])


# --------------------------------------------------------------------------------------- dtypes and remat


def test_bf16_compute_is_close(checkpoints):
    _, _, path, model, _, _ = checkpoints("llama3")
    bf16, config = load_model(path, param_dtype="bfloat16", dtype="bfloat16")
    assert bf16.layers.attn.q_kernel[...].dtype == jnp.bfloat16
    low, high = _ours(bf16), _ours(model)
    real = MASK.astype(bool)
    assert low.dtype == np.float32
    err = np.abs(low[real] - high[real]).max()
    assert 0 < err < 0.05 * np.abs(high[real]).max(), err


def test_remat_policies_give_the_same_loss_and_grads():
    """Every remat policy (and the blockwise attention under remat) changes memory, never values."""
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    tokens, mask, positions = (jnp.asarray(a[:, :6] % 64) for a in (TOKENS, MASK, POSITIONS))
    results = {}
    variants = [("none", {}), *((p, {"remat": p}) for p in (True, "dots", "dots_no_batch", "save_attn_out")),
                ("full + chunked", {"remat": "full", "attention": "chunked"})]
    for policy, changes in variants:
        graphdef, state = nnx.split(init_model(config.replace(**changes), seed=3))

        def loss(s):
            return jnp.mean(nnx.merge(graphdef, s)(tokens, positions, mask) ** 2)

        results[policy] = jax.jit(jax.value_and_grad(loss))(state)
    want_loss, want_grads = results.pop("none")
    for policy, (value, grads) in results.items():
        np.testing.assert_allclose(value, want_loss, rtol=1e-6, err_msg=str(policy))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
            assert np.isfinite(a).all()  # fully masked pad rows must not put NaN into the gradients
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=str(policy))


def test_remat_policy_names():
    base = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                       num_kv_heads=2, head_dim=8)
    assert base.remat == "none"
    assert base.replace(remat=True).remat == "full" and base.replace(remat=False).remat == "none"
    assert base.replace(remat=True) == base.replace(remat="full")  # one config, whichever spelling
    with pytest.raises(ValueError, match=r"remat='minimal' is not a remat policy; choose one of \['none', 'full'"):
        base.replace(remat="minimal")
    with pytest.raises(ValueError, match="attention='flash' is not an attention implementation"):
        base.replace(attention="flash")


def _program_equations(layers: int, remat: str) -> int:
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=layers, num_heads=4,
                         num_kv_heads=2, head_dim=8, remat=remat)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: init_model(config)))
    tokens = jnp.zeros((2, 8), jnp.int32)

    def loss(s):
        return jnp.sum(nnx.merge(graphdef, s)(tokens, tokens, tokens + 1))

    return len(jax.make_jaxpr(jax.grad(loss))(state).eqns)


def test_program_size_does_not_grow_with_depth():
    """The layers are scanned: the training program at 12 layers is the program at 2 layers (a Python loop
    over layers would repeat the layer's equations 6 times more)."""
    for remat in ("none", "full"):
        assert _program_equations(12, remat) == _program_equations(2, remat)


def test_packed_rows_equal_separate_sequences(checkpoints):
    """Two sequences packed in one row (segment ids 1, 2, per-segment positions) give each sequence's own
    logits, as transformers computes them for the sequences alone; neither sees the other."""
    _, torch_model, _, model, _, _ = checkpoints("qwen3")
    a, b = TOKENS[2, :5], TOKENS[3, :3]
    row_tokens = np.concatenate([a, b, [0]])[None].astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 3 + [0]], np.int32)
    positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 0]], np.int32)
    packed = _ours(model, row_tokens, segments, positions)[0]
    for seq, where in ((a, slice(0, 5)), (b, slice(5, 8))):
        ref = torch_logits(torch_model, seq[None], np.ones((1, len(seq)), np.int64), np.arange(len(seq))[None])
        assert np.abs(packed[where] - ref[0]).max() < 1e-4


def test_params_carry_logical_axes():
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=8, attention_bias=True, qk_norm=True, architecture="qwen3")
    state = nnx.state(init_model(config), nnx.Param)
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var.get_value().ndim, path
    attn = nnx.state(init_model(config), nnx.Param)["layers"]["attn"]
    assert attn["q_kernel"].get_metadata()["out_sharding"] == ("layers", "embed", "q_heads", "head_dim")
    assert attn["k_kernel"].get_metadata()["out_sharding"] == ("layers", "embed", "kv_heads", "head_dim")
    assert attn["q_kernel"].get_value().shape == (1, 32, 4, 8)  # stacked: a leading layer axis


# ------------------------------------------------------------------------------------------------ errors


def _rewrite_weights(path, edit):
    file = os.path.join(path, hf_io.SINGLE_WEIGHTS_FILE)
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("small"))
    _torch_model(transformers.Qwen2Config(**{**TINY, "num_hidden_layers": 1})).save_pretrained(path)
    return path


@pytest.fixture
def broken(small_checkpoint, tmp_path):
    path = str(tmp_path / "ckpt")
    shutil.copytree(small_checkpoint, path)
    return path


def test_error_missing_directory_config_and_weights(broken, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    os.remove(os.path.join(broken, hf_io.SINGLE_WEIGHTS_FILE))
    with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors"):
        load_model(broken)
    os.remove(os.path.join(broken, "config.json"))
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        load_model(broken)


def test_error_missing_shard(small_checkpoint, tmp_path):
    torch_model = _torch_model(transformers.Qwen2Config(**{**TINY, "num_hidden_layers": 1}))
    torch_model.save_pretrained(str(tmp_path), max_shard_size="40KB")
    shard = json.load(open(tmp_path / hf_io.INDEX_FILE))["weight_map"]["model.norm.weight"]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        load_model(str(tmp_path))


def test_error_unsupported_architecture(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="supported: llama, qwen2, qwen3"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="sliding"):
        ModelConfig.from_hf(transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=16,
                                                     max_window_layers=0))


def test_error_shape_mismatch(broken):
    _rewrite_weights(broken, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((95, 64),
                                                                                               np.float32)}))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \[95, 64\], "
                                         r"expected \[96, 64\]"):
        load_model(broken)


def test_error_dtype_mismatch(broken):
    _rewrite_weights(broken, lambda t: t.update({"model.norm.weight": np.zeros((64,), np.int8)}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has dtype I8"):
        load_model(broken)


def test_error_missing_and_unexpected_tensors(broken):
    _rewrite_weights(broken, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.0\.self_attn\.k_proj\.bias'\]"):
        load_model(broken)
    _rewrite_weights(broken, lambda t: t.update({"model.layers.0.self_attn.k_proj.bias": np.zeros(32, np.float32),
                                                 "model.layers.7.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model\.layers\.7\.extra\.weight'\]"):
        load_model(broken)


def _word_level_tokenizer(n_tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(n_tokens - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def test_tokenizer_saved_loaded_and_checked(small_checkpoint, tmp_path):
    model, config = load_model(small_checkpoint)
    save_hf(model, config, str(tmp_path / "ok"), tokenizer=_word_level_tokenizer(VOCAB - 6))
    tokenizer = load_tokenizer(str(tmp_path / "ok"), config)
    # transformers picks the tokenizer class from config.json's model_type (Qwen2Tokenizer adds its own
    # <|endoftext|>), so check that our vocabulary made the trip and that the loaded tokenizer still fits.
    assert tokenizer.get_vocab()["w5"] == 7 and VOCAB - 6 <= len(tokenizer) <= VOCAB
    too_big = _word_level_tokenizer(VOCAB + 1)
    with pytest.raises(ValueError, match=f"257 tokens .* vocab_size is {VOCAB}"):
        check_tokenizer(too_big, config)
    with pytest.raises(ValueError, match="vocab_size"):
        save_hf(model, config, str(tmp_path / "bad"), tokenizer=too_big)
    too_big.save_pretrained(str(tmp_path / "big_tok"))
    with pytest.raises(ValueError, match="big_tok has 257 tokens"):
        load_tokenizer(str(tmp_path / "big_tok"), config)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nothing"))


def test_config_validation_names_the_key():
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                head_dim=8)
    with pytest.raises(ValueError, match="num_heads .* multiple of num_kv_heads"):
        ModelConfig(**{**base, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="ModelConfig.dtype"):
        ModelConfig(**base, dtype="int8")
    with pytest.raises(ValueError, match="architecture='gpt2'"):
        ModelConfig(**base, architecture="gpt2")
    assert ModelConfig(**base, dtype=jnp.bfloat16).dtype == "bfloat16"
