"""QA data loading with grain: JSONL / Parquet rows -> validated records -> per-process shard -> seeded
shuffle -> epochs -> batches of Q queries, behind an iterator whose state can be saved and restored exactly.

A row is {"question": str, "answer": str | [str, ...] (aliases), "id": optional str/int, "metadata": optional
dict} (the format of `mgrpo_jax.data.synthetic.write_questions_jsonl`). Every file is read and validated when the
dataset is built, before any training step runs, so a bad row fails the run at start-up with `path:line: what is
wrong` (line = 1-based line of a JSONL file, 1-based row of a Parquet file), not hours into it. With
`on_bad_row="skip"` bad rows are dropped instead, counted (`QADataset.num_skipped`, `skipped`), and logged once
with the first few locations. QA sets are small (HotpotQA's train split is ~90k rows), so holding the validated
rows in memory is cheap and makes every later step random access.

The pipeline is a grain `MapDataset` (index-based, hence exactly resumable):

    source (all rows, files in the given order)
      -> rows[:n - n % process_count][process_index::process_count]   disjoint, equal-sized per-process shards
      -> shuffle(seed)                 a fresh permutation per epoch (grain folds the epoch into the seed)
      -> batch(Q, drop_remainder)      within an epoch: no batch mixes two epochs or repeats a question
      -> repeat(num_epochs | forever)
      -> to_iter_dataset()             no threads: the rows are already in memory

Equal-sized shards matter under multi-controller JAX: every process must run the same number of steps, or the
collectives of the step that one process skips hang the others. So up to process_count - 1 rows at the end of
the dataset are left out (logged). Batches drop the remainder of each epoch for the same reason (fixed shapes,
DESIGN.md principle 3); each epoch is shuffled anew, so different rows fall off each time.

Note on process sharding: `process_index`/`process_count` default to `jax.process_index()`/`jax.process_count()`.
A launcher whose processes must all see the *same* questions (e.g. one rollout batch replicated on every host)
passes process_index=0, process_count=1.

`QAIterator.get_state()` is a JSON-serializable dict (grain's iterator state plus a fingerprint of the
pipeline); `set_state()` on an iterator built with the same files and settings continues with exactly the batch
that would have come next, and refuses a state from a different pipeline with a message naming what differs.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mgrpo_jax.data.corpus import BAD_ROW_MODES, SKIP_HINT, BadRowError, SkippedRow, collect_rows, iter_jsonl

if TYPE_CHECKING:
    import grain

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json")  # ".json" only as JSON Lines (one object per line)
PARQUET_SUFFIXES = (".parquet", ".pq")
_LOGGED_LOCATIONS = 5  # how many skipped rows the one log line names
STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------- rows


def validate_row(row: Any, path: str, line: int) -> dict[str, Any]:
    """One raw row -> the record {"question", "answer", "answers", "id", "metadata"}.

    answer: as in the file (a str or a list of str aliases; `rollout.rewards` accepts both); answers: always the
    list of aliases. id: str(id), or "<file name>:<line>" when the row has none. metadata: a dict ({} if absent).
    Raises BadRowError("path:line: <what is wrong>").
    """
    def bad(reason: str) -> BadRowError:
        return BadRowError(f"{path}:{line}: {reason}")

    if not isinstance(row, Mapping):
        raise bad(f"a row must be a JSON object, got {type(row).__name__}")
    question = row.get("question")
    if question is None:
        raise bad("missing field 'question'")
    if not isinstance(question, str):
        raise bad(f"'question' must be a string, got {type(question).__name__}")
    if not question.strip():
        raise bad("'question' is empty")
    answer = row.get("answer")
    if answer is None:
        raise bad("missing field 'answer'")
    if isinstance(answer, str):
        answers = [answer]
    elif isinstance(answer, (list, tuple)):
        answers = list(answer)
        if not answers:
            raise bad("'answer' is an empty list; give at least one alias")
        for alias in answers:
            if not isinstance(alias, str):
                raise bad(f"'answer' aliases must be strings, got {type(alias).__name__} in {answer!r}")
        answer = answers
    else:
        raise bad(f"'answer' must be a string or a list of strings, got {type(answer).__name__}")
    if any(not a.strip() for a in answers):
        raise bad(f"'answer' has an empty alias: {answer!r}")
    row_id = row.get("id")
    if row_id is None:
        row_id = f"{os.path.basename(path)}:{line}"
    elif isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise bad(f"'id' must be a string or an integer, got {type(row_id).__name__}")
    metadata = row.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, Mapping):
        raise bad(f"'metadata' must be an object, got {type(metadata).__name__}")
    return {"question": question, "answer": answer, "answers": answers, "id": str(row_id),
            "metadata": dict(metadata)}


def _parquet_rows(path: str) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq  # only Parquet needs it
    except ImportError as e:  # pragma: no cover - pyarrow is a runtime dependency
        raise ImportError(f"reading {path} needs pyarrow; install it with `pip install pyarrow`") from e
    table = pq.read_table(path)
    missing = [c for c in ("question", "answer") if c not in table.column_names]
    if missing:
        raise BadRowError(f"{path}: Parquet file has no column(s) {missing}; it has {table.column_names}")
    yield from enumerate(table.to_pylist(), 1)


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Paths or glob patterns -> the files, patterns expanded in sorted order. Raises FileNotFoundError."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if glob.has_magic(p):
            matches = sorted(glob.glob(p))
            if not matches:
                raise FileNotFoundError(f"data path pattern {p!r} matches no file")
            out.extend(matches)
        elif not os.path.isfile(p):
            raise FileNotFoundError(f"data file {p!r} does not exist")
        else:
            out.append(p)
    if not out:
        raise ValueError("no data paths given; pass one or more .jsonl or .parquet files")
    return out


def read_qa_rows(paths: str | os.PathLike | Sequence[str | os.PathLike], on_bad_row: str = "error",
                 ) -> tuple[list[dict[str, Any]], list[SkippedRow]]:
    """Reads and validates every row of the files, in order. Returns (records, skipped rows).

    on_bad_row: "error" raises BadRowError at the first bad row; "skip" leaves bad rows out and lists them.
    """
    if on_bad_row not in BAD_ROW_MODES:
        raise ValueError(f"on_bad_row={on_bad_row!r} is not supported; choose one of {list(BAD_ROW_MODES)}")
    files = expand_paths(paths)
    for path in files:
        if not path.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
            raise ValueError(f"data file {path!r}: unknown format; use a {JSONL_SUFFIXES + PARQUET_SUFFIXES} file")

    def rows():
        for path in files:
            source = iter_jsonl(path) if path.lower().endswith(JSONL_SUFFIXES) else _parquet_rows(path)
            for line, row in source:
                yield path, line, row

    return collect_rows(rows(), validate_row, on_bad_row, SKIP_HINT)


def require_rows(paths: Sequence[str], records: Sequence[Any], skipped: Sequence[SkippedRow]) -> None:
    """Raises ValueError("<paths>: no valid question rows: <why>") when `records` (of read_qa_rows) is empty."""
    if records:
        return
    reason = f"all {len(skipped)} rows are bad (the first: {skipped[0]})" if skipped else "the files have no rows"
    raise ValueError(f"{', '.join(map(str, paths))}: no valid question rows: {reason}")


# ------------------------------------------------------------------------------------------- dataset


def _default_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # deferred: data loading is host-side and must not pull in jax at import time

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got process_index={process_index}, "
                         f"process_count={process_count}")
    return process_index, process_count


def _grain_seed(seed: int) -> int:
    """A 32-bit seed for grain from any int. grain shuffles epoch e with seed + e, so raw seeds s and s + 1
    would share all but one epoch's order; hashing keeps nearby user seeds unrelated."""
    digest = hashlib.blake2b(str(int(seed)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class QADataset:
    """Validated QA rows and the grain pipeline over them (module docstring).

    paths: JSONL / Parquet files or glob patterns. batch_size: Q, queries per batch. seed: shuffle seed.
    num_epochs: an int >= 1, or None for forever. process_index / process_count: this process's shard
    (default: jax's). on_bad_row: "error" | "skip". skip_first: leave out the first N valid rows (in file order,
    before sharding and shuffling), e.g. the training questions a warm start already demonstrated. max_rows:
    then keep only the next N rows (0: all), e.g. a small fixed set to fit.
    """

    def __init__(self, paths, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, process_index: int | None = None,
                 process_count: int | None = None, on_bad_row: str = "error", skip_first: int = 0,
                 max_rows: int = 0):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
            raise ValueError(f"num_epochs must be an int >= 1, or None to repeat forever; got {num_epochs!r}")
        self.paths = expand_paths(paths)
        self.batch_size, self.seed, self.shuffle, self.num_epochs = batch_size, int(seed), bool(shuffle), num_epochs
        self.process_index, self.process_count = _default_process(process_index, process_count)
        self.records, self.skipped = read_qa_rows(self.paths, on_bad_row)
        require_rows(self.paths, self.records, self.skipped)
        if not isinstance(skip_first, int) or not 0 <= skip_first < len(self.records):
            raise ValueError(f"skip_first={skip_first!r} must be an int in [0, {len(self.records)}): the files have "
                             f"{len(self.records)} valid rows")
        if not isinstance(max_rows, int) or max_rows < 0:
            raise ValueError(f"max_rows={max_rows!r} must be an int >= 0 (0: every row)")
        self.records = self.records[skip_first:skip_first + max_rows if max_rows else None]
        self._ids_hash: str | None = None
        if self.skipped:
            shown = "; ".join(str(s) for s in self.skipped[:_LOGGED_LOCATIONS])
            more = f" (and {len(self.skipped) - _LOGGED_LOCATIONS} more)" if len(self.skipped) > _LOGGED_LOCATIONS else ""
            logger.warning("skipped %d bad data row(s) of %d: %s%s", len(self.skipped),
                           len(self.skipped) + len(self.records), shown, more)
        n = len(self.records)
        usable = n - n % self.process_count
        if usable != n:
            logger.warning("leaving out the last %d of %d rows so that each of %d processes gets %d rows",
                           n - usable, n, self.process_count, usable // self.process_count)
        self.rows_per_process = usable // self.process_count
        if self.rows_per_process < batch_size:
            raise ValueError(f"each process gets {self.rows_per_process} rows ({n} valid rows over "
                             f"{self.process_count} processes), fewer than batch_size={batch_size}: no batch can be "
                             "formed; use more data or a smaller batch_size")

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def batches_per_epoch(self) -> int:
        return self.rows_per_process // self.batch_size

    def fingerprint(self) -> dict[str, Any]:
        """What a saved iterator state is only valid for (checked by `QAIterator.set_state`)."""
        if self._ids_hash is None:  # once: the rows never change after construction
            ids = hashlib.blake2b(digest_size=8)
            for r in self.records:
                ids.update(r["id"].encode())
                ids.update(b"\0")
            self._ids_hash = ids.hexdigest()
        return {"num_rows": len(self.records), "ids_hash": self._ids_hash, "batch_size": self.batch_size,
                "seed": self.seed, "shuffle": self.shuffle, "num_epochs": self.num_epochs,
                "process_index": self.process_index, "process_count": self.process_count}

    def map_dataset(self) -> grain.MapDataset:
        """The grain MapDataset of batches (each a list of records)."""
        import grain  # deferred: grain imports jax, and reading/validating rows needs neither

        ds = grain.MapDataset.source(self.records)
        ds = ds[: self.rows_per_process * self.process_count][self.process_index::self.process_count]
        if self.shuffle:
            ds = ds.shuffle(seed=_grain_seed(self.seed))
        ds = ds.batch(self.batch_size, drop_remainder=True, batch_fn=list)
        return ds.repeat(self.num_epochs)

    def __iter__(self) -> QAIterator:
        return QAIterator(self)


class QAIterator:
    """Iterator of batches (lists of `batch_size` records) with exact, JSON-serializable state."""

    def __init__(self, dataset: QADataset):
        import grain

        self.dataset = dataset
        read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # in memory: threads only add GIL churn
        self._it = iter(dataset.map_dataset().to_iter_dataset(read))

    def __iter__(self) -> QAIterator:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """{"version", "pipeline" (fingerprint), "grain" (grain's iterator state)}: plain JSON types."""
        state = {"version": STATE_VERSION, "pipeline": self.dataset.fingerprint(), "grain": self._it.get_state()}
        return json.loads(json.dumps(state))  # a deep copy, and proof that it serializes

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a state of `get_state`. Raises ValueError when it belongs to a different pipeline."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION or "grain" not in state:
            raise ValueError(f"not a QA iterator state of version {STATE_VERSION}: {str(state)[:200]}")
        mine, theirs = self.dataset.fingerprint(), state.get("pipeline", {})
        differ = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if differ:
            shown = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"the saved data iterator state is from a different pipeline ({shown}); resume with the "
                             "same data files and data settings, or start the data from scratch")
        self._it.set_state(dict(state["grain"]))


def make_qa_iterator(paths, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                     num_epochs: int | None = None, process_index: int | None = None,
                     process_count: int | None = None, on_bad_row: str = "error", skip_first: int = 0,
                     max_rows: int = 0) -> QAIterator:
    """`iter(QADataset(...))`: batches of `batch_size` records with `get_state()` / `set_state()`.
    The dataset (skip counts, sizes) is `iterator.dataset`."""
    return iter(QADataset(paths, batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                          process_index=process_index, process_count=process_count, on_bad_row=on_bad_row,
                          skip_first=skip_first, max_rows=max_rows))


def questions_and_golds(batch: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str | list[str]]]:
    """A batch -> (questions, golds), the arguments of `MGRPOTrainer.step`."""
    return [r["question"] for r in batch], [r["answer"] for r in batch]
