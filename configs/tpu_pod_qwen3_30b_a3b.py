"""Two Qwen3-30B-A3B agents (mixture of experts, 3B active), fully fine-tuned on a TPU pod slice (e.g. v5p-64: 8
hosts x 4 chips), time-sharing one mesh.

Hardware: a multi-host TPU slice (multi-controller JAX: one mesh over every chip, see tpu_pod_qwen3_8b.py). The
128 experts are split 8 ways (`expert` 8: 16 experts per chip) and everything else is FSDP over fsdp x expert
(32 ways); tokens are dispatched to their experts' chips inside the MoE layers. Start it on every host:

    python launch/train.py --config configs/tpu_pod_qwen3_30b_a3b.py --workdir gs://bucket/runs/qwen3_30b_a3b \
        --config.agents.main.checkpoint=/models/Qwen3-30B-A3B \
        --config.agents.sub.checkpoint=/models/Qwen3-30B-A3B --config.tokenizer.path=/models/Qwen3-30B-A3B

Memory per chip: float32 master weights + AdamW + float32 gradient accumulator, 16 bytes a parameter: 488 GB per
agent, 30.5 GB per chip for the pair over 32 chips, plus one micro-batch's activations at 8192 tokens per row.
`python bench/scale.py --sections presets,sampler` compiles the update and the sampler on abstract shapes and
prints the per-chip totals against a v5p's 95 GB. The router's load-balancing loss (the checkpoint's
coefficient) is on and logged as `<agent>/moe/...`.
"""
from configs import gpu_qwen3_30b_a3b_lora, tpu_pod_qwen3_8b


def get_config():
    c = tpu_pod_qwen3_8b.get_config()
    context = gpu_qwen3_30b_a3b_lora.CONTEXT
    c.controller.max_main_context = context
    c.controller.max_sub_context = context
    c.controller.max_observation_tokens = 1024
    for role in ("main", "sub"):
        a = c.agents[role]
        a.model.moe_matmul = "auto"  # megablox-style grouped matmul on TPU (ragged_dot)
        a.model.router_aux_loss_coef = 0.001  # Qwen3-MoE's own
        a.model.router_z_loss_coef = 0.0
        a.mesh = {"devices": 32, "fsdp": 4, "expert": 8, "tp": 1}
        a.sampler.batch_size = 256
        a.sampler.max_new_tokens = 1024
        a.sampler.prompt_buckets = (2048, 4096, context - 1024)
        a.loss.micro_batch_size = 32  # one 8192-token row per chip
    c.agents.sub.mesh = {"shared_with": "main"}
    return c
