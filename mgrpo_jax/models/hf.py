"""Hugging Face checkpoints <-> our `Transformer`.

Loading reads `config.json` and the safetensors weights (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`) tensor by tensor with `safe_open`: each tensor is read on the host, converted
to our layout and dtype, and placed with `jax.device_put` on its target sharding (or the default device), so a
sharded model is never assembled whole on one device. Saving writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads.

The name/layout table `tensor_specs` is the single source of truth for both directions.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax.models.transformer import SUPPORTED_ARCHITECTURES, ModelConfig, Transformer, abstract_model

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its HF name and shape, our state path, and the layout conversions."""

    hf_name: str
    path: tuple[str | int, ...]
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every tensor of an HF checkpoint for `config`, in file order (embedding, layers, norm, lm_head)."""
    c = config
    h, n, k, d, f, v = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size

    def in_heads(heads):  # PyTorch Linear [heads*d, h] <-> ours [h, heads, d]
        return (lambda w: w.T.reshape(h, heads, d)), (lambda w: w.reshape(h, heads * d).T)

    def bias_heads(heads):
        return (lambda b: b.reshape(heads, d)), (lambda b: b.reshape(heads * d))

    transpose = (lambda w: w.T, lambda w: w.T)
    specs = [TensorSpec("model.embed_tokens.weight", ("embed",), (v, h), _identity, _identity)]
    for i in range(c.num_layers):
        p, ours = f"model.layers.{i}.", ("layers", i)
        attn = ours + ("attn",)
        specs += [
            TensorSpec(p + "input_layernorm.weight", ours + ("input_norm", "scale"), (h,), _identity, _identity),
            TensorSpec(p + "self_attn.q_proj.weight", attn + ("q_kernel",), (n * d, h), *in_heads(n)),
            TensorSpec(p + "self_attn.k_proj.weight", attn + ("k_kernel",), (k * d, h), *in_heads(k)),
            TensorSpec(p + "self_attn.v_proj.weight", attn + ("v_kernel",), (k * d, h), *in_heads(k)),
            TensorSpec(p + "self_attn.o_proj.weight", attn + ("o_kernel",), (h, n * d),
                       lambda w: w.T.reshape(n, d, h), lambda w: w.reshape(n * d, h).T),
        ]
        if c.attention_bias:
            specs += [
                TensorSpec(p + "self_attn.q_proj.bias", attn + ("q_bias",), (n * d,), *bias_heads(n)),
                TensorSpec(p + "self_attn.k_proj.bias", attn + ("k_bias",), (k * d,), *bias_heads(k)),
                TensorSpec(p + "self_attn.v_proj.bias", attn + ("v_bias",), (k * d,), *bias_heads(k)),
            ]
        if c.attention_out_bias:
            specs.append(TensorSpec(p + "self_attn.o_proj.bias", attn + ("o_bias",), (h,), _identity, _identity))
        if c.qk_norm:
            specs += [
                TensorSpec(p + "self_attn.q_norm.weight", attn + ("q_norm", "scale"), (d,), _identity, _identity),
                TensorSpec(p + "self_attn.k_norm.weight", attn + ("k_norm", "scale"), (d,), _identity, _identity),
            ]
        specs += [
            TensorSpec(p + "post_attention_layernorm.weight", ours + ("post_attn_norm", "scale"), (h,), _identity,
                       _identity),
            TensorSpec(p + "mlp.gate_proj.weight", ours + ("mlp", "gate_kernel"), (f, h), *transpose),
            TensorSpec(p + "mlp.up_proj.weight", ours + ("mlp", "up_kernel"), (f, h), *transpose),
            TensorSpec(p + "mlp.down_proj.weight", ours + ("mlp", "down_kernel"), (h, f), *transpose),
        ]
    specs.append(TensorSpec("model.norm.weight", ("final_norm", "scale"), (h,), _identity, _identity))
    if not c.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head",), (v, h), *transpose))
    return specs


def _optional_hf_names(config: ModelConfig) -> set[str]:
    """Names a checkpoint may carry that we do not load: a tied lm_head (a copy of the embedding)."""
    return {"lm_head.weight"} if config.tie_word_embeddings else set()


# ------------------------------------------------------------------------------------------------ load


def _require_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist; pass a local directory holding "
                                f"{CONFIG_FILE} and {SINGLE_WEIGHTS_FILE} (or {INDEX_FILE} and its shards)")


def load_hf_config(path: str) -> Any:
    """The transformers PretrainedConfig stored in `path/config.json`."""
    import transformers

    _require_dir(path)
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise FileNotFoundError(f"{os.path.join(path, CONFIG_FILE)} not found: a Hugging Face checkpoint "
                                f"directory needs its {CONFIG_FILE} (save it with config.save_pretrained(dir))")
    return transformers.AutoConfig.from_pretrained(path)


def load_config(path: str, **overrides: Any) -> ModelConfig:
    """ModelConfig for the checkpoint at `path`; overrides: param_dtype, dtype, remat."""
    return ModelConfig.from_hf(load_hf_config(path), **overrides)


def _weight_map(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file path, from the index or the single file."""
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_WEIGHTS_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object; re-save the checkpoint with save_pretrained")
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, shard)):
                raise FileNotFoundError(f"{index} lists shard {shard!r}, which is missing from {path}; copy "
                                        "every shard of the checkpoint")
        return {name: os.path.join(path, shard) for name, shard in weight_map.items()}
    if os.path.isfile(single):
        with safe_open(single, framework="numpy") as fh:
            return {name: single for name in fh.keys()}
    raise FileNotFoundError(f"no weights in {path}: expected {SINGLE_WEIGHTS_FILE} or {INDEX_FILE} with its "
                            "shards (only safetensors is supported; convert .bin checkpoints with "
                            "save_pretrained(dir, safe_serialization=True))")


def _check_names(path: str, config: ModelConfig, found: set[str]) -> None:
    expected = {s.hf_name for s in tensor_specs(config)}
    missing = sorted(expected - found)
    unexpected = sorted(found - expected - _optional_hf_names(config))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)})")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
                         f"({len(unexpected)})")
        raise ValueError(f"checkpoint {path} does not match its config ({config.architecture}, "
                         f"{config.num_layers} layers, tie_word_embeddings={config.tie_word_embeddings}, "
                         f"attention_bias={config.attention_bias}, qk_norm={config.qk_norm}): "
                         + "; ".join(parts) + ". Check that config.json belongs to these weights.")


def load_params(path: str, config: ModelConfig, *, shardings: Any = None, mesh: jax.sharding.Mesh | None = None,
                rules: sharding_lib.LogicalRules = sharding_lib.DEFAULT_RULES) -> tuple[nnx.GraphDef, nnx.State]:
    """Read the weights at `path` into (graphdef, state) for `config`, one tensor at a time.

    Placement: `shardings` (a tree of `jax.sharding.Sharding` shaped like the state) if given, else
    `mesh` + logical `rules`, else the default device. Every tensor is validated first by name (missing or
    unexpected tensors), then by dtype (floating point only) and shape before it is read.
    """
    _require_dir(path)
    weight_map = _weight_map(path)
    _check_names(path, config, set(weight_map))
    graphdef, state = nnx.split(abstract_model(config))
    if shardings is None and mesh is not None:
        shardings = sharding_lib.state_shardings(state, mesh, rules)
    flat_state = dict(nnx.to_flat_state(state))
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    by_file: dict[str, list[TensorSpec]] = {}
    for spec in tensor_specs(config):
        by_file.setdefault(weight_map[spec.hf_name], []).append(spec)
    for file, specs in by_file.items():
        with safe_open(file, framework="numpy") as fh:
            for spec in specs:
                info = fh.get_slice(spec.hf_name)
                dtype, shape = info.get_dtype(), tuple(info.get_shape())
                if dtype not in _FLOAT_DTYPES:
                    raise ValueError(f"{file}: tensor {spec.hf_name!r} has dtype {dtype}; expected a float dtype "
                                     f"({', '.join(_FLOAT_DTYPES)}). Quantized checkpoints are not supported: "
                                     "dequantize them first")
                if shape != spec.hf_shape:
                    raise ValueError(f"{file}: tensor {spec.hf_name!r} has shape {list(shape)}, expected "
                                     f"{list(spec.hf_shape)} for the config in {path}; the weights and "
                                     "config.json do not belong together")
                var = flat_state[spec.path]
                value = np.ascontiguousarray(spec.to_ours(fh.get_tensor(spec.hf_name)).astype(var.get_value().dtype))
                target = flat_shardings.get(spec.path)
                target = target.get_value() if isinstance(target, nnx.Variable) else target
                var.set_value(jax.device_put(value, target))
                del value
    return graphdef, state


def load_model(path: str, *, param_dtype: str = "float32", dtype: str = "float32", remat: bool = False,
               shardings: Any = None, mesh: jax.sharding.Mesh | None = None,
               rules: sharding_lib.LogicalRules = sharding_lib.DEFAULT_RULES) -> tuple[Transformer, ModelConfig]:
    """(model, config) from a local Hugging Face checkpoint directory. See `load_params` for placement."""
    config = load_config(path, param_dtype=param_dtype, dtype=dtype, remat=remat)
    graphdef, state = load_params(path, config, shardings=shardings, mesh=mesh, rules=rules)
    return nnx.merge(graphdef, state), config


# ------------------------------------------------------------------------------------------------ save


def hf_config_from(config: ModelConfig) -> Any:
    """A transformers config (LlamaConfig / Qwen2Config / Qwen3Config) equivalent to `config`."""
    import transformers

    if config.architecture not in _HF_CLASSES:
        raise ValueError(f"unsupported architecture {config.architecture!r}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    if config.architecture == "qwen2":
        if not config.attention_bias or config.attention_out_bias:
            raise ValueError("qwen2 has q/k/v biases and no o_proj bias; set attention_bias=True, "
                             "attention_out_bias=False")
    elif config.attention_bias != config.attention_out_bias:
        raise ValueError(f"{config.architecture} has biases on all of q/k/v/o or none; set attention_bias == "
                         "attention_out_bias")
    if config.qk_norm != (config.architecture == "qwen3"):
        raise ValueError(f"qk_norm={config.qk_norm} does not match architecture {config.architecture!r} "
                         "(only qwen3 has q/k norms)")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = dict(rope_type="llama3", rope_theta=config.rope_theta, **dataclasses.asdict(config.rope_scaling))
    config_cls_name, model_cls_name = _HF_CLASSES[config.architecture]
    kwargs = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, max_position_embeddings=config.max_position_embeddings,
        rope_parameters=rope, hidden_act="silu", architectures=[model_cls_name])
    if config.architecture != "qwen2":
        kwargs["attention_bias"] = config.attention_bias
    return getattr(transformers, config_cls_name)(**kwargs)


def check_tokenizer(tokenizer: Any, config: ModelConfig, where: str = "tokenizer") -> None:
    """Raise ValueError when the tokenizer can produce ids >= the model's vocab_size."""
    size = len(tokenizer)
    if size > config.vocab_size:
        raise ValueError(f"{where} has {size} tokens (including added tokens) but the model's vocab_size is "
                         f"{config.vocab_size}: ids >= {config.vocab_size} would index past the embedding. Use "
                         "the tokenizer saved with this checkpoint, or resize the model's embedding")


def load_tokenizer(path: str, config: ModelConfig | None = None) -> Any:
    """AutoTokenizer from a local directory (no downloads); checked against `config.vocab_size` if given."""
    import transformers

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist; pass a local directory with "
                                "tokenizer.json / tokenizer_config.json (tokenizer.save_pretrained(dir))")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no usable tokenizer in {path!r} ({e}); save one there with "
                                "tokenizer.save_pretrained(dir)") from e
    if config is not None:
        check_tokenizer(tokenizer, config, where=f"tokenizer at {path}")
    return tokenizer


def save_hf(model: Transformer | nnx.State, config: ModelConfig, path: str, *, hf_config: Any = None,
            tokenizer: Any = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `path/{config.json, model.safetensors (or shards + index)}` (+ tokenizer files) for transformers.

    `model` is a Transformer or its Param state. Parameters are fetched to the host one tensor at a time and
    saved in their parameter dtype. `hf_config`, when given (e.g. the original checkpoint's), is written
    instead of a reconstructed one; its `architectures` and dtype fields are set to match.
    """
    if tokenizer is not None:
        check_tokenizer(tokenizer, config)
    state = nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else model
    flat_state = dict(nnx.to_flat_state(state))
    if hf_config is None:
        hf_config = hf_config_from(config)
    else:
        structural = dict(param_dtype=config.param_dtype, dtype=config.dtype, remat=config.remat)
        if ModelConfig.from_hf(hf_config, **structural) != config:
            raise ValueError(f"hf_config ({type(hf_config).__name__}) describes "
                             f"{ModelConfig.from_hf(hf_config, **structural)}, not the model being saved ({config}); "
                             "pass the config the weights were loaded with, or hf_config=None to rebuild one")
        hf_config = copy.deepcopy(hf_config)  # the caller's object keeps its fields
    hf_config.architectures = [_HF_CLASSES[config.architecture][1]]
    hf_config.dtype = config.param_dtype
    os.makedirs(path, exist_ok=True)

    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for spec in tensor_specs(config):
        if spec.path not in flat_state:
            raise ValueError(f"parameter {'.'.join(map(str, spec.path))} (for {spec.hf_name}) is missing from the "
                             "model state; pass the full model or nnx.state(model, nnx.Param)")
        array = np.ascontiguousarray(spec.to_hf(np.asarray(jax.device_get(flat_state[spec.path].get_value()))))
        if array.shape != spec.hf_shape:
            raise ValueError(f"parameter for {spec.hf_name} has shape {array.shape} after conversion, expected "
                             f"{spec.hf_shape}; the state does not match config")
        if shards[-1] and shard_bytes + array.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][spec.hf_name] = array
        shard_bytes += array.nbytes

    for name in os.listdir(path):  # stale weights from an earlier save would shadow or mix with these
        if name == INDEX_FILE or (name.startswith("model") and name.endswith(".safetensors")):
            os.remove(os.path.join(path, name))
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE_WEIGHTS_FILE), metadata=metadata)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, file), metadata=metadata)
            weight_map.update({name: file for name in shard})
            total += sum(a.nbytes for a in shard.values())
        with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    hf_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
