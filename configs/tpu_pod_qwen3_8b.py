"""Two ~8B Qwen3 agents on a TPU pod slice (e.g. v5p-64: 8 hosts x 4 chips), time-sharing one mesh.

Hardware: a multi-host TPU slice. Under multi-controller JAX a mesh that covers only some hosts' devices
does not work (LESSONS.md; Marin 3947), so both agents use one mesh over every device of every host
(`shared_with`) and take turns: rollouts, then the main update, then the sub update. To give each agent its
own hosts instead, run the decoupled preset (configs/decoupled_cpu.py shows the keys) as two jobs, one per
slice. Start it on every host with the same command; jax.distributed initializes from the TPU environment
(`distributed.auto`):

    python launch/train.py --config configs/tpu_pod_qwen3_8b.py --workdir gs://bucket/runs/qwen3_8b \
        --config.agents.main.checkpoint=/models/Qwen3-8B --config.agents.sub.checkpoint=/models/Qwen3-8B \
        --config.tokenizer.path=/models/Qwen3-8B

Install jax for TPU: `pip install -e '.[tpu]'`. Sharding: FSDP over 16 and tensor parallel over 2 (32 chips);
adjust `mesh` to the slice (fsdp x tp = devices, or devices=-1 style via the sizes of your slice). Attention
is `auto` (from the GPU preset): Pallas splash attention on TPU, sharded over the mesh. Memory per chip:
`python bench/scale.py --sections presets` (both agents' state + one micro-batch, against v5p and v5e).
"""
from ml_collections import ConfigDict

from configs import gpu_qwen3_0p6b


def get_config():
    c = gpu_qwen3_0p6b.get_config()
    c.distributed = ConfigDict({"auto": True})
    c.total_steps = 500
    c.mgrpo.num_queries = 16
    c.mgrpo.num_rollouts = 8
    for role in ("main", "sub"):
        a = c.agents[role]
        a.mesh = {"devices": 32, "fsdp": 16, "tp": 2}
        a.sampler.batch_size = 256
        a.loss.micro_batch_size = 16
    c.agents.sub.mesh = {"shared_with": "main"}
    return c
