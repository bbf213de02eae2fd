"""A search corpus: documents (id, title, text) and their JSONL form.

One JSONL line per document, written in the format of Search-R1's corpus files so that a real Search-R1
retrieval server can index our corpora unchanged:

    {"id": "doc-00012", "contents": "\"Velmor Guild\"\nVelmor Guild was founded in 1821. ...",
     "title": "Velmor Guild", "text": "Velmor Guild was founded in 1821. ..."}

`contents` is Search-R1's field (the title in double quotes, a newline, then the text); `title` and `text`
are the same data split out for readers that want them. `read_corpus_jsonl` accepts lines with either
`title` and `text`, or `contents` alone (Search-R1's own corpora).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Document:
    """One searchable document. `doc_id` is unique within a corpus."""

    doc_id: str
    title: str
    text: str

    def __post_init__(self):
        for name in ("doc_id", "title", "text"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"Document.{name} must be a str, got {type(getattr(self, name)).__name__}")
        if not self.doc_id:
            raise ValueError("Document.doc_id must not be empty")

    @property
    def contents(self) -> str:
        """Search-R1's `contents` field: the quoted title, a newline, the text."""
        return f'"{self.title}"\n{self.text}'

    def to_record(self) -> dict[str, str]:
        return {"id": self.doc_id, "contents": self.contents, "title": self.title, "text": self.text}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Document:
        """Builds a Document from {"id", "title", "text"} or Search-R1's {"id", "contents"}."""
        if not isinstance(record, Mapping) or "id" not in record:
            raise ValueError(f"a corpus record needs an 'id' and either 'title'+'text' or 'contents': {record!r}")
        if "title" in record and "text" in record:
            return cls(str(record["id"]), record["title"], record["text"])
        if "contents" in record:
            title, text = split_contents(record["contents"])
            return cls(str(record["id"]), title, text)
        raise ValueError(f"corpus record {record['id']!r} has neither 'title'+'text' nor 'contents'")


def split_contents(contents: str) -> tuple[str, str]:
    """Splits Search-R1's `"Title"\\ntext` into (title, text); a single line is all text, no title."""
    if not isinstance(contents, str):
        raise ValueError(f"'contents' must be a str, got {type(contents).__name__}")
    first, sep, rest = contents.partition("\n")
    if not sep:
        return "", contents
    return first.strip().strip('"'), rest


def check_unique_ids(documents: Iterable[Document]) -> list[Document]:
    """Returns the documents as a list; raises ValueError naming a duplicated doc id."""
    docs = list(documents)
    seen: set[str] = set()
    for doc in docs:
        if not isinstance(doc, Document):
            raise TypeError(f"expected Document, got {type(doc).__name__}")
        if doc.doc_id in seen:
            raise ValueError(f"duplicate doc id {doc.doc_id!r} in the corpus")
        seen.add(doc.doc_id)
    return docs


def write_corpus_jsonl(documents: Iterable[Document], path: str | os.PathLike) -> int:
    """Writes one JSON line per document (see the module docstring); returns how many were written."""
    docs = check_unique_ids(documents)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc.to_record(), ensure_ascii=False) + "\n")
    return len(docs)


def read_jsonl(path: str | os.PathLike, parse, what: str) -> list:
    """`parse(record)` for every non-blank line of a JSONL file; a bad line raises ValueError naming
    `path:line` and what it should have been (`what`: "corpus", "question")."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(parse(json.loads(line)))
            except (json.JSONDecodeError, ValueError, TypeError) as e:
                raise ValueError(f"{os.fspath(path)}:{line_no}: bad {what} line: {e}") from e
    return out


def read_corpus_jsonl(path: str | os.PathLike) -> list[Document]:
    """Reads documents written by `write_corpus_jsonl` or a Search-R1 corpus; blank lines are skipped."""
    return check_unique_ids(read_jsonl(path, Document.from_record, "corpus"))
