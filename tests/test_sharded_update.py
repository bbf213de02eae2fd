"""Per-agent optimizer state and jitted updates on their own meshes; multi-host initialization and a two-process
CPU run.

8 fake CPU devices: "main" on devices 0-3 (fsdp 2 x tp 2), "sub" on devices 4-7 (fsdp 4), each with its own
tiny model, AdamW state and donated update. References are computed on a single device by a plain
`jax.grad` + `tx.update` step written here, independently of `make_sharded_update`.
"""
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mgrpo_jax import sharding
from mgrpo_jax.compilation import CompileCounter
from mgrpo_jax.kernels import token_logprobs
from mgrpo_jax.models import ModelConfig, init_model, positions_from_mask
from processes import run_processes

_WORKER_PATH = Path(__file__).with_name("multiprocess_worker.py")
_spec = importlib.util.spec_from_file_location("multiprocess_worker", _WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

MAIN_CONFIG = worker.CONFIG
SUB_CONFIG = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8, qk_norm=True, architecture="qwen3")
LAYOUT = {"main": {"devices": 4, "fsdp": 2, "tp": 2}, "sub": {"devices": 4, "fsdp": 4, "tp": 1}}
# Sharded and single-device gradients differ by float32 reduction order: ~2e-7 of each tensor's largest entry
# here (GRAD_RTOL bounds Adam's first moment, 0.1 * grad). Adam's first step is ~lr * g / (|g| + eps), which
# amplifies that noise on near-zero entries (bounded by lr * noise / eps), so params get 1% of a step (lr = 1e-3):
# a wrong, missing or doubled update is off by ~lr.
GRAD_RTOL = 1e-6
PARAM_ATOL = 1e-5


def sub_loss_fn(model, batch):
    """Mean token cross-entropy over batch["loss_mask"] (the sub-agent's loss in these tests)."""
    mask = batch["attention_mask"]
    logits = model(batch["tokens"], positions_from_mask(mask), mask)
    logp = token_logprobs(logits, batch["targets"])
    n = jnp.sum(batch["loss_mask"])
    return -jnp.sum(logp * batch["loss_mask"]) / n, {"tokens": n}


AGENTS = {"main": (MAIN_CONFIG, 1, worker.loss_fn), "sub": (SUB_CONFIG, 2, sub_loss_fn)}


def _device_set(tree):
    out = set()
    for leaf in jax.tree.leaves(tree):
        out |= set(leaf.sharding.device_set)
    return out


def _adam_state(opt_state) -> optax.ScaleByAdamState:
    """AdamW's moments and count, wherever optax nests them in its chain state."""
    (adam,) = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
               if isinstance(x, optax.ScaleByAdamState)]
    return adam


def _build(role, mesh):
    """-> (graphdef, params, opt_state, update, data sharding) for one agent, all born on `mesh`."""
    config, seed, loss = AGENTS[role]
    tx = worker.make_tx()
    graphdef, params, param_shardings = sharding.born_sharded(lambda: init_model(config, seed), mesh)
    opt_state, opt_shardings = sharding.born_sharded_opt_state(tx, params, param_shardings)
    data = sharding.batch_sharding(mesh)
    update = sharding.make_sharded_update(graphdef, loss, tx, param_shardings, opt_shardings, data)
    return graphdef, params, opt_state, update, data


def _single_device_params(config, seed):
    """The initial params on the host, built on one device by the same (jitted) initializer."""
    mesh = sharding.make_agent_meshes({"ref": {"devices": 1}}, devices=jax.devices()[:1])["ref"]
    return jax.device_get(sharding.born_sharded(lambda: init_model(config, seed), mesh)[1])


def reference_update(graphdef, host_params, batch, loss, tx):
    """The same step on one device with no shardings: plain grad, tx.update, apply_updates.
    -> (params, opt_state) on the host."""
    device = jax.devices()[0]
    params = jax.device_put(host_params, device)
    batch = jax.device_put(batch, device)

    @jax.jit
    def step(params):
        grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p), batch)[0])(params)
        updates, opt_state = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates), opt_state

    return jax.device_get(step(params))


@pytest.fixture(scope="module")
def meshes():
    return sharding.make_agent_meshes(LAYOUT)


def test_params_and_optimizer_state_live_only_on_their_agents_devices(meshes):
    built = {role: _build(role, meshes[role]) for role in ("main", "sub")}
    for role, (_, params, opt_state, _, _) in built.items():
        own = set(meshes[role].devices.flat)
        assert not own & set(meshes["sub" if role == "main" else "main"].devices.flat)
        for leaf in jax.tree.leaves(params) + jax.tree.leaves(opt_state):
            assert set(leaf.sharding.device_set) == own, role
        adam = _adam_state(opt_state)
        assert adam.count.sharding.spec == P()  # the step count is replicated
        for moment in (adam.mu, adam.nu):  # moments mirror the parameters' shardings, leaf by leaf
            for m, p in zip(jax.tree.leaves(moment), jax.tree.leaves(params)):
                assert m.sharding == p.sharding and m.shape == p.shape
                np.testing.assert_array_equal(np.asarray(m), 0.0)
    _, params, opt_state, _, _ = built["main"]
    q = params["layers"]["attn"]["q_kernel"].get_value()
    mu_q = _adam_state(opt_state).mu["layers"]["attn"]["q_kernel"].get_value()
    assert q.sharding.spec == mu_q.sharding.spec == P(None, "fsdp", "tp", None)
    assert mu_q.addressable_shards[0].data.shape[1:] == (16, 2, 8)  # [layers, 32/fsdp, 4/tp, 8]


def test_both_agents_update_back_to_back_and_match_a_single_device_step(meshes):
    built = {role: _build(role, meshes[role]) for role in ("main", "sub")}
    # Initial values from a 1-device build (reading the agents' own params to the host here would pin their
    # buffers with zero-copy numpy views on CPU, and XLA then silently skips donating them).
    host_params = {role: _single_device_params(*AGENTS[role][:2]) for role in built}
    batches = {"main": worker.make_batch(10), "sub": worker.make_batch(11, SUB_CONFIG)}
    results = {}
    for role, (graphdef, params, opt_state, update, data) in built.items():  # dispatched without blocking
        results[role] = update(params, opt_state, sharding.put_batch(batches[role], data))
    for role, (new_params, new_opt_state, metrics) in results.items():
        graphdef, old_params = built[role][:2]
        own = set(meshes[role].devices.flat)
        assert _device_set(new_params) == own and _device_set(new_opt_state) == own, role
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old_params)), "params were not donated"
        assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0, role
        config, seed, loss = AGENTS[role]
        want, want_opt = reference_update(graphdef, host_params[role], batches[role], loss, worker.make_tx())
        got, got_opt = jax.device_get((new_params, new_opt_state))
        for g, w in zip(jax.tree.leaves(_adam_state(got_opt).mu), jax.tree.leaves(_adam_state(want_opt).mu)):
            np.testing.assert_allclose(g, w, atol=GRAD_RTOL * np.abs(w).max(), rtol=0, err_msg=f"{role} mu")
        moved = 0.0
        for (path, g), w, before in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want),
                                        jax.tree.leaves(host_params[role])):
            np.testing.assert_allclose(g, w, atol=PARAM_ATOL, rtol=0, err_msg=f"{role} {jax.tree_util.keystr(path)}")
            moved = max(moved, float(np.max(np.abs(g - before))))
        assert moved > 5e-4, f"{role}: the update did not move the parameters (max change {moved})"
        assert int(jax.device_get(_adam_state(new_opt_state).count)) == 1


def test_update_compiles_once_over_three_steps_with_new_batches(meshes):
    _, params, opt_state, update, data = _build("main", meshes["main"])
    losses = []
    with CompileCounter() as compiles:
        for step in range(3):
            params, opt_state, metrics = update(params, opt_state, sharding.put_batch(worker.make_batch(step), data))
            losses.append(float(metrics["loss"]))
    assert compiles.count == 1 and update._cache_size() == 1
    assert len(set(losses)) == 3  # new batch values (and new params) each step, same program
    assert int(jax.device_get(_adam_state(opt_state).count)) == 3


def test_factored_optimizer_state_is_replicated_where_it_does_not_mirror_a_parameter(meshes):
    mesh = meshes["main"]
    _, params, param_shardings = sharding.born_sharded(lambda: init_model(MAIN_CONFIG, 0), mesh)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adafactor(1e-3, min_dim_size_to_factor=8))
    opt_state, shardings = sharding.born_sharded_opt_state(tx, params, param_shardings)
    replicated = sharding.NamedSharding(mesh, P())
    param_shape_to_sharding = {(p.shape, s.spec) for p, s in zip(jax.tree.leaves(params),
                                                                 jax.tree.leaves(param_shardings))}
    specs = set()
    for leaf, s in zip(jax.tree.leaves(opt_state), jax.tree.leaves(shardings)):
        assert leaf.sharding == s and set(leaf.sharding.device_set) == set(mesh.devices.flat)
        assert s == replicated or (leaf.shape, s.spec) in param_shape_to_sharding
        specs.add(s.spec)
    # adafactor's factored rows/cols differ in shape from their parameters -> replicated; nothing else fails.
    assert P() in specs


def test_put_batch_rejects_a_batch_that_does_not_split_over_fsdp(meshes):
    data = sharding.batch_sharding(meshes["main"])
    assert data.spec == P("fsdp")
    with pytest.raises(ValueError, match=r"\['tokens'\] has batch size 3, not divisible by the 2 data-parallel"):
        sharding.put_batch({"tokens": np.zeros((3, 4), np.int32)}, data)


@pytest.mark.parametrize("settings, match", [
    ({"MGRPO_COORDINATOR": "127.0.0.1:1234"},
     r"environment is partial: MGRPO_COORDINATOR set but MGRPO_NUM_PROCESSES, MGRPO_PROCESS_ID missing"),
    ({"MGRPO_COORDINATOR": "127.0.0.1:1", "MGRPO_NUM_PROCESSES": "2", "MGRPO_PROCESS_ID": "2"},
     r"0 <= process_id < num_processes, got num_processes=2, process_id=2"),
    ({"MGRPO_COORDINATOR": "127.0.0.1:1", "MGRPO_NUM_PROCESSES": "two", "MGRPO_PROCESS_ID": "0"},
     r"must be integers"),
    ({"MGRPO_COORDINATOR": "somehost", "MGRPO_NUM_PROCESSES": "2", "MGRPO_PROCESS_ID": "0"}, r"'host:port'"),
    ({"MGRPO_DISTRIBUTED": "yes"}, r"MGRPO_DISTRIBUTED='yes': allowed values are 'auto' or unset"),
])
def test_initialize_distributed_rejects_bad_environments(settings, match):
    with pytest.raises(ValueError, match=match):
        sharding.initialize_distributed(env=settings)


def test_initialize_distributed_config_and_single_process():
    with pytest.raises(ValueError, match=r"config is partial: num_processes, process_id set but "
                                         r"coordinator_address missing"):
        sharding.initialize_distributed({"num_processes": 2, "process_id": 0})
    with pytest.raises(ValueError, match=r"unknown keys \['coordinator'\]"):
        sharding.initialize_distributed({"coordinator": "127.0.0.1:1"})
    # Nothing set: a single-process run, nothing initialized (jax itself would raise outside a cluster).
    assert sharding.initialize_distributed(env={}) is False
    assert sharding.initialize_distributed({}) is False
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


WORKER_TIMEOUT_S = 120


def test_two_processes_run_one_sharded_update_equal_to_a_single_device_step(tmp_path):
    for pid, (status, log) in enumerate(run_processes(_WORKER_PATH, [tmp_path], tmp_path,
                                                      timeout_s=WORKER_TIMEOUT_S)):
        assert status == 0, f"worker {pid} exited with {status} (killed after {WORKER_TIMEOUT_S} s if negative):\n{log}"

    results = [json.loads((tmp_path / f"result_{pid}.json").read_text()) for pid in range(2)]
    for r in results:
        assert (r["process_count"], r["global_devices"], r["local_devices"]) == (2, 4, 2)
        assert r["mesh_processes"] == [0, 1]
        assert "role 'main' would get devices of processes [0] only" in r["split_error"]
        assert "shared_with" in r["split_error"] and "separate job" in r["split_error"]
    assert results[0]["loss"] == results[1]["loss"]

    got = [dict(np.load(tmp_path / f"params_{pid}.npz")) for pid in range(2)]
    assert got[0].keys() == got[1].keys()
    for name in got[0]:
        np.testing.assert_array_equal(got[0][name], got[1][name], err_msg=name)  # the same global values

    # Single-device reference, same seed/batch/optimizer, computed in this process.
    graphdef = nnx.graphdef(init_model(worker.CONFIG))
    want = worker.flat_arrays(reference_update(graphdef, _single_device_params(worker.CONFIG, worker.SEED),
                                               worker.make_batch(0), worker.loss_fn, worker.make_tx())[0])
    assert want.keys() == got[0].keys()
    for name in want:
        np.testing.assert_allclose(got[0][name], want[name], atol=PARAM_ATOL, rtol=0, err_msg=name)
