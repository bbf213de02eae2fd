"""tiny_cpu with mixture-of-experts agents: M-GRPO co-training of two tiny Qwen3-MoE models, expert parallel.

Hardware: one CPU machine (8 fake devices). Each agent is a 3-layer Qwen3-MoE (8 experts, 2 per token; the last
layer dense, as `mlp_only_layers` allows) on its own 4 devices, experts split over them: the main agent on
fsdp 2 x expert 2, the sub-agent on expert 4. The router's load-balancing and z losses are on (and logged as
`<agent>/moe/...`). It shows the machinery (random weights earn no reward), like tiny_cpu.

    python launch/train.py --config configs/tiny_moe_cpu.py --workdir /tmp/mgrpo_moe --config.total_steps=3

With LoRA adapters (on every projection, experts' included; base frozen), and the merged export:

    python launch/train.py --config configs/tiny_moe_cpu.py --workdir /tmp/mgrpo_moe_lora --config.total_steps=2 \
        --config.agents.main.lora.rank=4 --config.agents.sub.lora.rank=4
    python launch/export_hf.py --config configs/tiny_moe_cpu.py --workdir /tmp/mgrpo_moe_lora --agent main \
        --config.agents.main.lora.rank=4 --config.agents.sub.lora.rank=4 --output /tmp/moe_lora_hf

A random main agent never delegates, so the sub-agent gets no trajectories (its steps report 0 tokens).
"""
from configs import tiny_cpu


def get_config():
    c = tiny_cpu.get_config()
    for role, mesh in (("main", {"devices": 4, "fsdp": 2, "expert": 2, "tp": 1}),
                       ("sub", {"devices": 4, "fsdp": 1, "expert": 4, "tp": 1})):
        a = c.agents[role]
        a.model.architecture = "qwen3_moe"
        a.model.num_experts = 8
        a.model.num_experts_per_tok = 2
        a.model.moe_intermediate_size = 32
        a.model.norm_topk_prob = True
        a.model.decoder_sparse_step = 1
        a.model.mlp_only_layers = (2,)
        a.model.num_layers = 3
        a.model.moe_matmul = "auto"  # ragged_dot on TPU/GPU, the tiled grouped matmul on CPU
        a.model.router_aux_loss_coef = 0.01
        a.model.router_z_loss_coef = 0.001
        a.mesh = mesh
        a.loss.micro_batch_size = 4  # a multiple of the data-parallel shards (fsdp x expert)
        # Random agents earn equal (zero) rewards, so every advantage is 0; keeping those segments makes every
        # step run the update (the router's losses still give a gradient), rather than skipping it as empty.
        a.loss.skip_zero_advantage = False
    return c
