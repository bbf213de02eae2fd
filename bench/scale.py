"""Will the train step fit the hardware? Compile-only memory and compile-time figures at real model sizes.

    python bench/scale.py                                  # everything below, Qwen3-0.6B and Qwen3-8B
    python bench/scale.py --sections memory --models configs/models/qwen3_0p6b.json --seq 8192 --remat full
    python bench/scale.py --sections depth --depths 2 36
    python bench/scale.py --sections presets
    python bench/scale.py --sections sampler,decode_flops

Nothing is materialized: parameters, optimizer state and batches are `jax.ShapeDtypeStruct`s carrying their
shardings, and every figure comes from `jax.jit(step).lower(abstract args).compile()` on fake CPU devices
(`--xla_force_host_platform_device_count`, set before jax is imported). Models come from Hugging Face
config.json values (`configs/models/*.json`), so no weights are needed.

Sections:
- memory: per device, the bytes of the parameters, the AdamW state (mu, nu) and the float32 gradient
  accumulator of `train.agent.AgentTrainer` (from shapes and shardings), and the temp memory XLA plans
  for one train micro-batch (`compiled.memory_analysis().temp_size_in_bytes`): `train.agent.batch_loss` under
  `jax.value_and_grad`, then an optax AdamW update, jitted like the trainer's step (`sharding.jit_sharded_step`:
  explicit shardings, donated state, traced under the mesh). One row of T tokens per data-parallel shard
  (a packed row: the same shape holds one long sequence or several short ones), for every T in
  `--seq`, every remat policy in `--remat` and every attention implementation in `--attention`.
- depth: the same step's trace + compile time at `--depths` layers, the width of the first model (wall time
  and the process's CPU time: on a shared machine the CPU time is the steadier figure).
- lora: per device, the AdamW state of a full fine-tune against that of LoRA adapters (`--lora-rank`, every
  projection targeted; `models.lora`), from shapes and shardings: the optimizer holds the adapters alone.
- presets: for each preset in configs/ that names hardware, both agents' parameters + optimizer +
  accumulator (they time-share the devices) + the larger micro-batch temp, per device, against the device's
  memory.
- sampler: for each preset, the rollout sampler (`rollout.sampler.Sampler`, its own sharded programs, the preset's
  sampler batch and buckets) per device: the rollout copy of the weights, the KV cache, and the peak of the
  prefill program at every prompt bucket and of the decode program (arguments + outputs - donated aliases +
  temp, from `memory_analysis`), against the preset's memory target (`SAMPLER_TARGETS`). The CPU backend has no
  bf16 matmul and converts every stacked bf16 weight to float32 once per program, so about twice the rollout
  weights of each temp is a CPU artefact: the figures are conservative for a GPU or TPU.
- decode_flops: XLA's `cost_analysis` FLOPs of one decode step (the decode program's loop body, layers unrolled)
  of the first model at cache sizes `--decode-caches`: the cache size alone should barely move it, since
  attention visits only the filled key tiles (a loop whose body XLA counts once; what grows with the cache
  outside that loop, e.g. masks over every slot, is counted). Also the measured wall time per decode step of a
  small model on this CPU at the same position for each cache size (the runtime check of the same claim).

XLA's CPU backend plans memory with its own scheduler and fusion decisions, which approximate but do not
equal a GPU's or TPU's (the CPU also computes some bf16 ops in float32); the figures are for comparing
layouts and catching what cannot fit, not for exact headroom. Prints; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS_DIR = os.path.join(ROOT, "configs", "models")

# preset module -> (model config.json, its device, that device's memory in bytes). The mesh, dtypes, remat,
# micro-batch and row length come from the preset itself.
PRESETS = {
    "gpu_qwen3_0p6b": ("qwen3_0p6b.json", "H100 80 GB", 80e9),
    "tpu_pod_qwen3_8b": ("qwen3_8b.json", "v5p 95 GB", 95e9),
    "gpu_qwen3_30b_a3b_lora": ("qwen3_30b_a3b.json", "H100 80 GB", 80e9),
    "tpu_pod_qwen3_30b_a3b": ("qwen3_30b_a3b.json", "v5p 95 GB", 95e9),
}
# preset -> the sampler's per-device memory target (issue 13: room left for both agents' training state).
SAMPLER_TARGETS = {"gpu_qwen3_0p6b": 60 * 2 ** 30, "tpu_pod_qwen3_8b": 80 * 2 ** 30,
                   "gpu_qwen3_30b_a3b_lora": 60 * 2 ** 30, "tpu_pod_qwen3_30b_a3b": 80 * 2 ** 30}
OTHER_DEVICES = (("H100 80 GB", 80e9), ("v5e 16 GB", 16e9), ("v5p 95 GB", 95e9))
PRESET_DEVICES = 32  # fake devices the presets' meshes need (the TPU preset's fsdp 16 x tp 2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="memory,depth,lora,presets,sampler,decode_flops",
                        help="comma-separated: memory,depth,lora,presets,sampler,decode_flops")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS),
                        help="the presets of the presets and sampler sections (default: all)")
    parser.add_argument("--lora-rank", type=int, default=16, help="adapter rank of the lora section")
    parser.add_argument("--models", nargs="+", default=[os.path.join(MODELS_DIR, "qwen3_0p6b.json"),
                                                        os.path.join(MODELS_DIR, "qwen3_8b.json")])
    parser.add_argument("--devices", type=int, default=8, help="devices of the memory/depth mesh")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (fsdp = devices / tp)")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 32768], help="tokens per sequence")
    parser.add_argument("--remat", nargs="+", default=None, help="remat policies (default: all)")
    parser.add_argument("--attention", nargs="+", default=None,
                        help="attention implementations (default: every one this build has that runs on CPU)")
    parser.add_argument("--param-dtype", default="float32")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 36])
    parser.add_argument("--depth-seq", type=int, default=2048, help="tokens per sequence of the depth section")
    parser.add_argument("--chunk-size", type=int, default=1024, help="loss.chunk_size (log-prob chunks)")
    parser.add_argument("--decode-caches", type=int, nargs="+", default=[1024, 4096, 16384],
                        help="cache sizes of the decode_flops section")
    parser.add_argument("--decode-batch", type=int, default=8, help="sampler rows of the decode_flops section")
    return parser.parse_args()


ARGS = parse_args()
_SECTIONS = set(ARGS.sections.split(","))
_NEEDED = max(ARGS.devices, PRESET_DEVICES if _SECTIONS & {"presets", "sampler"} else 1)
# Must happen before jax is imported: the host platform's device count is fixed when the backend starts.
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    + [f"--xla_force_host_platform_device_count={_NEEDED}"])
sys.path.insert(0, ROOT)

import dataclasses  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from mgrpo_jax import experiment, sharding  # noqa: E402
from mgrpo_jax.models import ModelConfig, abstract_model  # noqa: E402
from mgrpo_jax.models import lora as lora_lib  # noqa: E402
from mgrpo_jax.models import transformer  # noqa: E402
from mgrpo_jax.rollout import sampler as sampler_lib  # noqa: E402
from mgrpo_jax.train import agent as agent_lib  # noqa: E402
from mgrpo_jax.train import batch as batch_lib  # noqa: E402

GIB = 2 ** 30


def hf_config(path: str):
    """A Hugging Face config.json (its values, as shipped in configs/models/) -> transformers' config object."""
    import transformers

    with open(path, encoding="utf-8") as fh:
        values = json.load(fh)
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


def model_config(path: str, **overrides) -> ModelConfig:
    """A Hugging Face config.json -> ModelConfig."""
    return ModelConfig.from_hf(hf_config(path)).replace(**overrides)


def remat_policies() -> tuple[str, ...]:
    return tuple(getattr(transformer, "REMAT_POLICIES", ("none", "full")))


def attention_implementations() -> tuple[str, ...]:
    """The implementations this build has that compile on CPU (cudnn and splash need their accelerator)."""
    try:
        from mgrpo_jax.models import attention as attention_lib
    except ImportError:
        return ("dense",)
    names = getattr(attention_lib, "IMPLEMENTATIONS", ("dense",))
    return tuple(n for n in names if n in ("dense", "chunked"))


# ------------------------------------------------------------------------------------------ abstract state


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _per_device_bytes(tree, shardings) -> int:
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
    return total


@dataclasses.dataclass
class TrainState:
    """One agent's abstract train state on a mesh: what `AgentTrainer` holds, as shapes with shardings."""

    config: ModelConfig
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    params: object
    param_shardings: object
    tx: optax.GradientTransformation
    opt_state: object
    opt_shardings: object

    @property
    def params_bytes(self) -> int:
        return _per_device_bytes(self.params, self.param_shardings)

    @property
    def opt_bytes(self) -> int:
        return _per_device_bytes(self.opt_state, self.opt_shardings)

    @property
    def accumulator_bytes(self) -> int:
        """AgentTrainer's float32 gradient accumulator, sharded like the trained parameters (with LoRA, the
        adapters)."""
        params, _ = agent_lib.trainable_part(self.params, self.trainable)
        shardings, _ = agent_lib.trainable_part(self.param_shardings, self.trainable)
        f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32), params)
        return _per_device_bytes(f32, shardings)

    @property
    def trainable(self):
        """What the update trains: None (everything) or the LoRA adapters' filter, as `AgentTrainer` decides."""
        return agent_lib.trainable_filter(self.params)

    @property
    def state_bytes(self) -> int:
        return self.params_bytes + self.opt_bytes + self.accumulator_bytes


def train_state(config: ModelConfig, mesh: jax.sharding.Mesh) -> TrainState:
    graphdef, state = nnx.split(abstract_model(config))
    param_shardings = sharding.state_shardings(state, mesh)
    params = _abstract(state, param_shardings)
    tx = agent_lib.make_optimizer(agent_lib.OptimizerConfig())  # AdamW (mu, nu) + global-norm clipping
    trainable = agent_lib.trainable_filter(params)
    train, _ = agent_lib.trainable_part(params, trainable)
    train_shardings, _ = agent_lib.trainable_part(param_shardings, trainable)
    opt_shapes = jax.eval_shape(tx.init, train)
    opt_shardings = sharding.opt_state_shardings(opt_shapes, train, train_shardings)
    return TrainState(config, mesh, graphdef, params, param_shardings, tx, _abstract(opt_shapes, opt_shardings),
                      opt_shardings)


def abstract_batch(rows: int, length: int, batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """One packed micro-batch's fields as shapes: whatever `train.batch.empty_arrays` builds (the one place
    that knows the layout: tokens, positions, segment_ids, loss_mask, old_logp, advantages, weights), `rows`
    rows of `length` tokens, every field's dimension 0 over the data axis."""
    host = batch_lib.empty_arrays(1, length)
    return {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype, sharding=batch_sharding)
            for k, v in host.items()}


@dataclasses.dataclass(frozen=True)
class Seconds:
    """Wall time, and this process's CPU time (all its threads), which other jobs on a shared machine do not
    inflate."""

    wall: float
    cpu: float


def compile_micro_batch(ts: TrainState, rows: int, tokens: int, chunk_size: int):
    """jit(...).lower(...).compile() of one micro-batch's gradient + AdamW update; (compiled, Seconds)."""
    loss_cfg = agent_lib.LossConfig(chunk_size=min(chunk_size, tokens))

    def step(params, opt_state, batch):
        train, frozen = agent_lib.trainable_part(params, ts.trainable)

        def total_of(p):
            model = nnx.merge(ts.graphdef, agent_lib.join_trainable(p, frozen))
            total, denom, _ = agent_lib.batch_loss(model, batch, loss_cfg)
            return total, denom

        (total, denom), grads = jax.value_and_grad(total_of, has_aux=True)(train)
        updates, opt_state = ts.tx.update(grads, opt_state, train)
        train = optax.apply_updates(train, updates)
        return agent_lib.join_trainable(train, frozen), opt_state, {"loss": total / denom}

    data = sharding.batch_sharding(ts.mesh)
    jitted = sharding.jit_sharded_step(step, ts.param_shardings, ts.opt_shardings, data)
    # +1: next-token prediction reads tokens[:, :-1], so the model sees exactly `tokens` positions.
    batch = abstract_batch(rows, tokens + 1, data)
    start, cpu = time.perf_counter(), time.process_time()
    compiled = jitted.lower(ts.params, ts.opt_state, batch).compile()
    return compiled, Seconds(time.perf_counter() - start, time.process_time() - cpu)


def temp_bytes(compiled) -> int:
    return int(compiled.memory_analysis().temp_size_in_bytes)


def make_mesh(devices: int, tp: int, expert: int = 1) -> jax.sharding.Mesh:
    return sharding.make_agent_meshes({"bench": {"devices": devices, "tp": tp, "expert": expert}},
                                      devices=jax.devices()[:devices])["bench"]


def describe(config: ModelConfig) -> str:
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract_model(config))))
    return (f"hidden {config.hidden_size}, {config.num_layers} layers, {config.num_heads}/{config.num_kv_heads} "
            f"heads x {config.head_dim}, mlp {config.intermediate_size}, vocab {config.vocab_size}, "
            f"{'tied' if config.tie_word_embeddings else 'untied'}: {n / 1e9:.3f} B params")


def _gib(x: float) -> str:
    return f"{x / GIB:7.2f}"


# ------------------------------------------------------------------------------------------------ sections


def memory_section(args) -> None:
    mesh = make_mesh(args.devices, args.tp)
    fsdp = mesh.shape["fsdp"]
    policies = args.remat or remat_policies()
    impls = args.attention or attention_implementations()
    print(f"\n== memory per device: mesh fsdp {fsdp} x tp {mesh.shape['tp']}, one row per data shard "
          f"({fsdp} rows), params {args.param_dtype}, compute {args.dtype}; GiB")
    for path in args.models:
        base = model_config(path, param_dtype=args.param_dtype, dtype=args.dtype)
        ts = train_state(base, mesh)
        print(f"{os.path.basename(path)}: {describe(base)}")
        print(f"  params {_gib(ts.params_bytes)}  adamw {_gib(ts.opt_bytes)}  f32 grad accumulator "
              f"{_gib(ts.accumulator_bytes)}  = {_gib(ts.state_bytes)}")
        print(f"  {'T':>6} {'remat':>14} {'attention':>9} {'temp':>8} {'state+temp':>11} {'compile s':>9} "
              f"{'(cpu s)':>8}")
        for tokens in args.seq:
            for policy in policies:
                for impl in impls:
                    cfg = _with_policy(base, policy, impl)
                    ts_cfg = dataclasses.replace(ts, config=cfg, graphdef=nnx.split(abstract_model(cfg))[0])
                    try:
                        compiled, seconds = compile_micro_batch(ts_cfg, fsdp, tokens, args.chunk_size)
                    except Exception as e:  # noqa: BLE001 - a figure that cannot be had is printed, not fatal
                        print(f"  {tokens:6d} {policy:>14} {impl:>9}  failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]}")
                        continue
                    temp = temp_bytes(compiled)
                    print(f"  {tokens:6d} {policy:>14} {impl:>9} {_gib(temp):>8} {_gib(ts.state_bytes + temp):>11} "
                          f"{seconds.wall:9.1f} {seconds.cpu:8.1f}", flush=True)


def _with_policy(config: ModelConfig, policy: str, attention: str) -> ModelConfig:
    changes = {"remat": policy}
    if "attention" in {f.name for f in dataclasses.fields(ModelConfig)}:
        changes["attention"] = attention
    return config.replace(**changes)


def depth_section(args) -> None:
    mesh = make_mesh(args.devices, args.tp)
    base = model_config(args.models[0], param_dtype=args.param_dtype, dtype=args.dtype)
    policy = (args.remat or ["full"])[0]
    impl = (args.attention or ["dense"])[0]
    print(f"\n== train-step trace + compile time against depth: {os.path.basename(args.models[0])}'s width, "
          f"T = {args.depth_seq}, remat {policy}, attention {impl}, mesh fsdp {mesh.shape['fsdp']} x tp "
          f"{mesh.shape['tp']}")
    times = {}
    for depth in args.depths:
        cfg = _with_policy(base.replace(num_layers=depth), policy, impl)
        compiled, seconds = compile_micro_batch(train_state(cfg, mesh), mesh.shape["fsdp"], args.depth_seq,
                                                args.chunk_size)
        times[depth] = seconds
        print(f"  {depth:3d} layers: {seconds.wall:6.1f} s wall, {seconds.cpu:6.1f} s cpu   (temp "
              f"{temp_bytes(compiled) / GIB:.2f} GiB)", flush=True)
    first = args.depths[0]
    for depth in args.depths[1:]:
        print(f"  {depth} vs {first} layers: {times[depth].wall / times[first].wall:.2f}x wall, "
              f"{times[depth].cpu / times[first].cpu:.2f}x cpu")


def lora_section(args) -> None:
    mesh = make_mesh(args.devices, args.tp)
    rank = args.lora_rank
    print(f"\n== LoRA rank {rank} (every projection) vs full fine-tuning: AdamW state per device, mesh fsdp "
          f"{mesh.shape['fsdp']} x tp {mesh.shape['tp']}, params {args.param_dtype}; GiB")
    for path in args.models:
        base = model_config(path, param_dtype=args.param_dtype, dtype=args.dtype)
        full = train_state(base, mesh)
        adapted = train_state(base.replace(lora=lora_lib.LoraConfig(rank=rank, alpha=2.0 * rank)), mesh)
        n_full = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(full.params))
        n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora_lib.split(adapted.params)[0]))
        print(f"{os.path.basename(path)}: {describe(base)}; adapters {n_lora / 1e6:.2f} M params "
              f"({n_lora / n_full:.2%})")
        print(f"  full: adamw {_gib(full.opt_bytes)}  acc {_gib(full.accumulator_bytes)}  state "
              f"{_gib(full.state_bytes)}")
        print(f"  lora: adamw {_gib(adapted.opt_bytes)}  acc {_gib(adapted.accumulator_bytes)}  state "
              f"{_gib(adapted.state_bytes)}   optimizer state {adapted.opt_bytes / full.opt_bytes:.2%} of full",
              flush=True)


def _preset_agent(name: str, role: str = "main"):
    """A preset's agent -> (its ConfigDict, the ModelConfig it would run with the preset's checkpoint (shapes from
    configs/models/; dtypes, remat, attention, MoE and LoRA settings from the preset, as `launch/train.py` builds
    them), its mesh)."""
    c = importlib.import_module(f"configs.{name}").get_config()
    a = c.agents[role]
    cfg = experiment.checkpoint_model_config(hf_config(os.path.join(MODELS_DIR, PRESETS[name][0])), a,
                                             f"agents.{role}")
    mesh_cfg = a.mesh if "shared_with" not in a.mesh else c.agents[a.mesh["shared_with"]].mesh
    mesh = make_mesh(int(mesh_cfg["devices"]), int(mesh_cfg.get("tp", 1)), int(mesh_cfg.get("expert", 1)))
    return a, cfg, mesh


def _mesh_text(mesh) -> str:
    return " x ".join(f"{axis} {size}" for axis, size in mesh.shape.items())


def presets_section(args) -> None:
    print("\n== presets: per device, both agents' params + AdamW + f32 accumulator (they time-share the mesh) "
          "+ the larger micro-batch temp; GiB")
    for name in args.presets:
        model_file, device, capacity = PRESETS[name]
        c = importlib.import_module(f"configs.{name}").get_config()
        per_agent, temps = [], {}
        for role in ("main", "sub"):
            a, cfg, mesh = _preset_agent(name, role)
            context = c.controller.max_main_context if role == "main" else c.controller.max_sub_context
            length = int(a.loss.get("pack_len", 0)) or context  # the packed row length (experiment.pack_length)
            ts = train_state(cfg, mesh)
            key = (cfg, mesh, int(a.loss.micro_batch_size), length, int(a.loss.chunk_size))
            if key not in temps:  # the roles of most presets are the same program: compile it once
                compiled, _ = compile_micro_batch(ts, key[2], length - 1, key[4])
                temps[key] = temp_bytes(compiled)
            per_agent.append((role, ts, temps[key], key[2], length))
        state = sum(ts.state_bytes for _, ts, _, _, _ in per_agent)
        temp = max(t for _, _, t, _, _ in per_agent)
        total = state + temp
        ts0 = per_agent[0][1]
        lora = ts0.config.lora
        print(f"{name}: {os.path.basename(model_file)}, mesh {_mesh_text(ts0.mesh)}, params "
              f"{ts0.config.param_dtype}{f', LoRA rank {lora.rank}' if lora else ''}, remat {ts0.config.remat!r}, "
              f"compute {ts0.config.dtype}")
        for role, ts, t, rows, length in per_agent:
            print(f"  {role}: state {_gib(ts.state_bytes)} (params {_gib(ts.params_bytes).strip()}, adamw "
                  f"{_gib(ts.opt_bytes).strip()}, acc {_gib(ts.accumulator_bytes).strip()})  temp {_gib(t)} "
                  f"({rows} rows x {length} tokens per micro-batch)")
        verdict = "fits" if total <= capacity else "DOES NOT FIT"
        print(f"  total {_gib(total)} GiB per device vs {device} ({capacity / GIB:.1f} GiB): {verdict}; "
              + ", ".join(f"{d}: {total / cap:.0%}" for d, cap in OTHER_DEVICES))


def sampler_peak(compiled) -> tuple[int, int]:
    """(peak bytes per device = arguments + outputs - donated aliases + temp, temp bytes) of a compiled program."""
    m = compiled.memory_analysis()
    temp = int(m.temp_size_in_bytes)
    return (int(m.argument_size_in_bytes) + int(m.output_size_in_bytes) - int(m.alias_size_in_bytes) + temp,
            temp)


def sampler_section(args) -> None:
    print("\n== sampler per device (compile-only): rollout weights, KV cache, and the peak (args + outputs - "
          "donated + temp) of prefill at each bucket and of decode; GiB")
    for name in args.presets:
        a, cfg, mesh = _preset_agent(name)
        scfg = sampler_lib.SamplerConfig(batch_size=int(a.sampler.batch_size),
                                         max_new_tokens=int(a.sampler.max_new_tokens),
                                         prompt_buckets=tuple(a.sampler.prompt_buckets))
        graphdef, state = nnx.split(abstract_model(cfg))
        params = _abstract(state, sharding.state_shardings(state, mesh))  # the trainer's layout and dtype
        sampler = sampler_lib.Sampler(graphdef, cfg, scfg, mesh=mesh)
        rollout = sampler.rollout_params(params)
        weights = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
                      for x in jax.tree.leaves(rollout))
        cache_shapes = jax.eval_shape(sampler._init_impl)[0]
        programs = sampler._programs_for(params)
        cache = _per_device_bytes(cache_shapes, programs.cache_shardings)
        target = SAMPLER_TARGETS[name]
        print(f"{name}: {os.path.basename(PRESETS[name][0])}, mesh {_mesh_text(mesh)}, "
              f"{scfg.batch_size} rows x {scfg.max_len} slots, rollout weights {scfg.rollout_weights!r} in "
              f"{cfg.dtype}, attention {cfg.attention!r}")
        print(f"  rollout weights {_gib(weights)}  kv cache {_gib(cache)}  (target {target / GIB:.0f} GiB)")
        worst = 0
        rows = [(f"prefill {b}", "prefill", b) for b in scfg.prompt_buckets] + [("decode", "decode", None)]
        for label, program, bucket in rows:
            start = time.perf_counter()
            try:
                compiled = sampler.lowered(params, program, bucket).compile()
            except Exception as e:  # noqa: BLE001 - a figure that cannot be had is printed, not fatal
                print(f"  {label:>13}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                worst = float("inf")
                continue
            peak, temp = sampler_peak(compiled)
            worst = max(worst, peak)
            print(f"  {label:>13}: peak {_gib(peak)}  temp {_gib(temp)}   ({time.perf_counter() - start:.0f} s to "
                  f"compile)", flush=True)
        verdict = "meets" if worst <= target else "MISSES"
        print(f"  worst {_gib(worst)} GiB per device: {verdict} the {target / GIB:.0f} GiB target")


def _decode_sampler(cfg: ModelConfig, rows: int, cache: int) -> sampler_lib.Sampler:
    new = 16
    scfg = sampler_lib.SamplerConfig(batch_size=rows, max_new_tokens=new, prompt_buckets=(cache - new,))
    return sampler_lib.Sampler(nnx.split(abstract_model(cfg))[0], cfg, scfg)


def decode_flops_section(args) -> None:
    base = model_config(args.models[0], param_dtype=args.param_dtype, dtype=args.dtype)
    # cost_analysis counts a loop body once: unroll the layers. Attention as the presets have it ("auto").
    cfg = base.replace(scan_unroll=base.num_layers, attention=(args.attention or ["auto"])[0])
    print(f"\n== decode FLOPs per step (cost_analysis of the decode program's step, layers unrolled): "
          f"{os.path.basename(args.models[0])}, {args.decode_batch} rows, one device, attention {cfg.attention!r}")
    params = nnx.split(abstract_model(cfg))[1]
    flops = {}
    for cache in args.decode_caches:
        compiled = _decode_sampler(cfg, args.decode_batch, cache).lowered(params, "decode").compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops[cache] = float(cost["flops"])
        print(f"  cache {cache:6d}: {flops[cache] / 1e9:8.3f} GFLOP per step", flush=True)
    first, last = args.decode_caches[0], args.decode_caches[-1]
    print(f"  {last} vs {first}: {flops[last] / flops[first] - 1:+.1%} (target within 10%)")
    _decode_wall_time(args)


def _decode_wall_time(args) -> None:
    """Real decode steps of a small model on this CPU: the same prompt (same position) in caches of each size."""
    from mgrpo_jax.models import init_model

    cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, architecture="qwen3", qk_norm=True,
                      attention=(args.attention or ["auto"])[0])
    graphdef, state = nnx.split(init_model(cfg, seed=0))
    prompt = [[(7 * i + r) % 500 + 3 for i in range(100)] for r in range(4)]
    print(f"  measured: a {cfg.num_layers}-layer, hidden {cfg.hidden_size} model, 4 rows, 100-token prompts, "
          f"64 new tokens, greedy, attention {cfg.attention!r}; ms per decoded token on this CPU:")
    for cache in args.decode_caches:
        new = 64
        scfg = sampler_lib.SamplerConfig(batch_size=4, max_new_tokens=new, prompt_buckets=(128, cache - new),
                                         temperature=0.0)
        sampler = sampler_lib.Sampler(graphdef, cfg, scfg)
        sampler.generate(state, prompt, jax.random.key(0))  # compiles
        best = float("inf")
        for rep in range(3):
            sampler.release()
            before = time.perf_counter()
            samples = sampler.generate(state, prompt, jax.random.key(rep))
            best = min(best, time.perf_counter() - before)
        steps = max(len(s.tokens) for s in samples)
        print(f"    cache {cache:6d}: {1e3 * best / steps:7.2f} ms per step (prefill included, {steps} steps)",
              flush=True)


def main() -> None:
    args = ARGS
    devices = jax.devices()
    print(f"jax {jax.__version__}, {len(devices)} fake {devices[0].platform} devices, {os.cpu_count()} host cores; "
          f"remat policies {list(args.remat or remat_policies())}, attention "
          f"{list(args.attention or attention_implementations())}")
    if "memory" in _SECTIONS:
        memory_section(args)
    if "depth" in _SECTIONS:
        depth_section(args)
    if "lora" in _SECTIONS:
        lora_section(args)
    if "presets" in _SECTIONS:
        presets_section(args)
    if "sampler" in _SECTIONS:
        sampler_section(args)
    if "decode_flops" in _SECTIONS:
        decode_flops_section(args)


if __name__ == "__main__":
    main()
