"""Shared rollout test fixtures: a small generated world, its tools, a locally trained tokenizer, and a
scripted policy (a stand-in sampler that emits planned actions, token ids from the real tokenizer)."""
import functools

import numpy as np

from mgrpo_jax.data.synthetic import generate_questions, generate_world
from mgrpo_jax.data.tokenizer import train_tokenizer
from mgrpo_jax.rollout.sampler import Sample
from mgrpo_jax.rollout.tools import LocalSearch, ReadDocument


@functools.lru_cache(maxsize=None)
def world_and_questions(seed=0, n_questions=16):
    world = generate_world(seed, num_entities=40)
    return world, generate_questions(world, n_questions, seed=seed)


@functools.lru_cache(maxsize=None)
def tokenizer(seed=0):
    world, questions = world_and_questions(seed)
    texts = [d.contents for d in world.documents] + [q.question for q in questions]
    return train_tokenizer(texts, vocab_size=600)


def tools(seed=0):
    world, _ = world_and_questions(seed)
    return {"search": LocalSearch(world.documents), "read": ReadDocument(world.documents)}


class ScriptedPolicy:
    """Emits `script(prompt_text)` as the next turn; log-probs are a recognizable function of position."""

    def __init__(self, tok, script, version=0, max_new_tokens=64, max_prompt_tokens=4096):
        self.tok, self.script, self.version = tok, script, version
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.calls = []

    def generate(self, prompts, rng, stop_sequences):
        self.calls.append(len(prompts))
        out = []
        for p in prompts:
            text = self.script(self.tok.decode(p, skip_special_tokens=False))
            ids = np.asarray(self.tok.encode(text, add_special_tokens=False), np.int32)
            out.append(Sample(ids, -0.01 * (1 + np.arange(len(ids), dtype=np.float32)), "stop"))
        return out

    def update(self, params, version):
        self.params, self.version = params, version
