"""LoRA per agent (`mgrpo_jax.models.lora`): adapters on dense and expert projections, trained alone.

Oracles: the model with the adapters folded into its kernels (W + alpha/r A B, computed here in NumPy);
transformers' PyTorch model loading the merged export; PEFT loading the PEFT export onto the base checkpoint;
a plain `jax.grad` + optax AdamW step on the adapters alone for the trainer's update.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import nnx

from mgrpo_jax import checkpoint as ckpt_lib
from mgrpo_jax import sharding
from mgrpo_jax.models import ModelConfig, init_model, load_model, positions_from_mask, save_hf
from mgrpo_jax.models import lora
from mgrpo_jax.train.agent import AgentTrainer, LossConfig, OptimizerConfig, batch_loss
from model_oracles import random_segments, torch_logits

V = 64
DENSE = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, architecture="qwen3", qk_norm=True, lora=lora.LoraConfig(rank=4, alpha=8.0))
MOE = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=8, architecture="qwen3_moe", qk_norm=True, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=16, mlp_only_layers=(1,), lora=lora.LoraConfig(rank=4, alpha=8.0))
MASK = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0], [1] * 8], np.int32)
TOKENS = np.random.RandomState(0).randint(1, V, size=MASK.shape).astype(np.int32)
POSITIONS = np.asarray(positions_from_mask(jnp.asarray(MASK)))


def _logits(model, dropout_rng=None):
    return np.asarray(model(jnp.asarray(TOKENS), jnp.asarray(POSITIONS), jnp.asarray(MASK), dropout_rng=dropout_rng))


def _randomize_adapters(model, seed=1):
    """B starts at zero (a fresh adapter is a no-op); give every adapter a non-zero B."""
    rng = np.random.default_rng(seed)
    adapters = nnx.state(model, nnx.LoRAParam)
    for path, var in nnx.to_flat_state(adapters):
        if path[-1] == "b":
            var.set_value(jnp.asarray(rng.normal(0, 0.3, var.get_value().shape), jnp.float32))
    nnx.update(model, adapters)
    return model


def _numpy_merged(config, model):
    """The base model with every kernel replaced by W + scale * A @ B, computed in NumPy per layer (and expert)."""
    base = init_model(config.replace(lora=None))
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    merged = []
    for path, var in nnx.to_flat_state(nnx.state(base)):
        name = str(path[-1])
        adapter = path[:-1] + (name.replace("_kernel", "_lora"),)
        w = np.asarray(flat[path].get_value())
        if name.endswith("_kernel") and adapter + ("a",) in flat:
            a = np.asarray(flat[adapter + ("a",)].get_value())
            b = np.asarray(flat[adapter + ("b",)].get_value())
            delta = np.stack([np.stack([np.tensordot(a[l, e], b[l, e], axes=1) for e in range(a.shape[1])])
                              if w.ndim == 4 and a.ndim == 4 and name in ("gate_kernel", "up_kernel", "down_kernel")
                              else np.tensordot(a[l], b[l], axes=1) for l in range(a.shape[0])])
            w = w + config.lora.scale * delta
        merged.append((path, var.replace(jnp.asarray(w))))
    graphdef = nnx.graphdef(base)
    return nnx.merge(graphdef, nnx.from_flat_state(merged))


@pytest.mark.parametrize("config", [DENSE, MOE], ids=["dense", "moe"])
def test_adapters_equal_their_merged_kernels_and_start_as_a_no_op(config):
    model = init_model(config, seed=0)
    base = init_model(config.replace(lora=None), seed=0)
    # A seed gives the same base weights with or without adapters, and fresh adapters change nothing.
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(base)), nnx.to_flat_state(lora.split(nnx.state(model))[1])):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))
    # (B = 0 makes every adapter's output exactly 0; the programs with and without the adapter terms may still
    # order a float32 reduction differently, ~1e-7.)
    np.testing.assert_allclose(_logits(model), _logits(base), atol=1e-6, rtol=0)
    adapters = {p for p, _ in nnx.to_flat_state(lora.split(nnx.state(model))[0])}
    if config is MOE:
        assert ("layers", 0, "mlp", "gate_lora", "a") in adapters  # per-expert adapters of the sparse run
        assert ("layers", 1, "mlp", "gate_lora", "a") in adapters  # the dense layer's MLP adapter
    _randomize_adapters(model)
    want = _logits(_numpy_merged(config, model))
    np.testing.assert_allclose(_logits(model), want, atol=2e-5)
    assert np.abs(want - _logits(base)).max() > 1e-2  # the adapters matter
    # lora.merge (what the merged export writes) is the same model.
    merged_state, merged_config = lora.merge(nnx.state(model), config)
    assert merged_config.lora is None and not lora.has_adapters(merged_state)
    merged = nnx.merge(nnx.graphdef(init_model(merged_config)), merged_state)
    np.testing.assert_allclose(_logits(merged), want, atol=2e-5)


def test_dropout_only_with_a_key():
    config = DENSE.replace(lora=dataclasses.replace(DENSE.lora, dropout=0.5))
    model = _randomize_adapters(init_model(config))
    plain = _logits(model)
    np.testing.assert_allclose(plain, _logits(_numpy_merged(config, model)), atol=2e-5)
    a, b = _logits(model, jax.random.key(0)), _logits(model, jax.random.key(1))
    assert np.abs(a - plain).max() > 1e-3 and np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(a, _logits(model, jax.random.key(0)))


# ------------------------------------------------------------------------------------------- training


def _segments(seed, count=8):
    return random_segments(seed, count, V)


def _trainer(config, layout, devices, **kw):
    mesh = sharding.make_agent_meshes({"main": layout}, devices=devices)["main"]
    graphdef, params, shardings = sharding.born_sharded(lambda: init_model(config, 2), mesh)
    opt = OptimizerConfig(learning_rate=1e-2, weight_decay=0.1)
    return AgentTrainer("main", graphdef, params, shardings, opt, LossConfig(micro_batch_size=4, chunk_size=16),
                        row_len=24, **kw)


@pytest.mark.parametrize("config, layout", [
    (DENSE, {"devices": 2, "fsdp": 2}),
    (MOE, {"devices": 8, "fsdp": 2, "expert": 2, "tp": 2}),
], ids=["dense_fsdp2", "moe_expert_parallel"])
def test_update_trains_the_adapters_alone_as_a_plain_adamw_step_on_them(config, layout):
    trainer = _trainer(config, layout, jax.devices()[:layout["devices"]])
    host = jax.device_get(sharding.born_sharded(lambda: init_model(config, 2), _one_device())[1])
    adapters0, base0 = lora.split(host)
    # The optimizer state mirrors the adapters only.
    mu = [x for x in jax.tree.leaves(trainer.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(x, optax.ScaleByAdamState)][0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(adapters0)
    batch = trainer.pack(_segments(0))
    # Oracle: plain jax.grad of the summed micro-batch totals w.r.t. the adapters / the whole denominator, one
    # optax AdamW step on the adapters (the trainer's own optimizer definition), on one device.
    graphdef = trainer.graphdef

    def mean_loss(adapters):
        out = [batch_loss(nnx.merge(graphdef, nnx.merge_state(adapters, base0)), m, trainer.loss_config)
               for m in batch.micro_batches()]
        # The denominator is a token count: a constant of the adapters.
        den = jax.lax.stop_gradient(sum(d for _, d, _ in out))
        return sum(t for t, _, _ in out) / (den + batch.denominator_offset)

    # Jitted: op by op, the reference's ~1000 dispatches through the scanned (and expert) layers took minutes.
    grads = jax.jit(jax.grad(mean_loss))(adapters0)
    updates, _ = trainer.tx.update(grads, trainer.tx.init(adapters0), adapters0)
    want = optax.apply_updates(adapters0, updates)
    trainer.update(batch)
    got_adapters, got_base = lora.split(jax.device_get(trainer.params))
    for (path, g), (_, w) in zip(nnx.to_flat_state(got_base), nnx.to_flat_state(base0)):
        np.testing.assert_array_equal(g.get_value(), w.get_value(), err_msg=f"base {path} moved")
    moved = 0.0
    for (path, g), (_, w), (_, a0) in zip(nnx.to_flat_state(got_adapters), nnx.to_flat_state(want),
                                          nnx.to_flat_state(adapters0)):
        np.testing.assert_allclose(g.get_value(), w.get_value(), atol=2e-5, rtol=0, err_msg=str(path))
        moved = max(moved, float(np.abs(g.get_value() - a0.get_value()).max()))
    assert moved > 5e-3
    assert trainer.compile_count == 1


def _one_device():
    return sharding.make_agent_meshes({"m": {"devices": 1}}, devices=jax.devices()[:1])["m"]


def test_lora_dropout_update_uses_fresh_masks_and_compiles_once():
    config = DENSE.replace(lora=dataclasses.replace(DENSE.lora, dropout=0.3))
    with_dropout = _trainer(config, {"devices": 1}, jax.devices()[:1], dropout_seed=0)
    without = _trainer(config, {"devices": 1}, jax.devices()[:1])
    for step in range(2):
        batch = with_dropout.pack(_segments(step))
        a, b = with_dropout.update(batch), without.update(batch)
    assert a["loss"] != b["loss"]
    assert with_dropout.compile_count == 1


def test_checkpoint_holds_the_adapters_and_restores_them_onto_the_base(tmp_path):
    trainer = _trainer(DENSE, {"devices": 1}, jax.devices()[:1])
    trainer.update(trainer.pack(_segments(3)))
    saved = jax.device_get(trainer.params)
    with ckpt_lib.Checkpointer(tmp_path, ["main"]) as ckpt:
        ckpt.save(1, {"main": trainer}, force=True)
    fresh = _trainer(DENSE, {"devices": 1}, jax.devices()[:1])
    with ckpt_lib.Checkpointer(tmp_path, ["main"]) as ckpt:
        restored = ckpt.restore({"main": fresh})
    assert {p for p, _ in nnx.to_flat_state(restored.agents["main"].params)} == \
        {p for p, _ in nnx.to_flat_state(lora.split(saved)[0])}  # adapters only on disk
    ckpt_lib.load_agent_state(fresh, restored.agents["main"])
    for (path, g), (_, w) in zip(nnx.to_flat_state(jax.device_get(fresh.params)), nnx.to_flat_state(saved)):
        np.testing.assert_array_equal(g.get_value(), w.get_value(), err_msg=str(path))
    assert fresh.version == 1


# -------------------------------------------------------------------------------------------- exports


def _torch_logits(model):
    return torch_logits(model, TOKENS, MASK, POSITIONS)


@pytest.mark.parametrize("config", [DENSE, MOE], ids=["dense", "moe"])
def test_merged_export_equals_base_plus_adapters_in_transformers(config, tmp_path):
    model = _randomize_adapters(init_model(config, seed=0))
    state, base_config = lora.merge(nnx.state(model), config)
    with pytest.raises(ValueError, match="LoRA adapters: fold them in first"):
        save_hf(model, config, str(tmp_path / "refused"))
    save_hf(state, base_config, str(tmp_path))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    real = MASK.astype(bool)
    assert np.abs(_torch_logits(torch_model)[real] - _logits(model)[real]).max() < 1e-4


def test_peft_export_loads_onto_the_base_model_with_peft(tmp_path):
    model = _randomize_adapters(init_model(DENSE, seed=0))
    adapters, base = lora.split(nnx.state(model))
    save_hf(base, DENSE.replace(lora=None), str(tmp_path / "base"))
    lora.save_peft(nnx.state(model), DENSE, str(tmp_path / "adapter"), base_model=str(tmp_path / "base"))
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(torch_base, str(tmp_path / "adapter")).eval()
    real = MASK.astype(bool)
    assert np.abs(_torch_logits(with_adapter)[real] - _logits(model)[real]).max() < 1e-4
    with pytest.raises(ValueError, match="PEFT export of expert adapters is not supported"):
        lora.save_peft(nnx.state(init_model(MOE)), MOE, str(tmp_path / "moe"))


def test_loading_a_checkpoint_with_lora_initializes_the_adapters_born_sharded(tmp_path):
    base = init_model(DENSE.replace(lora=None), seed=4)
    save_hf(base, DENSE.replace(lora=None), str(tmp_path))
    mesh = sharding.make_agent_meshes({"m": {"devices": 2, "fsdp": 2}}, devices=jax.devices()[:2])["m"]
    model, config = load_model(str(tmp_path), mesh=mesh, lora=DENSE.lora)
    assert config.lora == DENSE.lora
    adapters, loaded_base = lora.split(nnx.state(model))
    for (_, a), (_, b) in zip(nnx.to_flat_state(loaded_base), nnx.to_flat_state(nnx.state(base))):
        np.testing.assert_array_equal(a.get_value(), b.get_value())
    want = lora.split(nnx.state(init_model(DENSE, seed=0)))[0]  # load_params' default lora_seed
    for (path, a), (_, b) in zip(nnx.to_flat_state(adapters), nnx.to_flat_state(want)):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))
        assert set(a.get_value().sharding.device_set) == set(mesh.devices.flat)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"lora.targets .*unknown or empty \['qkv'\]"):
        lora.LoraConfig(rank=4, targets=("qkv",))
    with pytest.raises(ValueError, match="lora.rank must be a positive integer"):
        lora.LoraConfig(rank=-1)
    with pytest.raises(ValueError, match=r"lora: unknown key\(s\) \['r'\]"):
        lora.from_config({"rank": 4, "r": 4})
    assert lora.from_config({"rank": 0, "alpha": 16}) is None


def test_rank16_optimizer_state_is_under_5_percent_of_a_full_fine_tune_on_qwen3_0p6b_shapes():
    """Shapes only (nothing materialized), per device on 8 fsdp devices, as bench/scale.py's lora section: the
    AdamW state of rank-16 adapters on every projection of a Qwen3-0.6B-shaped model against a full fine-tune's."""
    import json
    import os

    from mgrpo_jax.models import abstract_model
    from mgrpo_jax.train.agent import make_optimizer, trainable_filter, trainable_part

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "models", "qwen3_0p6b.json")
    with open(path, encoding="utf-8") as fh:
        values = json.load(fh)
    base = ModelConfig.from_hf(transformers.AutoConfig.for_model(values.pop("model_type"), **values))
    mesh = sharding.make_agent_meshes({"m": {"devices": 8}}, devices=jax.devices()[:8])["m"]
    tx = make_optimizer(OptimizerConfig())

    def opt_bytes(config):
        state = nnx.state(abstract_model(config))
        shardings = sharding.state_shardings(state, mesh)
        trainable = trainable_filter(state)
        params, _ = trainable_part(state, trainable)
        param_shardings, _ = trainable_part(shardings, trainable)
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                              param_shardings)
        shapes = jax.eval_shape(tx.init, params)
        opt_shardings = sharding.opt_state_shardings(shapes, params, param_shardings)
        return sum(int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
                   for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(opt_shardings)))

    full, adapted = opt_bytes(base), opt_bytes(base.replace(lora=lora.LoraConfig(rank=16, alpha=32.0)))
    assert full > 0.5e9  # ~0.6 B params x 2 moments x 4 bytes / 8 devices
    assert adapted / full < 0.05, adapted / full
