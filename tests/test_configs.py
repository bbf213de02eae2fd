"""Every preset in configs/ loads and its sections validate (models that need checkpoints are not built)."""
import glob
import importlib
import os

import pytest
from ml_collections import ConfigDict

from mgrpo_jax.data import synthetic
from mgrpo_jax.experiment import MAIN_JUDGES, SUB_JUDGES, main_judge, make, pack_length, sub_judge, to_dict
from mgrpo_jax.rollout.controller import ControllerConfig
from mgrpo_jax.rollout.protocol import ProtocolConfig
from mgrpo_jax.rollout.rewards import RewardConfig
from mgrpo_jax.rollout.sampler import SamplerConfig
from mgrpo_jax.sharding import _parse_layout
from mgrpo_jax.train.agent import LossConfig, OptimizerConfig
from mgrpo_jax.train.alignment import AlignmentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(os.path.relpath(p, os.path.join(ROOT, "configs"))[:-3].replace(os.sep, ".")
                 for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) + glob.glob(os.path.join(ROOT, "configs",
                                                                                                 "repro", "*.py"))
                 if os.path.basename(p) not in ("__init__.py", "common.py"))
REPRO_SETTINGS = ("single_agent", "main_only", "co_train", "co_train_no_alignment", "shared_model")


@pytest.mark.parametrize("name", PRESETS)
def test_preset_sections_validate(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.mode in ("co_train", "main_only", "single_agent", "shared_model")
    make(ProtocolConfig, config.protocol, "protocol")
    controller = make(ControllerConfig, config.controller, "controller")
    make(AlignmentConfig, config.mgrpo.alignment, "mgrpo.alignment")
    rewards = to_dict(config.mgrpo.rewards)
    # A built-in judge is named here and built against the task's data (experiment.sub_judge / main_judge,
    # tested below).
    assert rewards.get("sub_judge", "") in SUB_JUDGES and rewards.get("main_judge", "") in MAIN_JUDGES
    make(RewardConfig, {**rewards, "sub_judge": (lambda t: 1.0) if rewards.get("sub_judge") else None,
                        "main_judge": (lambda t, subs: 1.0) if rewards.get("main_judge") else None}, "mgrpo.rewards")
    _parse_layout({role: {k: v for k, v in to_dict(config.agents[role].mesh).items() if v not in ("", None)}
                   for role in ("main", "sub")})
    for role in ("main", "sub"):
        agent = config.agents[role]
        sampler = make(SamplerConfig, agent.sampler, f"agents.{role}.sampler")
        loss = make(LossConfig, agent.loss, f"agents.{role}.loss")
        make(OptimizerConfig, agent.optimizer, f"agents.{role}.optimizer")
        assert loss.temperature == sampler.temperature
        context = controller.max_main_context if role == "main" else controller.max_sub_context
        pack_length(loss, context, f"agents.{role}")  # packed rows hold the longest trajectory
        mesh = config.agents[config.agents[role].mesh.get("shared_with") or role].mesh
        # packed rows split over the data-parallel axes (fsdp, and expert where experts are split)
        assert loss.micro_batch_size % (mesh.fsdp * mesh.get("expert", 1)) == 0
        assert sampler.prompt_buckets[-1] >= context - sampler.max_new_tokens, (role, sampler.prompt_buckets)
    if config.mode == "shared_model":  # one model (main's sampler) also runs the sub-agent's episodes
        sampler = make(SamplerConfig, config.agents.main.sampler, "agents.main.sampler")
        assert sampler.prompt_buckets[-1] >= controller.max_sub_context - sampler.max_new_tokens


def test_sub_judge_by_name_is_built_for_the_run_s_generated_world():
    import types

    task = ConfigDict({"kind": "synthetic", "world_seed": 5, "num_entities": 40})
    world = synthetic.generate_world(5, 40)
    data = types.SimpleNamespace(documents=list(world.documents))
    assert sub_judge("", task, data) is None and sub_judge(None, task, data) is None
    judge = sub_judge("facts", task, data)
    hop = synthetic.generate_questions(world, 5, hops=(1,), seed=0)[0].chain[0]
    assert judge(types.SimpleNamespace(task=hop.question, final=hop.answer)) == 1.0
    assert sub_judge(judge, task, data) is judge  # a callable passes through
    with pytest.raises(ValueError, match="sub_judge='llm' is not a judge"):
        sub_judge("llm", task, data)
    with pytest.raises(ValueError, match="task.kind='files' has none"):
        sub_judge("facts", ConfigDict({"kind": "files"}), data)
    with pytest.raises(ValueError, match="not the world that task.world_seed=6"):
        sub_judge("facts", ConfigDict({"kind": "synthetic", "world_seed": 6, "num_entities": 40}), data)


def test_main_judge_by_name_is_built_for_the_run_s_generated_world():
    import types

    task = ConfigDict({"kind": "synthetic", "world_seed": 5, "num_entities": 40})
    world = synthetic.generate_world(5, 40)
    data = types.SimpleNamespace(documents=list(world.documents))
    assert main_judge("", task, data, "co_train") is None
    q = synthetic.generate_questions(world, 5, hops=(1,), seed=0)[0]
    main = types.SimpleNamespace(task=q.question)
    near = types.SimpleNamespace(task=q.chain[0].question.replace("?", "s?"), final="x", format_ok=True)
    soft = main_judge("delegation", task, data, "co_train")
    exact = main_judge("delegation_exact", task, data, "main_only")
    assert 0.9 < soft(main, [near]) < 1.0 and exact(main, [near]) == 0.0  # "delegation" gives partial credit
    with pytest.raises(ValueError, match="main_judge='facts' is not a judge"):
        main_judge("facts", task, data, "co_train")
    with pytest.raises(ValueError, match="mode='single_agent' makes none"):
        main_judge("delegation", task, data, "single_agent")
    with pytest.raises(ValueError, match="main_judge='delegation'.*task.kind='files' has none"):
        main_judge("delegation", ConfigDict({"kind": "files"}), data, "co_train")


def test_repro_settings_share_one_budget_and_start_from_their_warm_start():
    """The comparisons differ only in what they compare: same RL budget, data, optimizer and eval; each starts
    from the warm start of its kind, on the task that warm start was trained on, and RL trains on the heads that
    its demonstrations never started from (the three-way split)."""
    from configs.repro import common, warm_start

    configs = {s: importlib.import_module(f"configs.repro.{s}").get_config("/r") for s in common.SETTINGS}
    assert set(configs) == set(common.WARM_START_OF) == set(common.SETTING_NOTES)
    assert all(set(group) <= set(common.SETTINGS) for group in common.GROUPS.values())
    # pack_len is layout (rows sized to each kind's context), not what the loss computes.
    loss = lambda c: {k: v for k, v in to_dict(c.agents.main.loss).items() if k != "pack_len"}  # noqa: E731
    same = lambda c: (c.total_steps, c.mgrpo.num_queries, c.mgrpo.num_rollouts, c.eval_questions,  # noqa: E731
                      c.eval_every, c.eval_train_questions, c.task.to_dict(), to_dict(c.agents.main.optimizer),
                      loss(c), to_dict(c.mgrpo.rewards), c.controller.max_observation_tokens)
    # co_train_lora differs from co_train in its adapters and their (larger) learning rate alone.
    lora = configs.pop("co_train_lora")
    assert lora.agents.main.lora.rank == lora.agents.sub.lora.rank == common.LORA_RANK
    assert configs["co_train"].agents.main.lora.rank == 0
    for role in ("main", "sub"):
        assert lora.agents[role].optimizer.learning_rate == common.LORA_LEARNING_RATE
        lora.agents[role].lora = configs["co_train"].agents[role].lora
        lora.agents[role].optimizer = configs["co_train"].agents[role].optimizer
    assert to_dict(lora) == to_dict(configs["co_train"])
    # The *_judge and *_delegation settings differ from theirs in one judge and its weight alone.
    for suffix, judge, weight, expected in (("_judge", "sub_judge", "beta_j", ("facts", common.JUDGE_WEIGHT)),
                                            ("_delegation", "main_judge", "alpha_j",
                                             ("delegation", common.DELEGATION_WEIGHT))):
        for base in ("co_train", "bottleneck_co_train"):
            judged = configs.pop(base + suffix)
            assert (judged.mgrpo.rewards[judge], judged.mgrpo.rewards[weight]) == expected
            assert (configs[base].mgrpo.rewards[judge], configs[base].mgrpo.rewards[weight]) == ("", 0.0)
            judged.mgrpo.rewards = configs[base].mgrpo.rewards
            assert to_dict(judged) == to_dict(configs[base])
    assert len({repr(same(c)) for c in configs.values()}) == 1
    any_config = configs["co_train"]
    assert any_config.task.rl_fraction > 0 and not any_config.task.skip_train_questions
    assert 0 < any_config.eval_every < any_config.total_steps and any_config.eval_train_questions > 0
    for setting, c in configs.items():
        kind = common.WARM_START_OF[setting]
        assert c.agents.main.checkpoint == f"/r/warm_{kind}/warm_start/main" == c.tokenizer.path
        ws = warm_start.get_config(kind)
        assert not ws.agents.main.checkpoint and ws.mode == common.WARM_START_MODE[kind]
        assert to_dict(ws.controller) == to_dict(c.controller) and to_dict(ws.agents.main.model) == \
            to_dict(c.agents.main.model) and ws.task.to_dict() == c.task.to_dict()
        assert ws.warm_start.explore_k == c.mgrpo.num_rollouts  # the room it reports is RL's groups'
    assert {s: c.mode for s, c in configs.items()} == {
        "co_train": "co_train", "co_train_no_alignment": "co_train", "main_only": "main_only",
        "single_agent": "single_agent", "shared_model": "shared_model", "bottleneck_co_train": "co_train",
        "bottleneck_main_only": "main_only", "bottleneck_single_agent": "single_agent",
        "co_train_dynamic": "co_train", "bottleneck_co_train_dynamic": "co_train",
        "bottleneck_main_only_dynamic": "main_only"}
    # The *_dynamic settings differ from theirs in dynamic sampling alone.
    for setting, base in (("co_train_dynamic", "co_train"), ("bottleneck_co_train_dynamic", "bottleneck_co_train"),
                          ("bottleneck_main_only_dynamic", "bottleneck_main_only")):
        dynamic = configs[setting]
        assert dynamic.mgrpo.dynamic_sampling.enabled and not configs[base].mgrpo.dynamic_sampling.enabled
        assert dynamic.mgrpo.dynamic_sampling.max_rounds == common.DYNAMIC_MAX_ROUNDS
        dynamic.mgrpo.dynamic_sampling = configs[base].mgrpo.dynamic_sampling
        assert to_dict(dynamic) == to_dict(configs[base])
    assert configs["co_train"].mgrpo.alignment.pad_mode == "duplicate"
    assert configs["co_train_no_alignment"].mgrpo.alignment.pad_mode == "mask"
    assert not configs["co_train_no_alignment"].mgrpo.alignment.fill_empty_from_siblings
    assert configs["main_only"].agents.sub.checkpoint == "/r/warm_multi/warm_start/sub"
    assert configs["bottleneck_main_only"].agents.sub.checkpoint == "/r/warm_weak_sub/warm_start/sub"
    # The bottleneck warm starts differ from the core ones only in which teacher takes the shortcuts.
    for core, bottleneck in (("multi", "weak_sub"), ("single", "single_weak_sub")):
        core, weak = to_dict(warm_start.get_config(core)), to_dict(warm_start.get_config(bottleneck))
        assert core["warm_start"]["shortcuts"] == {"main": common.SHORTCUT, "sub": 0.0}
        assert weak["warm_start"]["shortcuts"] == {"main": 0.0, "sub": common.SHORTCUT}
        weak["warm_start"]["shortcuts"] = core["warm_start"]["shortcuts"]
        assert weak == core


def _parameters(model_cfg, vocab=1024):
    import jax
    from flax import nnx

    from mgrpo_jax.experiment import _model_config
    from mgrpo_jax.models import init_model

    cfg = _model_config(ConfigDict({"model": model_cfg}), vocab, "agents")
    return sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: init_model(cfg)), nnx.Param)))


def test_repro_single_agent_has_as_many_parameters_as_main_and_sub_together():
    from configs.repro import common

    multi, single = common.warm_start_config("multi"), common.warm_start_config("single")
    both = _parameters(multi.agents.main.model) + _parameters(multi.agents.sub.model)
    assert abs(_parameters(single.agents.main.model) / both - 1) < 0.02


@pytest.mark.parametrize("name", ["gpu_qwen3_0p6b", "tpu_pod_qwen3_8b", "gpu_qwen3_30b_a3b_lora",
                                  "tpu_pod_qwen3_30b_a3b"])
def test_real_size_presets_refuse_to_start_without_their_checkpoints(name, tmp_path):
    from mgrpo_jax.experiment import build_experiment, check_checkpoints_given

    config = importlib.import_module(f"configs.{name}").get_config()
    # Through build_experiment, before any data is generated or model built.
    with pytest.raises(ValueError, match=r"agents.main.checkpoint is empty.*--config.agents.main.checkpoint="):
        build_experiment(config, str(tmp_path / "run"))
    config.agents.main.checkpoint = "/models/Qwen3-0.6B"
    with pytest.raises(ValueError, match="agents.sub.checkpoint is empty"):
        check_checkpoints_given(config)
    check_checkpoints_given(config, "main")  # the decoupled main job builds the main agent only
    config.mode = "shared_model"  # one model plays both roles: the sub-agent's checkpoint is never read
    check_checkpoints_given(config)
    config.mode = "co_train"
    config.agents.sub.checkpoint_required = False  # opting out trains the `model` block from random weights
    check_checkpoints_given(config)
    check_checkpoints_given(importlib.import_module("configs.tiny_cpu").get_config())  # the toy default needs none
