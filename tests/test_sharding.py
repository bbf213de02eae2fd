"""Per-agent meshes over disjoint slices of the 8 fake CPU devices, and logical-axis sharding of parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mgrpo_jax import sharding
from mgrpo_jax.models import ModelConfig, init_model, load_model, positions_from_mask
from mgrpo_jax.models import hf as hf_io

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8)
MASK = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]], np.int32)
TOKENS = np.array([[0, 0, 5, 9, 11], [3, 4, 5, 6, 0]], np.int32)


def _devices_of(state):
    out = set()
    for leaf in jax.tree.leaves(state):
        out |= set(leaf.sharding.device_set)
    return out


def _forward(graphdef, state, tokens=TOKENS, mask=MASK):
    fn = jax.jit(lambda s, t, p, m: nnx.merge(graphdef, s)(t, p, m))
    return np.asarray(fn(state, jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask)))


def test_logical_to_pspec_rules():
    rules = sharding.DEFAULT_RULES
    # Without a mesh the rule is returned whole: the weights' embed dimension over fsdp and expert.
    assert sharding.logical_to_pspec(("embed", "q_heads", "head_dim"), rules) == P(("fsdp", "expert"), "tp", None)
    assert sharding.logical_to_pspec(("norm",), rules) == P(None)
    assert sharding.logical_to_pspec(("unknown_axis", "mlp"), rules) == P(None, "tp")
    # A mesh axis is used once per array: the second dimension asking for "tp" is replicated.
    assert sharding.logical_to_pspec(("vocab", "mlp"), rules) == P("tp", None)
    mesh = sharding.make_agent_meshes({"m": {"devices": 8, "fsdp": 4, "tp": 2}})["m"]
    # A mesh without an expert axis (no expert parallelism) keeps fsdp alone.
    assert sharding.logical_to_pspec(("embed", "q_heads", "head_dim"), rules, mesh, (8, 4, 2)) == P("fsdp", "tp", None)
    # With one, experts go over "expert" and each expert's embed dimension over fsdp only (an axis is used once).
    ep = sharding.make_agent_meshes({"m": {"devices": 8, "fsdp": 2, "expert": 2, "tp": 2}})["m"]
    assert sharding.logical_to_pspec(("experts", "embed", "moe_mlp"), rules, ep, (4, 8, 4)) == P("expert", "fsdp", "tp")
    assert sharding.logical_to_pspec(("embed", "q_heads"), rules, ep, (8, 4)) == P(("fsdp", "expert"), "tp")
    # 6 is not divisible by fsdp=4: replicated instead of failing to place.
    assert sharding.logical_to_pspec(("embed", "mlp"), rules, mesh, (6, 4)) == P(None, "tp")
    assert sharding.logical_to_pspec(("embed", "mlp"), (("embed", ("fsdp", "tp")),), mesh, (8, 4)) == \
        P(("fsdp", "tp"), None)


def test_agents_get_disjoint_meshes_and_params_live_only_there():
    meshes = sharding.make_agent_meshes({"main": {"devices": 4, "fsdp": 2, "tp": 2},
                                         "sub": {"devices": 4, "fsdp": -1, "tp": 1}})
    main_devices, sub_devices = set(meshes["main"].devices.flat), set(meshes["sub"].devices.flat)
    assert main_devices == set(jax.devices()[:4]) and sub_devices == set(jax.devices()[4:])
    assert dict(meshes["main"].shape) == {"fsdp": 2, "tp": 2} and dict(meshes["sub"].shape) == {"fsdp": 4, "tp": 1}

    main = sharding.born_sharded(lambda: init_model(CONFIG, seed=1), meshes["main"])
    sub = sharding.born_sharded(lambda: init_model(CONFIG.replace(num_layers=1), seed=2), meshes["sub"])
    assert _devices_of(main[1]) == main_devices
    assert _devices_of(sub[1]) == sub_devices
    q = main[1]["layers"]["attn"]["q_kernel"].get_value()
    assert q.sharding.spec == P(None, "fsdp", "tp", None)  # the stacked layer axis is never sharded
    assert q.addressable_shards[0].data.shape == (2, 16, 2, 8)  # [layers, 32/fsdp, 4/tp, 8]
    assert sub[1]["embed"].get_value().sharding.spec == P("tp", "fsdp")  # tp has size 1 on sub: replicated

    # Born sharded == initialized on one device, and the sharded forward gives the same logits.
    graphdef, plain = nnx.split(init_model(CONFIG, seed=1))
    for a, b in zip(jax.tree.leaves(main[1]), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)  # same keys; jit may fuse the scale
    np.testing.assert_allclose(_forward(main[0], main[1]), _forward(graphdef, plain), atol=1e-5)


def test_time_shared_mesh():
    meshes = sharding.make_agent_meshes({"main": {"devices": 8, "tp": 2}, "sub": {"shared_with": "main"}})
    assert meshes["sub"] is meshes["main"] and dict(meshes["main"].shape) == {"fsdp": 4, "tp": 2}


@pytest.mark.parametrize("layout, match", [
    ({"main": {"devices": 4}, "sub": {"devices": 6}}, r"needs 10 devices \(main: 4, sub: 6\) but 8 are available"),
    ({"main": {"devices": 4, "fsdp": 3, "tp": 2}}, r"fsdp \(3\) x expert \(1\) x tp \(2\) must equal devices \(4\)"),
    ({"main": {"devices": 8, "fsdp": -1, "expert": 3}}, r"fsdp \(-1\) x expert \(3\) x tp \(1\) must equal devices"),
    ({"main": {"devices": 4}, "sub": {"shared_with": "critic"}}, r"shared_with'\]='critic' must name a role"),
    ({"main": {"devices": 4, "gpus": 2}}, r"unknown keys \['gpus'\]"),
    ({"main": {"tp": 2}}, r"needs 'devices' > 0"),
])
def test_layout_errors(layout, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_agent_meshes(layout)


class _RecordingTensor:
    """A checkpoint tensor that records how many elements each read takes."""

    def __init__(self, name, array, reads):
        self.name, self.array, self.reads = name, array, reads

    def __getitem__(self, index):
        block = self.array[index]
        self.reads.append((self.name, block.size, self.array.size))
        return block


def test_hf_checkpoint_loads_into_a_mesh(tmp_path, monkeypatch):
    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)
    transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(str(tmp_path))
    mesh = sharding.make_agent_meshes({"sub": {"devices": 4, "fsdp": 2, "tp": 2}},
                                      devices=jax.devices()[4:])["sub"]
    reads = []
    array = hf_io._SafetensorsFile.array
    monkeypatch.setattr(hf_io._SafetensorsFile, "array",
                        lambda self, name: _RecordingTensor(name, array(self, name), reads))
    sharded, config = load_model(str(tmp_path), mesh=mesh)
    monkeypatch.undo()
    # Each device's block is read straight from the file: every kernel here is sharded over fsdp 2 x tp 2, and
    # no read takes more than one device's quarter of it.
    for name, size, total in reads:
        if name.endswith("proj.weight") or name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            assert size <= total // 4, (name, size, total)
    assert {name for name, _, _ in reads} == {s.hf_name for s in hf_io.tensor_specs(config)}
    plain, _ = load_model(str(tmp_path))
    state = nnx.state(sharded, nnx.Param)
    assert _devices_of(state) == set(jax.devices()[4:])
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        want = sharding.logical_to_pspec(var.get_metadata()["out_sharding"], sharding.DEFAULT_RULES, mesh,
                                         value.shape)
        assert value.sharding.spec == want, path
    assert state["layers"]["mlp"]["up_kernel"].get_value().sharding.spec == P(None, "fsdp", "tp")
    g1, s1 = nnx.split(sharded)
    g2, s2 = nnx.split(plain)
    np.testing.assert_allclose(_forward(g1, s1), _forward(g2, s2), atol=1e-5)


def test_constrain_follows_the_traced_mesh_and_is_a_no_op_without_one():
    x = jnp.arange(8 * 6 * 4, dtype=jnp.float32).reshape(8, 6, 4)
    assert sharding.constrain(x, ("batch", "length", "mlp")) is x  # no mesh: untouched
    mesh = sharding.make_agent_meshes({"m": {"devices": 8, "fsdp": 4, "tp": 2}})["m"]
    replicated = NamedSharding(mesh, P())

    def f(y):
        return sharding.constrain(y * 2, ("batch", "length", "mlp"))

    assert jax.jit(f)(x).sharding.is_fully_replicated or len(jax.jit(f)(x).sharding.device_set) == 1
    on_mesh = jax.jit(sharding.with_mesh(f, mesh))
    y = on_mesh(jax.device_put(x, replicated))
    assert y.sharding.spec == P("fsdp", None, "tp")  # batch over the data axis, the mlp dimension over tp
    np.testing.assert_array_equal(np.asarray(y), 2 * np.asarray(x))
    odd = on_mesh(jax.device_put(x[:6], replicated))  # 6 rows do not divide over fsdp=4: left replicated
    assert odd.sharding.spec == P(None, None, "tp")


@pytest.mark.parametrize("tp", [1, 2])
def test_activations_stay_batch_sharded(tp):
    """Under the mesh, the model's activations are sharded over the batch (data-parallel "fsdp"), as its
    constraints say. Left to XLA's propagation from the FSDP weights, the hidden states came out sharded over
    the hidden dimension instead (every device holding every row), to be resharded at every use."""
    config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, qk_norm=True, architecture="qwen3", tie_word_embeddings=True)
    mesh = sharding.make_agent_meshes({"m": {"devices": 8, "tp": tp}})["m"]
    graphdef, params, shardings = sharding.born_sharded(lambda: init_model(config), mesh)
    data = sharding.batch_sharding(mesh)

    def hidden(p, tokens):
        return nnx.merge(graphdef, p)(tokens, positions_from_mask(tokens > 0), (tokens > 0).astype(jnp.int32),
                                      return_hidden=True)

    tokens = sharding.put_batch(np.arange(1, 8 * 16 + 1, dtype=np.int32).reshape(8, 16) % 512, data)
    out = jax.jit(sharding.with_mesh(hidden, mesh), in_shardings=(shardings, data))(params, tokens)
    assert out.sharding.spec[0] == "fsdp" and all(a is None for a in out.sharding.spec[1:]), out.sharding.spec
    np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(hidden)(params, tokens)), atol=1e-5)
