"""The rollout sampler: a persistent slot cache, prefill of only what a row does not hold yet, continuous batching.

The sampler owns `batch_size` rows ("slots") of one KV cache of `prompt_buckets[-1] + max_new_tokens` positions,
kept across `generate` calls while the weights stay the same. Each row is packed from position 0 and remembers
the token ids whose keys and values it holds. A prompt is admitted to a free row:

- a row whose cached tokens are a prefix of the prompt (the previous turn of the same episode: its prompt, its
  sampled tokens) is continued: only the rest (the observation and the next prompt part) is prefilled, at that
  row's own offset;
- otherwise the least recently used free row is evicted and refilled (keeping any prefix it shares).

Prefill runs the new tokens of every admitted row as one [batch_size, bucket] block through the model's cached
forward (`Transformer.extend`, the memory-efficient attention with per-row slots), where bucket is the smallest of
the static `prompt_buckets` that holds the longest new part. Decoding is a `lax.while_loop` over all rows; each
step writes one token per running row at that row's length and attends only the filled extent of the cache
(with blockwise attention: `SamplerConfig.attention` / `attention_block` choose how prefill and decode attend).
When more prompts wait than rows are free, the loop returns to the host as soon as enough rows have finished (as
many as prompts wait, at most half the rows), the freed rows take the next prompts, and decoding resumes: no row
waits idle for the longest one. Shapes never change: one prefill program per bucket, one decode program, so the
sampler compiles once per bucket, never per call (LESSONS.md, item 14). A prompt longer than the largest bucket is
left-truncated or rejected, per `overflow`, never given a new shape.

Results are token-exact whatever the batching: a row's keys and values are the same whether they were prefilled
in one block or written turn by turn, and every prompt samples from its own random stream
(fold_in(fold_in(rng, prompt index), token index)), so a prompt's sample does not depend on which row it got,
what else ran beside it, or when it was admitted. Log-probs are returned under the exact distribution sampled
from: softmax(logits / temperature), restricted to the top-k / top-p set when those are on
(`mgrpo_jax.kernels.filter_logits`, the one definition); greedy decoding (temperature 0) picks each token with
probability 1, so its log-probs are 0 and it skips the softmax and the random keys altogether. They equal what
the trainer recomputes with `token_logprobs` / `chunked_token_logprobs(..., temperature=, top_k=, top_p=)` given
the same three values (LESSONS.md, item 8).

Weights and devices: `generate(params, ...)` takes the trainer's parameters (`nnx.State`). The first call with
new parameters (or `prepare`, which `SamplerPolicy.update` calls at each weight sync) makes the rollout copy once:
every parameter the model uses in its compute dtype is cast to it (norm scales stay as they are, since the model
reads them in float32), laid out on the parameters' mesh per `rollout_weights` ("tp": sharded over tensor
parallelism only and replicated over the data axis, so decode steps gather no weights; "fsdp": the training
layout). With the same dtype and layout the parameters themselves are used, not copied. On a mesh every program
has explicit shardings: rows of the batch and of the KV cache over the data ("fsdp") axis, the cache's kv heads
over "tp", what the host reads replicated; the cache and the decode state are donated from call to call. New
parameters invalidate every cached row; `release()` frees the cache and the rollout copy (the controller calls it
when a rollout batch ends).
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax.kernels import filter_logits
from mgrpo_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from mgrpo_jax.models.transformer import KVCache, ModelConfig

OVERFLOW_MODES = ("left_truncate", "error")
ROLLOUT_WEIGHTS = ("tp", "fsdp")
FINISH_REASONS = ("length", "eos", "stop")  # index = the code in `finish` arrays
_WILDCARD = -2  # stop-table filler that matches any token
_NO_TOKEN = -1  # window filler before enough tokens were generated
_NEVER = -3  # fills unused stop-table rows: equals no token and no filler, so the row never matches
_REFILL_FRACTION = 0.5  # with prompts waiting, decoding returns once this share of the rows (at most) has finished


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static sampling settings (changing any of them compiles a new program).

    batch_size: rows of the slot cache (and of every program).
    temperature: > 0 samples from softmax(logits / temperature); 0 decodes greedily.
    top_k: 0 = off. top_p: 1.0 = off.
    prompt_buckets: ascending prefill block lengths; the largest is the longest prompt a row takes.
    max_stop_sequences / max_stop_tokens: the fixed shape of the stop table (stop sequences are data).
    rollout_weights: "tp" or "fsdp", the layout of the rollout copy of the weights on a mesh (module docstring).
    prefill_rows: ascending row counts below batch_size: a prefill that admits at most that many prompts runs
        a block of that many rows (gathered from the cache and written back), not all batch_size rows. () runs
        every prefill over every row. One program per (rows, prompt bucket) pair used; on one device only
        (on a mesh the rows are sharded and every prefill takes them all).
    attention: how prefill and decode attend the cache: "" = the model's `attention`, else one of
        `attention.IMPLEMENTATIONS` (the same result; only the cost differs). attention_block: its tile, queries
        and keys: with "auto" (on CPU; on GPU/TPU where no fused kernel takes a cache) or "chunked", a cache of
        more slots than one tile runs the blockwise attention, which visits only the tiles below the filled
        extent and, in a prefill, only the causal ones: a step costs what the tokens in the cache cost, not what
        its size does. 512 (the default) keeps a cache of up to 512 slots dense under "auto".
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
    rollout_weights: str = "tp"
    prefill_rows: tuple[int, ...] = ()
    attention: str = ""
    attention_block: int = 512

    def __post_init__(self):
        object.__setattr__(self, "prompt_buckets", tuple(int(b) for b in self.prompt_buckets))
        object.__setattr__(self, "prefill_rows", tuple(int(r) for r in self.prefill_rows))
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
        if list(self.prefill_rows) != sorted(set(self.prefill_rows)) or any(
                not 1 <= r < self.batch_size for r in self.prefill_rows):
            raise ValueError(f"sampler prefill_rows must be ascending, distinct and in [1, batch_size="
                             f"{self.batch_size}), got {self.prefill_rows}")
        if self.attention and self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"sampler attention={self.attention!r} is not an attention implementation; choose '' "
                             f"(the model's) or one of {list(ATTENTION_IMPLEMENTATIONS)}")
        if isinstance(self.attention_block, bool) or not isinstance(self.attention_block, (int, np.integer)) \
                or self.attention_block < 1:
            raise ValueError(f"sampler attention_block must be a positive integer, got {self.attention_block!r}")
        if self.rollout_weights not in ROLLOUT_WEIGHTS:
            raise ValueError(f"sampler rollout_weights={self.rollout_weights!r} is not supported; choose one of "
                             f"{list(ROLLOUT_WEIGHTS)}")

    @property
    def max_len(self) -> int:
        """Positions of a cache row: the longest prompt plus a whole generation."""
        return self.prompt_buckets[-1] + self.max_new_tokens


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Per-row generation state kept on the devices between calls (B rows, N = max_new_tokens).

    last [B]: the newest sampled token, not yet fed to the model; count [B]: tokens sampled; done [B]; finish [B]
    (`FINISH_REASONS` code); window [B, max_stop_tokens]: the last sampled tokens, for stop sequences; prompt [B]:
    the row's prompt index in its `generate` call (its random stream); tokens / logprobs [B, N]: the sample so far.
    """

    last: jax.Array
    count: jax.Array
    done: jax.Array
    finish: jax.Array
    window: jax.Array
    prompt: jax.Array
    tokens: jax.Array
    logprobs: jax.Array


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _casts_to_compute(var: nnx.Variable) -> bool:
    """Whether the model reads this parameter in its compute dtype: everything but the RMSNorm scales, which it
    reads in float32 (so a cast copy would change the result)."""
    axes = var.get_metadata().get("out_sharding") or ()
    return "norm" not in axes and jnp.issubdtype(var.get_value().dtype, jnp.floating)


class Sampler:
    """Batched generation for one model architecture over a persistent slot cache (module docstring).

    mesh: where the programs run; None takes the mesh of the parameters' shardings (none on one device).
    """

    def __init__(self, graphdef: nnx.GraphDef, model_config: ModelConfig, config: SamplerConfig, *,
                 mesh: jax.sharding.Mesh | None = None):
        self.graphdef = graphdef
        self.model_config = model_config
        self.config = config
        self.mesh = mesh
        # Counters of the work done, for benchmarks and tests: prompt tokens asked for, tokens prefilled, tokens
        # whose keys/values a row already held, prefill and decode calls, evicted rows, rollout copies made, prompts
        # admitted while other rows were still decoding (continuous batching).
        self.stats: collections.Counter[str] = collections.Counter()
        self._programs: _Programs | None = None
        self._bound: Any = None  # the parameters the rollout copy and the cached rows were made with
        self._rollout: Any = None
        self._cache: KVCache | None = None
        self._state: DecodeState | None = None
        self._rows: list[list[int]] = [[] for _ in range(config.batch_size)]  # token ids each row's cache holds
        self._used = [0] * config.batch_size  # when each row was last admitted (least recently used is evicted)
        self._clock = 0
        self._attention = {"attention": config.attention or None, "attention_block": config.attention_block}

    # -------------------------------------------------------------------------------------------- weights

    @property
    def compiled_buckets(self) -> int:
        """How many prefill programs have been compiled so far (one per prompt bucket used)."""
        p = self._programs
        return 0 if p is None or p.prefill is None else p.prefill._cache_size()

    @property
    def compiled_programs(self) -> int:
        """Every program compiled so far: prefill per bucket, decode, cache creation, the rollout copy."""
        p = self._programs
        if p is None:
            return 0
        return sum(f._cache_size() for f in (p.prefill, p.decode, p.init, p.rollout) if f is not None)

    def _programs_for(self, params) -> _Programs:
        if self._programs is None:
            mesh, one_device = (self.mesh, None) if self.mesh is not None else _placement(params)
            self._programs = _Programs(self, mesh, one_device)
        return self._programs

    def rollout_params(self, params):
        """The weights as sampling reads them (module docstring): kernels, embeddings and biases in the compute
        dtype, laid out per `rollout_weights`; `params` itself when nothing would change. Accepts abstract
        parameters (`jax.ShapeDtypeStruct` leaves with shardings) and returns abstract ones."""
        programs = self._programs_for(params)
        dt = jnp.dtype(self.model_config.dtype)
        targets = programs.param_shardings(params)
        leaves = jax.tree.leaves(params)
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
            shapes = jax.eval_shape(programs.cast, params)
            if targets is None:
                return shapes
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, targets)
        casts = [_casts_to_compute(v) for v in jax.tree.leaves(params, is_leaf=_is_var)]
        same_dtype = all(x.dtype == dt or not cast for x, cast in zip(leaves, casts))
        same_layout = targets is None or all(
            x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, jax.tree.leaves(targets)))
        if same_dtype and same_layout:
            return params
        self.stats["rollout_copies"] += 1
        return programs.rollout(params)

    @property
    def rollout(self):
        """The rollout copy of the bound parameters (`prepare`), or None before any."""
        return self._rollout

    def prepare(self, params) -> None:
        """Binds `params`: makes their rollout copy now (once per weight sync) and forgets every cached row
        (their keys and values came from other weights). `generate` does it itself for new parameters."""
        if params is self._bound:
            return
        self._rollout = None  # the previous copy can go before the new one is made
        self._rollout = self.rollout_params(params)
        self._bound = params
        self._forget_rows()

    def warm_up(self, params) -> int:
        """Compiles every program `generate` can run (each prefill block and prompt bucket, decode) by running each
        once on no prompt, so that none compiles in the middle of a measured or time-limited rollout. Cached rows
        are kept. Returns how many programs were compiled."""
        cfg = self.config
        before = self.compiled_programs
        self.prepare(params)
        programs = self._programs_for(params)
        if self._cache is None:
            self._cache, self._state = programs.init()
        key_data, impl = _key_parts(jax.random.key(0))
        table = stop_table((), cfg)
        for block in self._prefill_blocks(programs):
            for bucket in cfg.prompt_buckets:  # no entry: nothing is prefilled, no row changes
                self._run_prefill(programs, block, bucket, [], [], key_data, impl, table)
        put = programs.put
        self._cache, self._state, _ = programs.decode(  # no live row: returns at once
            self._rollout, self._cache, self._state, put(np.zeros(cfg.batch_size, bool), "rows"),
            put(np.int32(1), None), put(key_data, None), impl, put(table, None))
        return self.compiled_programs - before

    def release(self) -> None:
        """Frees the KV cache, the decode state and the rollout copy of the weights (device memory the update
        that follows a rollout batch needs) and forgets the cached rows. The next `generate` makes them again
        (the rollout copy once, for the parameters it is given)."""
        self._cache = self._state = self._rollout = self._bound = None
        self._forget_rows()

    def _forget_rows(self) -> None:
        self._rows = [[] for _ in range(self.config.batch_size)]

    # ----------------------------------------------------------------------------------------- generation

    def _bucket(self, length: int) -> int:
        for bucket in self.config.prompt_buckets:
            if length <= bucket:
                return bucket
        return self.config.prompt_buckets[-1]

    def _checked(self, prompts) -> tuple[list[list[int]], list[int]]:
        cfg = self.config
        longest = cfg.prompt_buckets[-1]
        out, truncated = [], []
        for i, p in enumerate(prompts):
            p = [int(t) for t in p]
            if not p:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            cut = max(0, len(p) - longest)
            if cut and cfg.overflow == "error":
                raise ValueError(f"prompt {i} has {len(p)} tokens, more than the largest prompt bucket "
                                 f"{longest}; raise sampler.prompt_buckets or set overflow='left_truncate'")
            out.append(p[cut:])
            truncated.append(cut)
        return out, truncated

    def generate(self, params: nnx.State, prompts: Sequence[Sequence[int]], rng: jax.Array,
                 stop_sequences: Sequence[Sequence[int]] = ()) -> list[Sample]:
        """Samples a continuation for each prompt (token ids), in order. `stop_sequences` are token-id sequences
        that end a row (as does any of `eos_ids`). Any number of prompts: they share the rows as they free up."""
        cfg = self.config
        prompts, truncated = self._checked(prompts)
        table = stop_table(stop_sequences, cfg)
        if not prompts:
            return []
        self.prepare(params)
        programs = self._programs_for(params)
        if self._cache is None:
            self._cache, self._state = programs.init()
        key_data, impl = _key_parts(rng)
        rows = cfg.batch_size
        pending = collections.deque(range(len(prompts)))
        live = np.zeros(rows, bool)
        owner = np.full(rows, -1)
        results: list[Sample | None] = [None] * len(prompts)
        while pending or live.any():
            free = np.flatnonzero(~live)
            if pending and free.size:
                admitted = self._admit(pending, free, prompts)
                self.stats["admitted_beside_running_rows"] += len(admitted) if live.any() else 0
                self._prefill(programs, admitted, prompts, key_data, impl, table)
                for row, i, _ in admitted:
                    live[row], owner[row] = True, i
            # With prompts waiting, come back as soon as enough rows have finished to be worth a prefill.
            target = rows + 1 if not pending else min(len(pending), max(1, int(rows * _REFILL_FRACTION)))
            self._cache, self._state, view = programs.decode(
                self._rollout, self._cache, self._state, programs.put(live, "rows"),
                programs.put(np.int32(target), None), programs.put(key_data, None), impl,
                programs.put(table, None))
            self.stats["decode_calls"] += 1
            tokens, logprobs, count, finish, done = jax.device_get(view)
            for row in np.flatnonzero(live & done):
                i, n = owner[row], int(count[row])
                results[i] = Sample(np.array(tokens[row, :n]), np.array(logprobs[row, :n]),
                                    FINISH_REASONS[int(finish[row])], truncated[i])
                # The row holds the prompt and every sampled token but the last (never fed to the model).
                self._rows[row] = prompts[i] + [int(t) for t in tokens[row, :n - 1]]
                live[row] = False
        return results

    def _admit(self, pending: collections.deque, free: np.ndarray, prompts: list[list[int]]):
        """Pairs waiting prompts with free rows -> [(row, prompt index, kept prefix length)].

        A prompt continues a row whose cached tokens are a prefix of it (the longest such); the others take the
        least recently used rows and keep whatever prefix those share with them. At least one token is always
        prefilled (the last prompt token's logits give the first sample)."""
        take = [pending.popleft() for _ in range(min(len(pending), free.size))]
        free_rows = [int(r) for r in free]
        held = {r: self._rows[r] for r in free_rows}
        admitted, rest = [], []
        for i in take:
            p = prompts[i]
            best = max((r for r in free_rows if held[r] and len(held[r]) < len(p) and p[:len(held[r])] == held[r]),
                       key=lambda r: len(held[r]), default=None)
            if best is None:
                rest.append(i)
                continue
            free_rows.remove(best)
            admitted.append((best, i, len(held[best])))
        free_rows.sort(key=lambda r: self._used[r])
        for i, row in zip(rest, free_rows):
            p, cached = prompts[i], held[row]
            keep = _common_prefix(p, cached, min(len(p) - 1, len(cached)))
            self.stats["evictions"] += int(len(cached) > keep)
            admitted.append((row, i, keep))
        for row, i, keep in admitted:
            self._clock += 1
            self._used[row] = self._clock
            self._rows[row] = []  # in flux until the row finishes
            self.stats["prompt_tokens"] += len(prompts[i])
            self.stats["reused_tokens"] += keep
            self.stats["prefill_tokens"] += len(prompts[i]) - keep
        return admitted

    def _prefill_blocks(self, programs: _Programs) -> tuple[int, ...]:
        """The row counts a prefill may run over, ascending (SamplerConfig.prefill_rows; all rows on a mesh)."""
        rows = self.config.prefill_rows if programs.mesh is None else ()
        return (*rows, self.config.batch_size)

    def _prefill(self, programs: _Programs, admitted, prompts, key_data, impl, table) -> None:
        bucket = self._bucket(max(len(prompts[i]) - keep for _, i, keep in admitted))
        block = next(rows for rows in self._prefill_blocks(programs) if len(admitted) <= rows)
        self._run_prefill(programs, block, bucket, admitted, prompts, key_data, impl, table)
        self.stats["prefill_calls"] += 1
        self.stats["prefill_block_tokens"] += block * bucket

    def _run_prefill(self, programs: _Programs, block: int, bucket: int, admitted, prompts, key_data, impl,
                     table) -> None:
        """Runs the prefill program over `block` rows at `bucket` tokens for the admitted (row, prompt index, kept
        prefix) entries. A full block is laid out by row; a smaller one lists its rows (unused entries point past
        the last row: nothing is written there)."""
        cfg = self.config
        tokens = np.full((block, bucket), cfg.pad_id, np.int32)
        n_new = np.zeros(block, np.int32)
        keep_at = np.zeros(block, np.int32)
        prompt_ids = np.zeros(block, np.int32)
        full = block == cfg.batch_size
        row_ids = np.arange(block, dtype=np.int32) if full else np.full(block, cfg.batch_size, np.int32)
        for j, (row, i, keep) in enumerate(admitted):
            at = row if full else j
            new = prompts[i][keep:]
            tokens[at, :len(new)] = new
            n_new[at], keep_at[at], prompt_ids[at], row_ids[at] = len(new), keep, i, row
        put = programs.put
        self._cache, self._state = programs.prefill(
            self._rollout, self._cache, self._state, put(tokens, "rows"), put(n_new, "rows"), put(keep_at, "rows"),
            put(prompt_ids, "rows"), put(row_ids, "rows"), put(key_data, None), impl, put(table, None))

    # ------------------------------------------------------------------------------ the traced programs

    def _sample(self, logits, key_data, impl, prompt_ids, counts):
        """logits [B, V] float32 -> (token [B] int32, log-prob [B] float32), row b from its own stream."""
        cfg = self.config
        if cfg.temperature == 0:  # no key, no softmax: the greedy policy picks its token with probability 1
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape[:1], jnp.float32)
        z = filter_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p)
        rng = jax.random.wrap_key_data(key_data, impl=impl)
        keys = jax.vmap(lambda i, c: jax.random.fold_in(jax.random.fold_in(rng, i), c))(prompt_ids, counts)
        token = jax.vmap(jax.random.categorical)(keys, z).astype(jnp.int32)
        return token, jnp.take_along_axis(jax.nn.log_softmax(z), token[:, None], axis=-1)[:, 0]

    def _stops(self, window, token, table):
        """-> (hit EOS [B], hit a stop sequence [B]) after `token` entered `window`."""
        eos = jnp.asarray(self.config.eos_ids or (_NO_TOKEN,), jnp.int32)
        hit_stop = jnp.any(jnp.all((table[None] == window[:, None]) | (table[None] == _WILDCARD), axis=-1), -1)
        return jnp.any(token[:, None] == eos[None], axis=-1), hit_stop

    def _init_impl(self):
        cfg = self.config
        b, n, w = cfg.batch_size, cfg.max_new_tokens, cfg.max_stop_tokens
        cache = KVCache.init(self.model_config, b, cfg.max_len)
        zeros = jnp.zeros((b,), jnp.int32)
        state = DecodeState(last=zeros, count=zeros, done=jnp.ones((b,), bool), finish=zeros,
                            window=jnp.full((b, w), _NO_TOKEN, jnp.int32), prompt=zeros,
                            tokens=jnp.full((b, n), cfg.pad_id, jnp.int32), logprobs=jnp.zeros((b, n), jnp.float32))
        return cache, state

    def _prefill_impl(self, params, cache, state, tokens, n_new, keep, prompt_ids, row_ids, key_data, impl,
                      table):
        """Block entries with n_new > 0 drop their row's slots from keep on, take tokens[:, :n_new] there and
        sample their first token; the other rows are untouched. tokens [R, T]; n_new, keep, prompt_ids, row_ids
        [R]. With R = batch_size entry r is row r (row_ids unused); with fewer, entry r is row row_ids[r] (one
        past the last row: unused), whose cache and state are gathered, prefilled and written back."""
        if tokens.shape[0] == self.config.batch_size:
            return self._prefill_rows(params, cache, state, tokens, n_new, keep, prompt_ids, key_data, impl, table)
        take = lambda x: jnp.take(x, row_ids, axis=0, mode="clip")  # noqa: E731
        block = KVCache.packed(jnp.take(cache.k, row_ids, axis=1, mode="clip"),
                               jnp.take(cache.v, row_ids, axis=1, mode="clip"), take(cache.segment_ids))
        block, block_state = self._prefill_rows(params, block, jax.tree.map(take, state), tokens, n_new, keep,
                                                prompt_ids, key_data, impl, table)
        put = lambda full, part: full.at[row_ids].set(part, mode="drop")  # noqa: E731
        cache = KVCache.packed(cache.k.at[:, row_ids].set(block.k, mode="drop"),
                               cache.v.at[:, row_ids].set(block.v, mode="drop"),
                               put(cache.segment_ids, block.segment_ids))
        return cache, jax.tree.map(put, state, block_state)

    def _prefill_rows(self, params, cache, state, tokens, n_new, keep, prompt_ids, key_data, impl, table):
        """`_prefill_impl` on a cache and state of tokens.shape[0] rows, entry r being row r."""
        cfg = self.config
        model = nnx.merge(self.graphdef, params)
        b, t = tokens.shape
        refill = n_new > 0
        cache = cache.truncate(jnp.where(refill, keep, cache.max_len))
        offsets = jnp.arange(t, dtype=jnp.int32)[None, :]
        segment_ids = (offsets < n_new[:, None]).astype(jnp.int32)
        slots = keep[:, None] + offsets
        hidden, cache = model.extend(tokens, slots * segment_ids, segment_ids, slots, cache, **self._attention)
        last = jnp.take_along_axis(hidden, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]
        token, logp = self._sample(model.logits_from_hidden(last), key_data, impl, prompt_ids,
                                   jnp.zeros((b,), jnp.int32))
        window = jnp.full((b, cfg.max_stop_tokens), _NO_TOKEN, jnp.int32).at[:, -1].set(token)
        hit_eos, hit_stop = self._stops(window, token, table)
        fresh = DecodeState(
            last=token, count=jnp.ones((b,), jnp.int32), done=hit_eos | hit_stop | (cfg.max_new_tokens == 1),
            finish=jnp.where(hit_eos, 1, jnp.where(hit_stop, 2, 0)).astype(jnp.int32), window=window,
            prompt=prompt_ids, tokens=jnp.full((b, cfg.max_new_tokens), cfg.pad_id, jnp.int32).at[:, 0].set(token),
            logprobs=jnp.zeros((b, cfg.max_new_tokens), jnp.float32).at[:, 0].set(logp))
        pick = lambda new, old: jnp.where(refill.reshape((b,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
        return cache, jax.tree.map(pick, fresh, state)

    def _decode_impl(self, params, cache, state, live, target, key_data, impl, table):
        """Decodes the live rows until none runs, `target` live rows have finished, or N steps. -> (cache,
        state, what the host reads: tokens, logprobs, count, finish, done)."""
        cfg = self.config
        model = nnx.merge(self.graphdef, params)
        b, n = cfg.batch_size, cfg.max_new_tokens
        rows = jnp.arange(b, dtype=jnp.int32)

        def cond(carry):
            state, _, steps = carry
            finished = jnp.sum(live & state.done, dtype=jnp.int32)
            return jnp.any(live & ~state.done) & (finished < target) & (steps < n)

        def body(carry):
            state, cache, steps = carry
            feed = live & ~state.done
            at = cache.lengths[:, None]  # packed rows: a row's next slot is its length, and so is its position
            hidden, cache = model.extend(state.last[:, None], at, feed[:, None].astype(jnp.int32), at, cache,
                                         **self._attention)
            token, logp = self._sample(model.logits_from_hidden(hidden[:, 0]), key_data, impl, state.prompt,
                                       state.count)
            token = jnp.where(feed, token, cfg.pad_id)
            index = jnp.where(feed, state.count, n)  # out of range for the other rows: dropped
            window = jnp.where(feed[:, None], jnp.concatenate([state.window[:, 1:], token[:, None]], axis=1),
                               state.window)
            hit_eos, hit_stop = self._stops(window, token, table)
            count = state.count + feed.astype(jnp.int32)
            finish = jnp.where(feed & hit_eos, 1, jnp.where(feed & hit_stop, 2, state.finish)).astype(jnp.int32)
            state = DecodeState(
                last=jnp.where(feed, token, state.last), count=count,
                done=state.done | (feed & (hit_eos | hit_stop | (count >= n))), finish=finish, window=window,
                prompt=state.prompt, tokens=state.tokens.at[rows, index].set(token, mode="drop"),
                logprobs=state.logprobs.at[rows, index].set(logp, mode="drop"))
            return state, cache, steps + 1

        state, cache, _ = jax.lax.while_loop(cond, body, (state, cache, jnp.zeros((), jnp.int32)))
        return cache, state, (state.tokens, state.logprobs, state.count, state.finish, state.done)

    # --------------------------------------------------------------------------------- compile-only use

    def lowered(self, params, program: str, bucket: int | None = None, rows: int | None = None
                ) -> jax.stages.Lowered:
        """`jit(...).lower(...)` of "prefill" (at `bucket`, over `rows` rows: default all) or "decode" on abstract
        shapes, for compile-only memory figures: `params` may be abstract (ShapeDtypeStructs with the training
        shardings); the rollout copy, the cache and every input are abstract too."""
        programs = self._programs_for(params)
        rollout = self.rollout_params(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), params))
        cache, state = jax.eval_shape(self._init_impl)
        cache = programs.abstract(cache, programs.cache_shardings)
        state = programs.abstract(state, programs.state_shardings)
        b = self.config.batch_size
        r = rows or b
        rows = lambda shape, dtype: programs.abstract_input(shape, dtype, "rows")  # noqa: E731
        key_data, impl = _key_parts(jax.random.key(0))
        key = programs.abstract_input(key_data.shape, key_data.dtype, None)
        table = programs.abstract_input((self.config.max_stop_sequences, self.config.max_stop_tokens), jnp.int32,
                                        None)
        if program == "prefill":
            t = bucket or self.config.prompt_buckets[-1]
            return programs.prefill.lower(rollout, cache, state, rows((r, t), jnp.int32), rows((r,), jnp.int32),
                                          rows((r,), jnp.int32), rows((r,), jnp.int32), rows((r,), jnp.int32), key,
                                          impl, table)
        if program == "decode":
            return programs.decode.lower(rollout, cache, state, rows((b,), bool),
                                         programs.abstract_input((), jnp.int32, None), key, impl, table)
        raise ValueError(f"program must be 'prefill' or 'decode', got {program!r}")


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def _key_parts(rng) -> tuple[np.ndarray, str]:
    """A PRNG key (typed or raw uint32) -> (its raw data on the host, its implementation name)."""
    rng = rng if isinstance(rng, jax.Array) else jnp.asarray(rng, jnp.uint32)
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):  # a raw jax.random.PRNGKey
        rng = jax.random.wrap_key_data(rng)
    return np.asarray(jax.random.key_data(rng)), str(jax.random.key_impl(rng))


def _placement(params) -> tuple[jax.sharding.Mesh | None, jax.sharding.Sharding | None]:
    """Where the parameters live: (the mesh of their NamedShardings when it spans more than one device, else None;
    off such a mesh, the sharding the programs' outputs take from them, a one-device NamedSharding when they have
    one). A fresh cache takes the latter: made with another sharding type than the one a prefill returns, it
    would make each program compile twice, once per type."""
    shardings = [s for s in (getattr(x, "sharding", None) for x in jax.tree.leaves(params)) if s is not None]
    for s in shardings:
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh, None
    first = shardings[0] if shardings else None
    return None, NamedSharding(first.mesh, PartitionSpec()) if isinstance(first, NamedSharding) else first


class _Programs:
    """A sampler's jitted programs on one mesh (or plain jit on one device), with their shardings."""

    def __init__(self, sampler: Sampler, mesh: jax.sharding.Mesh | None,
                 one_device: jax.sharding.Sharding | None = None):
        self.mesh = mesh
        cfg, mcfg = sampler.config, sampler.model_config
        self.rules = sharding_lib.DEFAULT_RULES
        if cfg.rollout_weights == "tp":  # the data axis holds whole copies of the weights: no per-step gathers
            self.rules = tuple((name, None if name == "embed" else target) for name, target in self.rules)
        dt = jnp.dtype(mcfg.dtype)

        def cast(state):
            return jax.tree.map(lambda v: v.replace(v.get_value().astype(dt)) if _casts_to_compute(v) else v,
                                state, is_leaf=_is_var)

        self.cast = cast
        statics = dict(static_argnames=("impl",))
        if mesh is None:
            self.cache_shardings = self.state_shardings = None
            self.rollout = jax.jit(cast)
            self.init = jax.jit(sampler._init_impl, out_shardings=one_device)
            self.prefill = jax.jit(sampler._prefill_impl, donate_argnums=(1, 2), **statics)
            self.decode = jax.jit(sampler._decode_impl, donate_argnums=(1, 2), **statics)
            return
        shapes = jax.eval_shape(sampler._init_impl)
        named = lambda axes, shape: NamedSharding(mesh, sharding_lib.logical_to_pspec(  # noqa: E731
            axes, sharding_lib.DEFAULT_RULES, mesh, shape))
        cache_axes = ("layers", "batch", "length", "kv_heads", "head_dim")
        c = shapes[0]
        self.cache_shardings = KVCache(k=named(cache_axes, c.k.shape), v=named(cache_axes, c.v.shape),
                                       segment_ids=named(("batch", "length"), c.segment_ids.shape),
                                       lengths=named(("batch",), c.lengths.shape), end_index=self.replicated)
        self.state_shardings = jax.tree.map(lambda x: named(("batch",) + (None,) * (x.ndim - 1), x.shape), shapes[1])
        self.rows_sharding = named(("batch",), (cfg.batch_size,))
        with_mesh = lambda f: sharding_lib.with_mesh(f, mesh)  # noqa: E731
        self._param_shardings = None
        self.rollout = None  # made with the parameters' structure (`param_shardings`)
        self.init = jax.jit(with_mesh(sampler._init_impl), out_shardings=(self.cache_shardings, self.state_shardings))
        carried = (self.cache_shardings, self.state_shardings)
        self._prefill_fn, self._decode_fn = sampler._prefill_impl, sampler._decode_impl
        self.prefill = self.decode = None  # built with the parameters' shardings
        self._carried = carried
        self._statics = statics

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def param_shardings(self, params):
        """The rollout copy's shardings on the mesh (None without one); builds the programs that take it."""
        if self.mesh is None:
            return None
        if self._param_shardings is None:
            shardings = sharding_lib.state_shardings(params, self.mesh, self.rules)
            self._param_shardings = shardings
            with_mesh = lambda f: sharding_lib.with_mesh(f, self.mesh)  # noqa: E731
            rows, rep = self.rows_sharding, self.replicated
            self.rollout = jax.jit(self.cast, out_shardings=shardings)
            self.prefill = jax.jit(
                with_mesh(self._prefill_fn), donate_argnums=(1, 2), out_shardings=self._carried,
                in_shardings=(shardings, *self._carried, rows, rows, rows, rows, rows, rep, rep), **self._statics)
            self.decode = jax.jit(
                with_mesh(self._decode_fn), donate_argnums=(1, 2), out_shardings=(*self._carried, rep),
                in_shardings=(shardings, *self._carried, rows, rep, rep, rep), **self._statics)
        return self._param_shardings

    def put(self, x: np.ndarray, kind: str | None):
        """A host array -> the devices: rows over the data axis ("rows"), or replicated (None). Every process
        passes the same array; each device takes its own slice (also under multi-controller JAX)."""
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.make_array_from_callback(x.shape, self._input_sharding(x.ndim, kind), lambda index: x[index])

    def abstract(self, tree, shardings):
        if shardings is None:
            return tree
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    def abstract_input(self, shape, dtype, kind):
        if self.mesh is None:
            return jax.ShapeDtypeStruct(shape, dtype)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._input_sharding(len(shape), kind))

    def _input_sharding(self, ndim: int, kind: str | None) -> NamedSharding:
        """An input's sharding: its leading axis over the data axis like the rows ("rows"), or replicated (None,
        and every scalar)."""
        if kind is None or ndim == 0:
            return self.replicated
        return NamedSharding(self.mesh, PartitionSpec(*self.rows_sharding.spec, *([None] * (ndim - 1))))
