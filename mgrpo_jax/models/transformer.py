"""A decoder-only transformer in Flax NNX: dense Llama 3.x, Qwen2/Qwen2.5 and Qwen3, and Qwen3-MoE.

One module tree serves three paths that share every layer:

- `Transformer.__call__`: the training / scoring forward over a whole padded (or packed) batch, no cache.
- `Transformer.extend`: the same forward over a block of new tokens that writes their keys and values into a
  `KVCache` at per-row slots and attends the cache (the sampler's prefill and decode);
  `Transformer.prefill` / `decode_step` are its aligned special cases (every row at the same slots).

The layers are one stacked `DecoderLayer` (every parameter has a leading layer axis, logical name "layers")
applied with `jax.lax.scan`, so the program, and its compile time, do not grow with
depth; in training the scanned body is wrapped in `jax.checkpoint` with the named policy `ModelConfig.remat`
(LESSONS.md, item 16). The KV cache is stacked the same way, [layers, B, S, kv_heads, head_dim]. A Qwen3-MoE
model (`mgrpo_jax.models.moe`) whose layers mix sparse (MoE) and dense MLPs (`mlp_only_layers`,
`decoder_sparse_step`) stacks each run of equal consecutive layers and scans the runs one after the other.
Projections carry LoRA adapters when `ModelConfig.lora` says so (`mgrpo_jax.models.lora`).

Attention takes segment ids (the `attention_mask` argument: 0 = pad, equal positive ids = one sequence, so
packed rows with several sequences work) and slot indices (causal order), and runs `ModelConfig.attention`'s
implementation of `mgrpo_jax.models.attention.attention` (dense, chunked, cudnn, splash, auto); the model never
builds a [B, T, S] mask (LESSONS.md, item 15): query t attends key s iff
q_seg[t] != 0 and q_seg[t] == kv_seg[s] and slot[s] <= slot[t]. A pad token never attends and is never attended
to, whatever side the padding is on. RoPE takes explicit `positions`, so left-padded rows use positions that
start at 0 on their first real token, as transformers does with `position_ids`.

Parameters are stored in the layout the einsums want (`[embed, heads, head_dim]` kernels, not the flattened
PyTorch `[out, in]`), each `nnx.Param` tagged with logical axis names in its `out_sharding` metadata
(`eager_sharding=False`: a model is built without any mesh; `mgrpo_jax.sharding` maps the names to a mesh).
Activations are constrained by logical names too (`sharding.constrain`: batch over the data axis), which is a
no-op unless the computation is traced under a mesh (`sharding.jit_sharded_step` sets one).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mgrpo_jax.models import attention as attention_lib
from mgrpo_jax.models import lora as lora_lib
from mgrpo_jax.models import moe as moe_lib
from mgrpo_jax.sharding import constrain, current_mesh

Array = jax.Array

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_moe")
_SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

# Logical axis names used by the parameters ("layers" is the stacked layer axis), for `mgrpo_jax.sharding`
# rules; activations use "batch", "length", "act_embed" and the head / mlp names.
LOGICAL_AXES = ("layers", "vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "norm", "experts", "moe_mlp",
                "lora_rank")

# `ModelConfig.remat`: what the scanned layer keeps for the backward pass (the rest is recomputed).
#   none: no remat (keeps every intermediate); full: keeps only the layer's input;
#   dots: keeps every matmul output (jax.checkpoint_policies.dots_saveable; includes attention scores);
#   dots_no_batch: keeps the matmuls without batch dimensions, i.e. the projections, not the scores;
#   save_attn_out: keeps only the attention output (named ATTENTION_OUT): recomputing what follows attention
#     (output projection, MLP) needs no attention forward, though attention's own backward still recomputes
#     its internals (scores, or the blockwise statistics).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out")
ATTENTION_OUT = "attn_out"
# `ModelConfig.attention`: the attention implementation (`mgrpo_jax.models.attention`: dense, chunked,
# cudnn, splash, auto).
ATTENTION_IMPLEMENTATIONS = attention_lib.IMPLEMENTATIONS


def remat_policy(value: Any) -> str:
    """A `remat` setting -> its policy name: True -> "full", False/None -> "none", names are checked."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return "full" if value else "none"
    if value not in REMAT_POLICIES:
        raise ValueError(f"ModelConfig.remat={value!r} is not a remat policy; choose one of "
                         f"{list(REMAT_POLICIES)} (True means 'full', False 'none')")
    return str(value)


def _checkpoint_policy(name: str):
    """Policy name -> the `jax.checkpoint` policy of the scanned layer body (None: no checkpoint)."""
    policies = jax.checkpoint_policies
    return {
        "none": None,
        "full": policies.nothing_saveable,
        "dots": policies.dots_saveable,
        "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
        "save_attn_out": policies.save_only_these_names(ATTENTION_OUT),
    }[name]


# ----------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x RoPE frequency scaling (transformers' `rope_type="llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of one decoder. Hashable, so it can be a static jit argument.

    `architecture` is the Hugging Face `model_type` ("llama", "qwen2", "qwen3"); `attention_bias` adds biases to
    the q/k/v projections (Qwen2 always, Llama/Qwen3 when their config says so) and `attention_out_bias` to the
    output projection (Llama/Qwen3 `attention_bias=True`); `qk_norm` is Qwen3's per-head RMSNorm of q and k.
    `param_dtype` is the storage dtype of the parameters, `dtype` the compute dtype of activations; logits are
    always float32 and RMSNorm always computes in float32. `remat` names the rematerialization policy of the
    scanned layers (`REMAT_POLICIES`; booleans are accepted: True = "full", False = "none"); `attention` the
    attention implementation (`ATTENTION_IMPLEMENTATIONS`). `scan_unroll` is the layers per iteration of the
    layer scan (`jax.lax.scan(unroll=...)`): 1 keeps the program independent of depth; `num_layers` unrolls it
    (XLA's cost analysis counts a loop body once, so FLOP counts need the unrolled program).

    Qwen3-MoE (`architecture="qwen3_moe"`, `mgrpo_jax.models.moe`): `num_experts` experts of width
    `moe_intermediate_size`, `num_experts_per_tok` (k) per token, top-k weights renormalized when
    `norm_topk_prob`; layer i is dense (width `intermediate_size`) when i is in `mlp_only_layers` or
    (i + 1) % `decoder_sparse_step` != 0. `moe_matmul` picks the grouped matmul (`moe.MOE_MATMULS`);
    `router_aux_loss_coef` / `router_z_loss_coef` weight the router's load-balancing and z losses in training
    (0: only reported). `moe_chunk_tokens`: each device runs its tokens through a MoE layer in chunks of this
    many (scanned, each chunk rematerialized), so the dispatch buffers scale with the chunk, not the micro-batch
    (0: one chunk; a token's output does not depend on the chunking). `lora` (a `lora.LoraConfig`, or None)
    adds adapters to the projections it targets.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    qk_norm: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    max_position_embeddings: int = 8192
    architecture: str = "llama"
    attention: str = "dense"
    scan_unroll: int = 1
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    moe_matmul: str = "auto"
    moe_chunk_tokens: int = 2048
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    lora: lora_lib.LoraConfig | None = None

    def __post_init__(self):
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "max_position_embeddings", "scan_unroll"):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"ModelConfig.{key} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"ModelConfig.architecture={self.architecture!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        for key in ("param_dtype", "dtype"):
            try:
                name = jnp.dtype(getattr(self, key)).name
            except TypeError as e:
                raise ValueError(f"ModelConfig.{key}={getattr(self, key)!r} is not a dtype; use one of "
                                 f"{', '.join(_SUPPORTED_DTYPES)}") from e
            if name not in _SUPPORTED_DTYPES:
                raise ValueError(f"ModelConfig.{key}={name!r} is not supported; use one of "
                                 f"{', '.join(_SUPPORTED_DTYPES)}")
            object.__setattr__(self, key, name)  # normalize jnp.bfloat16 etc. to a string: hashable, printable
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "remat", remat_policy(self.remat))
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"ModelConfig.attention={self.attention!r} is not an attention implementation; "
                             f"choose one of {list(ATTENTION_IMPLEMENTATIONS)}")
        self._check_moe()
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", lora_lib.from_config(self.lora))

    def _check_moe(self) -> None:
        object.__setattr__(self, "mlp_only_layers", tuple(sorted(int(i) for i in self.mlp_only_layers)))
        if self.moe_chunk_tokens < 0:
            raise ValueError(f"ModelConfig.moe_chunk_tokens must be >= 0 (0: no chunking), got "
                             f"{self.moe_chunk_tokens}")
        if self.moe_matmul not in moe_lib.MOE_MATMULS:
            raise ValueError(f"ModelConfig.moe_matmul={self.moe_matmul!r} is not one of {list(moe_lib.MOE_MATMULS)}")
        if self.architecture != "qwen3_moe":
            if self.num_experts:
                raise ValueError(f"ModelConfig.num_experts={self.num_experts}: experts need architecture="
                                 f"'qwen3_moe', not {self.architecture!r}")
            return
        if self.num_experts <= 0 or not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"qwen3_moe needs num_experts > 0 and 1 <= num_experts_per_tok <= num_experts, got "
                             f"{self.num_experts} experts, {self.num_experts_per_tok} per token")
        if self.moe_intermediate_size <= 0 or self.decoder_sparse_step <= 0:
            raise ValueError(f"qwen3_moe needs moe_intermediate_size > 0 and decoder_sparse_step > 0, got "
                             f"{self.moe_intermediate_size}, {self.decoder_sparse_step}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"ModelConfig.mlp_only_layers {bad} are not layers of a {self.num_layers}-layer model")
        for key in ("router_aux_loss_coef", "router_z_loss_coef"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"ModelConfig.{key} must be >= 0, got {getattr(self, key)}")

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Every layer's MLP: "moe" (sparse) or "dense"."""
        return moe_lib.layer_kinds(self.num_layers, self.num_experts, self.decoder_sparse_step,
                                   self.mlp_only_layers)

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf_config: Any, *, param_dtype: str = "float32", dtype: str = "float32",
                remat: str | bool = "none", attention: str = "dense") -> "ModelConfig":
        """Build a config from a transformers `PretrainedConfig` (LlamaConfig, Qwen2Config, Qwen3Config or
        Qwen3MoeConfig).

        Raises ValueError for any other architecture or for features this decoder does not implement
        (sliding-window layers, MLP biases, activations other than SiLU, RoPE types other than default/llama3).
        """
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture model_type={model_type!r} "
                             f"({type(hf_config).__name__}); supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
                             "(LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig)")
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{model_type}: hidden_act={act!r} is not supported; only 'silu' (SwiGLU)")
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError(f"{model_type}: mlp_bias=True is not supported")
        layer_types = getattr(hf_config, "layer_types", None) or ()
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"{model_type}: layer_types={sorted(set(layer_types))} is not supported; only "
                             "full attention (set use_sliding_window=False)")
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
        rope_theta = float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{model_type}: partial_rotary_factor={rope['partial_rotary_factor']} is not supported")
        if rope_type == "default":
            rope_scaling = None
        elif rope_type == "llama3":
            rope_scaling = RopeScaling(
                factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
        else:
            raise ValueError(f"{model_type}: rope_type={rope_type!r} is not supported; supported: default, llama3")
        if model_type == "qwen2":
            qkv_bias, out_bias = True, False
        else:
            qkv_bias = out_bias = bool(getattr(hf_config, "attention_bias", False))
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        moe = {}
        if model_type == "qwen3_moe":
            moe = dict(num_experts=int(hf_config.num_experts), num_experts_per_tok=int(hf_config.num_experts_per_tok),
                       moe_intermediate_size=int(hf_config.moe_intermediate_size),
                       norm_topk_prob=bool(hf_config.norm_topk_prob),
                       decoder_sparse_step=int(hf_config.decoder_sparse_step),
                       mlp_only_layers=tuple(int(i) for i in (hf_config.mlp_only_layers or ())))
        return cls(
            vocab_size=int(hf_config.vocab_size), hidden_size=int(hf_config.hidden_size),
            intermediate_size=int(hf_config.intermediate_size), num_layers=int(hf_config.num_hidden_layers),
            num_heads=int(hf_config.num_attention_heads), num_kv_heads=int(kv_heads), head_dim=int(head_dim),
            rope_theta=rope_theta, rope_scaling=rope_scaling, rms_norm_eps=float(hf_config.rms_norm_eps),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=qkv_bias, attention_out_bias=out_bias, qk_norm=model_type in ("qwen3", "qwen3_moe"),
            param_dtype=param_dtype, dtype=dtype, remat=remat,
            max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 8192)),
            architecture=model_type, attention=attention, **moe)


# ------------------------------------------------------------------------------------------- components


def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: str,
           init: str = "normal", std: float = 0.02) -> nnx.Param:
    """A parameter tagged with logical axis names; never eagerly sharded (no mesh is needed to build)."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32, returned in `out_dtype`. scale: [dim]."""

    def __init__(self, dim: int, eps: float, param_dtype: str):
        self.eps = eps
        self.scale = _param(None, (dim,), ("norm",), param_dtype, init="ones")

    def __call__(self, x: Array, out_dtype: Any) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(out_dtype)


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2, with Llama 3 scaling when configured. [head_dim/2] f32.

    Computed in float32 numpy exactly as transformers does (default and `_compute_llama3_parameters`).
    """
    dim = config.head_dim
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))))
    inv_freq = inv_freq.astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq).astype(np.float32)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor
                                                                                    - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_sin_cos(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """positions [B, T] int -> (sin, cos), each [B, T, head_dim/2] float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: Array, sin: Array, cos: Array) -> Array:
    """Rotate x [B, T, heads, head_dim] by the half-split convention of transformers' `rotate_half`.

    With x = [x1, x2] (halves of head_dim): out = [x1 cos - x2 sin, x2 cos + x1 sin], i.e.
    x * [cos, cos] + rotate_half(x) * [sin, sin] with rotate_half(x) = [-x2, x1]. Computed in float32.
    """
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask_from_segments(q_segment_ids: Array, q_slots: Array, kv_segment_ids: Array,
                                 kv_slots: Array) -> Array:
    """Boolean attention mask [B, T, S]: query t may attend key s (what `attention.attention` computes with).

    mask[b,t,s] = (q_seg[b,t] != 0) & (q_seg[b,t] == kv_seg[b,s]) & (kv_slots[b,s] <= q_slots[b,t])

    q_segment_ids [B, T], kv_segment_ids [B, S]: 0 marks a pad, equal positive ids share a sequence (so packed
    rows work too). q_slots [B, T] / kv_slots [B, S] or [S]: the index of each token in the row (cache slot),
    which orders tokens causally regardless of the RoPE positions. For inspection and tests: the model never
    builds it (the dense attention does, internally; the efficient implementations never do).
    """
    kv_slots = jnp.broadcast_to(kv_slots, kv_segment_ids.shape)
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    real = (q_segment_ids != 0)[:, :, None]
    causal = kv_slots[:, None, :] <= q_slots[:, :, None]
    return same & real & causal


@dataclasses.dataclass(frozen=True)
class _CacheView:
    """What one scanned layer needs of the stacked KV cache: the caches [L, B, S, kv_heads, head_dim] (words, see
    `KVCache`), this layer's index, where each new token goes (rows and slots [B, T]; a slot >= S is not
    written), the keys' segment ids [B, S] (after this write) and slots [S], the filled extent (`chunked`
    never visits a tile at or above it), and how attention over the cache runs: the implementation and its tile
    (queries and keys), static."""

    k: Array
    v: Array
    layer: Array
    rows: Array
    write_slots: Array
    segment_ids: Array
    slots: Array
    valid_len: Array
    implementation: str
    block: int


class Attention(nnx.Module):
    """Grouped-query attention with RoPE (and Qwen3 q/k RMSNorm).

    Kernels: q [embed, q_heads, head_dim], k/v [embed, kv_heads, head_dim], o [q_heads, head_dim, embed].
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c, pd = config, config.param_dtype
        self.config = config
        self.q_kernel = _param(rngs, (c.hidden_size, c.num_heads, c.head_dim), ("embed", "q_heads", "head_dim"), pd)
        self.k_kernel = _param(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                               pd)
        self.v_kernel = _param(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                               pd)
        self.o_kernel = _param(rngs, (c.num_heads, c.head_dim, c.hidden_size), ("q_heads", "head_dim", "embed"), pd)
        if c.attention_bias:
            self.q_bias = _param(None, (c.num_heads, c.head_dim), ("q_heads", "head_dim"), pd, init="zeros")
            self.k_bias = _param(None, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), pd, init="zeros")
            self.v_bias = _param(None, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), pd, init="zeros")
        if c.attention_out_bias:
            self.o_bias = _param(None, (c.hidden_size,), ("embed",), pd, init="zeros")
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, pd)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, pd)
        h, n, k, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        for name, in_shape, out_shape, in_axes, out_axes in (
                ("q", (h,), (n, d), ("embed",), ("q_heads", "head_dim")),
                ("k", (h,), (k, d), ("embed",), ("kv_heads", "head_dim")),
                ("v", (h,), (k, d), ("embed",), ("kv_heads", "head_dim")),
                ("o", (n, d), (h,), ("q_heads", "head_dim"), ("embed",))):
            if lora_lib.targets(c.lora, f"{name}_proj"):
                setattr(self, f"{name}_lora", lora_lib.LoRA(in_shape, out_shape, in_axes, out_axes, c.lora, rngs))

    def _project(self, x: Array, kernel: nnx.Param, bias_name: str, heads_axis: str,
                 dropout_key: Array | None = None) -> Array:
        dt = self.config.dtype
        y = jnp.einsum("bth,hnd->btnd", x, kernel[...].astype(dt))
        if self.config.attention_bias:
            y = y + getattr(self, bias_name)[...].astype(dt)
        name = bias_name[0]  # "q", "k" or "v"
        adapter = lora_lib.apply(self, name, x, dt, dropout_key, "qkv".index(name))
        if adapter is not None:
            y = y + adapter
        return constrain(y, ("batch", "length", heads_axis, "head_dim"))

    def __call__(self, x: Array, sin: Array, cos: Array, segment_ids: Array, slots: Array,
                 cache: _CacheView | None = None, *, dropout_key: Array | None = None
                 ) -> tuple[Array, tuple[Array, Array] | None]:
        """x [B, T, embed], sin/cos [B, T, head_dim/2], segment_ids / slots [B, T] of these tokens.

        Without a cache the keys are this block's own. With `cache` the new keys/values are written into this
        layer's cache at their rows' slots (`_CacheView`) and the queries attend the cache's filled slots.
        Returns ([B, T, embed], the updated stacked (k, v) caches or None). `dropout_key`: the LoRA adapters'
        dropout (training only).
        """
        c, dt = self.config, self.config.dtype
        q = self._project(x, self.q_kernel, "q_bias", "q_heads", dropout_key)
        k = self._project(x, self.k_kernel, "k_bias", "kv_heads", dropout_key)
        v = self._project(x, self.v_kernel, "v_bias", "kv_heads", dropout_key)
        if c.qk_norm:
            q, k = self.q_norm(q, dt), self.k_norm(k, dt)
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        if cache is None:
            new_cache = None
            out = attention_lib.attention(q, k, v, segment_ids, segment_ids, slots, slots,
                                          implementation=c.attention, mesh=current_mesh())
        else:
            # Each row's tokens go to their own slots (one scatter into the stacked cache, in place); attention
            # then reads this layer's key tiles straight from the stacked arrays, up to the filled extent only.
            write = lambda words, x: words.at[cache.layer, cache.rows, cache.write_slots].set(  # noqa: E731
                _to_words(x, words.dtype), mode="drop")
            new_cache = (write(cache.k, k), write(cache.v, v))
            out = attention_lib.attention(q, new_cache[0], new_cache[1], segment_ids, cache.segment_ids, slots,
                                          cache.slots, implementation=cache.implementation, block_q=cache.block,
                                          block_kv=cache.block, kv_valid_len=cache.valid_len, kv_layer=cache.layer,
                                          mesh=current_mesh())
        out = checkpoint_name(constrain(out, ("batch", "length", "q_heads", "head_dim")), ATTENTION_OUT)
        y = jnp.einsum("btnd,ndh->bth", out, self.o_kernel[...].astype(dt))
        adapter = lora_lib.apply(self, "o", out, dt, dropout_key, 3)
        if adapter is not None:
            y = y + adapter
        if c.attention_out_bias:
            y = y + self.o_bias[...].astype(dt)
        return y, new_cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up)). gate/up [embed, mlp], down [mlp, embed]."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c, pd = config, config.param_dtype
        self.dtype = c.dtype
        self.gate_kernel = _param(rngs, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), pd)
        self.up_kernel = _param(rngs, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), pd)
        self.down_kernel = _param(rngs, (c.intermediate_size, c.hidden_size), ("mlp", "embed"), pd)
        h, f = c.hidden_size, c.intermediate_size
        for name, d_in, d_out, axes in (("gate", h, f, ("embed", "mlp")), ("up", h, f, ("embed", "mlp")),
                                        ("down", f, h, ("mlp", "embed"))):
            if lora_lib.targets(c.lora, f"{name}_proj"):
                setattr(self, f"{name}_lora", lora_lib.LoRA((d_in,), (d_out,), axes[:1], axes[1:], c.lora, rngs))

    def _project(self, x: Array, name: str, index: int, dropout_key: Array | None) -> Array:
        y = x @ getattr(self, f"{name}_kernel")[...].astype(self.dtype)
        adapter = lora_lib.apply(self, name, x, self.dtype, dropout_key, index)
        return y if adapter is None else y + adapter

    def __call__(self, x: Array, dropout_key: Array | None = None) -> Array:
        gate = self._project(x, "gate", 0, dropout_key)
        up = self._project(x, "up", 1, dropout_key)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return self._project(hidden, "down", 2, dropout_key)


class DecoderLayer(nnx.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h)). `kind` "moe": the MLP is a
    `moe.MoEBlock` (router + experts), "dense": a SwiGLU `MLP`."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, kind: str = "dense"):
        self.dtype = config.dtype
        self.kind = kind
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.param_dtype)
        self.attn = Attention(config, rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.param_dtype)
        self.mlp = moe_lib.MoEBlock(config, rngs) if kind == "moe" else MLP(config, rngs)

    def __call__(self, x: Array, sin: Array, cos: Array, segment_ids: Array, slots: Array,
                 cache: _CacheView | None = None, *, dropout_key: Array | None = None, return_aux: bool = False):
        """x [B, T, embed] -> ([B, T, embed], updated stacked k/v caches or None); see `Attention`. With
        `return_aux` a third value: the router's statistics of a MoE layer (`moe.AUX_METRICS`), {} for dense."""
        attn_key = mlp_key = None
        if dropout_key is not None:
            attn_key, mlp_key = jax.random.fold_in(dropout_key, 0), jax.random.fold_in(dropout_key, 1)
        attn_out, new_cache = self.attn(self.input_norm(x, self.dtype), sin, cos, segment_ids, slots, cache,
                                        dropout_key=attn_key)
        h = x + attn_out
        if self.kind == "moe":
            mlp_out, aux = self.mlp(self.post_attn_norm(h, self.dtype), segment_ids, mlp_key)
        else:
            mlp_out, aux = self.mlp(self.post_attn_norm(h, self.dtype), mlp_key), {}
        out = constrain(h + mlp_out, ("batch", "length", "act_embed"))
        return (out, new_cache, aux) if return_aux else (out, new_cache)


def _stack(values: list[Array]) -> Array:
    """Stack along a new leading axis: on the host when the values are concrete (eager init compiles nothing
    per shape), with jnp under a trace (`abstract_model`, `born_sharded`'s jitted init)."""
    if any(isinstance(v, jax.core.Tracer) for v in values):
        return jnp.stack(values)
    return jnp.asarray(np.stack([np.asarray(v) for v in values]))


def stacked_layers(config: ModelConfig, rngs: nnx.Rngs, kind: str = "dense", count: int | None = None
                   ) -> DecoderLayer:
    """`count` (default `config.num_layers`) DecoderLayers of `kind` as one module whose every parameter has a
    leading layer axis (logical name "layers"). Layers are initialized one after the other from `rngs`, exactly
    as separate modules would be, then stacked, so a seed gives the same weights as it did before layers were
    stacked."""
    layers = [DecoderLayer(config, rngs, kind) for _ in range(config.num_layers if count is None else count)]
    graphdef, first = nnx.split(layers[0])
    states = [nnx.state(layer) for layer in layers[1:]]

    def stack(var, *others):
        return var.copy(_stack([var.get_value()] + [o.get_value() for o in others]),
                        out_sharding=("layers",) + tuple(var.get_metadata()["out_sharding"]))

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return nnx.merge(graphdef, jax.tree.map(stack, first, *states, is_leaf=is_var))


# --------------------------------------------------------------------------------------------- KV cache


_WORDS = {2: jnp.uint16, 4: jnp.uint32}


def _to_words(x: Array, words_dtype: Any) -> Array:
    """Float keys/values -> the cache's storage words of the same width (a bitcast: the values are unchanged)."""
    return jax.lax.bitcast_convert_type(x, words_dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Fixed-size decoding cache, a plain pytree (donate it to the jitted step that writes it).

    k, v: every layer's keys/values stacked, [layers, B, max_len, kv_heads, head_dim], in the model's compute
    dtype stored as unsigned integer words of its width (`values()` bitcasts them back; bit-identical). Words,
    because XLA's CPU backend converts a 16-bit float buffer to float32 around every dynamic slice or update,
    i.e. would touch the whole cache per decoded token (and compile-only figures taken on CPU would count it).
    segment_ids [B, max_len] int32: 1 where a real token was written, 0 for empty slots and pads (never
    attended). lengths [B] int32: the real tokens per row. end_index [] int32: one past the highest slot holding
    a real token in any row; attention visits nothing at or above it.

    Rows may be laid out two ways: aligned (`Transformer.prefill` / `decode_step`: every row writes the same
    slots, left-padded prompts keep their pads at the front, masked), or each row packed from slot 0 and written
    at its own offset (`Transformer.extend` with per-row slots, `truncate` to reuse a prefix; the sampler's way),
    where a row's next free slot is its `lengths` entry.
    """

    k: Array
    v: Array
    segment_ids: Array
    lengths: Array
    end_index: Array

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]

    @classmethod
    def init(cls, config: ModelConfig, batch_size: int, max_len: int) -> "KVCache":
        """An empty cache for `batch_size` rows of `max_len` slots, holding the compute dtype's values."""
        shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
        words = _WORDS[jnp.dtype(config.dtype).itemsize]
        return cls(k=jnp.zeros(shape, words), v=jnp.zeros(shape, words),
                   segment_ids=jnp.zeros((batch_size, max_len), jnp.int32),
                   lengths=jnp.zeros((batch_size,), jnp.int32), end_index=jnp.zeros((), jnp.int32))

    def values(self, dtype: Any) -> tuple[Array, Array]:
        """(k, v) as `dtype` (the compute dtype the cache was made for), [layers, B, max_len, kv_heads, head_dim]."""
        return tuple(jax.lax.bitcast_convert_type(x, dtype) for x in (self.k, self.v))

    @classmethod
    def packed(cls, k: Array, v: Array, segment_ids: Array) -> "KVCache":
        """A cache of rows packed from slot 0 (the sampler's layout), its lengths and end_index derived from the
        segment ids: a row's length is its count of real slots."""
        slot = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
        return cls(k=k, v=v, segment_ids=segment_ids, lengths=jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32),
                   end_index=jnp.max(jnp.where(segment_ids != 0, slot + 1, 0)).astype(jnp.int32))

    def truncate(self, keep: Array) -> "KVCache":
        """Keeps slots [0, keep[b]) of each row b (keep [B] int32; >= max_len keeps the whole row) and empties
        the rest, so that a row packed from slot 0 can be refilled after a reused prefix (or from 0)."""
        slot = jnp.arange(self.max_len, dtype=jnp.int32)[None, :]
        return KVCache.packed(self.k, self.v, jnp.where(slot < keep[:, None], self.segment_ids, 0))


# ------------------------------------------------------------------------------------------------ model


class Transformer(nnx.Module):
    """Decoder-only LM. Parameter tree (L = num_layers, every `layers` parameter stacked on a leading axis):

    embed [vocab, embed]; layers.{input_norm.scale [L, embed], attn.{q,k,v,o}_kernel [L, ...] (+ biases, q_norm,
    k_norm), post_attn_norm, mlp.{gate,up,down}_kernel [L, ...]}; final_norm; lm_head [embed, vocab] unless tied.
    A MoE layer's mlp is {router_kernel [L, embed, E], gate/up_kernel [L, E, embed, moe_mlp], down_kernel [L, E,
    moe_mlp, embed]}. When layers of both kinds mix, `layers` is a list of stacks, one per run of equal
    consecutive layers (`layers.{r}.…`, `moe.layer_runs`). LoRA adapters sit beside their kernels
    (`attn.q_lora.{a, b}`, ...).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.embed = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype)
        runs = moe_lib.layer_runs(c.layer_kinds)
        stacks = [stacked_layers(c, rngs, kind, stop - start) for kind, start, stop in runs]
        self.layers = stacks[0] if len(stacks) == 1 else nnx.List(stacks)
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = _param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c.param_dtype)

    def unembedding(self) -> Array:
        """The output projection [hidden, vocab] (the embedding transposed when tied); logits = hidden @ this."""
        if self.config.tie_word_embeddings:
            return self.embed[...].T
        return self.lm_head[...]

    def logits_from_hidden(self, hidden: Array) -> Array:
        """hidden [..., H] -> logits [..., V] float32 (products in the compute dtype, accumulated in f32)."""
        dt = self.config.dtype
        return jnp.matmul(hidden.astype(dt), self.unembedding().astype(dt), preferred_element_type=jnp.float32)

    def _embed(self, tokens: Array) -> Array:
        # The table's embed dimension is gathered (FSDP) before the lookup, so the gathered rows come out
        # batch-sharded like the tokens instead of sharded over embed (which XLA would have to undo by a full
        # rematerialization of the lookup).
        table = constrain(self.embed[...].astype(self.config.dtype), ("vocab", "act_embed"))
        return constrain(jnp.take(table, tokens, axis=0), ("batch", "length", "act_embed"))

    def layer_stacks(self) -> list[tuple[DecoderLayer, int, int]]:
        """(stacked module, first layer, end layer) of every run of equal layers, in depth order."""
        runs = moe_lib.layer_runs(self.config.layer_kinds)
        stacks = [self.layers] if len(runs) == 1 else list(self.layers)
        return [(stack, start, stop) for stack, (_, start, stop) in zip(stacks, runs)]

    def _scan_layers(self, body, carry, *, remat: str = "none", unroll: int = 1):
        """carry = body(layer, carry, layer_index) over every layer in depth order: one `jax.lax.scan` per run of
        equal layers (over its stacked parameters and global layer indices), the step rematerialized per
        `remat`."""
        for stack, start, stop in self.layer_stacks():
            graphdef, state = nnx.split(stack)

            def step(c, xs, graphdef=graphdef):
                layer_state, index = xs
                return body(nnx.merge(graphdef, layer_state), c, index), None

            if remat != "none":
                step = jax.checkpoint(step, policy=_checkpoint_policy(remat), prevent_cse=False)
            index = jnp.arange(start, stop, dtype=jnp.int32)
            carry = jax.lax.scan(step, carry, (state, index), unroll=max(1, min(unroll, stop - start)))[0]
        return carry

    def _run_layers(self, x: Array, sin: Array, cos: Array, segment_ids: Array, slots: Array,
                    dropout_rng: Array | None = None) -> tuple[Array, dict[str, Array]]:
        """The stacked layers over x [B, T, embed] with `jax.lax.scan`, the body rematerialized per
        `config.remat`. -> (x, the router's statistics averaged over the MoE layers; {} without any)."""
        kinds = self.config.layer_kinds
        zero = {name: jnp.zeros((), jnp.float32) for name in moe_lib.AUX_METRICS} if "moe" in kinds else {}

        def body(layer, carry, index):
            h, aux = carry
            key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
            h, _, stats = layer(h, sin, cos, segment_ids, slots, dropout_key=key, return_aux=True)
            return h, {name: aux[name] + stats[name] for name in aux} if stats else aux

        x, aux = self._scan_layers(body, (x, zero), remat=self.config.remat, unroll=self.config.scan_unroll)
        return x, {name: v / kinds.count("moe") for name, v in aux.items()}

    def __call__(self, tokens: Array, positions: Array, attention_mask: Array, *,
                 return_hidden: bool = False, return_aux: bool = False, dropout_rng: Array | None = None):
        """Full forward without a cache.

        tokens [B, T] int32, positions [B, T] int32 (RoPE positions, e.g. cumsum(mask) - 1; per segment in
        packed rows), attention_mask [B, T] segment ids (0 pad; 1 real, or several positive ids for the packed
        sequences of a row, which never attend each other). Returns logits [B, T, V] float32, or with
        `return_hidden` the final normed hidden states [B, T, H] in the compute dtype (logits = hidden @
        `unembedding()`). Pad rows give finite values that callers must mask out.

        With `return_aux`, returns (that, aux): for a MoE model the router's statistics over the real tokens
        averaged over the MoE layers (`moe.AUX_METRICS`) and "router_loss" = router_aux_loss_coef *
        load_balance + router_z_loss_coef * z_loss, the term training adds to its loss; {} for a dense model.
        `dropout_rng` (a PRNG key) turns on the LoRA adapters' dropout (training only).
        """
        segment_ids = attention_mask.astype(jnp.int32)
        slots = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        sin, cos = rope_sin_cos(positions, rope_inverse_frequencies(self.config))
        x, aux = self._run_layers(self._embed(tokens), sin, cos, segment_ids, slots, dropout_rng)
        hidden = self.final_norm(x, self.config.dtype)
        out = hidden if return_hidden else self.logits_from_hidden(hidden)
        if not return_aux:
            return out
        if aux:
            c = self.config
            aux["router_loss"] = c.router_aux_loss_coef * aux["load_balance"] + c.router_z_loss_coef * aux["z_loss"]
        return out, aux

    def extend(self, tokens: Array, positions: Array, segment_ids: Array, slots: Array, cache: KVCache, *,
               attention: str | None = None, attention_block: int = 512) -> tuple[Array, KVCache]:
        """Runs a block of new tokens through the model, writing each real token's keys/values into the cache.

        tokens, positions (RoPE), segment_ids (0 = pad: not written, sees nothing; else 1), slots: [B, T] int32.
        Token t of row b goes to cache slot slots[b, t] and attends the cache's real tokens at slots <= its own
        (the cache's earlier tokens of that row and this block's). Slots must lie below `max_len` (a real token at
        a slot >= max_len is dropped) and never overwrite a slot the row still attends.
        `attention` (default: the config's) and `attention_block` pick how the queries attend the cache (see
        `attention.attention`: `auto` on CPU runs `chunked` over tiles of `attention_block` when the cache has more
        slots than one tile, which visits only the tiles below the filled extent).
        Returns (hidden [B, T, H] after the final norm, the updated cache).
        """
        implementation = self.config.attention if attention is None else attention
        segment_ids = (segment_ids != 0).astype(jnp.int32)
        real = segment_ids != 0
        s = cache.max_len
        write_slots = jnp.where(real, slots, s)  # pads go out of range: dropped
        rows = jnp.broadcast_to(jnp.arange(tokens.shape[0], dtype=jnp.int32)[:, None], tokens.shape)
        cache_segments = cache.segment_ids.at[rows, write_slots].set(1, mode="drop")
        end_index = jnp.maximum(cache.end_index, jnp.max(jnp.where(real & (slots < s), slots + 1, 0)))
        kv_slots = jnp.arange(s, dtype=jnp.int32)
        sin, cos = rope_sin_cos(positions, rope_inverse_frequencies(self.config))

        # The whole stacked cache rides in the scan's carry and each layer writes its own rows in place, so no
        # per-layer copies of the cache are made (and attention reads the tiles it needs from the carry).
        def body(layer, carry, index):
            h, k_all, v_all = carry
            view = _CacheView(k_all, v_all, index, rows, write_slots, cache_segments, kv_slots, end_index,
                              implementation, attention_block)
            h, (k_all, v_all) = layer(h, sin, cos, segment_ids, slots, view)
            return h, k_all, v_all

        x, k, v = self._scan_layers(body, (self._embed(tokens), cache.k, cache.v), unroll=self.config.scan_unroll)
        hidden = self.final_norm(x, self.config.dtype)
        written = jnp.sum(real & (slots < s), axis=1, dtype=jnp.int32)
        return hidden, KVCache(k=k, v=v, segment_ids=cache_segments, lengths=cache.lengths + written,
                               end_index=end_index)

    def prefill(self, tokens: Array, positions: Array, attention_mask: Array, cache: KVCache, *,
                return_all_logits: bool = False) -> tuple[Array, KVCache]:
        """Run a (left- or right-) padded prompt block through the model, writing it into the cache.

        tokens/positions/attention_mask [B, T]; the block goes to slots [end_index, end_index + T) of every row,
        which must fit in the cache (a real token past max_len would be dropped), so size `max_len` for
        prompt + generation.
        Returns (logits [B, V] float32 at each row's last real token, or [B, T, V] with `return_all_logits`,
        updated cache). attention_mask is treated as binary here (no packing in the cache).
        """
        if tokens.shape[1] > cache.max_len:
            raise ValueError(f"prefill: prompt length {tokens.shape[1]} exceeds the cache max_len {cache.max_len}")
        b, t = tokens.shape
        segment_ids = (attention_mask != 0).astype(jnp.int32)
        slots = jnp.broadcast_to(cache.end_index + jnp.arange(t, dtype=jnp.int32), (b, t))
        hidden, cache = self.extend(tokens, positions, segment_ids, slots, cache)
        # Aligned rows: the block occupies its T slots in every row, pads included (they stay empty).
        cache = dataclasses.replace(cache, end_index=jnp.maximum(cache.end_index, slots[0, -1] + 1))
        if return_all_logits:
            return self.logits_from_hidden(hidden), cache
        last = t - 1 - jnp.argmax(segment_ids[:, ::-1], axis=1)  # index of the last real token per row
        last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return self.logits_from_hidden(last_hidden), cache

    def decode_step(self, token: Array, position: Array, cache: KVCache) -> tuple[Array, KVCache]:
        """One new token per row at the aligned slot `end_index` (must be < max_len, see `prefill`): token [B]
        int32, position [B] int32 -> (logits [B, V] float32, cache). Every row's token counts as real."""
        b = token.shape[0]
        slots = jnp.broadcast_to(cache.end_index, (b, 1))
        hidden, cache = self.extend(token[:, None], position[:, None], jnp.ones((b, 1), jnp.int32), slots, cache)
        return self.logits_from_hidden(hidden[:, 0]), cache


def init_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A randomly initialized model (normal(0.02) kernels, unit norms, zero biases; LoRA adapters from their own
    stream, so they do not change the base weights a seed gives)."""
    lora_key = jax.random.fold_in(jax.random.key(seed), 0x10A)
    return Transformer(config, rngs=nnx.Rngs(params=seed, lora=lora_key))


def abstract_model(config: ModelConfig) -> Transformer:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes, dtypes and logical axes, no memory."""
    return nnx.eval_shape(lambda: init_model(config))


def positions_from_mask(attention_mask: Array) -> Array:
    """RoPE positions for padded rows: cumsum(mask) - 1 on real tokens, 0 on pads. [B, T] -> [B, T] int32."""
    m = (attention_mask != 0).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0) * m
