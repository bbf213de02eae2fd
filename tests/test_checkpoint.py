"""Per-agent orbax checkpoints: sharded round trips onto each agent's own devices, keep-N and intervals, JSON
state, clear errors for another model's checkpoint, and a clean stop on SIGTERM that a restart resumes."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mgrpo_jax.checkpoint import AgentState, Checkpointer, ShutdownRequest, rng_from_json, rng_to_json
from mgrpo_jax.data.pipeline import make_qa_iterator


class Tiny(nnx.Module):
    def __init__(self, d_in, d_out, seed):
        self.layer = nnx.Linear(d_in, d_out, rngs=nnx.Rngs(seed))


def meshes():
    """main on devices 0-3 as fsdp 2 x tp 2, sub on devices 4-7 as fsdp 4."""
    devices = np.array(jax.devices())
    return Mesh(devices[:4].reshape(2, 2), ("fsdp", "tp")), Mesh(devices[4:].reshape(4, 1), ("fsdp", "tp"))


def sharded_agent(mesh, seed, d_out=16, trained=True):
    """An nnx.State + adamw state placed on `mesh` (kernel sharded over both axes); one update when `trained`,
    so that the moments are not all zeros."""
    _, state = nnx.split(Tiny(8, d_out, seed))
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, P("fsdp", "tp") if x.ndim == 2 else P("tp")), state)
    params = jax.device_put(state, shardings)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    if trained:
        grads = jax.tree.map(lambda x: jnp.sin(x * 3.0 + seed), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_bitwise_on(restored, original):
    for r, o in zip(jax.tree.leaves(restored), jax.tree.leaves(original), strict=True):
        assert r.sharding.is_equivalent_to(o.sharding, r.ndim) and r.dtype == o.dtype
        assert np.array_equal(np.asarray(r).reshape(-1).view(np.uint8), np.asarray(o).reshape(-1).view(np.uint8))


def test_two_agents_round_trip_bitwise_on_their_own_devices(tmp_path):
    main_mesh, sub_mesh = meshes()
    main = AgentState(*sharded_agent(main_mesh, 1), version=5, extra={"skipped_steps": 1})
    sub = AgentState(*sharded_agent(sub_mesh, 2), version=3)
    with Checkpointer(tmp_path, ["main", "sub"]) as ckpt:
        assert ckpt.save(10, {"main": main, "sub": sub}, extra={"step_count": 10})
    # A restart: fresh (differently initialized) live states on the same meshes are the restore targets.
    with Checkpointer(tmp_path, ["main", "sub"]) as ckpt:
        assert ckpt.latest_step() == 10
        targets = {"main": AgentState(*sharded_agent(main_mesh, 7, trained=False)),
                   "sub": AgentState(*sharded_agent(sub_mesh, 8, trained=False))}
        restored = ckpt.restore(targets)
    assert restored.step == 10 and restored.extra == {"step_count": 10}
    assert_bitwise_on(restored.agents["main"].params, main.params)
    assert_bitwise_on(restored.agents["main"].opt_state, main.opt_state)
    assert_bitwise_on(restored.agents["sub"].params, sub.params)
    assert_bitwise_on(restored.agents["sub"].opt_state, sub.opt_state)
    assert isinstance(restored.agents["main"].params, nnx.State)
    assert {d.id for x in jax.tree.leaves(restored.agents["sub"].params) for d in x.sharding.device_set} == \
        {d.id for d in sub_mesh.devices.flat}
    assert (restored.agents["main"].version, restored.agents["sub"].version) == (5, 3)
    assert restored.agents["main"].extra == {"skipped_steps": 1}


def test_restore_one_agent_from_abstract_target(tmp_path):
    main_mesh, sub_mesh = meshes()
    sub = AgentState(*sharded_agent(sub_mesh, 2), version=4)
    with Checkpointer(tmp_path, ["main", "sub"]) as ckpt:
        ckpt.save(3, {"main": AgentState(*sharded_agent(main_mesh, 1)), "sub": sub})
        ckpt.wait_until_finished()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                (sub.params, sub.opt_state))
        got = ckpt.restore_agent("sub", AgentState(*abstract))
    assert_bitwise_on(got.params, sub.params)
    assert_bitwise_on(got.opt_state, sub.opt_state)
    assert got.version == 4


def test_async_save_survives_donation(tmp_path):
    """save() returns once arrays are on the host, so the next donating train step cannot corrupt it."""
    main_mesh, _ = meshes()
    params, opt_state = sharded_agent(main_mesh, 1)
    expected = host(params)
    with Checkpointer(tmp_path, ["main"]) as ckpt:
        ckpt.save(1, {"main": AgentState(params, opt_state)})
        step = jax.jit(lambda p: jax.tree.map(lambda x: x * 0 - 1, p), donate_argnums=0)
        params = step(params)  # reuses the saved arrays' buffers where the backend allows
        ckpt.wait_until_finished()
        got = ckpt.restore_agent("main", AgentState(params, opt_state))
    for r, e in zip(host(got.params), expected, strict=True):
        assert np.array_equal(r, e)


def test_interval_and_keep_n(tmp_path):
    _, sub_mesh = meshes()
    state = AgentState(*sharded_agent(sub_mesh, 0))
    with Checkpointer(tmp_path, ["main"], save_interval_steps=2, max_to_keep=2) as ckpt:
        started = [ckpt.save(s, {"main": state}) for s in range(7)]
        ckpt.wait_until_finished()
        assert started == [True, False, True, False, True, False, True]
        assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
        assert ckpt.save(7, {"main": state}, force=True)  # a shutdown save off the interval
        assert not ckpt.save(7, {"main": state}, force=True)  # already on disk: no error, nothing written
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [6, 7]


def test_data_iterator_and_json_state_round_trip(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}"}) + "\n" for i in range(9)))
    kwargs = dict(batch_size=2, seed=5, process_index=0, process_count=1)
    it = make_qa_iterator(str(path), **kwargs)
    for _ in range(3):
        next(it)
    key = jax.random.fold_in(jax.random.key(3), 11)
    _, sub_mesh = meshes()
    with Checkpointer(tmp_path, ["main"]) as ckpt:
        ckpt.save(3, {"main": AgentState(*sharded_agent(sub_mesh, 0))}, data_state=it.get_state(),
                  extra={"step_count": 3, "rng": rng_to_json(key), "d_max": {"seen": [1, 2], "frozen": None}})
        ckpt.wait_until_finished()
        restored = ckpt.restore({})
    resumed = make_qa_iterator(str(path), **kwargs)
    resumed.set_state(restored.data_state)
    assert [r["id"] for r in next(resumed)] == [r["id"] for r in next(it)]
    assert restored.extra["step_count"] == 3 and restored.extra["d_max"] == {"seen": [1, 2], "frozen": None}
    assert jnp.array_equal(jax.random.key_data(rng_from_json(restored.extra["rng"])), jax.random.key_data(key))


def test_other_model_and_missing_items_are_clear_errors(tmp_path):
    _, sub_mesh = meshes()
    with Checkpointer(tmp_path, ["main", "sub"]) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            ckpt.restore({})
        ckpt.save(2, {"main": AgentState(*sharded_agent(sub_mesh, 0, d_out=16))})
        ckpt.wait_until_finished()
        wider = AgentState(*sharded_agent(sub_mesh, 0, d_out=32, trained=False))
        with pytest.raises(ValueError, match=r"item 'main.params': layer\.bias\.value has shape \(16,\) in "
                                             r"the checkpoint but \(32,\) in the model"):
            ckpt.restore_agent("main", wider)
        with pytest.raises(FileNotFoundError, match=r"no item\(s\) \['sub.meta', 'sub.opt_state', 'sub.params'\]"):
            ckpt.restore_agent("sub", wider)
        # A step that holds only the main agent (the sub-agent still warming up) restores what it has.
        narrow = AgentState(*sharded_agent(sub_mesh, 0, trained=False))
        assert set(ckpt.restore({"main": narrow, "sub": narrow}).agents) == {"main"}
        assert ckpt.saved_agents() == ["main"]
        with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 9 .* saved steps: \[2\]"):
            ckpt.restore({}, step=9)
        with pytest.raises(ValueError, match="without a sharding"):
            ckpt.restore_agent("main", AgentState(jax.tree.map(np.asarray, narrow.params), narrow.opt_state))


def test_shutdown_request_sets_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with ShutdownRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


WORKER = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from mgrpo_jax.checkpoint import AgentState, Checkpointer, ShutdownRequest

    workdir, max_steps = sys.argv[1], int(sys.argv[2])
    params, opt_state = {"w": jnp.zeros((4,), jnp.float32)}, {"count": jnp.zeros((), jnp.int32)}
    with Checkpointer(workdir, ["main"], save_interval_steps=1000) as ckpt, ShutdownRequest() as stop:
        start = 0
        if ckpt.latest_step() is not None:
            restored = ckpt.restore({"main": AgentState(params, opt_state)})
            start, params = restored.step, restored.agents["main"].params
            print(f"resumed {start} {float(params['w'][0])}", flush=True)
        for step in range(start, start + max_steps):
            params = {"w": params["w"] + 1.0}  # the "training step"
            print(f"step {step + 1}", flush=True)
            time.sleep(0.02)
            ckpt.save(step + 1, {"main": AgentState(params, opt_state)}, force=stop.requested)
            if stop.requested:
                print(f"saved {step + 1}", flush=True)
                break
""")


def test_sigterm_saves_exits_zero_and_restart_resumes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), "100000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.strip() == "step 3":
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    saved = int(out.split("saved ")[1].split()[0])
    assert saved >= 3

    again = subprocess.run([sys.executable, str(script), str(tmp_path), "1"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    first = again.stdout.splitlines()[0].split()
    assert first[0] == "resumed" and int(first[1]) == saved and float(first[2]) == saved  # w was incremented N times
    assert again.stdout.splitlines()[1] == f"step {saved + 1}"
