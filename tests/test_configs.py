"""Every preset in configs/ loads and its sections validate (models that need checkpoints are not built)."""
import glob
import importlib
import os

import pytest

from mgrpo_jax.experiment import make, to_dict
from mgrpo_jax.rollout.controller import ControllerConfig
from mgrpo_jax.rollout.protocol import ProtocolConfig
from mgrpo_jax.rollout.rewards import RewardConfig
from mgrpo_jax.rollout.sampler import SamplerConfig
from mgrpo_jax.sharding import _parse_layout
from mgrpo_jax.train.agent import LossConfig, OptimizerConfig
from mgrpo_jax.train.alignment import AlignmentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith("__init__.py"))


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
    rows = config.mgrpo.num_queries * config.mgrpo.num_rollouts
    for role in ("main", "sub"):
        agent = config.agents[role]
        sampler = make(SamplerConfig, agent.sampler, f"agents.{role}.sampler")
        loss = make(LossConfig, agent.loss, f"agents.{role}.loss")
        make(OptimizerConfig, agent.optimizer, f"agents.{role}.optimizer")
        assert loss.temperature == sampler.temperature
        assert rows % loss.micro_batch_size == 0
        context = controller.max_main_context if role == "main" else controller.max_sub_context
        assert sampler.prompt_buckets[-1] >= context - sampler.max_new_tokens, (role, sampler.prompt_buckets)
