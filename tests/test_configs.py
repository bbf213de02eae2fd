"""Every preset in configs/ loads and its sections validate (models that need checkpoints are not built)."""
import glob
import importlib
import os

import pytest

from mgrpo_jax.experiment import make, pack_length, to_dict
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
    make(RewardConfig, config.mgrpo.rewards, "mgrpo.rewards")
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
        assert loss.micro_batch_size % mesh.fsdp == 0  # packed rows split over the data-parallel axis
        assert sampler.prompt_buckets[-1] >= context - sampler.max_new_tokens, (role, sampler.prompt_buckets)
    if config.mode == "shared_model":  # one model (main's sampler) also runs the sub-agent's episodes
        sampler = make(SamplerConfig, config.agents.main.sampler, "agents.main.sampler")
        assert sampler.prompt_buckets[-1] >= controller.max_sub_context - sampler.max_new_tokens


def test_repro_settings_share_one_budget_and_start_from_their_warm_start():
    """The comparisons differ only in what they compare: same RL budget, data, optimizer and eval; each starts
    from the warm start of its kind and trains on the questions that warm start did not demonstrate."""
    from configs.repro import common, warm_start

    configs = {s: importlib.import_module(f"configs.repro.{s}").get_config("/r") for s in REPRO_SETTINGS}
    assert set(configs) == set(common.WARM_START_OF)
    # pack_len is layout (rows sized to each kind's context), not what the loss computes.
    loss = lambda c: {k: v for k, v in to_dict(c.agents.main.loss).items() if k != "pack_len"}  # noqa: E731
    same = lambda c: (c.total_steps, c.mgrpo.num_queries, c.mgrpo.num_rollouts, c.eval_questions,  # noqa: E731
                      c.task.to_dict(), to_dict(c.agents.main.optimizer), loss(c),
                      to_dict(c.mgrpo.rewards), c.controller.max_observation_tokens)
    assert len({repr(same(c)) for c in configs.values()}) == 1
    for setting, c in configs.items():
        kind = common.WARM_START_OF[setting]
        assert c.agents.main.checkpoint == f"/r/warm_{kind}/warm_start/main" == c.tokenizer.path
        assert c.task.skip_train_questions == c.warm_start.max_questions > 0
        ws = warm_start.get_config(kind)
        assert not ws.agents.main.checkpoint and ws.mode == common.WARM_START_MODE[kind]
        assert to_dict(ws.controller) == to_dict(c.controller) and to_dict(ws.agents.main.model) == \
            to_dict(c.agents.main.model) and ws.task.to_dict() == {**c.task.to_dict(), "skip_train_questions": 0}
    assert configs["co_train"].mode == configs["co_train_no_alignment"].mode == "co_train"
    assert configs["co_train"].mgrpo.alignment.pad_mode == "duplicate"
    assert configs["co_train_no_alignment"].mgrpo.alignment.pad_mode == "mask"
    assert not configs["co_train_no_alignment"].mgrpo.alignment.fill_empty_from_siblings
    assert configs["main_only"].agents.sub.checkpoint == "/r/warm_multi/warm_start/sub"
