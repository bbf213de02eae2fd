"""A run's task: question files, the document corpus and its tools, and the tokenizer.

config.task.kind:
  "synthetic"  a generated deep-research world (`data.synthetic`), written once to workdir/data as
               corpus.jsonl (Search-R1's corpus format), train.jsonl and heldout.jsonl (QA JSONL);
  "files"      the user's QA files (JSONL or Parquet) and a corpus JSONL for local BM25 search, or the URL
               of a Search-R1 compatible retrieval service.
config.tokenizer.path: a Hugging Face tokenizer directory, or "" to train a byte-level BPE locally on the
corpus and questions (saved to workdir/tokenizer and reused when the run resumes).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from mgrpo_jax.data.corpus import Document, read_corpus_jsonl, write_corpus_jsonl
from mgrpo_jax.rollout.protocol import ProtocolConfig

TASK_KINDS = ("synthetic", "files")


@dataclasses.dataclass
class TaskData:
    train_files: list[str]
    eval_files: list[str]
    documents: list[Document]
    tools: dict[str, Any]
    tokenizer: Any


def _synthetic_files(task, data_dir: str) -> tuple[list[str], list[str], str]:
    from mgrpo_jax.data.synthetic import generate_questions, generate_world, split_questions, write_questions_jsonl

    paths = [os.path.join(data_dir, name) for name in ("train.jsonl", "heldout.jsonl", "corpus.jsonl")]
    if all(os.path.exists(p) for p in paths):
        return [paths[0]], [paths[1]], paths[2]  # a resumed run keeps the exact files it started with
    os.makedirs(data_dir, exist_ok=True)
    world = generate_world(int(task.world_seed), int(task.num_entities))
    questions = generate_questions(world, int(task.num_questions), tuple(task.hops), seed=int(task.world_seed),
                                   hop_weights=tuple(task.hop_weights) if task.get("hop_weights") else None)
    train, heldout = split_questions(questions, float(task.heldout_fraction), seed=int(task.world_seed))
    write_questions_jsonl(train, paths[0])
    write_questions_jsonl(heldout, paths[1])
    write_corpus_jsonl(world.documents, paths[2])
    return [paths[0]], [paths[1]], paths[2]


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
            with open(file, encoding="utf-8") as f:
                texts += f.readlines()
    tokenizer = train_tokenizer(texts, vocab_size=int(config.tokenizer.vocab_size), tags=protocol_tags(protocol))
    save_tokenizer(tokenizer, local)
    return load_tokenizer(local)  # what a resumed run will load: the same object either way


def _tools(task, documents: list[Document]) -> dict[str, Any]:
    from mgrpo_jax.rollout.tools import HttpRetriever, LocalSearch, ReadDocument

    search = dict(top_k=int(task.search_top_k), snippet_chars=int(task.snippet_chars),
                  timeout_s=float(task.tool_timeout_s))
    url = task.get("retriever_url", "")
    tools = {"search": HttpRetriever(url, **search) if url else LocalSearch(documents, **search)}
    if documents:
        tools["read"] = ReadDocument(documents, timeout_s=float(task.tool_timeout_s))
    return tools


def load_task(config, workdir: str, protocol: ProtocolConfig) -> TaskData:
    task = config.task
    if task.kind not in TASK_KINDS:
        raise ValueError(f"config task.kind={task.kind!r} is not supported; choose one of {list(TASK_KINDS)}")
    if task.kind == "synthetic":
        train, evals, corpus = _synthetic_files(task, os.path.join(workdir, "data"))
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
    documents = read_corpus_jsonl(corpus) if corpus else []
    tokenizer = _tokenizer(config, workdir, documents, train + evals, protocol)
    return TaskData(train, evals, documents, _tools(task, documents), tokenizer)
