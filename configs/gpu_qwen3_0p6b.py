"""Two ~0.6B Qwen3 agents time-sharing one GPU (e.g. one H100 80 GB).

Hardware: 1 GPU; both agents' meshes are the same single device (`shared_with`), so their updates run one
after the other. Models: local Hugging Face checkpoints (no hub downloads), e.g. Qwen3-0.6B for both roles:

    python launch/train.py --config configs/gpu_qwen3_0p6b.py --workdir /runs/qwen3_0p6b \
        --config.agents.main.checkpoint=/models/Qwen3-0.6B --config.agents.sub.checkpoint=/models/Qwen3-0.6B \
        --config.tokenizer.path=/models/Qwen3-0.6B

Task: the generated deep-research world by default; set task.kind=files with train_files / eval_files /
corpus_file (or retriever_url) for your own data. Install jax for CUDA: `pip install -e '.[cuda]'`.
Memory: float32 master weights + AdamW moments + the float32 gradient accumulator (9.5 GB per agent, both
agents on the one device), bf16 compute, scanned layers rematerialized in full (`model.remat="full"`) and
attention picked per backend (`model.attention="auto"`: cuDNN flash attention on the GPU where the layout
allows, else the blockwise `chunked`). `python bench/scale.py --sections presets` compiles this preset's train
step on abstract shapes and prints its per-device total against the device's memory.
"""
from configs import tiny_cpu


def get_config():
    c = tiny_cpu.get_config()
    c.total_steps = 300
    c.log_every = 1
    c.eval_every = 50
    c.eval_questions = 128
    c.task.num_entities = 400
    c.task.num_questions = 4000
    c.task.hops = (1, 2, 3)
    c.task.search_top_k = 3
    c.task.snippet_chars = 200
    c.controller.max_main_turns = 8
    c.controller.max_sub_turns = 6
    c.controller.max_delegations = 4
    c.controller.max_main_context = 4096
    c.controller.max_sub_context = 4096
    c.controller.max_observation_tokens = 512
    c.mgrpo.num_queries = 2  # the paper code's 2 queries x 8 rollouts per step
    c.mgrpo.num_rollouts = 8
    c.mgrpo.alignment.d_max = 4
    for role in ("main", "sub"):
        a = c.agents[role]
        a.checkpoint = ""  # set to a local Qwen3-0.6B directory (see the docstring)
        a.checkpoint_required = True  # without one the agent would be the tiny random model
        a.model.param_dtype = "float32"
        a.model.dtype = "bfloat16"
        a.model.remat = "full"
        a.model.attention = "auto"
        a.mesh = {"devices": 1, "fsdp": 1, "tp": 1}
        a.sampler.batch_size = 64
        a.sampler.max_new_tokens = 1024
        a.sampler.prompt_buckets = (1024, 2048, 3072)
        a.optimizer.learning_rate = 1e-6  # the paper code's
        a.loss.chunk_size = 1024
        a.loss.micro_batch_size = 4
    c.agents.sub.mesh = {"shared_with": "main"}
    return c
