"""Qwen3 mixture-of-experts: the router, top-k routing, dropless dispatch, the experts' SwiGLU as grouped
matmuls, expert parallelism, and the router's auxiliary losses.

    probs = softmax(x @ router)                       [N, E] float32
    w, e  = top_k(probs, k)                           [N, k] (w / sum(w) when norm_topk_prob)
    y[n]  = sum_j w[n, j] * down_e(silu(gate_e(x[n])) * up_e(x[n]))  with e = e[n, j]

**Dropless dispatch under fixed shapes.** The N x k (token, choice) assignments are sorted by expert, so
that each expert's rows are contiguous, and the experts' matmuls run as *grouped* matmuls over those rows
(`grouped_matmul`: `jax.lax.ragged_dot` on TPU and GPU; on CPU a tiled loop that visits only the row tiles
each expert's group spans, because jax's own CPU lowering of `ragged_dot` expands it into a dense
all-experts compute). The sorted buffer always has N x k rows, whatever the routing, so the program has one
shape and compiles once; no token is ever dropped. Why dropless rather than a per-expert capacity with
counted overflow: with a capacity, whether a token is dropped depends on which other tokens share its batch,
and the sampler's batches (a few prompts, one token each while decoding) are not the trainer's packed rows, so
the trainer could not recompute the log-probs the sampler sampled with: every dropped token would be an
off-policy error in the importance ratio. Dropless, a token's output depends only on the token and the
weights. Pad tokens (segment id 0) take no row in any group: they cost no expert compute and output 0.

**Expert parallelism** (`expert` mesh axis, `mgrpo_jax.sharding`): the expert weights [E, H, I] are sharded
experts over "expert", H over "fsdp" and I over "tp"; the batch is sharded over ("fsdp", "expert"). Inside a
`shard_map`, each device gathers its weights' H shards (FSDP), gathers the tokens of its expert group (the
devices that share its fsdp index and hold the other experts; an all-gather over "expert"), runs its own
experts on the assignments routed to them, and the partial outputs are summed back to the tokens' owners
(reduce-scatter over "expert", sum over "tp"). The buffer of a device holds all of its group's assignments
(G x tokens x k rows, G the expert-axis size) because in the worst case every one of them goes to its experts;
the grouped matmul computes only the rows routed there. Without a mesh (one device, or a computation not
traced under `sharding.with_mesh`) the same code runs with every expert local and no collectives.

**Auxiliary losses** (options, `ModelConfig.router_aux_loss_coef` / `router_z_loss_coef`; 0 = off, and always
reported as metrics), per MoE layer over the real tokens, averaged over the MoE layers:

    load_balance = E * sum_e f_e * P_e     f_e: share of the N x k assignments that chose e, P_e: mean probs[:, e]
    z_loss       = mean_n logsumexp(router_logits[n])^2

load_balance is 1 when routing is uniform (transformers' `load_balancing_loss_func` is k times this and pools
the layers' tokens); `max_load` = E * max_e f_e is reported too (1 = balanced).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mgrpo_jax import sharding as sharding_lib

Array = jax.Array

# `ModelConfig.moe_matmul`: how the experts' grouped matmuls run.
#   ragged_dot: jax.lax.ragged_dot (XLA's grouped matmul on TPU and GPU);
#   tiled: a loop over row tiles x groups in pure JAX with a custom VJP (any backend; what CPU runs);
#   auto: ragged_dot on TPU and GPU, tiled elsewhere.
MOE_MATMULS = ("auto", "ragged_dot", "tiled")
# Rows per tile of the `tiled` grouped matmul. Each (tile, group) visit is one [TILE, K] x [K, N] product, and
# there are at most ceil(M / TILE) + G - 1 visits: a group boundary inside a tile costs one extra visit.
TILE_ROWS = 128
AUX_METRICS = ("load_balance", "z_loss", "max_load")

LAYER_KINDS = ("dense", "moe")


# ------------------------------------------------------------------------------------------------ layout


def layer_kinds(num_layers: int, num_experts: int, decoder_sparse_step: int,
                mlp_only_layers: tuple[int, ...]) -> tuple[str, ...]:
    """The MLP kind of every layer, transformers' rule: layer i is sparse ("moe") iff num_experts > 0, i is not
    in mlp_only_layers and (i + 1) % decoder_sparse_step == 0; else "dense"."""
    return tuple("moe" if num_experts > 0 and i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
                 else "dense" for i in range(num_layers))


def layer_runs(kinds: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    """Maximal runs of equal consecutive kinds: ((kind, start, stop), ...). Each run is one stacked, scanned
    module, so a model of one kind (every released Qwen3-MoE) is one scan."""
    runs = []
    for i, kind in enumerate(kinds):
        if runs and runs[-1][0] == kind:
            runs[-1][2] = i + 1
        else:
            runs.append([kind, i, i + 1])
    return tuple(tuple(r) for r in runs)


# ---------------------------------------------------------------------------------------- grouped matmul


def resolve_matmul(implementation: str, mesh=None) -> str:
    if implementation not in MOE_MATMULS:
        raise ValueError(f"ModelConfig.moe_matmul={implementation!r} is not one of {list(MOE_MATMULS)}")
    if implementation != "auto":
        return implementation
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return "ragged_dot" if platform in ("tpu", "gpu", "cuda", "rocm") else "tiled"


def grouped_matmul(x: Array, w: Array, group_sizes: Array, implementation: str = "tiled",
                   tile_rows: int = TILE_ROWS) -> Array:
    """out[m] = x[m] @ w[g(m)] for the rows m of group g (rows sorted by group: group g is rows
    [sum(gs[:g]), sum(gs[:g+1]))); rows past sum(group_sizes) give 0.

    x [M, K], w [G, K, N], group_sizes [G] int32 -> [M, N] in x's dtype (float32 accumulation).
    """
    if implementation == "ragged_dot":
        out = jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
        rows = jnp.arange(x.shape[0])
        return jnp.where((rows < jnp.sum(group_sizes))[:, None], out, 0).astype(x.dtype)
    if implementation != "tiled":
        raise ValueError(f"grouped_matmul: implementation={implementation!r}; use 'ragged_dot' or 'tiled'")
    # Inside shard_map, x and w may vary over different mesh axes (tokens over the data axes, weights over "tp"
    # too): make both vary over all of them before the custom VJP, whose cotangents must have its inputs' types
    # (the implicit broadcast's transpose then sums x's cotangent over the axes only w varied over).
    x, w = _varying_like(x, w, group_sizes), _varying_like(w, x, group_sizes)
    return _tiled_gmm(x, w, _varying_like(group_sizes.astype(jnp.int32), x), tile_rows)


def _visits(group_sizes: Array, num_tiles: int, tile_rows: int):
    """The (tile, group) pairs where a group's rows meet a row tile, padded to the static bound
    num_tiles + G - 1. -> (tile [V], group [V], valid [V], group starts [G], group ends [G])."""
    g_n = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first = starts // tile_rows
    last = jnp.maximum(ends - 1, 0) // tile_rows
    count = jnp.where(group_sizes > 0, last - first + 1, 0)
    count_end = jnp.cumsum(count)
    visits = num_tiles + g_n - 1
    v = jnp.arange(visits)
    group = jnp.minimum(jnp.searchsorted(count_end, v, side="right"), g_n - 1)
    tile = first[group] + v - (count_end[group] - count[group])
    valid = v < count_end[-1]
    return jnp.where(valid, tile, 0), group, valid, starts, ends


def _varying_like(init: Array, *refs: Array) -> Array:
    """`init` marked as varying over the manual mesh axes any of `refs` varies over (inside `shard_map`, a scan's
    carry must have the type its body returns); unchanged outside `shard_map`."""
    missing = frozenset().union(*(_vma(r) for r in refs)) - _vma(init)
    return jax.lax.pcast(init, tuple(sorted(missing)), to="varying") if missing else init


def _vma(x: Array) -> frozenset:
    return getattr(getattr(jax.typeof(x), "mat", None), "varying", frozenset())


def _tile_loop(x: Array, group_sizes: Array, tile_rows: int, body, init, *refs: Array):
    """Runs body(carry, tile_start, group, row_mask [tile_rows]) over every (tile, group) visit of x's rows."""
    init = _varying_like(init, x, group_sizes, *refs)
    num_tiles = -(-x.shape[0] // tile_rows)
    tiles, groups, valid, starts, ends = _visits(group_sizes, num_tiles, tile_rows)

    def step(carry, visit):
        tile, group, ok = visit
        rows = tile * tile_rows + jnp.arange(tile_rows)
        mask = ok & (rows >= starts[group]) & (rows < ends[group])
        return body(carry, tile * tile_rows, group, mask), None

    return jax.lax.scan(step, init, (tiles, groups, valid))[0]


def _pad_rows(x: Array, tile_rows: int) -> Array:
    pad = -x.shape[0] % tile_rows
    return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def _gmm_impl(x: Array, w: Array, group_sizes: Array, tile_rows: int) -> Array:
    m, k = x.shape
    n = w.shape[2]
    tile_rows = min(tile_rows, max(8, -(-m // 8) * 8))
    xp = _pad_rows(x, tile_rows)

    def body(out, start, group, mask):
        xt = jax.lax.dynamic_slice_in_dim(xp, start, tile_rows, 0)
        wg = jax.lax.dynamic_index_in_dim(w, group, 0, keepdims=False)
        yt = jnp.dot(xt, wg, preferred_element_type=jnp.float32)
        yt = jnp.where(mask[:, None], yt, 0).astype(out.dtype)
        # A row belongs to one group, so at most one visit writes non-zeros into it: adding is exact.
        return jax.lax.dynamic_update_slice_in_dim(out, jax.lax.dynamic_slice_in_dim(out, start, tile_rows, 0) + yt,
                                                   start, 0)

    out = _tile_loop(xp, group_sizes, tile_rows, body, jnp.zeros((xp.shape[0], n), x.dtype), w)
    return out[:m]


def _tgmm_impl(x: Array, dy: Array, group_sizes: Array, num_groups: int, tile_rows: int) -> Array:
    """dw[g] = x_g^T @ dy_g: [M, K], [M, N] -> [G, K, N] float32."""
    m, k = x.shape
    n = dy.shape[1]
    tile_rows = min(tile_rows, max(8, -(-m // 8) * 8))
    xp, dyp = _pad_rows(x, tile_rows), _pad_rows(dy, tile_rows)

    def body(dw, start, group, mask):
        xt = jax.lax.dynamic_slice_in_dim(xp, start, tile_rows, 0)
        dyt = jnp.where(mask[:, None], jax.lax.dynamic_slice_in_dim(dyp, start, tile_rows, 0), 0)
        part = jnp.dot(xt.T, dyt, preferred_element_type=jnp.float32)
        current = jax.lax.dynamic_index_in_dim(dw, group, 0, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(dw, current + part[None], group, 0)

    return _tile_loop(xp, group_sizes, tile_rows, body, jnp.zeros((num_groups, k, n), jnp.float32), dyp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled_gmm(x, w, group_sizes, tile_rows):
    return _gmm_impl(x, w, group_sizes, tile_rows)


def _tiled_gmm_fwd(x, w, group_sizes, tile_rows):
    return _gmm_impl(x, w, group_sizes, tile_rows), (x, w, group_sizes)


def _tiled_gmm_bwd(tile_rows, residuals, dy):
    x, w, group_sizes = residuals
    dx = _gmm_impl(dy.astype(x.dtype), jnp.swapaxes(w, 1, 2), group_sizes, tile_rows)
    dw = _tgmm_impl(x, dy, group_sizes, w.shape[0], tile_rows).astype(w.dtype)
    return dx, dw, np.zeros(group_sizes.shape, jax.dtypes.float0)


_tiled_gmm.defvjp(_tiled_gmm_fwd, _tiled_gmm_bwd)


# ------------------------------------------------------------------------------------------------ routing


def route(x: Array, router: Array, top_k: int, norm_topk_prob: bool) -> tuple[Array, Array, Array]:
    """x [..., H], router [H, E] -> (weights [..., k] float32, experts [..., k] int32, logits [..., E] float32).

    transformers' Qwen3MoeTopKRouter: softmax in float32, top-k of the probabilities (ties: the lower expert),
    renormalized over the k when norm_topk_prob. The logits are computed in float32 (the choice of experts
    is a discrete function of them; the trainer and the sampler make it with the same arithmetic)."""
    logits = jnp.matmul(x, router.astype(x.dtype), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), logits


def router_statistics(logits: Array, experts: Array, real: Array) -> dict[str, Array]:
    """The router's auxiliary losses over the real tokens (module docstring). logits [N, E] f32, experts
    [N, k], real [N] bool -> {"load_balance", "z_loss", "max_load"} float32 scalars."""
    e_n = logits.shape[-1]
    k = experts.shape[-1]
    m = real.astype(jnp.float32)
    n_real = jnp.maximum(jnp.sum(m), 1.0)
    probs = jax.nn.softmax(logits, axis=-1)
    p_mean = jnp.sum(probs * m[:, None], axis=0) / n_real
    chosen = jnp.sum(jax.nn.one_hot(experts, e_n, dtype=jnp.float32), axis=1)  # [N, E]: 1 per chosen expert
    f = jnp.sum(chosen * m[:, None], axis=0) / (n_real * k)
    z = jax.nn.logsumexp(logits, axis=-1)
    return {"load_balance": e_n * jnp.sum(jax.lax.stop_gradient(f) * p_mean),
            "z_loss": jnp.sum(z * z * m) / n_real,
            "max_load": jax.lax.stop_gradient(e_n * jnp.max(f))}


# ---------------------------------------------------------------------------------------- local experts


def _dropout(x: Array, rate: float, key: Array | None) -> Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def local_experts(x: Array, experts: Array, weights: Array, real: Array, w: dict[str, Array], first_expert: Array,
                  *, matmul: str, dtype: Any, lora_scale: float = 0.0, lora_dropout: float = 0.0,
                  dropout_key: Array | None = None, tile_rows: int = TILE_ROWS) -> Array:
    """The experts [first_expert, first_expert + G) of one device applied to the assignments routed to them.

    x [N, H]; experts / weights [N, k]; real [N] bool (pads take no row); w: "gate" / "up" [G, H, I], "down"
    [G, I, H] and, with LoRA, "<name>_a" / "<name>_b" per-expert adapters ([G, in, r], [G, r, out]).
    Returns [N, H]: sum over each token's choices that are local of weight * SwiGLU_e(x), in `dtype`
    (a partial sum when I is split over tensor-parallel devices).
    """
    n, k = experts.shape
    g_n = w["gate"].shape[0]
    local = experts.reshape(-1) - first_expert
    mine = (local >= 0) & (local < g_n) & jnp.repeat(real, k)
    key = jnp.where(mine, local, g_n)
    order = jnp.argsort(key, stable=True)  # rows of each local expert contiguous; others at the end
    group_sizes = jnp.bincount(key, length=g_n + 1)[:g_n].astype(jnp.int32)
    rows = jnp.take(x.astype(dtype), order // k, axis=0)  # [N*k, H]

    def project(h, name, key_index):
        out = grouped_matmul(h, w[name].astype(dtype), group_sizes, matmul, tile_rows)
        if f"{name}_a" in w:
            k_drop = None if dropout_key is None else jax.random.fold_in(dropout_key, key_index)
            z = grouped_matmul(_dropout(h, lora_dropout, k_drop), w[f"{name}_a"].astype(dtype), group_sizes, matmul,
                               tile_rows)
            out = out + (lora_scale * grouped_matmul(z, w[f"{name}_b"].astype(dtype), group_sizes, matmul,
                                                     tile_rows)).astype(dtype)
        return out

    hidden = jax.nn.silu(project(rows, "gate", 0)) * project(rows, "up", 1)
    out = project(hidden, "down", 2)  # [N*k, H]; rows of other devices' experts are 0
    weight = jnp.where(mine, weights.reshape(-1), 0.0)[order]
    # Each sorted row added straight into its token's float32 sum: no [N*k, H] float32 copy is made.
    combined = jax.ops.segment_sum(out.astype(jnp.float32) * weight[:, None], order // k, num_segments=n)
    return combined.astype(dtype)


def over_token_chunks(fn, chunk: int, *tokens: Array) -> Array:
    """fn(*token_arrays, chunk_index) -> [n, ...] applied to consecutive chunks of `chunk` tokens of arrays
    [n, ...] (the last chunk padded with zeros: pads must be marked not real by the caller's arrays), one
    `lax.scan` step per chunk with the step rematerialized, so that only one chunk's buffers are alive in the
    forward and in the backward. chunk <= 0 or >= n: one call."""
    n = tokens[0].shape[0]
    if chunk <= 0 or n <= chunk:
        return fn(*tokens, jnp.zeros((), jnp.int32))
    count = -(-n // chunk)
    pad = count * chunk - n
    split = [jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)).reshape(count, chunk, *v.shape[1:]) for v in tokens]

    def step(_, xs):
        return None, fn(*xs)

    _, out = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), None,
                          (*split, jnp.arange(count, dtype=jnp.int32)))
    return out.reshape(count * chunk, *out.shape[2:])[:n]


# ------------------------------------------------------------------------------------ expert parallelism


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def moe_mlp(x: Array, experts: Array, weights: Array, real: Array, w: dict[str, Array], axes: dict[str, tuple],
            *, matmul: str, dtype: Any, mesh=None, rules=sharding_lib.DEFAULT_RULES, lora_scale: float = 0.0,
            lora_dropout: float = 0.0, dropout_key: Array | None = None, chunk_tokens: int = 0) -> Array:
    """The experts' output for tokens x [B, T, H] routed to experts / weights [B, T, k] (real [B, T] bool).

    w: the layer's expert weights (see `local_experts`), axes: their logical axis names. With `mesh` the
    computation is expert-parallel (module docstring) in a `shard_map` over every mesh axis; without, all
    experts are local. Each device's tokens go through in chunks of `chunk_tokens` (`over_token_chunks`; 0:
    all at once). Returns [B, T, H] in `dtype`.
    """
    b, t, h = x.shape
    k = experts.shape[-1]
    impl = resolve_matmul(matmul, mesh)
    if mesh is None:
        def run(xs, es, ws, rs, index):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
            return local_experts(xs, es, ws, rs, w, jnp.zeros((), jnp.int32), matmul=impl, dtype=dtype,
                                 lora_scale=lora_scale, lora_dropout=lora_dropout, dropout_key=key)

        out = over_token_chunks(run, chunk_tokens, x.reshape(b * t, h), experts.reshape(b * t, k),
                                weights.reshape(b * t, k), real.reshape(b * t))
        return out.reshape(b, t, h)

    x_spec = sharding_lib.logical_to_pspec(("batch", "length", "act_embed"), rules, mesh, x.shape)
    tok_spec = PartitionSpec(*x_spec[:2])
    w_specs = {name: sharding_lib.logical_to_pspec(axes[name], rules, mesh, w[name].shape) for name in w}
    batch_axes = _axes(x_spec[0]) + _axes(x_spec[1])
    expert_axes = _axes(w_specs["gate"][0])
    gather_axes = tuple(a for a in expert_axes if a in batch_axes)  # tokens split over them: gather the group
    sum_axes = tuple(a for a in expert_axes if a not in batch_axes)  # tokens replicated over them: plain sum
    mlp_axes = _axes(w_specs["gate"][2])  # I split over them (tensor parallel): partial sums
    data_axes = tuple(a for a in mesh.axis_names if a not in mlp_axes)  # devices with different dropout masks
    constrain = lambda v, spec: jax.lax.with_sharding_constraint(v, NamedSharding(mesh, spec))  # noqa: E731
    x = constrain(x, x_spec)
    experts, weights, real = (constrain(v, PartitionSpec(*x_spec[:2], *([None] * (v.ndim - 2))))
                              for v in (experts, weights, real))
    # The FSDP-sharded dimensions of each weight, gathered inside: H ("embed") and an adapter's rank
    # ("lora_rank"); (array axis, mesh axes) pairs.
    gathered = {name: [(d, _axes(w_specs[name][d])) for d, logical in enumerate(axes[name])
                       if logical in ("embed", "lora_rank") and _axes(w_specs[name][d])] for name in w}
    key = jnp.zeros((2,), jnp.uint32) if dropout_key is None else jax.random.key_data(dropout_key)

    def body(x, experts, weights, real, w, key):
        w = dict(w)
        for name in w:
            for dim, mesh_axes in gathered[name]:
                w[name] = jax.lax.all_gather(w[name], mesh_axes, axis=dim, tiled=True)
        bl, tl = x.shape[:2]
        flat = lambda v: v.reshape(bl * tl, *v.shape[2:])  # noqa: E731
        g_n = w["gate"].shape[0]
        first = (jax.lax.axis_index(expert_axes) * g_n).astype(jnp.int32) if expert_axes else jnp.zeros((),
                                                                                                     jnp.int32)
        k_drop = None
        if dropout_key is not None:
            k_drop = jax.random.wrap_key_data(key)
            for a in data_axes:
                k_drop = jax.random.fold_in(k_drop, jax.lax.axis_index(a))

        def run(xs, es, ws, rs, index):
            # Every device of an expert group steps through its chunks in lockstep (same local token count), so
            # the gathers below always pair up chunk i of each device.
            if gather_axes:
                xs, es, ws, rs = (jax.lax.all_gather(v, gather_axes, axis=0, tiled=True) for v in (xs, es, ws, rs))
            chunk_key = None if k_drop is None else jax.random.fold_in(k_drop, index)
            out = local_experts(xs, es, ws, rs, w, first, matmul=impl, dtype=dtype, lora_scale=lora_scale,
                                lora_dropout=lora_dropout, dropout_key=chunk_key)
            if gather_axes:
                out = jax.lax.psum_scatter(out, gather_axes, scatter_dimension=0, tiled=True)
            if sum_axes or mlp_axes:
                out = jax.lax.psum(out, sum_axes + mlp_axes)
            return out

        out = over_token_chunks(run, chunk_tokens, flat(x), flat(experts), flat(weights), flat(real))
        return out.reshape(bl, tl, -1)

    tok3 = PartitionSpec(*x_spec[:2], None)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(x_spec, tok3, tok3, tok_spec, w_specs, PartitionSpec()),
                       out_specs=x_spec)
    return fn(x, experts, weights, real, w, key)


# ------------------------------------------------------------------------------------------------ module


class MoEBlock(nnx.Module):
    """Qwen3MoeSparseMoeBlock: router [embed, E] and E SwiGLU experts, gate/up [E, embed, moe_mlp], down
    [E, moe_mlp, embed] (logical axes "experts", "embed", "moe_mlp"), and per-expert LoRA adapters when the
    config's `lora` targets the experts."""

    def __init__(self, config, rngs: nnx.Rngs):
        from mgrpo_jax.models import lora as lora_lib
        from mgrpo_jax.models.transformer import _param

        c, pd = config, config.param_dtype
        self.config = config
        e, h, i = c.num_experts, c.hidden_size, c.moe_intermediate_size
        self.router_kernel = _param(rngs, (h, e), ("embed", None), pd)
        self.gate_kernel = _param(rngs, (e, h, i), EXPERT_AXES["gate"], pd)
        self.up_kernel = _param(rngs, (e, h, i), EXPERT_AXES["up"], pd)
        self.down_kernel = _param(rngs, (e, i, h), EXPERT_AXES["down"], pd)
        for name, (d_in, d_out) in (("gate", (h, i)), ("up", (h, i)), ("down", (i, h))):
            if lora_lib.targets(c.lora, f"experts.{name}_proj"):
                setattr(self, f"{name}_lora", lora_lib.ExpertLoRA(e, d_in, d_out, EXPERT_AXES[name], c.lora, rngs))

    def adapters(self) -> dict[str, Any]:
        return {name: getattr(self, f"{name}_lora") for name in ("gate", "up", "down")
                if hasattr(self, f"{name}_lora")}

    def __call__(self, x: Array, segment_ids: Array, dropout_key: Array | None = None
                 ) -> tuple[Array, dict[str, Array]]:
        """x [B, T, H] -> ([B, T, H], the router's statistics for this layer)."""
        c = self.config
        weights, experts, logits = route(x, self.router_kernel[...], c.num_experts_per_tok, c.norm_topk_prob)
        real = segment_ids != 0
        w = {"gate": self.gate_kernel[...], "up": self.up_kernel[...], "down": self.down_kernel[...]}
        axes = dict(EXPERT_AXES)
        scale, rate = 0.0, 0.0
        for name, adapter in self.adapters().items():
            w[f"{name}_a"], w[f"{name}_b"] = adapter.a[...], adapter.b[...]
            axes[f"{name}_a"], axes[f"{name}_b"] = adapter.axes()
            scale, rate = adapter.scale, adapter.dropout
        out = moe_mlp(x, experts, weights, real, w, axes, matmul=c.moe_matmul, dtype=c.dtype,
                      mesh=sharding_lib.current_mesh(), lora_scale=scale, lora_dropout=rate,
                      dropout_key=dropout_key, chunk_tokens=c.moe_chunk_tokens)
        stats = router_statistics(logits.reshape(-1, logits.shape[-1]), experts.reshape(-1, experts.shape[-1]),
                                  real.reshape(-1))
        return out, stats


EXPERT_AXES = {"gate": ("experts", "embed", "moe_mlp"), "up": ("experts", "embed", "moe_mlp"),
               "down": ("experts", "moe_mlp", "embed")}


def num_moe_params(config) -> tuple[int, int]:
    """(total, active per token) parameter counts of a config's decoder layers' MLPs + routers, for reports."""
    kinds = layer_kinds(config.num_layers, config.num_experts, config.decoder_sparse_step, config.mlp_only_layers)
    h = config.hidden_size
    total = active = 0
    for kind in kinds:
        if kind == "moe":
            per_expert = 3 * h * config.moe_intermediate_size
            total += config.num_experts * per_expert + h * config.num_experts
            active += config.num_experts_per_tok * per_expert + h * config.num_experts
        else:
            total += 3 * h * config.intermediate_size
            active += 3 * h * config.intermediate_size
    return total, active


__all__ = ["AUX_METRICS", "EXPERT_AXES", "LAYER_KINDS", "MOE_MATMULS", "MoEBlock", "grouped_matmul", "layer_kinds",
           "layer_runs", "local_experts", "moe_mlp", "num_moe_params", "over_token_chunks", "resolve_matmul", "route",
           "router_statistics"]
