"""Low-rank adapters (LoRA) on the decoder's projections, per agent.

    y = x @ W + (alpha / r) * dropout(x) @ A @ B          A [in, r], B [r, out]; W frozen

`ModelConfig.lora` (a `LoraConfig`, from `agents.<role>.lora`) puts an adapter on every projection it targets:
attention `q_proj` / `k_proj` / `v_proj` / `o_proj`, the dense MLP's `gate_proj` / `up_proj` / `down_proj`,
and the experts' `experts.gate_proj` / `experts.up_proj` / `experts.down_proj` (one adapter per expert, A
[E, in, r], B [E, r, out], run as grouped matmuls beside the experts'). Adapters are `nnx.LoRAParam`s (a kind
of `nnx.Param`): the trainer differentiates and optimizes only those (`TRAINABLE`), so the gradient and the
optimizer state hold adapters only, and the base weights stay bit-identical; store the base in bf16 with
`model.param_dtype="bfloat16"` (adapters are always float32). A starts uniform in +-1/sqrt(in) (PEFT's
default, kaiming-uniform with a = sqrt(5)) and B at zero, so a fresh adapter leaves the model unchanged.
Adapters are drawn from their own random stream (`nnx.Rngs(lora=...)`), so adding them does not change the
base weights a seed gives.

The sampler runs base + adapters (the model applies them; no second copy of the weights). `merge` folds
them into the base (W + scale A B) for `launch/export_hf.py --format merged`; `save_peft` writes them in
PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`), which `peft.PeftModel.from_pretrained`
loads onto the transformers model of the base checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
EXPERT_TARGETS = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS + EXPERT_TARGETS
# What the trainer differentiates and optimizes when a model has adapters (an nnx filter).
TRAINABLE = nnx.LoRAParam


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r (> 0), alpha (the update is scaled by alpha / r), dropout on the adapters' inputs during the
    policy update (never while sampling or scoring), and the projections to adapt (`TARGETS`)."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, (int, np.integer)) or self.rank <= 0:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"lora.targets {list(self.targets)}: unknown or empty {unknown}; choose among "
                             f"{list(TARGETS)}")

    @property
    def scale(self) -> float:
        return float(self.alpha) / int(self.rank)


def from_config(values: Any) -> LoraConfig | None:
    """`agents.<role>.lora` (a mapping; rank 0 or no mapping = no adapters) -> LoraConfig or None."""
    if values is None:
        return None
    if isinstance(values, LoraConfig):
        return values
    values = dict(values)
    if int(values.get("rank", 0)) == 0:
        return None
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"lora: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    return LoraConfig(**values)


def targets(config: LoraConfig | None, name: str) -> bool:
    """Whether `config` puts an adapter on projection `name` (one of `TARGETS`)."""
    return config is not None and name in config.targets


def _key(rngs: nnx.Rngs) -> Array:
    return rngs["lora"]() if "lora" in rngs else rngs.params()


def _a_init(key: Array, shape: tuple[int, ...], fan_in: int) -> Array:
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _dropout(x: Array, rate: float, key: Array | None) -> Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class LoRA(nnx.Module):
    """One projection's adapter. The base kernel is [*in_shape, *out_shape] (e.g. q [embed, heads, head_dim],
    o [heads, head_dim, embed]); a [*in_shape, r], b [r, *out_shape], float32, logical axes those of the kernel
    plus "lora_rank"."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], in_axes: tuple, out_axes: tuple,
                 config: LoraConfig, rngs: nnx.Rngs):
        r = config.rank
        self.scale, self.dropout = config.scale, config.dropout
        self.a = nnx.LoRAParam(_a_init(_key(rngs), (*in_shape, r), int(np.prod(in_shape))),
                               out_sharding=(*in_axes, "lora_rank"), eager_sharding=False)
        self.b = nnx.LoRAParam(jnp.zeros((r, *out_shape), jnp.float32), out_sharding=("lora_rank", *out_axes),
                               eager_sharding=False)

    def __call__(self, x: Array, dtype: Any, dropout_key: Array | None = None) -> Array:
        """x [..., *in_shape] -> scale * dropout(x) @ a @ b, [..., *out_shape] in `dtype`."""
        n_in = self.a.ndim - 1
        z = jnp.tensordot(_dropout(x, self.dropout, dropout_key), self.a[...].astype(dtype), axes=n_in)
        return (self.scale * jnp.tensordot(z, self.b[...].astype(dtype), axes=1)).astype(dtype)

    def delta(self) -> Array:
        """scale * a @ b: the adapter as an update of the base kernel, [*in_shape, *out_shape] float32."""
        return self.scale * jnp.tensordot(self.a[...], self.b[...], axes=1)


class ExpertLoRA(nnx.Module):
    """Per-expert adapters of one expert projection [E, in, out]: a [E, in, r], b [E, r, out] (float32)."""

    def __init__(self, num_experts: int, d_in: int, d_out: int, kernel_axes: tuple, config: LoraConfig,
                 rngs: nnx.Rngs):
        r = config.rank
        experts, in_axis, out_axis = kernel_axes
        self.scale, self.dropout = config.scale, config.dropout
        self.a = nnx.LoRAParam(_a_init(_key(rngs), (num_experts, d_in, r), d_in),
                               out_sharding=(experts, in_axis, "lora_rank"), eager_sharding=False)
        self.b = nnx.LoRAParam(jnp.zeros((num_experts, r, d_out), jnp.float32),
                               out_sharding=(experts, "lora_rank", out_axis), eager_sharding=False)

    def axes(self) -> tuple[tuple, tuple]:
        """The logical axes of one layer's a and b ([E, in, r], [E, r, out]: without the "layers" axis that
        stacking prepends to the metadata)."""
        return tuple(self.a.get_metadata()["out_sharding"])[-3:], tuple(self.b.get_metadata()["out_sharding"])[-3:]

    def delta(self) -> Array:
        return self.scale * jnp.einsum("eir,ero->eio", self.a[...], self.b[...])


def apply(module: nnx.Module, name: str, x: Array, dtype: Any, dropout_key: Array | None, index: int) -> Array | None:
    """The adapter `<name>_lora` of `module` applied to x, or None when the module has none."""
    adapter = getattr(module, f"{name}_lora", None)
    if adapter is None:
        return None
    key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
    return adapter(x, dtype, key)


# ---------------------------------------------------------------------------------------- state surgery


def has_adapters(state: Any) -> bool:
    return any(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
        x, nnx.Variable)))


def split(state: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(adapters, everything else) of a model state."""
    return nnx.split_state(state, TRAINABLE, ...)


def _adapter_paths(flat: dict) -> dict[tuple, tuple]:
    """{path of an adapter module: path of the kernel it adapts}: `<x>_lora` -> `<x>_kernel`."""
    out = {}
    for path in flat:
        if len(path) >= 2 and path[-1] == "a" and str(path[-2]).endswith("_lora"):
            module = path[:-1]
            out[module] = path[:-2] + (str(path[-2])[:-len("_lora")] + "_kernel",)
    return out


def merge(state: nnx.State, config) -> tuple[nnx.State, Any]:
    """Fold every adapter into its kernel: W + scale * a @ b (in float32, stored in W's dtype), per layer (and
    per expert) of the stacked kernels. -> (the state without adapters, config with lora=None), which
    `hf.save_hf` writes as a plain checkpoint."""
    if config.lora is None:
        return state, config
    flat = dict(nnx.to_flat_state(state))
    scale = config.lora.scale
    merged = {}
    for module, kernel_path in _adapter_paths(flat).items():
        a = flat[module + ("a",)].get_value()
        b = flat[module + ("b",)].get_value()
        w = flat[kernel_path].get_value()
        expert = isinstance(flat[module + ("a",)], nnx.LoRAParam) and str(module[-1]) in (
            "gate_lora", "up_lora", "down_lora") and w.ndim == 4  # [L, E, in, out]; a dense MLP's is [L, in, out]
        merged[kernel_path] = _merged(w, a, b, scale, expert)
    out = []
    for path, var in flat.items():
        if isinstance(var, nnx.LoRAParam):
            continue
        out.append((path, var.replace(merged[path]) if path in merged else var))
    return nnx.from_flat_state(out), config.replace(lora=None)


def _merged(w: Array, a: Array, b: Array, scale: float, expert: bool) -> Array:
    """w [L, ...] stacked (+ experts), a [L, (E,) *in, r], b [L, (E,) r, *out]."""
    if expert:  # [L, E, in, out]
        delta = jnp.einsum("leir,lero->leio", a, b)
    else:
        delta = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


# ---------------------------------------------------------------------------------------------- PEFT


PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
# Our adapter module name -> (the transformers module it adapts, in the layer), for the dense projections.
_PEFT_MODULES = {("attn", "q_lora"): "self_attn.q_proj", ("attn", "k_lora"): "self_attn.k_proj",
                 ("attn", "v_lora"): "self_attn.v_proj", ("attn", "o_lora"): "self_attn.o_proj",
                 ("mlp", "gate_lora"): "mlp.gate_proj", ("mlp", "up_lora"): "mlp.up_proj",
                 ("mlp", "down_lora"): "mlp.down_proj"}


def peft_tensors(state: nnx.State, config) -> dict[str, np.ndarray]:
    """The adapters as PEFT tensors: `base_model.model.model.layers.{i}.<module>.lora_A.weight` [r, in] and
    `lora_B.weight` [out, r] (PyTorch Linear layouts, in = prod(in_shape), out = prod(out_shape)).

    Raises ValueError for expert adapters: transformers 5 keeps a Qwen3-MoE layer's experts as fused
    [E, 2I, H] / [E, H, I] parameters rather than per-expert Linear modules, which PEFT's `target_modules`
    cannot address; export such a run merged (`launch/export_hf.py --format merged`)."""
    from mgrpo_jax.models.moe import layer_runs

    if config.lora is None:
        raise ValueError("this model has no LoRA adapters (agents.<role>.lora.rank is 0); export it merged")
    if any(t in config.lora.targets for t in EXPERT_TARGETS) and "moe" in config.layer_kinds:
        raise ValueError("PEFT export of expert adapters is not supported (transformers keeps a Qwen3-MoE "
                         "layer's experts as fused parameters, which PEFT's target_modules do not address); "
                         "export the merged model with --format merged")
    flat = dict(nnx.to_flat_state(state))
    runs = layer_runs(config.layer_kinds)
    out: dict[str, np.ndarray] = {}
    for r, (_, start, stop) in enumerate(runs):
        prefix = ("layers",) if len(runs) == 1 else ("layers", r)
        for (parent, name), hf_module in _PEFT_MODULES.items():
            path = prefix + (parent, name)
            if path + ("a",) not in flat:
                continue
            a = np.asarray(jax.device_get(flat[path + ("a",)].get_value()), np.float32)
            b = np.asarray(jax.device_get(flat[path + ("b",)].get_value()), np.float32)
            for i in range(stop - start):
                rank = a.shape[-1]
                name_prefix = f"base_model.model.model.layers.{start + i}.{hf_module}"
                out[f"{name_prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
                out[f"{name_prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    return out


def save_peft(state: nnx.State, config, path: str, *, base_model: str = "") -> None:
    """Write the adapters of `state` to `path` in PEFT's layout (module docstring)."""
    from safetensors.numpy import save_file

    tensors = peft_tensors(state, config)
    targets_used = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in tensors})
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": int(config.lora.rank), "lora_alpha": float(config.lora.alpha), "lora_dropout": float(config.lora.dropout),
        "target_modules": targets_used, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    with open(os.path.join(path, PEFT_CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(adapter_config, fh, indent=2)
