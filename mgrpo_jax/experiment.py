"""A config (`configs/*.py`, an ml_collections ConfigDict) -> every running part of an M-GRPO run.

`build_experiment(config, workdir)` validates the whole config once, with errors that name the key, then
builds, in order: the task data (a generated world written to workdir/data, or the user's files), the
tokenizer (trained locally or loaded), one mesh per agent, the models (random or a Hugging Face
checkpoint, born sharded on their mesh), a sampler per agent, tools, the controller, the agents' trainers and
the M-GRPO loop. Launch scripts, benchmarks and tests all build runs through it.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from mgrpo_jax import sharding
from mgrpo_jax.multihost import BroadcastToolSet
from mgrpo_jax.workdir import check_workdir, scratch_dir
from mgrpo_jax.models import ModelConfig, init_model
from mgrpo_jax.rollout.controller import Controller, ControllerConfig, SamplerPolicy, TextCodec, ToolSet
from mgrpo_jax.rollout.protocol import ProtocolConfig
from mgrpo_jax.rollout.rewards import RewardConfig
from mgrpo_jax.rollout.sampler import Sampler, SamplerConfig
from mgrpo_jax.train.agent import AgentTrainer, LossConfig, OptimizerConfig
from mgrpo_jax.train.alignment import AlignmentConfig
from mgrpo_jax.train.mgrpo import DynamicSamplingConfig, MGRPOConfig, MGRPOTrainer

TASK_KINDS = ("synthetic", "files")
MODEL_KEYS = ("architecture", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "param_dtype", "dtype", "remat",
              "attention") + ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                              "decoder_sparse_step", "mlp_only_layers", "moe_matmul", "moe_chunk_tokens",
                              "router_aux_loss_coef", "router_z_loss_coef")
# How a model runs rather than what it is: taken from `agents.<role>.model` also when the architecture comes from
# a checkpoint's config.json.
RUN_KEYS = ("moe_matmul", "moe_chunk_tokens", "router_aux_loss_coef", "router_z_loss_coef")


def to_dict(value: Any) -> Any:
    """ConfigDict (locked or not) / FrozenConfigDict / mapping -> plain nested dicts."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: to_dict(v) for k, v in value.items()}
    return value


def make(cls, values: Mapping[str, Any] | None, where: str, **extra):
    """`cls(**values, **extra)` with errors that name the config key: unknown keys and bad values."""
    values = dict(to_dict(values) or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"config {where}: unknown key(s) {unknown}; allowed: {sorted(names - set(extra))}")
    for key, value in list(values.items()):
        if isinstance(value, list):
            values[key] = tuple(value)
    try:
        return cls(**values, **extra)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config {where}: {e}") from e


SUB_JUDGES = ("", "facts")
MAIN_JUDGES = ("", "delegation", "delegation_exact")


def sub_judge(name: Any, task: Mapping[str, Any], data) -> Any:
    """config mgrpo.rewards.sub_judge -> RewardConfig.sub_judge: None for "" / None, a callable as it is, or a
    built-in judge by name: "facts", the generated world's facts (`data.synthetic.FactJudge`)."""
    from mgrpo_jax.data.synthetic import FactJudge

    return _world_judge("sub_judge", name, SUB_JUDGES, task, data, FactJudge)


def main_judge(name: Any, task: Mapping[str, Any], data, mode: str) -> Any:
    """config mgrpo.rewards.main_judge -> RewardConfig.main_judge: None for "" / None, a callable as it is, or a
    built-in judge by name: "delegation" (how faithfully the main agent delegated each hop of its generated
    question, partial credit for a near copy; `data.synthetic.DelegationJudge`) or "delegation_exact" (whole
    sub-questions only)."""
    from mgrpo_jax.data.synthetic import DelegationJudge

    if name and not callable(name) and mode == "single_agent":
        raise ValueError(f"config mgrpo.rewards.main_judge={name!r} scores delegations; mode='single_agent' makes "
                         "none (set main_judge='')")
    return _world_judge("main_judge", name, MAIN_JUDGES, task, data,
                        lambda world: DelegationJudge(world, soft=name == "delegation"))


def _world_judge(field: str, name: Any, names: Sequence[str], task: Mapping[str, Any], data, build) -> Any:
    """A judge config value resolved: None, a callable as it is, or build(the generated world of the task)."""
    if name is None or callable(name) or name == "":
        return name or None
    if name not in names:
        raise ValueError(f"config mgrpo.rewards.{field}={name!r} is not a judge; choose one of {list(names)}")
    if task.kind != "synthetic":
        raise ValueError(f"config mgrpo.rewards.{field}={name!r} checks episodes against a generated world's facts; "
                         f"task.kind={task.kind!r} has none (set task.kind='synthetic', or {field}='')")
    from mgrpo_jax.data.synthetic import generate_world

    world = generate_world(int(task.world_seed), int(task.num_entities))
    if [(d.doc_id, d.text) for d in world.documents] != [(d.doc_id, d.text) for d in data.documents]:
        raise ValueError(f"config mgrpo.rewards.{field}={name!r}: the run's corpus is not the world that "
                         f"task.world_seed={task.world_seed} and task.num_entities={task.num_entities} generate "
                         f"(data written by another version?); regenerate the data or set {field}=''")
    return build(world)


@dataclasses.dataclass
class Agent:
    """One agent's parts: model config, graph, mesh, sampler policy and (when it trains) its trainer."""

    name: str
    model_config: ModelConfig
    graphdef: nnx.GraphDef
    mesh: jax.sharding.Mesh
    policy: SamplerPolicy
    trainer: AgentTrainer | None


@dataclasses.dataclass
class Experiment:
    config: Any
    workdir: str
    tokenizer: Any
    data: Any  # mgrpo_jax.data.task.TaskData
    agents: dict[str, Agent]
    controller: Controller | None  # None in the decoupled sub job
    loop: MGRPOTrainer | None


def _model_config(agent_cfg, vocab_size: int, where: str) -> ModelConfig:
    values = dict(to_dict(agent_cfg.model))
    unknown = sorted(set(values) - set(MODEL_KEYS))
    if unknown:
        raise ValueError(f"config {where}.model: unknown key(s) {unknown}; allowed: {list(MODEL_KEYS)}")
    # What the Hugging Face family fixes (so that exports load in transformers as that family).
    arch = values.get("architecture", "llama")
    family = {"qk_norm": arch in ("qwen3", "qwen3_moe"), "attention_bias": arch == "qwen2"}
    return make(ModelConfig, values, f"{where}.model", vocab_size=vocab_size,
                max_position_embeddings=max(8192, vocab_size), lora=_lora(agent_cfg, where), **family)


def _lora(agent_cfg, where: str):
    """`agents.<role>.lora` -> a LoraConfig, or None (no key, or rank 0)."""
    from mgrpo_jax.models import lora as lora_lib

    try:
        return lora_lib.from_config(to_dict(agent_cfg.get("lora", None)))
    except (ValueError, TypeError) as e:
        raise ValueError(f"config {where}.{e}") from e


def checkpoint_model_config(hf_config, agent_cfg, where: str) -> ModelConfig:
    """The ModelConfig an agent runs with a checkpoint whose Hugging Face config is `hf_config`: the architecture
    from the checkpoint, how it runs (dtypes, remat, attention, `RUN_KEYS`) and its LoRA adapters from
    `agents.<role>` (also used by bench/scale.py on the presets' shapes)."""
    model = agent_cfg.model
    run = {k: v for k, v in to_dict(model).items() if k in RUN_KEYS}
    return ModelConfig.from_hf(hf_config, param_dtype=model.get("param_dtype", "float32"),
                               dtype=model.get("dtype", "float32"), remat=model.get("remat", False),
                               attention=model.get("attention", "dense")).replace(**run, lora=_lora(agent_cfg, where))


def _load_or_init(agent_cfg, tokenizer, mesh, where: str, seed: int):
    """(graphdef, params, param_shardings, model_config), born sharded on `mesh`."""
    from mgrpo_jax.models import hf

    checkpoint = agent_cfg.get("checkpoint", "")
    if checkpoint:
        model_cfg = checkpoint_model_config(hf.load_hf_config(checkpoint), agent_cfg, where)
        hf.check_tokenizer(tokenizer, model_cfg, where=f"{where} tokenizer")
        shardings = sharding.state_shardings(nnx.state(nnx.eval_shape(lambda: init_model(model_cfg))), mesh)
        graphdef, params = hf.load_params(checkpoint, model_cfg, shardings=shardings, lora_seed=seed)
        return graphdef, params, shardings, model_cfg
    model_cfg = _model_config(agent_cfg, len(tokenizer), where)
    graphdef, params, shardings = sharding.born_sharded(lambda: init_model(model_cfg, seed=seed), mesh)
    return graphdef, params, shardings, model_cfg


ROLES = ("all", "main", "sub")


def model_roles(mode: str) -> list[str]:
    """The roles that have a model of their own: one model plays both roles in single_agent and shared_model."""
    return ["main"] if mode in ("single_agent", "shared_model") else ["main", "sub"]


def check_checkpoints_given(config, job: str = "all") -> None:
    """A preset for real-size models (`agents.<role>.checkpoint_required`) refuses to start without its checkpoint:
    otherwise the agent would silently be the random `model` block, a toy, on a pod. Checks the models `job`
    builds."""
    for role in model_roles(config.mode):
        if job != "all" and role != job:
            continue
        agent_cfg = config.agents[role]
        if agent_cfg.get("checkpoint_required", False) and not agent_cfg.get("checkpoint", ""):
            raise ValueError(
                f"config agents.{role}.checkpoint is empty, but this preset trains a real-size model from a Hugging "
                f"Face checkpoint (agents.{role}.checkpoint_required=True): set --config.agents.{role}.checkpoint="
                f"/path/to/the/model (and --config.tokenizer.path), or --config.agents.{role}.checkpoint_required="
                f"False to train the config's `model` block from random weights")


def pack_length(loss: LossConfig, context: int, where: str) -> int:
    """The packed row length of an agent's batches: loss.pack_len, or its context limit when 0. A row must hold
    the longest trajectory the controller can produce, so a shorter pack_len is a config error."""
    if loss.pack_len == 0:
        return context
    if loss.pack_len < context:
        raise ValueError(f"config {where}.loss.pack_len={loss.pack_len} is shorter than the agent's context limit "
                         f"{context} (controller.max_*_context): a trajectory could not fit in a row; raise "
                         "pack_len, or set it to 0 to use the context limit")
    return loss.pack_len


def build_experiment(config, workdir: str, *, role: str = "all", sub_policy=None) -> Experiment:
    """Builds a run from its config (see configs/tiny_cpu.py for every key).

    role: "all" builds every agent (one program). The decoupled jobs (train/decoupled.py) build one agent each:
    "main" builds the main agent and its trainer, a controller whose sub-agent is `sub_policy` (a
    `train.service.RemoteSubPolicy`), and a loop that trains the main agent alone; "sub" builds the sub-agent
    and its trainer only (`controller` and `loop` are None).
    """
    from mgrpo_jax.data.task import check_tools, load_task

    if role not in ROLES:
        raise ValueError(f"role={role!r}; choose one of {list(ROLES)}")
    job = role  # `role` names each agent below
    check_workdir(workdir)
    mgrpo_cfg = config.mgrpo
    mode = config.mode
    if job != "all":
        if mode != "co_train":
            raise ValueError(f"config mode={mode!r}: the decoupled roles (--role main|sub) train main and sub-agent "
                             "as separate jobs, which is mode='co_train'")
        if mgrpo_cfg.alignment.d_max == "auto":
            raise ValueError("config mgrpo.alignment.d_max='auto' is not supported by the decoupled roles: the sub "
                             "job's batch shape must be known up front; set an integer d_max")
        if job == "main" and sub_policy is None:
            raise ValueError("role='main' needs sub_policy (the remote sub-agent)")
    check_checkpoints_given(config, job)
    protocol = make(ProtocolConfig, config.get("protocol", {}), "protocol")
    controller_cfg = make(ControllerConfig, config.controller, "controller")
    data = load_task(config, scratch_dir(workdir), protocol)  # generated data: local even for a gs:// run
    if job != "sub":  # one real call per tool, before any model is built: a dead retriever stops the run here
        check_tools(config.task, data.tools)
    tokenizer = data.tokenizer

    roles = ["main"] if mode == "single_agent" else ["main", "sub"]
    if job != "all":
        roles = [job]
    layout = {role: to_dict(config.agents[role].mesh) for role in roles}
    if mode == "shared_model":
        layout["sub"] = {"shared_with": "main"}
    for role in roles:
        layout[role] = {k: v for k, v in layout[role].items() if v not in ("", None)}
    meshes = sharding.make_agent_meshes(layout)

    alignment = make(AlignmentConfig, mgrpo_cfg.alignment, "mgrpo.alignment")
    reward_values = dict(to_dict(mgrpo_cfg.rewards))
    reward_values["sub_judge"] = sub_judge(reward_values.get("sub_judge"), config.task, data)
    reward_values["main_judge"] = main_judge(reward_values.get("main_judge"), config.task, data, mode)
    rewards = make(RewardConfig, reward_values, "mgrpo.rewards")
    dynamic = make(DynamicSamplingConfig, mgrpo_cfg.get("dynamic_sampling", {}), "mgrpo.dynamic_sampling")
    nested = ("alignment", "rewards", "dynamic_sampling", "num_queries")
    loop_values = {k: v for k, v in to_dict(mgrpo_cfg).items() if k not in nested}
    loop_mode = "main_only" if job == "main" else mode  # the decoupled main job trains the main agent alone
    loop_cfg = make(MGRPOConfig, loop_values, "mgrpo", mode=loop_mode, alignment=alignment, rewards=rewards,
                    dynamic_sampling=dynamic, seed=config.seed)
    num_queries = int(mgrpo_cfg.num_queries)
    if num_queries < 1:
        raise ValueError(f"config mgrpo.num_queries must be >= 1, got {num_queries}")
    # The longest trajectory each trained model sees: its context limit (shared_model: either role's).
    context = {"main": controller_cfg.max_main_context, "sub": controller_cfg.max_sub_context}
    if mode == "shared_model":
        context["main"] = max(context.values())

    agents: dict[str, Agent] = {}
    trainers: dict[str, Any] = {}
    for i, role in enumerate(model_roles(mode)):
        if job != "all" and role != job:
            continue
        where = f"agents.{role}"
        agent_cfg = config.agents[role]
        graphdef, params, shardings, model_cfg = _load_or_init(agent_cfg, tokenizer, meshes[role], where,
                                                               seed=config.seed + i)
        sampler_cfg = make(SamplerConfig, agent_cfg.sampler, f"{where}.sampler", eos_ids=(tokenizer.eos_token_id,),
                           pad_id=tokenizer.pad_token_id)
        policy = SamplerPolicy(Sampler(graphdef, model_cfg, sampler_cfg), params)
        trainer = None
        trains = role == "main" or mode == "co_train"
        if trains:
            optimizer = make(OptimizerConfig, agent_cfg.optimizer, f"{where}.optimizer")
            loss = make(LossConfig, agent_cfg.loss, f"{where}.loss")
            if not sampler_cfg.temperature > 0:  # greedy rollouts: every group has zero variance, no gradient
                raise ValueError(f"config {where}.sampler.temperature={sampler_cfg.temperature}: a training agent "
                                 "must sample (temperature > 0, e.g. 1.0); greedy decoding gives identical rollouts, "
                                 "zero advantages and no update. (Evaluation decodes greedily on its own.)")
            for key in ("temperature", "top_k", "top_p"):
                if getattr(loss, key) != getattr(sampler_cfg, key) and sampler_cfg.temperature > 0:
                    raise ValueError(f"config {where}.loss.{key}={getattr(loss, key)} differs from {where}.sampler."
                                     f"{key}={getattr(sampler_cfg, key)}: the trainer must score tokens under the "
                                     "distribution they were sampled from (set both to the same value)")
            ref = jax.tree.map(lambda x: x.copy(), params) if loss.kl_coef else None
            row_len = pack_length(loss, context[role], where)
            lora_dropout = model_cfg.lora is not None and model_cfg.lora.dropout > 0
            trainer = AgentTrainer(role, graphdef, params, shardings, optimizer, loss, row_len=row_len,
                                   pad_id=tokenizer.pad_token_id, ref_params=ref,
                                   dropout_seed=config.seed + i if lora_dropout else None)
            trainers[role] = trainer
            policy.update(trainer.params, trainer.version)
        agents[role] = Agent(role, model_cfg, graphdef, meshes[role], policy, trainer)
    if mode == "shared_model":
        trainers["sub"] = trainers["main"]
        agents["sub"] = agents["main"]

    if job == "sub":  # the sub job only trains and serves; the main job runs the episodes (and the tools)
        return Experiment(config, workdir, tokenizer, data, agents, None, None)
    if job == "main":
        trainers = {"main": trainers["main"]}
    tools = ToolSet(data.tools)
    if jax.process_count() > 1:  # one truth across hosts: process 0 runs the tools, every process sees its results
        tools = BroadcastToolSet(tools)
    controller = Controller(
        config=controller_cfg, codec=TextCodec(tokenizer, controller_cfg.max_observation_tokens),
        main_policy=agents["main"].policy,
        main_protocol=protocol.single() if mode == "single_agent" else protocol.main(), tools=tools,
        sub_policy=None if mode == "single_agent" else (sub_policy if job == "main" else agents["sub"].policy),
        sub_protocol=None if mode == "single_agent" else protocol.sub(),
        delegate_action=None if mode == "single_agent" else protocol.delegate)
    loop = MGRPOTrainer(loop_cfg, controller, trainers)
    return Experiment(config, workdir, tokenizer, data, agents, controller, loop)
