"""Decoder models (Llama 3.x, Qwen2/2.5, Qwen3) in Flax NNX and Hugging Face checkpoint I/O."""
from mgrpo_jax.models.hf import (
    check_tokenizer,
    hf_config_from,
    load_config,
    load_hf_config,
    load_model,
    load_params,
    load_tokenizer,
    save_hf,
    tensor_specs,
)
from mgrpo_jax.models.transformer import (
    ATTENTION_IMPLEMENTATIONS,
    REMAT_POLICIES,
    SUPPORTED_ARCHITECTURES,
    KVCache,
    ModelConfig,
    RopeScaling,
    Transformer,
    abstract_model,
    attention_mask_from_segments,
    init_model,
    positions_from_mask,
)

__all__ = [
    "ATTENTION_IMPLEMENTATIONS", "REMAT_POLICIES", "SUPPORTED_ARCHITECTURES", "KVCache", "ModelConfig",
    "RopeScaling", "Transformer", "abstract_model", "attention_mask_from_segments", "check_tokenizer", "hf_config_from", "init_model", "load_config",
    "load_hf_config", "load_model", "load_params", "load_tokenizer", "positions_from_mask", "save_hf",
    "tensor_specs",
]
