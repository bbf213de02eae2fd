"""Device layout for the agents, and the sharding of their parameters, optimizer state, batches and updates.

- `make_agent_meshes`: a small layout config -> one `Mesh` (axes "fsdp", "tp"; "fsdp", "expert", "tp" for expert
  parallelism) per agent role, over disjoint slices of `jax.devices()`, or the same mesh time-shared between roles.
- `logical_to_pspec` / `state_shardings`: logical axis names on parameters -> `PartitionSpec`/`NamedSharding`.
- `born_sharded`: build a model's parameters directly in their sharding (`nnx.eval_shape` + `jit(out_shardings)`),
  never materializing them whole on one device.
- `opt_state_shardings` / `born_sharded_opt_state`: the same for an optax optimizer state, whose moments mirror
  the parameters (and take their shardings) and whose counters are replicated.
- `batch_sharding` / `put_batch`: the batch dimension over the data-parallel ("fsdp") axis.
- `make_sharded_update`: one agent's jitted, donated `update(params, opt_state, batch)` with explicit in/out
  shardings; `nnx.merge` happens only inside the jitted function.
- `constrain`: pins an activation's sharding by logical axis names (batch over "fsdp") when the computation is
  traced under a mesh (`with_mesh`; `jit_sharded_step` does it), a no-op otherwise.
- `initialize_distributed`: multi-controller JAX (`jax.distributed.initialize`) from a config or the
  environment, before any device is touched.

Every `nnx.Param` of `mgrpo_jax.models` carries its logical axis names in its `out_sharding` metadata, e.g.
("embed", "mlp"). A rule set maps each logical name to a mesh axis name (or a tuple of mesh axes, or None for
replicated); names without a rule are replicated. A mesh axis is used at most once per array: a later
dimension whose rule asks for an axis already used is replicated instead (e.g. `q_heads` and `kv_heads` both
map to "tp", a kernel has only one of them).

Multi-host (LESSONS.md, Marin 3947): after `initialize_distributed`, `jax.devices()` lists the devices of every
process, and every process must run every computation. Per-agent meshes that split *hosts* (agent A on host 0's
devices, agent B on host 1's) do not work under ordinary multi-controller JAX: across hosts, either every
agent's mesh spans all processes (time-share one mesh with `shared_with`), or the agents run as separate jobs
(one `jax.distributed` job per agent) that exchange weights and trajectories explicitly. `make_agent_meshes`
refuses a layout that would give an agent a mesh missing some process.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, Any]]

# FSDP over the embed dimension, tensor parallelism over heads / mlp / vocab. Works for any mesh whose axes
# are named "fsdp" and "tp" (size 1 axes are fine). Parameters use "layers" (the stacked layer axis, never
# sharded: each scan step needs its whole layer) and the weight names; activations use "batch" (data-parallel
# over fsdp), "length", "act_embed" (an activation's hidden dimension: replicated, unlike the weights' "embed")
# and the head / mlp names.
# Expert parallelism (a mesh with an "expert" axis, `AgentMeshSpec.expert`): a MoE layer's experts are split over
# "expert" (`models.moe`); everywhere else "expert" is one more data-parallel / FSDP axis (the batch and the
# weights' embed dimension over fsdp x expert), as in MaxText. A mesh without it leaves every spec as before.
# "lora_rank" (an adapter's rank dimension) is sharded over the data axes where no other dimension of the
# adapter already is (B [r, out] of a projection whose out dimension is replicated), so adapters and their
# optimizer state are split like the base weights rather than replicated.
DEFAULT_RULES: LogicalRules = (
    ("layers", None),
    ("vocab", "tp"),
    ("experts", "expert"),
    ("embed", ("fsdp", "expert")),
    ("q_heads", "tp"),
    ("kv_heads", "tp"),
    ("head_dim", None),
    ("mlp", "tp"),
    ("moe_mlp", "tp"),
    ("norm", None),
    ("lora_rank", ("fsdp", "expert")),
    ("batch", ("fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
)


def logical_to_pspec(axes: Sequence[str | None] | None, rules: LogicalRules, mesh: Mesh | None = None,
                     shape: Sequence[int] | None = None) -> PartitionSpec:
    """Logical axis names -> PartitionSpec via `rules`.

    With `mesh` and `shape`, a dimension is only sharded over mesh axes whose total size divides it (otherwise
    it is replicated), so odd sizes (a vocab of 151_936 on 3 devices) never fail to place.
    """
    if not axes:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if a in mesh.shape)
            if shape is not None:
                size = 1
                for a in mesh_axes:
                    size *= mesh.shape[a]
                if shape[i] % size:
                    mesh_axes = ()
        used.update(mesh_axes)
        out.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
    return PartitionSpec(*out)


def constrain(x: jax.Array, axes: Sequence[str | None], rules: LogicalRules = DEFAULT_RULES) -> jax.Array:
    """`jax.lax.with_sharding_constraint(x, <axes mapped by rules>)` on the mesh the computation is traced
    under (`jax.sharding.get_abstract_mesh()`, set by `with_mesh` / `jit_sharded_step`); x unchanged when there
    is none (one device, tests, a plain `jax.jit`). A dimension whose size the mesh axes do not divide is left
    replicated, as for parameters. Pinning activations (batch over "fsdp") keeps XLA from replicating them or
    resharding them by a full rematerialization."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or len(axes) != x.ndim:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_pspec(axes, rules, mesh, x.shape))


_TRACED_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("traced_mesh", default=None)


def with_mesh(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """`fn` traced under `mesh` (as jax's abstract mesh, and as `current_mesh()`), so that `constrain` inside
    it takes effect and mesh-aware kernels (splash attention's `shard_map`) find the mesh. Wrap the function
    you jit: `jax.jit(with_mesh(step, mesh), in_shardings=...)`."""
    @functools.wraps(fn)
    def traced_on_mesh(*args, **kwargs):
        token = _TRACED_MESH.set(mesh)
        try:
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return fn(*args, **kwargs)
        finally:
            _TRACED_MESH.reset(token)

    return traced_on_mesh


def current_mesh() -> Mesh | None:
    """The concrete Mesh the running trace was started under by `with_mesh`, or None."""
    return _TRACED_MESH.get()


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes(state: Any) -> Any:
    """The logical axis names of every Variable in an nnx state (None where a Variable has none)."""
    return jax.tree.map(lambda v: v.get_metadata().get("out_sharding"), state, is_leaf=_is_var)


def state_shardings(state: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """A tree of NamedSharding with the structure of `state` (an nnx.State of real or abstract Variables)."""

    def one(v):
        value = v.get_value()
        spec = logical_to_pspec(v.get_metadata().get("out_sharding"), rules, mesh, getattr(value, "shape", None))
        return v.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=_is_var)


def born_sharded(init_fn: Callable[[], nnx.Module], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES,
                 ) -> tuple[nnx.GraphDef, nnx.State, Any]:
    """Initialize a module's state directly in its sharding on `mesh`.

    `init_fn()` builds the module (e.g. `lambda: init_model(config, seed)`). Its shapes and logical axes come
    from `nnx.eval_shape` (no memory), its shardings from `rules`, and the real initialization runs under
    `jax.jit(out_shardings=...)`, so each device only ever holds its own shards.
    Returns (graphdef, state, shardings); `shardings` has the structure of `state`.
    """
    graphdef, abstract_state = nnx.split(nnx.eval_shape(init_fn))
    shardings = state_shardings(abstract_state, mesh, rules)
    state = jax.jit(lambda: nnx.split(init_fn())[1], out_shardings=shardings)()
    return graphdef, state, shardings


# ---------------------------------------------------------------------------------------- optimizer state


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _mesh_of(shardings: Any) -> Mesh:
    leaves = [s for s in jax.tree.leaves(shardings) if isinstance(s, NamedSharding)]
    if not leaves:
        raise ValueError("expected a tree of NamedSharding (e.g. the third value of `born_sharded`), found none")
    mesh = leaves[0].mesh
    if any(s.mesh != mesh for s in leaves):
        raise ValueError("the parameter shardings span more than one mesh; one agent's state lives on one mesh")
    return mesh


def opt_state_shardings(abstract_opt_state: Any, params: Any, param_shardings: Any) -> Any:
    """Shardings for an optax state (real or `jax.eval_shape`d), derived from the parameters' shardings.

    Optax states mirror the parameters: every sub-tree with the parameters' tree structure (Adam's `mu` and
    `nu`, a momentum trace, ...) takes `param_shardings` leaf by leaf, so each moment lives exactly where its
    parameter lives. A leaf whose shape differs from its parameter's (a factored second moment) and every other
    leaf (step counts, schedule state, loss scales) is replicated on the parameters' mesh.

    params: the parameter tree (arrays or `jax.ShapeDtypeStruct`s), the structure of `param_shardings`.
    Returns a tree of NamedSharding with the structure of `abstract_opt_state`.
    """
    mesh = _mesh_of(param_shardings)
    replicated = _replicated(mesh)
    params_def = jax.tree.structure(params)
    if jax.tree.structure(param_shardings) != params_def:
        raise ValueError("param_shardings must have the tree structure of params (one sharding per leaf)")
    param_leaves = jax.tree.leaves(params)
    sharding_leaves = jax.tree.leaves(param_shardings)

    def mirrors_params(node: Any) -> bool:
        return jax.tree.structure(node) == params_def

    def assign(node: Any) -> Any:
        if not mirrors_params(node):
            return replicated  # a leaf that is not a parameter mirror: count, scale, ...
        out = [s if getattr(leaf, "shape", None) == p.shape else replicated
               for leaf, p, s in zip(jax.tree.leaves(node), param_leaves, sharding_leaves)]
        return jax.tree.unflatten(params_def, out)

    return jax.tree.map(assign, abstract_opt_state, is_leaf=mirrors_params)


def born_sharded_opt_state(tx: optax.GradientTransformation, params: Any, param_shardings: Any,
                           ) -> tuple[Any, Any]:
    """`tx.init(params)` created directly in its sharding, next to the parameters on their mesh.

    Shapes come from `jax.eval_shape(tx.init, params)` (no memory), shardings from `opt_state_shardings`, and
    `jax.jit(tx.init, out_shardings=...)` builds each shard on its own device.
    Returns (opt_state, opt_shardings); pass both shardings to `make_sharded_update`.
    """
    shardings = opt_state_shardings(jax.eval_shape(tx.init, params), params, param_shardings)
    opt_state = jax.jit(tx.init, in_shardings=(param_shardings,), out_shardings=shardings)(params)
    return opt_state, shardings


# ---------------------------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """The sharding of a batch on `mesh`: dimension 0 over the mesh axes of the logical "batch" rule (the
    data-parallel "fsdp" axis by default), every other dimension replicated. One sharding serves every leaf of a
    batch dict ([B], [B, T], [B, T, H]...), as a pytree prefix for `jit` or `put_batch`."""
    return NamedSharding(mesh, logical_to_pspec(("batch",), rules, mesh))


def data_parallel_size(sharding: NamedSharding) -> int:
    """How many shards a batch's dimension 0 splits into under `sharding` (1 when it is replicated)."""
    spec0 = sharding.spec[0] if len(sharding.spec) else None
    axes = () if spec0 is None else ((spec0,) if isinstance(spec0, str) else tuple(spec0))
    return int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1


def put_batch(batch: Any, sharding: NamedSharding) -> Any:
    """Place a host batch (a pytree of numpy arrays, identical on every process) on `sharding`.

    Each device receives only its slice (`jax.make_array_from_callback`), which also works under
    multi-controller JAX where a process can address only its own devices. Raises ValueError when the batch size
    is not divisible by the number of data-parallel shards.
    """
    shards = data_parallel_size(sharding)

    def one(path, x):
        x = np.asarray(x)
        if x.ndim and x.shape[0] % shards:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} has batch size {x.shape[0]}, not divisible "
                             f"by the {shards} data-parallel shards of the mesh; make the batch size a "
                             "multiple of the mesh's 'fsdp' size")
        leaf_sharding = sharding if x.ndim else _replicated(sharding.mesh)
        return jax.make_array_from_callback(x.shape, leaf_sharding, lambda index: x[index])

    return jax.tree_util.tree_map_with_path(one, batch)


# -------------------------------------------------------------------------------------------- the update


def make_sharded_update(graphdef: nnx.GraphDef, loss_fn: Callable[[nnx.Module, Any], tuple[jax.Array, dict]],
                        tx: optax.GradientTransformation, param_shardings: Any, opt_shardings: Any,
                        batch_sharding: Any) -> Callable[[Any, Any, Any], tuple[Any, Any, dict]]:
    """One agent's optimizer step, jitted on its mesh with explicit shardings and donated state.

        update(params, opt_state, batch) -> (params, opt_state, metrics)

    params: the model's state (`born_sharded`'s second value), sharded as `param_shardings`; opt_state: sharded as
    `opt_shardings` (`born_sharded_opt_state`); batch: any pytree, sharded as `batch_sharding` (a NamedSharding
    applies to every leaf, see `batch_sharding`). `loss_fn(model, batch) -> (loss, metrics)` gets the model
    rebuilt with `nnx.merge(graphdef, params)` *inside* the jitted function, so there is no per-step split/merge
    on the host (LESSONS.md, item 13); `loss` is a float32 scalar, `metrics` a dict of scalars.

    The step is loss -> gradients (pinned to the parameters' shardings, so FSDP reduces-scatters them) ->
    `tx.update` -> `optax.apply_updates`. Returned metrics are `loss_fn`'s plus "loss" and "grad_norm" (the global
    L2 norm before the optimizer), replicated. params and opt_state are donated (`donate_argnums=(0, 1)`): their
    buffers are reused for the outputs, so the arrays passed in are invalid afterwards. With fixed batch shapes
    it compiles once; calls for different agents (different meshes) dispatch asynchronously and run
    concurrently.
    """
    def update(params, opt_state, batch):
        def loss_of(p):
            return loss_fn(nnx.merge(graphdef, p), batch)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return params, opt_state, metrics

    return jit_sharded_step(update, param_shardings, opt_shardings, batch_sharding)


def jit_sharded_step(step: Callable[[Any, Any, Any], tuple[Any, Any, dict]], param_shardings: Any,
                     opt_shardings: Any, batch_sharding: Any) -> Callable[[Any, Any, Any], tuple[Any, Any, dict]]:
    """Jits a pure `step(params, opt_state, batch) -> (params, opt_state, metrics)` on the parameters' mesh:
    explicit in/out shardings, params and opt_state donated, metrics replicated, traced under the mesh (so the
    model's activation constraints apply, see `constrain`)."""
    mesh = _mesh_of(param_shardings)
    return jax.jit(with_mesh(step, mesh), in_shardings=(param_shardings, opt_shardings, batch_sharding),
                   out_shardings=(param_shardings, opt_shardings, _replicated(mesh)), donate_argnums=(0, 1))


# ------------------------------------------------------------------------------------------ agent meshes

MESH_AXES = ("fsdp", "tp")
EXPERT_MESH_AXES = ("fsdp", "expert", "tp")  # with expert parallelism (expert > 1)


@dataclasses.dataclass(frozen=True)
class AgentMeshSpec:
    """One role's entry in a layout: `devices` devices arranged as fsdp x tp (fsdp=-1: devices // (expert x tp)),
    or fsdp x expert x tp with expert parallelism (`expert` > 1: a MoE model's experts split over that many
    devices), or `shared_with` another role, whose mesh it then time-shares."""

    devices: int = 0
    fsdp: int = -1
    tp: int = 1
    shared_with: str | None = None
    expert: int = 1


def _parse_layout(layout: Mapping[str, Mapping[str, Any] | AgentMeshSpec]) -> dict[str, AgentMeshSpec]:
    if not layout:
        raise ValueError("mesh layout is empty; give at least one role, e.g. {'main': {'devices': 8, 'tp': 2}}")
    fields = {f.name for f in dataclasses.fields(AgentMeshSpec)}
    specs = {}
    for role, entry in layout.items():
        if isinstance(entry, AgentMeshSpec):
            specs[role] = entry
            continue
        unknown = sorted(set(entry) - fields)
        if unknown:
            raise ValueError(f"mesh layout[{role!r}] has unknown keys {unknown}; allowed: {sorted(fields)}")
        specs[role] = AgentMeshSpec(**entry)
    for role, spec in specs.items():
        if spec.shared_with is not None:
            if spec.shared_with not in specs or specs[spec.shared_with].shared_with is not None:
                owners = [r for r, s in specs.items() if s.shared_with is None]
                raise ValueError(f"mesh layout[{role!r}]['shared_with']={spec.shared_with!r} must name a role "
                                 f"with its own devices: one of {owners}")
            if spec.devices:
                raise ValueError(f"mesh layout[{role!r}] sets both 'devices' and 'shared_with'; keep one")
            continue
        if spec.devices <= 0 or spec.tp <= 0 or spec.expert <= 0:
            raise ValueError(f"mesh layout[{role!r}] needs 'devices' > 0, 'tp' > 0 and 'expert' > 0 (or "
                             f"'shared_with'), got devices={spec.devices}, tp={spec.tp}, expert={spec.expert}")
        fsdp = spec.devices // (spec.tp * spec.expert) if spec.fsdp == -1 else spec.fsdp
        if fsdp <= 0 or fsdp * spec.expert * spec.tp != spec.devices:
            raise ValueError(f"mesh layout[{role!r}]: fsdp ({spec.fsdp}) x expert ({spec.expert}) x tp ({spec.tp}) "
                             f"must equal devices ({spec.devices}); set fsdp=-1 to derive it")
        specs[role] = dataclasses.replace(spec, fsdp=fsdp)
    return specs


def make_agent_meshes(layout: Mapping[str, Mapping[str, Any] | AgentMeshSpec],
                      devices: Sequence[jax.Device] | None = None) -> dict[str, Mesh]:
    """One Mesh (axes "fsdp", "tp", or "fsdp", "expert", "tp" when the role's `expert` > 1) per role, over
    consecutive disjoint slices of `devices` (default:
    `jax.devices()`), in the layout's order. A role with `shared_with` gets the other role's Mesh object.

    Example: {"main": {"devices": 4, "fsdp": 2, "tp": 2}, "sub": {"devices": 4, "tp": 1}} on 8 devices, or
    {"main": {"devices": 8, "tp": 2}, "sub": {"shared_with": "main"}} to time-share all of them.
    Raises ValueError naming the roles when the layout needs more devices than there are, and, under
    multi-controller JAX (`jax.process_count() > 1`), when a role's mesh would miss the devices of some process
    (module docstring: such meshes do not work; time-share one mesh or run the agents as separate jobs).
    """
    devices = list(jax.devices() if devices is None else devices)
    specs = _parse_layout(layout)
    owners = {role: spec for role, spec in specs.items() if spec.shared_with is None}
    needed = sum(spec.devices for spec in owners.values())
    if needed > len(devices):
        per_role = ", ".join(f"{role}: {spec.devices}" for role, spec in owners.items())
        raise ValueError(f"mesh layout needs {needed} devices ({per_role}) but {len(devices)} are available; "
                         "shrink 'devices', or let roles time-share one mesh with {'shared_with': '<role>'}")
    meshes: dict[str, Mesh] = {}
    start = 0
    for role, spec in owners.items():
        if spec.expert > 1:
            grid = np.array(devices[start:start + spec.devices], dtype=object).reshape(spec.fsdp, spec.expert,
                                                                                        spec.tp)
            meshes[role] = Mesh(grid, EXPERT_MESH_AXES)
        else:
            grid = np.array(devices[start:start + spec.devices], dtype=object).reshape(spec.fsdp, spec.tp)
            meshes[role] = Mesh(grid, MESH_AXES)
        start += spec.devices
    _check_meshes_span_processes(meshes, jax.process_count())
    return {role: meshes[spec.shared_with or role] for role, spec in specs.items()}


def _check_meshes_span_processes(meshes: Mapping[str, Mesh], process_count: int) -> None:
    """Under multi-controller JAX every process runs every computation, so each agent's mesh must hold devices
    of every process (Marin 3947). Raises ValueError naming the role, its processes, and the two fixes."""
    if process_count <= 1:
        return
    everyone = set(range(process_count))
    for role, mesh in meshes.items():
        have = {d.process_index for d in mesh.devices.flat}
        if have != everyone:
            raise ValueError(
                f"mesh layout: role {role!r} would get devices of processes {sorted(have)} only, but this is a "
                f"multi-controller JAX run with {process_count} processes; a per-agent mesh that splits hosts does "
                "not work (every process must take part in every agent's computations). Fix: give every role a "
                "mesh spanning all processes, e.g. time-share one mesh over all devices "
                "({'main': {'devices': <all>, 'tp': ...}, 'sub': {'shared_with': 'main'}}), or run each agent as "
                "a separate job (its own jax.distributed cluster) that exchanges weights and trajectories "
                "explicitly.")


# ------------------------------------------------------------------------------------------- multi-host

ENV_COORDINATOR = "MGRPO_COORDINATOR"  # "host:port" of process 0's coordinator service
ENV_NUM_PROCESSES = "MGRPO_NUM_PROCESSES"
ENV_PROCESS_ID = "MGRPO_PROCESS_ID"
ENV_DISTRIBUTED = "MGRPO_DISTRIBUTED"  # "auto": let jax detect the cluster (Cloud TPU, SLURM, Open MPI, k8s)
_DISTRIBUTED_KEYS = ("coordinator_address", "num_processes", "process_id")
_ENV_OF_KEY = {"coordinator_address": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES,
               "process_id": ENV_PROCESS_ID}


def _distributed_settings(config: Any, env: Mapping[str, str]) -> tuple[dict[str, Any], bool, str]:
    """(values of the three keys or None, auto, where they came from) from a mapping/attribute config or env."""
    if config is not None:
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        allowed = set(_DISTRIBUTED_KEYS) | {"auto"}
        if isinstance(config, Mapping) and set(config) - allowed:
            raise ValueError(f"distributed config has unknown keys {sorted(set(config) - allowed)}; allowed: "
                             f"{sorted(allowed)}")
        values = {k: get(k, None) for k in _DISTRIBUTED_KEYS}
        return values, bool(get("auto", False)), "config"
    values = {k: env.get(_ENV_OF_KEY[k]) or None for k in _DISTRIBUTED_KEYS}
    mode = env.get(ENV_DISTRIBUTED, "").strip().lower()
    if mode not in ("", "auto"):
        raise ValueError(f"{ENV_DISTRIBUTED}={env[ENV_DISTRIBUTED]!r}: allowed values are 'auto' or unset")
    return values, mode == "auto", "environment"


def initialize_distributed(config: Any = None, *, env: Mapping[str, str] | None = None) -> bool:
    """Start multi-controller JAX (`jax.distributed.initialize`) once, before anything touches a device.

    Settings come from `config` (a mapping or an object with attributes, e.g. an ml_collections ConfigDict) with
    keys `coordinator_address` ("host:port" of process 0), `num_processes`, `process_id` and optionally `auto`;
    or, when `config` is None, from the environment (`env`, default `os.environ`):

        MGRPO_COORDINATOR=10.0.0.1:1234  MGRPO_NUM_PROCESSES=2  MGRPO_PROCESS_ID=0|1
        MGRPO_DISTRIBUTED=auto   (instead of the three: jax detects Cloud TPU pods, SLURM, Open MPI, k8s)

    All three values, or none: a partial set raises ValueError naming the missing keys. With none and no `auto`,
    this is a single-process run and nothing is initialized (jax itself would raise outside a known cluster).
    Idempotent: once initialized, a second call checks the values against the running cluster and returns.
    Afterwards `jax.devices()` lists every process's devices; build meshes from it (`make_agent_meshes`).

    Returns True when the process is part of a distributed run (initialized now or before), else False.
    """
    values, auto, source = _distributed_settings(config, os.environ if env is None else env)
    given = [k for k in _DISTRIBUTED_KEYS if values[k] is not None]
    names = (lambda ks: ", ".join(ks if source == "config" else [_ENV_OF_KEY[k] for k in ks]))
    if given and len(given) < len(_DISTRIBUTED_KEYS):
        missing = [k for k in _DISTRIBUTED_KEYS if values[k] is None]
        raise ValueError(f"distributed {source} is partial: {names(given)} set but {names(missing)} missing; set "
                         f"all of {names(list(_DISTRIBUTED_KEYS))}, or none of them for a single-process run"
                         + (f" ({ENV_DISTRIBUTED}=auto lets jax detect a TPU/SLURM/MPI cluster)"
                            if source == "environment" else " (auto=True lets jax detect a cluster)"))
    if given:
        try:
            num_processes, process_id = int(values["num_processes"]), int(values["process_id"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"distributed {source}: {names(['num_processes', 'process_id'])} must be integers, got "
                             f"{values['num_processes']!r}, {values['process_id']!r}") from e
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"distributed {source}: need num_processes >= 1 and 0 <= process_id < num_processes, "
                             f"got num_processes={num_processes}, process_id={process_id}")
        coordinator = str(values["coordinator_address"])
        if ":" not in coordinator:
            raise ValueError(f"distributed {source}: coordinator address {coordinator!r} must be 'host:port'")

    if jax.distributed.is_initialized():
        if given and (jax.process_count(), jax.process_index()) != (num_processes, process_id):
            raise ValueError(f"jax.distributed is already initialized as process {jax.process_index()} of "
                             f"{jax.process_count()}, not {process_id} of {num_processes} as now requested")
        return True
    if not given and not auto:
        return False
    try:
        if given:
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                       process_id=process_id)
        else:
            jax.distributed.initialize()  # cluster auto-detection
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise RuntimeError("initialize_distributed() must run at the very start of the program, before any "
                               "jax computation, jax.devices() or device_put (the XLA backend is already "
                               "initialized in this process)") from e
        raise
    return True
