"""Two Qwen3-30B-A3B agents (mixture of experts, 3B active) trained as LoRA adapters on one 8-GPU node.

Hardware: 8 GPUs (e.g. 8 x H100 80 GB); both agents time-share one mesh over all eight (`shared_with`), experts
split over them (`expert` 8: 16 of the 128 experts per GPU), everything else FSDP over the same eight devices.
Models: a local Hugging Face checkpoint for each role (no hub downloads):

    python launch/train.py --config configs/gpu_qwen3_30b_a3b_lora.py --workdir /runs/qwen3_30b_a3b_lora \
        --config.agents.main.checkpoint=/models/Qwen3-30B-A3B \
        --config.agents.sub.checkpoint=/models/Qwen3-30B-A3B --config.tokenizer.path=/models/Qwen3-30B-A3B

Why LoRA: a full fine-tune keeps float32 weights + AdamW moments + a float32 gradient accumulator, 16 bytes a
parameter, 488 GB per 30.5B-parameter agent (122 GB per GPU for the pair on 8 GPUs). Here the base weights are
frozen and stored in bf16 (61 GB per agent, 7.6 GB per GPU each) and only rank-16 adapters on every projection
(attention, and each expert's gate/up/down) are trained, with their AdamW state: about 3% of the parameters.
`python bench/scale.py --sections presets,sampler` compiles this preset's update at 8192 tokens per row and its
sampler on abstract shapes and prints the per-GPU totals against 80 GB. Export the merged model, or the adapters
alone in PEFT's layout, with `launch/export_hf.py --format merged|peft`.
"""
from configs import gpu_qwen3_0p6b

CONTEXT = 8192


def get_config():
    c = gpu_qwen3_0p6b.get_config()
    c.controller.max_main_context = CONTEXT
    c.controller.max_sub_context = CONTEXT
    c.controller.max_observation_tokens = 1024
    for role in ("main", "sub"):
        a = c.agents[role]
        a.model.param_dtype = "bfloat16"  # the frozen base; adapters and their optimizer state are float32
        a.model.moe_matmul = "auto"  # ragged_dot (grouped GEMM) on the GPU
        a.model.router_aux_loss_coef = 0.0  # the router is frozen under LoRA: no balancing loss to pay
        a.model.router_z_loss_coef = 0.0
        a.lora = {"rank": 16, "alpha": 32.0, "dropout": 0.0}  # every projection, experts' included (lora.TARGETS)
        a.mesh = {"devices": 8, "fsdp": 1, "expert": 8, "tp": 1}
        a.sampler.batch_size = 64
        a.sampler.max_new_tokens = 1024
        a.sampler.prompt_buckets = (2048, 4096, CONTEXT - 1024)
        a.optimizer.learning_rate = 2e-5  # adapters take a larger step than full weights (1e-6)
        a.loss.micro_batch_size = 8  # one 8192-token row per GPU (a multiple of the 8 data-parallel shards)
        a.loss.chunk_size = 1024
    c.agents.sub.mesh = {"shared_with": "main"}
    return c
