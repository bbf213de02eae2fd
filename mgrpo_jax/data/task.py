"""A run's task: question files, the document corpus and its tools, and the tokenizer.

config.task.kind:
  "synthetic"  a generated deep-research world (`data.synthetic`), written once to workdir/data as
               corpus.jsonl (Search-R1's corpus format), train.jsonl and heldout.jsonl (QA JSONL); with
               task.rl_fraction > 0 the questions are split three ways by head entity, and warm_start.jsonl holds
               the warm start's (its demonstrations), train.jsonl RL's and heldout.jsonl evaluation's, so that RL
               trains on heads the warm start never started from, as evaluation does;
  "files"      the user's QA files (JSONL or Parquet) and a corpus JSONL for local BM25 search, or the URL
               of a Search-R1 compatible retrieval service.
config.tokenizer.path: a Hugging Face tokenizer directory, or "" to train a byte-level BPE locally on the
corpus and questions (saved to workdir/tokenizer and reused when the run resumes).

Every data file is read and validated here, at start-up (bad lines: `path:line: reason`, or skipped and
counted with task.on_bad_row="skip"); `check_tools` makes one real call to every tool (a retrieval service that
does not answer stops the run before any model is built).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

from mgrpo_jax.data.corpus import Document, read_corpus_rows, write_corpus_jsonl
from mgrpo_jax.data.pipeline import read_qa_rows, require_rows
from mgrpo_jax.rollout.protocol import ProtocolConfig

logger = logging.getLogger(__name__)

TASK_KINDS = ("synthetic", "files")


@dataclasses.dataclass
class TaskData:
    train_files: list[str]
    eval_files: list[str]
    documents: list[Document]
    tools: dict[str, Any]
    tokenizer: Any
    warm_start_files: list[str] = dataclasses.field(default_factory=list)  # the warm start's own questions, if any


def _synthetic_files(task, data_dir: str) -> tuple[list[str], list[str], str, list[str]]:
    """(train files, eval files, corpus file, warm-start files) of a generated task, written on first use."""
    from mgrpo_jax.data.synthetic import (generate_questions, generate_world, split_questions,
                                          split_questions_three_ways, write_questions_jsonl)

    rl_fraction = float(task.get("rl_fraction", 0.0))
    names = ["train.jsonl", "heldout.jsonl", "corpus.jsonl"] + (["warm_start.jsonl"] if rl_fraction else [])
    paths = [os.path.join(data_dir, name) for name in names]
    if all(os.path.exists(p) for p in paths):
        return [paths[0]], [paths[1]], paths[2], paths[3:]  # a resumed run keeps the exact files it started with
    os.makedirs(data_dir, exist_ok=True)
    world = generate_world(int(task.world_seed), int(task.num_entities))
    questions = generate_questions(world, int(task.num_questions), tuple(task.hops), seed=int(task.world_seed),
                                   hop_weights=tuple(task.hop_weights) if task.get("hop_weights") else None)
    if rl_fraction:
        try:
            warm, train, heldout = split_questions_three_ways(questions, rl_fraction, float(task.heldout_fraction),
                                                              seed=int(task.world_seed))
        except ValueError as e:
            raise ValueError(f"config task.rl_fraction / task.heldout_fraction: {e}") from None
        write_questions_jsonl(warm, paths[3])
    else:
        train, heldout = split_questions(questions, float(task.heldout_fraction), seed=int(task.world_seed))
    write_questions_jsonl(train, paths[0])
    write_questions_jsonl(heldout, paths[1])
    write_corpus_jsonl(world.documents, paths[2])
    return [paths[0]], [paths[1]], paths[2], paths[3:]


def _tokenizer(config, workdir: str, documents: list[Document], question_files: list[str], protocol):
    from mgrpo_jax.data.tokenizer import protocol_tags, save_tokenizer, train_tokenizer
    from mgrpo_jax.models.hf import load_tokenizer

    path = config.tokenizer.get("path", "")
    if path:
        return load_tokenizer(path)
    local = os.path.join(workdir, "tokenizer")
    if os.path.isdir(local):
        return load_tokenizer(local)
    texts = [d.contents for d in documents]
    for file in question_files:
        if file.endswith(".jsonl"):
            # Raw lines (the validated rows are read later); an undecodable byte is a bad row, not a crash here.
            with open(file, encoding="utf-8", errors="replace") as f:
                texts += f.readlines()
    tokenizer = train_tokenizer(texts, vocab_size=int(config.tokenizer.vocab_size), tags=protocol_tags(protocol))
    save_tokenizer(tokenizer, local)
    return load_tokenizer(local)  # what a resumed run will load: the same object either way


def _tools(task, documents: list[Document], corpus: str) -> dict[str, Any]:
    from mgrpo_jax.rollout.tools import HttpRetriever, LocalSearch, ReadDocument

    search = dict(top_k=int(task.search_top_k), snippet_chars=int(task.snippet_chars),
                  timeout_s=float(task.tool_timeout_s))
    url = task.get("retriever_url", "")
    if url:
        tools = {"search": HttpRetriever(url, **search)}
    else:
        try:
            tools = {"search": LocalSearch(documents, **search)}
        except ValueError as e:  # e.g. a corpus with no searchable word
            raise ValueError(f"{corpus}: {e}") from None
    if documents:
        tools["read"] = ReadDocument(documents, timeout_s=float(task.tool_timeout_s))
    return tools


def check_tools(task, tools: Mapping[str, Any]) -> None:
    """`Tool.check()` for every tool (one real call each), at start-up. Raises ToolCheckError naming the tool,
    what failed and the config key to fix."""
    from mgrpo_jax.rollout.tools import HttpRetriever, ToolCheckError

    for name, tool in tools.items():
        check = getattr(tool, "check", None)
        if check is None:
            continue
        try:
            check()
        except ToolCheckError as e:
            key = ("task.retriever_url (or '' for local BM25 search over task.corpus_file)"
                   if isinstance(tool, HttpRetriever) else "task.corpus_file")
            raise ToolCheckError(f"{e}; see config {key}") from None
        logger.info("tool %r answered its start-up check", name)


def _read_corpus(path: str, on_bad_row: str) -> list[Document]:
    documents, skipped = read_corpus_rows(path, on_bad_row)
    if skipped:
        logger.warning("skipped %d bad corpus line(s) of %s: %s", len(skipped), path,
                       "; ".join(str(s) for s in skipped[:5]))
    if not documents:
        reason = f"all {len(skipped)} lines are bad (the first: {skipped[0]})" if skipped else "the file has no lines"
        raise ValueError(f"{path}: no usable corpus documents: {reason}")
    return documents


def load_task(config, workdir: str, protocol: ProtocolConfig) -> TaskData:
    task = config.task
    if task.kind not in TASK_KINDS:
        raise ValueError(f"config task.kind={task.kind!r} is not supported; choose one of {list(TASK_KINDS)}")
    warm_files: list[str] = []
    if task.kind == "synthetic":
        train, evals, corpus, warm_files = _synthetic_files(task, os.path.join(workdir, "data"))
    else:
        train, evals, corpus = list(task.train_files), list(task.eval_files), task.get("corpus_file", "")
        if not train:
            raise ValueError("config task.kind='files' needs task.train_files (JSONL or Parquet QA files)")
        if not corpus and not task.get("retriever_url", ""):
            raise ValueError("config task.kind='files' needs task.corpus_file (local BM25 search) or "
                             "task.retriever_url (a Search-R1 /retrieve service)")
        for path in [*train, *evals, *([corpus] if corpus else [])]:
            if not os.path.exists(path):
                raise FileNotFoundError(f"config task: {path!r} does not exist")
    on_bad_row = task.get("on_bad_row", "error")
    documents = _read_corpus(corpus, on_bad_row) if corpus else []
    for files in (train, evals, warm_files):  # validated now, so that a bad file fails before any model is built
        if files:
            require_rows(files, *read_qa_rows(files, on_bad_row))
    tokenizer = _tokenizer(config, workdir, documents, warm_files + train + evals, protocol)
    return TaskData(train, evals, documents, _tools(task, documents, corpus), tokenizer, warm_files)
