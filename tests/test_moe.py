"""Qwen3 mixture-of-experts (`mgrpo_jax.models.moe`) against its oracles.

- transformers' Qwen3MoeForCausalLM (float32, CPU) on random tiny configs, every parameter randomized: logits on
  padded batches, save/load, greedy generation;
- NumPy for the grouped matmul (forward and both gradients) and the router's statistics;
- the same update on one device for the expert-parallel update on 8 fake devices (fsdp 2 x expert 2 x tp 2).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from mgrpo_jax import sharding
from mgrpo_jax.compilation import CompileCounter
from mgrpo_jax.models import ModelConfig, init_model, load_model, positions_from_mask, save_hf
from mgrpo_jax.models import moe
from mgrpo_jax.rollout.sampler import Sampler, SamplerConfig
from mgrpo_jax.train.agent import AgentTrainer, LossConfig, OptimizerConfig
from model_oracles import (checkpoint_builder, our_logits, padded_batch, random_segments, random_torch_model,
                           torch_logits)

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2, max_position_embeddings=64)
CONFIGS = {
    # dense first and last layers, experts renormalized over the top 2
    "norm_topk_dense_ends": dict(num_hidden_layers=4, norm_topk_prob=True, mlp_only_layers=[0, 3]),
    # every other layer sparse (decoder_sparse_step 2): runs of one layer each; raw top-k probabilities
    "sparse_step_2": dict(num_hidden_layers=4, norm_topk_prob=False, decoder_sparse_step=2),
    # all sparse (the released Qwen3-MoE layout), tied embeddings
    "all_sparse_tied": dict(num_hidden_layers=2, norm_topk_prob=False, tie_word_embeddings=True),
}
TOKENS, MASK, POSITIONS = padded_batch(VOCAB)


def _torch_model(name, seed=0):
    return random_torch_model(transformers.Qwen3MoeConfig(**TINY, **CONFIGS[name]), seed)


def _torch_logits(model, tokens=TOKENS, mask=MASK, positions=POSITIONS):
    return torch_logits(model, tokens, mask, positions)


def _ours(model, tokens=TOKENS, mask=MASK, positions=POSITIONS):
    return our_logits(model, tokens, mask, positions)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return checkpoint_builder(tmp_path_factory, _torch_model, TOKENS, MASK, POSITIONS)


@pytest.fixture(params=sorted(CONFIGS))
def family(request, checkpoints):
    return checkpoints(request.param)


# ------------------------------------------------------------------------------------------- the model


def test_logits_match_transformers_on_padded_batches(family):
    name, torch_model, _, model, config, ref = family
    real = MASK.astype(bool)
    ours = _ours(model)
    assert np.abs(ours[real] - ref[real]).max() < 1e-4, name
    assert np.isfinite(ours).all()
    # The layer kinds follow transformers' rule, and each run of equal layers is one stack.
    want = tuple("moe" if type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" else "dense"
                 for layer in torch_model.model.layers)
    assert config.layer_kinds == want
    assert len(model.layer_stacks()) == len(moe.layer_runs(want))
    # Pads take no expert row and attend nothing: other pad tokens change no real logit.
    other_pads = np.where(MASK == 1, TOKENS, (TOKENS * 7 + 1) % VOCAB)
    np.testing.assert_array_equal(_ours(model, tokens=other_pads)[real], ours[real])
    # Tokens run through the experts in chunks (7 of the 32 tokens at a time, the last chunk padded) give the
    # same logits: a token's output depends on the token alone.
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(config.replace(moe_chunk_tokens=7))))
    chunked = nnx.merge(graphdef, nnx.state(model))
    np.testing.assert_allclose(_ours(chunked)[real], ours[real], atol=1e-5, rtol=0)


def test_save_load_round_trip_is_bit_exact(family, tmp_path):
    name, torch_model, _, model, config, ref = family
    save_hf(model, config, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "Qwen3MoeForCausalLM"
    np.testing.assert_array_equal(_torch_logits(reloaded), ref)
    ours_again, config_again = load_model(str(tmp_path))
    assert config_again == config
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(ours_again))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


def test_greedy_tokens_equal_transformers_generate(checkpoints):
    _, torch_model, _, model, config, _ = checkpoints("norm_topk_dense_ends")
    prompts = [[5, 17, 33, 2, 9], [40], [7, 7, 61, 12, 3, 88, 41]]
    new = 8
    graphdef, state = nnx.split(model)
    sampler = Sampler(graphdef, config, SamplerConfig(batch_size=4, max_new_tokens=new, prompt_buckets=(8,),
                                                      temperature=0.0))
    samples = sampler.generate(state, prompts, jax.random.key(0))
    for prompt, sample in zip(prompts, samples):
        with torch.no_grad():
            out = torch_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                       eos_token_id=None, pad_token_id=0)
        assert sample.tokens.tolist() == out[0, len(prompt):].tolist(), prompt


def test_router_statistics_match_numpy():
    rng = np.random.default_rng(0)
    n, e, k = 12, 5, 2
    logits = rng.normal(size=(n, e)).astype(np.float32)
    real = rng.random(n) > 0.3
    experts = np.argsort(-logits, axis=1)[:, :k]
    stats = moe.router_statistics(jnp.asarray(logits), jnp.asarray(experts), jnp.asarray(real))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    f = np.array([(experts[real] == j).sum() for j in range(e)]) / (real.sum() * k)
    p = probs[real].mean(0)
    z = np.log(np.exp(logits).sum(1))[real]
    np.testing.assert_allclose(float(stats["load_balance"]), e * np.sum(f * p), rtol=1e-5)
    np.testing.assert_allclose(float(stats["z_loss"]), np.mean(z ** 2), rtol=1e-5)
    np.testing.assert_allclose(float(stats["max_load"]), e * f.max(), rtol=1e-6)
    # Uniform routing balances perfectly.
    uniform = moe.router_statistics(jnp.zeros((6, 3)), jnp.asarray([[0], [1], [2]] * 2), jnp.ones(6, bool))
    np.testing.assert_allclose(float(uniform["load_balance"]), 1.0, rtol=1e-6)


def test_route_renormalizes_top_k_only_when_asked():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8)), jnp.float32)
    router = jnp.asarray(np.random.default_rng(2).normal(size=(8, 5)), jnp.float32)
    raw, experts, logits = moe.route(x, router, 2, False)
    normed, experts2, _ = moe.route(x, router, 2, True)
    probs = jax.nn.softmax(logits, axis=-1)
    np.testing.assert_array_equal(experts, experts2)
    np.testing.assert_allclose(raw, jnp.take_along_axis(probs, experts, axis=1), rtol=1e-6)
    np.testing.assert_allclose(normed, raw / raw.sum(1, keepdims=True), rtol=1e-6)
    assert (np.asarray(experts) == np.argsort(-np.asarray(probs), axis=1)[:, :2]).all()


# ------------------------------------------------------------------------------------ grouped matmul


def _numpy_gmm(x, w, sizes):
    out, start = np.zeros((x.shape[0], w.shape[2])), 0
    for g, n in enumerate(sizes):
        out[start:start + n] = x[start:start + n] @ w[g]
        start += n
    return out


@settings(max_examples=6)
@given(sizes=st.lists(st.integers(0, 19), min_size=1, max_size=5), extra=st.integers(0, 9),
       impl=st.sampled_from(["tiled", "ragged_dot"]))
def test_grouped_matmul_and_its_gradients_match_numpy(sizes, extra, impl):
    """Groups of any size (empty ones, groups inside one tile and across tiles), rows past the groups: out, dx
    and dw equal NumPy's per-group products."""
    rng = np.random.default_rng(len(sizes) * 100 + extra)
    m = sum(sizes) + extra
    if m == 0:
        return
    x = rng.normal(size=(m, 6)).astype(np.float32)
    w = rng.normal(size=(len(sizes), 6, 5)).astype(np.float32)
    dy = rng.normal(size=(m, 5)).astype(np.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    out, vjp = jax.vjp(lambda a, b: moe.grouped_matmul(a, b, gs, impl, tile_rows=8), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    np.testing.assert_allclose(out, _numpy_gmm(x, w, sizes), atol=1e-5)
    want_dx, want_dw, start = np.zeros_like(x), np.zeros_like(w), 0
    for g, n in enumerate(sizes):
        want_dx[start:start + n] = dy[start:start + n] @ w[g].T
        want_dw[g] = x[start:start + n].T @ dy[start:start + n]
        start += n
    np.testing.assert_allclose(dx, want_dx, atol=1e-5)
    np.testing.assert_allclose(dw, want_dw, atol=1e-5)


def test_tiled_matmul_visits_only_the_tiles_each_group_spans():
    """Never a dense all-experts compute: the tiled loop runs at most ceil(M / tile) + G - 1 tile products (a
    group boundary inside a tile adds one), and exactly the tiles the groups touch."""
    sizes = np.array([0, 5, 0, 13, 2, 0, 30], np.int32)
    tile = 8
    m = int(sizes.sum()) + 6
    tiles, groups, valid, _, _ = moe._visits(jnp.asarray(sizes), -(-m // tile), tile)
    assert len(tiles) == -(-m // tile) + len(sizes) - 1
    got = sorted((int(t), int(g)) for t, g, v in zip(tiles, groups, valid) if v)
    want, start = [], 0
    for g, n in enumerate(sizes):
        want += [(t, g) for t in range(start // tile, (start + n - 1) // tile + 1)] if n else []
        start += n
    assert got == sorted(want)


# -------------------------------------------------------------------------------- expert parallelism

EP_CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                        head_dim=8, architecture="qwen3_moe", qk_norm=True, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=16, mlp_only_layers=(2,), router_aux_loss_coef=0.05,
                        router_z_loss_coef=0.01)
EP_LAYOUT = {"devices": 8, "fsdp": 2, "expert": 2, "tp": 2}


def _segments(seed, count=10):
    return random_segments(seed, count, EP_CONFIG.vocab_size)


def _trainer(layout, devices, config=EP_CONFIG):
    mesh = sharding.make_agent_meshes({"main": layout}, devices=devices)["main"]
    graphdef, params, shardings = sharding.born_sharded(lambda: init_model(config, 3), mesh)
    return AgentTrainer("main", graphdef, params, shardings, OptimizerConfig(learning_rate=1e-2, weight_decay=0.0),
                        LossConfig(micro_batch_size=4, chunk_size=16), row_len=24)


def test_expert_parallel_update_equals_the_single_device_update_and_compiles_once():
    # The expert-parallel side also runs each device's 24 tokens through the experts in chunks of 5 (the last
    # padded), each chunk's gathers and reduce-scatters in lockstep across the expert group.
    ep = _trainer(EP_LAYOUT, jax.devices(), EP_CONFIG.replace(moe_chunk_tokens=5))
    one = _trainer({"devices": 1}, jax.devices()[:1])
    gate = ep.params["layers"][0]["mlp"]["gate_kernel"].get_value()  # the run of the two MoE layers
    assert gate.sharding.spec == sharding.PartitionSpec(None, "expert", "fsdp", "tp")
    assert gate.addressable_shards[0].data.shape == (2, 2, 16, 8)  # [layers, 4/expert, 32/fsdp, 16/tp]
    assert ep.batch_sharding.spec == sharding.PartitionSpec(("fsdp", "expert"))
    with CompileCounter():
        for step in range(2):
            segments = _segments(step)
            m_ep, m_one = ep.update(ep.pack(segments)), one.update(one.pack(segments))
            assert m_ep["num_tokens"] == m_one["num_tokens"] > 0
            np.testing.assert_allclose(m_ep["loss"], m_one["loss"], rtol=1e-5)
            for key in ("moe/load_balance", "moe/z_loss", "moe/max_load", "moe/router_loss"):
                np.testing.assert_allclose(m_ep[key], m_one[key], rtol=1e-5, err_msg=key)
    assert ep.compile_count == 1
    got, want = jax.device_get((ep.params, one.params))
    init = jax.device_get(sharding.born_sharded(lambda: init_model(EP_CONFIG, 3), _single())[1])
    moved = 0.0
    for (path, g), (_, w), (_, i) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want), nnx.to_flat_state(init)):
        # Adam's steps move a parameter by ~lr (1e-2) each; sharded reductions differ in float32 rounding only,
        # which Adam's g / sqrt(v) amplifies on near-zero gradients: 1% of a step (a wrong, missing or doubled
        # expert's update is off by ~lr), as in test_sharded_update.
        np.testing.assert_allclose(g.get_value(), w.get_value(), atol=1e-4, rtol=0, err_msg=str(path))
        moved = max(moved, float(np.abs(g.get_value() - i.get_value()).max()))
    assert moved > 5e-3


def _single():
    return sharding.make_agent_meshes({"m": {"devices": 1}}, devices=jax.devices()[:1])["m"]


def test_router_loss_enters_the_gradient():
    """With router_aux_loss_coef > 0 the router's gradient changes (load balancing pushes on it), and so does that
    of everything upstream of a router; the last MoE layer's experts' does not."""
    from mgrpo_jax.train.agent import build_update_programs, make_optimizer

    grads = {}
    for coef in (0.0, 1.0):
        cfg = dataclasses.replace(EP_CONFIG, router_aux_loss_coef=coef, router_z_loss_coef=0.0)
        graphdef, params, shardings = sharding.born_sharded(lambda: init_model(cfg, 3), _single())
        trainer = AgentTrainer("m", graphdef, params, shardings, OptimizerConfig(),
                               LossConfig(micro_batch_size=4, chunk_size=16), row_len=24)
        micro = next(trainer.pack(_segments(7)).micro_batches())
        programs = build_update_programs(graphdef, make_optimizer(OptimizerConfig()), trainer.loss_config)
        acc = jax.jit(programs.accumulate)(params, jax.jit(programs.zero_acc)(params, micro), micro)
        grads[coef] = acc["grads"]["layers"][0]["mlp"]  # the run of MoE layers 0 and 1
    assert not np.allclose(grads[0.0]["router_kernel"].get_value(), grads[1.0]["router_kernel"].get_value())
    # The last MoE layer's experts feed no router, so their gradient does not depend on the coefficient (layer
    # 0's experts do: their output feeds layer 1's router).
    np.testing.assert_allclose(grads[0.0]["down_kernel"].get_value()[1], grads[1.0]["down_kernel"].get_value()[1],
                               rtol=1e-5, atol=1e-9)
    assert not np.allclose(grads[0.0]["down_kernel"].get_value()[0], grads[1.0]["down_kernel"].get_value()[0])


def test_expert_parallel_load_reads_each_devices_block(checkpoints):
    _, _, path, model, config, _ = checkpoints("all_sparse_tied")
    mesh = sharding.make_agent_meshes({"m": EP_LAYOUT})["m"]
    sharded, _ = load_model(path, mesh=mesh)
    gate = sharded.layers.mlp.gate_kernel.get_value()
    assert gate.sharding.spec == sharding.PartitionSpec(None, "expert", "fsdp", "tp")
    np.testing.assert_array_equal(np.asarray(gate), np.asarray(model.layers.mlp.gate_kernel.get_value()))


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="num_experts > 0"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                    head_dim=8, architecture="qwen3_moe")
    with pytest.raises(ValueError, match="experts need architecture='qwen3_moe'"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                    head_dim=8, num_experts=4)
    with pytest.raises(ValueError, match=r"mlp_only_layers \[5\]"):
        dataclasses.replace(EP_CONFIG, mlp_only_layers=(5,))
    with pytest.raises(ValueError, match="moe_matmul='dense'"):
        dataclasses.replace(EP_CONFIG, moe_matmul="dense")
