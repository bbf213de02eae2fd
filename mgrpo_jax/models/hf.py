"""Hugging Face checkpoints <-> our `Transformer`.

Loading reads `config.json` and the safetensors weights (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`) memory-mapped, tensor by tensor, straight into the model's stacked, sharded
layout: every parameter is built with `jax.make_array_from_callback`, whose callback reads from the files only
the block that one device holds (a slice of each layer's tensor, converted to our layout, and the layers'
slices stacked), so no host and no device ever holds a whole sharded tensor, and under multi-controller JAX
each host reads only its own devices' shards. Saving writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads, one layer's tensor at a time.

The name/layout table `tensor_specs` is the single source of truth for both directions.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax.models.transformer import SUPPORTED_ARCHITECTURES, ModelConfig, Transformer, abstract_model

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype -> numpy (little-endian, as the format stores them); BF16 as jax's (ml_dtypes') bfloat16,
# which numpy and safetensors' numpy reader do not know (real Qwen3/Llama checkpoints are BF16).
_FLOAT_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
                 "BF16": np.dtype(jnp.bfloat16)}
_HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one checkpoint tensor maps onto our parameter layout (`n` heads of `d` for the head kinds).

    kind: "identity"; "transpose" (PyTorch Linear [out, in] <-> ours [in, out]); "in_heads" (PyTorch
    [n*d, h] <-> ours [h, n, d]: the q/k/v projections); "out_heads" ([h, n*d] <-> [n, d, h]: o_proj);
    "bias_heads" ([n*d] <-> [n, d]).
    """

    kind: str = "identity"
    n: int = 0
    d: int = 0

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        n, d = self.n, self.d
        if self.kind == "transpose":
            return w.T
        if self.kind == "in_heads":
            return w.T.reshape(w.shape[1], n, d)
        if self.kind == "out_heads":
            return w.T.reshape(n, d, w.shape[0])
        if self.kind == "bias_heads":
            return w.reshape(n, d)
        return w

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        n, d = self.n, self.d
        if self.kind == "transpose":
            return w.T
        if self.kind == "in_heads":
            return w.reshape(w.shape[0], n * d).T
        if self.kind == "out_heads":
            return w.reshape(n * d, w.shape[2]).T
        if self.kind == "bias_heads":
            return w.reshape(n * d)
        return w

    def read(self, hf: Any, index: tuple[slice, ...]) -> np.ndarray:
        """`to_ours(hf)[index]`, reading only the rows/columns of `hf` that block needs.

        hf: anything sliceable like the checkpoint tensor (a memory-mapped array); index: one `slice` with step
        1 and explicit bounds per dimension of *our* layout.
        """
        d = self.d
        if self.kind == "transpose":
            return np.asarray(hf[index[1], index[0]]).T
        if self.kind == "in_heads":  # ours [h, n, d]: hf rows n0*d:n1*d (whole heads), columns h0:h1
            sh, sn, sd = index
            block = np.asarray(hf[sn.start * d:sn.stop * d, sh])
            return block.T.reshape(sh.stop - sh.start, sn.stop - sn.start, d)[:, :, sd]
        if self.kind == "out_heads":  # ours [n, d, h]: hf rows h0:h1, columns n0*d:n1*d
            sn, sd, sh = index
            block = np.asarray(hf[sh, sn.start * d:sn.stop * d])
            return block.T.reshape(sn.stop - sn.start, d, sh.stop - sh.start)[:, sd, :]
        if self.kind == "bias_heads":
            sn, sd = index
            return np.asarray(hf[sn.start * d:sn.stop * d]).reshape(sn.stop - sn.start, d)[:, sd]
        return np.asarray(hf[index])


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its HF name and shape, where it lives in our state, and its layout.

    Per-layer tensors (`model.layers.{i}.*`) live in a stacked parameter: `path` names it and `layer` is i, the
    index along its leading layer axis; the others have `layer=None`.
    """

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    layout: Layout = Layout()
    layer: int | None = None

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        return self.layout.to_ours(w)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        return self.layout.to_hf(w)


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every tensor of an HF checkpoint for `config`, in file order (embedding, layers, norm, lm_head)."""
    c = config
    h, n, k, d, f, v = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    transpose = Layout("transpose")
    specs = [TensorSpec("model.embed_tokens.weight", ("embed",), (v, h))]
    for i in range(c.num_layers):
        p = f"model.layers.{i}."

        def spec(name, path, shape, layout=Layout(), _i=i, _p=p):
            return TensorSpec(_p + name, ("layers",) + path, shape, layout, _i)

        specs += [
            spec("input_layernorm.weight", ("input_norm", "scale"), (h,)),
            spec("self_attn.q_proj.weight", ("attn", "q_kernel"), (n * d, h), Layout("in_heads", n, d)),
            spec("self_attn.k_proj.weight", ("attn", "k_kernel"), (k * d, h), Layout("in_heads", k, d)),
            spec("self_attn.v_proj.weight", ("attn", "v_kernel"), (k * d, h), Layout("in_heads", k, d)),
            spec("self_attn.o_proj.weight", ("attn", "o_kernel"), (h, n * d), Layout("out_heads", n, d)),
        ]
        if c.attention_bias:
            specs += [
                spec("self_attn.q_proj.bias", ("attn", "q_bias"), (n * d,), Layout("bias_heads", n, d)),
                spec("self_attn.k_proj.bias", ("attn", "k_bias"), (k * d,), Layout("bias_heads", k, d)),
                spec("self_attn.v_proj.bias", ("attn", "v_bias"), (k * d,), Layout("bias_heads", k, d)),
            ]
        if c.attention_out_bias:
            specs.append(spec("self_attn.o_proj.bias", ("attn", "o_bias"), (h,)))
        if c.qk_norm:
            specs += [
                spec("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), (d,)),
                spec("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), (d,)),
            ]
        specs += [
            spec("post_attention_layernorm.weight", ("post_attn_norm", "scale"), (h,)),
            spec("mlp.gate_proj.weight", ("mlp", "gate_kernel"), (f, h), transpose),
            spec("mlp.up_proj.weight", ("mlp", "up_kernel"), (f, h), transpose),
            spec("mlp.down_proj.weight", ("mlp", "down_kernel"), (h, f), transpose),
        ]
    specs.append(TensorSpec("model.norm.weight", ("final_norm", "scale"), (h,)))
    if not c.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head",), (v, h), transpose))
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
    """ModelConfig for the checkpoint at `path`; overrides: param_dtype, dtype, remat, attention."""
    return ModelConfig.from_hf(load_hf_config(path), **overrides)


class _SafetensorsFile:
    """One safetensors file, memory-mapped: its header, and each tensor as a read-only numpy view whose pages
    are read from disk only when a slice of it is used."""

    def __init__(self, path: str):
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        self.path, self.header, self._data_start = path, header, 8 + size
        self._buffer: np.ndarray | None = None

    def keys(self):
        return self.header.keys()

    def dtype(self, name: str) -> str:
        return self.header[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def array(self, name: str) -> np.ndarray:
        if self._buffer is None:
            self._buffer = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.header[name]
        begin, end = (self._data_start + o for o in info["data_offsets"])
        return self._buffer[begin:end].view(_FLOAT_DTYPES[info["dtype"]]).reshape(info["shape"])


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
        return {name: single for name in _SafetensorsFile(single).keys()}
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


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A device's index (slices that may have None bounds) -> slices with explicit bounds and step 1."""
    out = []
    for sl, size in zip(index, shape):
        start, stop, step = sl.indices(size)
        assert step == 1, index
        out.append(slice(start, stop))
    return tuple(out)


def _block_reader(specs: list[TensorSpec], sources: list[np.ndarray], abstract: Any):
    """The `make_array_from_callback` callback of one parameter: device index -> that device's block in our
    layout and dtype, read from the memory-mapped checkpoint tensors `sources` (one per spec; for a stacked
    parameter one per layer, in layer order), the per-layer blocks of the requested layer range stacked.
    Blocks are cached by index, so replicas of a shard are read once."""
    layered = specs[0].layer is not None
    blocks: dict[tuple, np.ndarray] = {}

    def read(index):
        index = _bounds(index, abstract.shape)
        key = tuple((sl.start, sl.stop) for sl in index)
        if key not in blocks:
            if layered:
                block = np.stack([specs[i].layout.read(sources[i], index[1:])
                                  for i in range(index[0].start, index[0].stop)])
            else:
                block = specs[0].layout.read(sources[0], index)
            blocks[key] = np.ascontiguousarray(block.astype(abstract.dtype))
        return blocks[key]

    return read


def load_params(path: str, config: ModelConfig, *, shardings: Any = None, mesh: jax.sharding.Mesh | None = None,
                rules: sharding_lib.LogicalRules = sharding_lib.DEFAULT_RULES) -> tuple[nnx.GraphDef, nnx.State]:
    """Read the weights at `path` into (graphdef, state) for `config`, each device reading only its shards.

    Placement: `shardings` (a tree of `jax.sharding.Sharding` shaped like the state) if given, else
    `mesh` + logical `rules`, else the default device. Every tensor is validated first by name (missing or
    unexpected tensors), then by dtype (floating point only) and shape, before anything is read. Each
    parameter is then built with `jax.make_array_from_callback`: the callback for a device reads that device's
    block of each layer's tensor from the memory-mapped files (`Layout.read`) and stacks the layers.
    """
    _require_dir(path)
    weight_map = _weight_map(path)
    _check_names(path, config, set(weight_map))
    graphdef, state = nnx.split(abstract_model(config))
    if shardings is None and mesh is not None:
        shardings = sharding_lib.state_shardings(state, mesh, rules)
    flat_state = dict(nnx.to_flat_state(state))
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    files = {file: _SafetensorsFile(file) for file in sorted(set(weight_map.values()))}
    by_path: dict[tuple[str, ...], list[TensorSpec]] = {}
    for spec in tensor_specs(config):
        file = files[weight_map[spec.hf_name]]
        dtype, shape = file.dtype(spec.hf_name), file.shape(spec.hf_name)
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{file.path}: tensor {spec.hf_name!r} has dtype {dtype}; expected a float dtype "
                             f"({', '.join(_FLOAT_DTYPES)}). Quantized checkpoints are not supported: "
                             "dequantize them first")
        if shape != spec.hf_shape:
            raise ValueError(f"{file.path}: tensor {spec.hf_name!r} has shape {list(shape)}, expected "
                             f"{list(spec.hf_shape)} for the config in {path}; the weights and "
                             "config.json do not belong together")
        by_path.setdefault(spec.path, []).append(spec)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for param_path, specs in by_path.items():
        var = flat_state[param_path]
        abstract = var.get_value()
        target = flat_shardings.get(param_path, default)
        target = target.get_value() if isinstance(target, nnx.Variable) else target
        sources = [files[weight_map[s.hf_name]].array(s.hf_name) for s in specs]
        var.set_value(jax.make_array_from_callback(abstract.shape, target, _block_reader(specs, sources, abstract)))
    return graphdef, state


def load_model(path: str, *, param_dtype: str = "float32", dtype: str = "float32", remat: str | bool = "none",
               attention: str = "dense", shardings: Any = None, mesh: jax.sharding.Mesh | None = None,
               rules: sharding_lib.LogicalRules = sharding_lib.DEFAULT_RULES) -> tuple[Transformer, ModelConfig]:
    """(model, config) from a local Hugging Face checkpoint directory. See `load_params` for placement."""
    config = load_config(path, param_dtype=param_dtype, dtype=dtype, remat=remat, attention=attention)
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

    `model` is a Transformer or its Param state. Parameters are fetched to the host one tensor (one layer of a
    stacked parameter) at a time and saved in their parameter dtype, under transformers' per-layer names.
    `hf_config`, when given (e.g. the original checkpoint's), is written instead of a reconstructed one; its
    `architectures` and dtype fields are set to match.
    """
    if tokenizer is not None:
        check_tokenizer(tokenizer, config)
    state = nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else model
    flat_state = dict(nnx.to_flat_state(state))
    if hf_config is None:
        hf_config = hf_config_from(config)
    else:
        described = ModelConfig.from_hf(hf_config, param_dtype=config.param_dtype, dtype=config.dtype,
                                        remat=config.remat, attention=config.attention).replace(
                                            scan_unroll=config.scan_unroll)  # how it runs, not what it is
        if described != config:
            raise ValueError(f"hf_config ({type(hf_config).__name__}) describes {described}, not the model being "
                             f"saved ({config}); pass the config the weights were loaded with, or hf_config=None to "
                             "rebuild one")
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
        value = flat_state[spec.path].get_value()
        if spec.layer is not None:
            value = value[spec.layer]  # one layer of the stacked parameter, sliced where it lives
        array = np.ascontiguousarray(spec.to_hf(np.asarray(jax.device_get(value))))
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
