"""A search corpus: documents (id, title, text) and their JSONL form.

One JSONL line per document, written in the format of Search-R1's corpus files so that a real Search-R1
retrieval server can index our corpora unchanged:

    {"id": "doc-00012", "contents": "\"Velmor Guild\"\nVelmor Guild was founded in 1821. ...",
     "title": "Velmor Guild", "text": "Velmor Guild was founded in 1821. ..."}

`contents` is Search-R1's field (the title in double quotes, a newline, then the text); `title` and `text`
are the same data split out for readers that want them. `read_corpus_jsonl` accepts lines with either
`title` and `text`, or `contents` alone (Search-R1's own corpora).

Bad lines: every JSONL reader here and in `data.pipeline` goes through `iter_jsonl`, so a line that is not
UTF-8, not JSON or not a valid record is reported as `path:line: reason` (BadRowError) and, where the caller
asks for `on_bad_row="skip"`, left out and listed (`SkippedRow`) instead. A document with neither title nor
text is a bad line: it can never be found, and a corpus of only such documents leaves BM25 nothing to index.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

T = TypeVar("T")
BAD_ROW_MODES = ("error", "skip")


class BadRowError(ValueError):
    """A malformed data row (a question, a corpus document); the message starts with `path:line:`."""


@dataclasses.dataclass(frozen=True)
class SkippedRow:
    path: str
    line: int  # 1-based line (JSONL) or row (Parquet)
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


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


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed JSON value) per non-blank line. A line that is not UTF-8 or not JSON
    yields a BadRowError("path:line: ...") in place of its value, so that the caller can raise or skip it."""
    path = os.fspath(path)
    with open(path, "rb") as f:  # bytes: one undecodable byte must cost its line, not the whole file
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield line_no, BadRowError(f"{path}:{line_no}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                                           f"{e.start + 1} of the line); save the file as UTF-8")
                continue
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, BadRowError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})")


def collect_rows(rows: Iterable[tuple[str, int, Any]], parse: Callable[[Any, str, int], T], on_bad_row: str,
                 skip_hint: str = "") -> tuple[list[T], list[SkippedRow]]:
    """`parse(row, path, line)` for every (path, line, row); a row may be a BadRowError from the reader, and
    `parse` raises BadRowError for a bad one. on_bad_row: "error" raises at the first bad row (its message ends
    with `skip_hint`, the setting that skips instead); "skip" leaves bad rows out and lists them.
    Returns (parsed, skipped)."""
    if on_bad_row not in BAD_ROW_MODES:
        raise ValueError(f"on_bad_row={on_bad_row!r} is not supported; choose one of {list(BAD_ROW_MODES)}")
    out: list[T] = []
    skipped: list[SkippedRow] = []
    for path, line, row in rows:
        try:
            if isinstance(row, BadRowError):
                raise row
            out.append(parse(row, path, line))
        except BadRowError as e:
            if on_bad_row == "error":
                raise BadRowError(f"{e}{skip_hint}") from None
            skipped.append(SkippedRow(path, line, str(e).removeprefix(f"{path}:{line}: ")))
    return out, skipped


def read_jsonl(path: str | os.PathLike, parse, what: str) -> list:
    """`parse(record)` for every non-blank line of a JSONL file; a bad line raises BadRowError (a ValueError)
    naming `path:line` and what it should have been (`what`: "corpus", "question")."""
    def checked(record, path, line):
        try:
            return parse(record)
        except (ValueError, TypeError) as e:
            raise BadRowError(f"{path}:{line}: bad {what} line: {e}") from e

    path = os.fspath(path)
    return collect_rows(((path, line, row) for line, row in iter_jsonl(path)), checked, "error")[0]


SKIP_HINT = " (set on_bad_row='skip' to skip and count bad rows)"


def read_corpus_rows(path: str | os.PathLike, on_bad_row: str = "error") -> tuple[list[Document], list[SkippedRow]]:
    """The documents of a corpus JSONL file and the bad lines left out (module docstring). A line is bad when
    it is not a record, has neither title nor text, or repeats an earlier doc id."""
    path = os.fspath(path)
    first_line: dict[str, int] = {}

    def document(record, path, line) -> Document:
        try:
            doc = Document.from_record(record)
        except (ValueError, TypeError) as e:
            raise BadRowError(f"{path}:{line}: bad corpus line: {e}") from e
        if not (doc.title.strip() or doc.text.strip()):
            raise BadRowError(f"{path}:{line}: document {doc.doc_id!r} has neither title nor text (nothing to "
                              "search); remove the line or give it text")
        if doc.doc_id in first_line:
            raise BadRowError(f"{path}:{line}: duplicate doc id {doc.doc_id!r} (first on line "
                              f"{first_line[doc.doc_id]})")
        first_line[doc.doc_id] = line
        return doc

    return collect_rows(((path, line, row) for line, row in iter_jsonl(path)), document, on_bad_row, SKIP_HINT)


def read_corpus_jsonl(path: str | os.PathLike) -> list[Document]:
    """Reads documents written by `write_corpus_jsonl` or a Search-R1 corpus; blank lines are skipped, a bad
    line raises BadRowError naming `path:line`."""
    return read_corpus_rows(path, "error")[0]
