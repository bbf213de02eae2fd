"""Per-agent checkpoints with orbax, and a clean stop on SIGTERM/SIGINT.

One orbax `CheckpointManager` under `<workdir>/checkpoints/` holds, per step, named items:

    <agent>.params     the agent's parameters (StandardSave: sharded arrays, each process writes its shards)
    <agent>.opt_state  its optimizer state
    <agent>.meta       JSON: {"version": policy version, "extra": {...}} (skipped_steps, skipped_empty)
    data               JSON: the data iterator's state (`mgrpo_jax.data.pipeline.QAIterator.get_state`)
    run                JSON: {"agents": [the agents saved at this step], "extra": {...}} (e.g.
                       MGRPOTrainer.step_count, the D_max estimator's state_dict, RNG keys via `rng_to_json`)

Why one manager with named items rather than one per agent: orbax finalizes a step directory atomically, so a
step is either complete for every agent or absent; with one manager per agent a crash between two agents'
saves would leave steps that exist for one agent only. Each agent's items are still restored on their own
(`restore_agent`), onto that agent's mesh: the restore targets are abstract arrays (`jax.ShapeDtypeStruct` with
a sharding) taken from the live state or from `jax.eval_shape`, so every array lands on its own agent's devices
with its own sharding, bit for bit as saved. A step may hold a subset of the agents (the sub-agent before D_max
is known, `MGRPOTrainer` with d_max="auto"); `run["agents"]` says which.

`step` means "training steps completed": a run resumed from step N runs step N next.

Saves are asynchronous: `save` returns once the arrays are copied to host memory (so the next, donating, train
step may reuse the device buffers) and files are written in a background thread. Call `wait_until_finished()`
before the process exits (`close()` does), or the last checkpoint may be incomplete (orbax then ignores it).

`ShutdownRequest` turns SIGTERM/SIGINT (a preemption notice, Ctrl-C) into a flag the training loop polls:

    with Checkpointer(workdir, ["main", "sub"], save_interval_steps=100) as ckpt, ShutdownRequest() as stop:
        for step in range(start, total):
            ...train...
            ckpt.save(step + 1, {"main": agent_state_of(main), ...}, data_state=it.get_state(), force=stop.requested)
            if stop.requested:
                break               # leaving the `with` waits for the save; exit code 0
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
RUN_ITEM, DATA_ITEM = "run", "data"
_AGENT_ITEMS = ("params", "opt_state", "meta")
_AGENT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclasses.dataclass
class AgentState:
    """What one agent needs to resume: its arrays, policy version and small JSON extras.

    As a restore target, params/opt_state may be the live trees (jax.Arrays) or abstract ones
    (`jax.ShapeDtypeStruct` with `.sharding`); version and extra are then ignored.
    """

    params: Any
    opt_state: Any
    version: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Restored:
    step: int
    agents: dict[str, AgentState]
    data_state: dict[str, Any] | None
    extra: dict[str, Any]


def agent_state_of(trainer: Any) -> AgentState:
    """The AgentState of an `AgentTrainer` (params, opt_state, version, and its RESUMED_COUNTERS)."""
    counters = getattr(trainer, "RESUMED_COUNTERS", ())
    return AgentState(trainer.params, trainer.opt_state, int(trainer.version),
                      {name: int(getattr(trainer, name)) for name in counters})


def load_agent_state(trainer: Any, state: AgentState) -> None:
    """Puts a restored AgentState into an `AgentTrainer` (the inverse of `agent_state_of`). Counters missing from
    an older checkpoint keep their value (0 on a fresh trainer)."""
    trainer.params, trainer.opt_state, trainer.version = state.params, state.opt_state, state.version
    for name in getattr(trainer, "RESUMED_COUNTERS", ()):
        if name in state.extra:
            setattr(trainer, name, int(state.extra[name]))


def rng_to_json(key: jax.Array) -> dict[str, Any]:
    """A typed or raw JAX PRNG key -> JSON ({"impl", "data"}), for the run's `extra` state."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(key) if typed else key)
    return {"impl": str(jax.random.key_impl(key)) if typed else None, "data": data.tolist(),
            "dtype": str(data.dtype)}


def rng_from_json(state: Mapping[str, Any]) -> jax.Array:
    data = np.asarray(state["data"], dtype=state["dtype"])
    return jax.random.wrap_key_data(data, impl=state["impl"]) if state["impl"] else jax.numpy.asarray(data)


def abstract_tree(tree: Any, what: str = "state") -> Any:
    """Live arrays or ShapeDtypeStructs -> ShapeDtypeStructs that carry the sharding to restore onto.

    Raises ValueError when a leaf has no sharding (restore would not know which devices it belongs to)."""
    def one(path, x):
        sharding = getattr(x, "sharding", None)
        if sharding is None or not hasattr(x, "shape"):
            raise ValueError(f"restore target {what}{jax.tree_util.keystr(path)} is {type(x).__name__} without a "
                             "sharding; pass the live state or jax.ShapeDtypeStruct(shape, dtype, sharding=...) "
                             "leaves (e.g. from jax.eval_shape with the agent's shardings)")
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(one, tree)


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _named_leaves(tree: Any) -> dict[str, Any]:
    """{"a.b.0.value": leaf}: the dotted names orbax also uses, independent of dict/namedtuple/attr keys."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


class Checkpointer:
    """Async, sharded checkpoints of several agents plus run/data JSON state under `<workdir>/checkpoints`.

    agents: every agent name that may ever be saved (letters, digits, '_', '-').
    save_interval_steps: `save` writes only steps that are multiples of it (unless force=True).
    max_to_keep: how many of the newest steps stay on disk (None: all).
    """

    def __init__(self, workdir: str | os.PathLike, agents: Sequence[str], *, save_interval_steps: int = 1,
                 max_to_keep: int | None = 3, async_save: bool = True):
        agents = list(agents)
        bad = [a for a in agents if not isinstance(a, str) or not _AGENT_NAME.match(a)]
        if not agents or bad or len(set(agents)) != len(agents):
            raise ValueError(f"agents must be distinct names of letters, digits, '_' or '-'; got {agents}")
        if save_interval_steps < 1 or (max_to_keep is not None and max_to_keep < 1):
            raise ValueError(f"checkpoint needs save_interval_steps >= 1 and max_to_keep >= 1 or None; got "
                             f"{save_interval_steps}, {max_to_keep}")
        self.agents = agents
        workdir = os.fspath(workdir)
        if "://" not in workdir:  # local paths absolute (orbax wants that); gs:// and the like as given
            workdir = os.path.abspath(workdir)
        self.directory = epath.Path(workdir) / CHECKPOINT_SUBDIR
        handlers: dict[str, Any] = {RUN_ITEM: ocp.JsonCheckpointHandler(), DATA_ITEM: ocp.JsonCheckpointHandler()}
        for a in agents:
            handlers[f"{a}.params"] = ocp.StandardCheckpointHandler()
            handlers[f"{a}.opt_state"] = ocp.StandardCheckpointHandler()
            handlers[f"{a}.meta"] = ocp.JsonCheckpointHandler()
        options = ocp.CheckpointManagerOptions(save_interval_steps=save_interval_steps, max_to_keep=max_to_keep,
                                               enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, item_names=tuple(handlers), item_handlers=handlers,
                                              options=options)

    # ------------------------------------------------------------------------------------------- save

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def save(self, step: int, agents: Mapping[str, AgentState | Any], *, data_state: Mapping[str, Any] | None = None,
             extra: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Starts an async save of `step` when it is due (a multiple of save_interval_steps) or `force`.

        agents: name -> AgentState (or an AgentTrainer). data_state / extra: JSON-serializable dicts.
        Returns True when a save started; False when not due, or when this step is already on disk (e.g. a
        periodic save and a shutdown save at the same step).
        """
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        unknown = sorted(set(agents) - set(self.agents))
        if unknown:
            raise ValueError(f"agents {unknown} were not declared; Checkpointer(agents=...) has {self.agents}")
        items: dict[str, Any] = {}
        for name, state in agents.items():
            if not isinstance(state, AgentState):
                state = agent_state_of(state)
            items[f"{name}.params"] = ocp.args.StandardSave(state.params)
            items[f"{name}.opt_state"] = ocp.args.StandardSave(state.opt_state)
            items[f"{name}.meta"] = ocp.args.JsonSave({"version": int(state.version), "extra": dict(state.extra)})
        items[RUN_ITEM] = ocp.args.JsonSave({"agents": sorted(agents), "extra": dict(extra or {})})
        if data_state is not None:
            items[DATA_ITEM] = ocp.args.JsonSave(dict(data_state))
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

    def wait_until_finished(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- inspect

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step on disk, or None (a fresh run)."""
        return self._manager.latest_step()

    def _step_or_latest(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}; start a fresh run (or point workdir "
                                        "at the run to resume)")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; saved steps: "
                                    f"{self.all_steps()}")
        return step

    def _items_on_disk(self, step: int) -> set[str]:
        path = self.directory / str(step)
        return {p.name for p in path.iterdir() if not p.name.startswith("_")} if path.is_dir() else set()

    def saved_agents(self, step: int | None = None) -> list[str]:
        """The agents whose state the step holds."""
        step = self._step_or_latest(step)
        return list(self._restore_items(step, {RUN_ITEM: ocp.args.JsonRestore()})[RUN_ITEM]["agents"])

    # ---------------------------------------------------------------------------------------- restore

    def _restore_items(self, step: int, items: dict[str, Any]) -> Any:
        missing = sorted(set(items) - self._items_on_disk(step))
        if missing:
            raise FileNotFoundError(f"checkpoint step {step} in {self.directory} has no item(s) {missing}; it holds "
                                    f"{sorted(self._items_on_disk(step))}. An agent missing from a step was not "
                                    "saved then (e.g. the sub-agent before D_max was known): restore it from its "
                                    "initial weights, or pick another step")
        return self._manager.restore(step, args=ocp.args.Composite(**items))

    def _check_shapes(self, step: int, item: str, target: Any) -> None:
        """Compares the saved arrays' names, shapes and dtypes with the target's before restoring, so that a
        checkpoint of another model fails with the key and both shapes instead of deep inside orbax."""
        try:
            metadata = self._manager.item_metadata(step)[item]
        except Exception as e:  # metadata unreadable (older layout): let orbax's own checks speak
            logger.debug("no metadata for %s at step %d: %s", item, step, e)
            return
        saved = _named_leaves(getattr(metadata, "tree", metadata))
        wanted = _named_leaves(target)
        where = f"checkpoint {self.directory} step {step} item {item!r}"
        fix = ("this checkpoint directory is from a different model or optimizer; use another workdir, or build the "
               "same model configuration as the saved run")
        only_saved, only_wanted = sorted(set(saved) - set(wanted)), sorted(set(wanted) - set(saved))
        if only_saved or only_wanted:
            raise ValueError(f"{where}: keys differ (only in the checkpoint: {only_saved[:5]}, only in the model: "
                             f"{only_wanted[:5]}); {fix}")
        for name, want in wanted.items():
            have = saved[name]
            have_shape = tuple(getattr(have, "shape", ()) or ())
            if have_shape != tuple(want.shape):
                raise ValueError(f"{where}: {name} has shape {have_shape} in the checkpoint but {tuple(want.shape)} "
                                 f"in the model; {fix}")
            have_dtype = getattr(have, "dtype", None)
            if have_dtype is not None and np.dtype(have_dtype) != np.dtype(want.dtype):
                raise ValueError(f"{where}: {name} has dtype {np.dtype(have_dtype)} in the checkpoint but "
                                 f"{np.dtype(want.dtype)} in the model; {fix}")

    def restore_agent(self, name: str, target: AgentState, step: int | None = None) -> AgentState:
        """One agent's state at `step` (default: latest), onto the shardings of `target`'s trees."""
        step = self._step_or_latest(step)
        if name not in self.agents:
            raise ValueError(f"agent {name!r} was not declared; Checkpointer(agents=...) has {self.agents}")
        abstract = {"params": abstract_tree(target.params, f"{name}.params"),
                    "opt_state": abstract_tree(target.opt_state, f"{name}.opt_state")}
        for part, tree in abstract.items():
            if f"{name}.{part}" in self._items_on_disk(step):
                self._check_shapes(step, f"{name}.{part}", tree)
        out = self._restore_items(step, {f"{name}.params": ocp.args.StandardRestore(abstract["params"]),
                                         f"{name}.opt_state": ocp.args.StandardRestore(abstract["opt_state"]),
                                         f"{name}.meta": ocp.args.JsonRestore()})
        meta = out[f"{name}.meta"]
        return AgentState(out[f"{name}.params"], out[f"{name}.opt_state"], int(meta["version"]),
                          dict(meta.get("extra") or {}))

    def restore(self, targets: Mapping[str, AgentState | Any], step: int | None = None) -> Restored:
        """Every agent in `targets` (name -> AgentState or AgentTrainer used as the target) that the step holds,
        plus the data and run state. Agents in `targets` but not in the step are left out of `Restored.agents`
        (see `saved_agents`); an agent in the step but not in `targets` is not read."""
        step = self._step_or_latest(step)
        run = self._restore_items(step, {RUN_ITEM: ocp.args.JsonRestore()})[RUN_ITEM]
        agents = {}
        for name, target in targets.items():
            if name in run["agents"]:
                target = target if isinstance(target, AgentState) else agent_state_of(target)
                agents[name] = self.restore_agent(name, target, step)
        data = None
        if DATA_ITEM in self._items_on_disk(step):
            data = self._restore_items(step, {DATA_ITEM: ocp.args.JsonRestore()})[DATA_ITEM]
        return Restored(step, agents, data, dict(run.get("extra") or {}))


# ------------------------------------------------------------------------------------------- signals


class ShutdownRequest:
    """Context manager: SIGTERM/SIGINT set `requested` instead of killing the process.

    The training loop polls `requested`, saves (force=True), waits for the save and returns, so a preempted
    job exits 0 with a complete checkpoint. A second signal while a request is pending runs the previous
    handler (Ctrl-C twice still interrupts at once). Previous handlers are restored on exit. Signal handlers
    can only be installed from the main thread; elsewhere this raises RuntimeError.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested:  # second signal: the user means it
            previous = self._previous.get(signum, signal.SIG_DFL)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: finishing this step, saving a checkpoint and exiting (send it again to stop "
                       "at once)", self.signal_name)

    def __enter__(self) -> ShutdownRequest:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("ShutdownRequest must be entered in the main thread (Python delivers signals there)")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
