"""The KV-cache sampler: a jitted prefill and a `lax.while_loop` decode, compiled once per prompt bucket.

Shapes are fixed for a whole run: the batch is always `batch_size` rows (short batches are padded with inert
rows), prompts are left-padded to the smallest of a few static `prompt_buckets`, and every call decodes up to
`max_new_tokens`. So the sampler compiles once per bucket, never per call (LESSONS.md, item 14). A prompt
longer than the largest bucket is left-truncated or rejected, per `overflow`, never given a new shape.

Log-probs are returned under the exact distribution sampled from: softmax(logits / temperature), restricted
to the top-k / top-p set when those are on (`mgrpo_jax.kernels.filter_logits`, the one definition); greedy
decoding (temperature 0) picks each token with probability 1, so its log-probs are 0 and it skips the softmax
and the random keys altogether. They equal what the trainer recomputes with `token_logprobs` /
`chunked_token_logprobs(..., temperature=, top_k=, top_p=)` given the same three values (LESSONS.md, item 8).

Weights are arguments: pass the trainer's current parameters (`nnx.State`) and nothing is copied.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgrpo_jax.kernels import filter_logits
from mgrpo_jax.models.transformer import KVCache, ModelConfig, positions_from_mask

OVERFLOW_MODES = ("left_truncate", "error")
FINISH_REASONS = ("length", "eos", "stop")  # index = the code in `finish` arrays
_WILDCARD = -2  # stop-table filler that matches any token
_NO_TOKEN = -1  # window filler before enough tokens were generated
_NEVER = -3  # fills unused stop-table rows: equals no token and no filler, so the row never matches


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static sampling settings (changing any of them compiles a new program).

    temperature: > 0 samples from softmax(logits / temperature); 0 decodes greedily.
    top_k: 0 = off. top_p: 1.0 = off.
    prompt_buckets: ascending prompt lengths; a prompt is left-padded to the smallest that fits.
    max_stop_sequences / max_stop_tokens: the fixed shape of the stop table (stop sequences are data).
    """

    batch_size: int
    max_new_tokens: int
    prompt_buckets: tuple[int, ...] = (64, 128, 256)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    overflow: str = "left_truncate"
    max_stop_sequences: int = 8
    max_stop_tokens: int = 8

    def __post_init__(self):
        object.__setattr__(self, "prompt_buckets", tuple(int(b) for b in self.prompt_buckets))
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"sampler batch_size and max_new_tokens must be >= 1, got {self.batch_size}, "
                             f"{self.max_new_tokens}")
        if not self.prompt_buckets or list(self.prompt_buckets) != sorted(set(self.prompt_buckets)) \
                or self.prompt_buckets[0] < 1:
            raise ValueError(f"sampler prompt_buckets must be ascending, distinct and >= 1, got {self.prompt_buckets}")
        if self.temperature < 0:
            raise ValueError(f"sampler temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampler needs top_k >= 0 (0 = off) and 0 < top_p <= 1, got {self.top_k}, {self.top_p}")
        if self.overflow not in OVERFLOW_MODES:
            raise ValueError(f"sampler overflow={self.overflow!r} is not supported; choose one of {list(OVERFLOW_MODES)}")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated continuation: `tokens` and `logprobs` (float32) have the same length; the stop token
    or EOS, when there is one, is the last token. `prompt_truncated` counts tokens cut from the prompt's left."""

    tokens: np.ndarray
    logprobs: np.ndarray
    finish_reason: str
    prompt_truncated: int = 0


def stop_table(stop_sequences: Sequence[Sequence[int]], config: SamplerConfig) -> np.ndarray:
    """Token-id stop sequences -> the fixed [max_stop_sequences, max_stop_tokens] table, right-aligned."""
    if len(stop_sequences) > config.max_stop_sequences:
        raise ValueError(f"{len(stop_sequences)} stop sequences exceed sampler.max_stop_sequences="
                         f"{config.max_stop_sequences}; raise it")
    table = np.full((config.max_stop_sequences, config.max_stop_tokens), _WILDCARD, np.int32)
    table[:, 0] = _NEVER
    for i, seq in enumerate(stop_sequences):
        seq = [int(t) for t in seq]
        if not 1 <= len(seq) <= config.max_stop_tokens:
            raise ValueError(f"stop sequence {seq} must have 1 to sampler.max_stop_tokens="
                             f"{config.max_stop_tokens} tokens")
        table[i] = _WILDCARD
        table[i, config.max_stop_tokens - len(seq):] = seq
    return table


class Sampler:
    """Batched generation for one model architecture; `generate` takes the weights on every call."""

    def __init__(self, graphdef: nnx.GraphDef, model_config: ModelConfig, config: SamplerConfig):
        self.graphdef = graphdef
        self.model_config = model_config
        self.config = config
        self._generate = jax.jit(self._generate_impl)

    @property
    def compiled_buckets(self) -> int:
        """How many programs have been compiled so far (one per prompt bucket used)."""
        return self._generate._cache_size()

    def _bucket(self, length: int) -> int:
        for bucket in self.config.prompt_buckets:
            if length <= bucket:
                return bucket
        return self.config.prompt_buckets[-1]

    def generate(self, params: nnx.State, prompts: Sequence[Sequence[int]], rng: jax.Array,
                 stop_sequences: Sequence[Sequence[int]] = ()) -> list[Sample]:
        """Samples a continuation for each prompt (token ids). More prompts than `batch_size` run in several
        fixed-size calls. `stop_sequences` are token-id sequences that end a row (as does any of `eos_ids`)."""
        cfg = self.config
        table = jnp.asarray(stop_table(stop_sequences, cfg))
        results: list[Sample] = []
        for start in range(0, len(prompts), cfg.batch_size):
            chunk = [list(map(int, p)) for p in prompts[start:start + cfg.batch_size]]
            rng, key = jax.random.split(rng)
            results.extend(self._generate_chunk(params, chunk, key, table))
        return results

    def _generate_chunk(self, params, prompts: list[list[int]], rng, table) -> list[Sample]:
        cfg = self.config
        longest_bucket = cfg.prompt_buckets[-1]
        truncated = []
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            cut = max(0, len(p) - longest_bucket)
            if cut and cfg.overflow == "error":
                raise ValueError(f"prompt {i} has {len(p)} tokens, more than the largest prompt bucket "
                                 f"{longest_bucket}; raise sampler.prompt_buckets or set overflow='left_truncate'")
            truncated.append(cut)
            prompts[i] = p[cut:]
        bucket = self._bucket(max(len(p) for p in prompts))
        tokens = np.full((cfg.batch_size, bucket), cfg.pad_id, np.int32)
        mask = np.zeros((cfg.batch_size, bucket), np.int32)
        for i, p in enumerate(prompts):  # left padding: every row's last prompt token sits at slot bucket - 1
            tokens[i, bucket - len(p):] = p
            mask[i, bucket - len(p):] = 1
        out_tokens, out_logp, n_new, finish = jax.device_get(
            self._generate(params, jnp.asarray(tokens), jnp.asarray(mask), rng, table))
        return [Sample(out_tokens[i, :n_new[i]], out_logp[i, :n_new[i]], FINISH_REASONS[finish[i]], truncated[i])
                for i in range(len(prompts))]

    def _generate_impl(self, params, tokens, mask, rng, table):
        """tokens/mask [B, L] left-padded -> (tokens [B, N], logprobs [B, N], n_new [B], finish code [B])."""
        cfg, mcfg = self.config, self.model_config
        model = nnx.merge(self.graphdef, params)
        batch, prompt_len = tokens.shape
        n_new = cfg.max_new_tokens
        cache = KVCache.init(mcfg, batch, prompt_len + n_new)
        logits, cache = model.prefill(tokens, positions_from_mask(mask), mask, cache)
        prompt_lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
        eos = jnp.asarray(cfg.eos_ids or (_NO_TOKEN,), jnp.int32)
        window_len = table.shape[1]

        greedy = cfg.temperature == 0

        def sample(logits, key):
            if greedy:  # no key, no softmax: the greedy policy picks its token with probability 1 (log-prob 0)
                return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape[:1], jnp.float32)
            z = filter_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p)
            token = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
            return token, jnp.take_along_axis(jax.nn.log_softmax(z), token[:, None], axis=-1)[:, 0]

        def cond(state):
            step, done = state[0], state[3]
            return (step < n_new) & ~jnp.all(done)

        def body(state):
            step, logits, cache, done, out_tok, out_lp, count, finish, window, rng = state
            key = None
            if not greedy:
                rng, key = jax.random.split(rng)
            token, logp = sample(logits, key)
            token = jnp.where(done, cfg.pad_id, token)
            out_tok = out_tok.at[:, step].set(token)
            out_lp = out_lp.at[:, step].set(jnp.where(done, 0.0, logp))
            count = count + (~done).astype(jnp.int32)
            window = jnp.concatenate([window[:, 1:], token[:, None]], axis=1)
            hit_stop = jnp.any(jnp.all((table[None] == window[:, None]) | (table[None] == _WILDCARD), axis=-1), -1)
            hit_eos = jnp.any(token[:, None] == eos[None], axis=-1)
            finish = jnp.where(~done & hit_eos, 1, jnp.where(~done & hit_stop, 2, finish))
            done = done | hit_eos | hit_stop
            logits, cache = model.decode_step(token, prompt_lengths + step, cache)
            return step + 1, logits, cache, done, out_tok, out_lp, count, finish, window, rng

        inert = prompt_lengths == 0
        state = (jnp.zeros((), jnp.int32), logits, cache, inert,
                 jnp.full((batch, n_new), cfg.pad_id, jnp.int32), jnp.zeros((batch, n_new), jnp.float32),
                 jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32),
                 jnp.full((batch, window_len), _NO_TOKEN, jnp.int32), rng)
        state = jax.lax.while_loop(cond, body, state)
        return state[4], state[5], state[6], state[7]
