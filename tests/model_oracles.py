"""Shared by the model tests: logits of transformers' PyTorch model (the oracle) and of ours on the same padded
batch, and random trajectories packed as update segments."""
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from mgrpo_jax.models import load_model, positions_from_mask
from mgrpo_jax.rollout.controller import Trajectory
from mgrpo_jax.train.batch import Segment


# Rows: left-padded, right-padded, full, heavily left-padded.
PADDED_MASK = np.array([[0, 0, 0, 1, 1, 1, 1, 1],
                        [1, 1, 1, 1, 1, 1, 0, 0],
                        [1, 1, 1, 1, 1, 1, 1, 1],
                        [0, 0, 0, 0, 0, 1, 1, 1]], np.int32)


def padded_batch(vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, mask, positions) [4, 8] of PADDED_MASK's rows, tokens drawn from [3, vocab)."""
    tokens = np.random.RandomState(0).randint(3, vocab, size=PADDED_MASK.shape).astype(np.int32)
    return tokens, PADDED_MASK, np.asarray(positions_from_mask(jnp.asarray(PADDED_MASK)))


def random_torch_model(hf_config, seed: int = 0):
    """transformers' model of `hf_config` with random weights large enough to matter (norm scales around 1)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model


def torch_logits(model, tokens, mask, positions) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions, dtype=torch.long)).logits.float().numpy()


def our_logits(model, tokens, mask, positions) -> np.ndarray:
    return np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))


def checkpoint_builder(tmp_path_factory, torch_model_of, tokens, mask, positions):
    """name -> (name, torch model, its saved checkpoint dir, our model loaded from it, our config, the torch
    logits on tokens/mask/positions), each built once (for a module-scoped fixture)."""
    built = {}

    def get(name):
        if name not in built:
            torch_model = torch_model_of(name)
            path = str(tmp_path_factory.mktemp(name))
            torch_model.save_pretrained(path)
            model, config = load_model(path)
            built[name] = (name, torch_model, path, model, config, torch_logits(torch_model, tokens, mask, positions))
        return built[name]

    return get


def random_segments(seed: int, count: int, vocab: int) -> list[Segment]:
    """`count` main-agent trajectories of 6-19 random tokens (the first third or so a prompt, the rest sampled
    with random behaviour log-probs), each a segment with a random advantage and weight 1."""
    rng = np.random.default_rng(seed)
    segments = []
    for index in range(count):
        n = int(rng.integers(6, 20))
        prompt = int(rng.integers(1, n // 2))
        tokens = rng.integers(0, vocab, size=n).tolist()
        logprobs = [0.0] + [float(-rng.uniform(1, 5)) for _ in range(n - 1)]
        trajectory = Trajectory("main", index // 4, index % 4, -1, prompt, tokens,
                                [0] * prompt + [1] * (n - prompt), logprobs, [(prompt, n)], "x", "answer", None, 0)
        segments.append(Segment(trajectory, float(rng.normal()), 1.0))
    return segments
