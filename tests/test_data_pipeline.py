"""QA data pipeline: JSONL/Parquet reading, bad rows, process shards, seeded shuffling, exact resume."""
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mgrpo_jax.data.pipeline import BadRowError, QADataset, make_qa_iterator, questions_and_golds, read_qa_rows


def rows(n, start=0):
    return [{"question": f"Who is number {i}?", "answer": f"n{i}" if i % 3 else [f"n{i}", f"num {i}"],
             "id": f"q{i}", "metadata": {"hops": i % 4}} for i in range(start, start + n)]


def write_jsonl(path, records, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def ids(batch):
    return [r["id"] for r in batch]


def test_jsonl_and_parquet_round_trip(tmp_path):
    data = rows(6)
    jsonl = write_jsonl(tmp_path / "a.jsonl", data[:3])
    parquet = str(tmp_path / "b.parquet")
    pq.write_table(pa.Table.from_pylist([{**r, "answer": r["answer"] if isinstance(r["answer"], list)
                                          else [r["answer"]]} for r in data[3:]]), parquet)
    it = make_qa_iterator([jsonl, parquet], 6, shuffle=False, num_epochs=1, process_index=0, process_count=1)
    (batch,) = list(it)
    assert ids(batch) == [r["id"] for r in data]
    for got, want in zip(batch, data):
        assert got["question"] == want["question"] and got["metadata"] == want["metadata"]
        aliases = want["answer"] if isinstance(want["answer"], list) else [want["answer"]]
        assert got["answers"] == aliases
    assert batch[1]["answer"] == "n1" and batch[0]["answer"] == ["n0", "num 0"]  # JSONL keeps the file's form
    questions, golds = questions_and_golds(batch)
    assert questions[2] == data[2]["question"] and golds[1] == "n1"


def test_missing_id_and_metadata_get_defaults(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q?", "answer": "a"}])
    (record,), skipped = read_qa_rows(path)
    assert record["id"] == "x.jsonl:1" and record["metadata"] == {} and not skipped


@pytest.mark.parametrize("line, reason", [
    ("{not json", "not valid JSON"),
    ('{"answer": "a"}', "missing field 'question'"),
    ('{"question": "  ", "answer": "a"}', "'question' is empty"),
    ('{"question": 3, "answer": "a"}', "'question' must be a string"),
    ('{"question": "q", "answer": []}', "empty list"),
    ('{"question": "q", "answer": ["a", 2]}', "aliases must be strings"),
    ('{"question": "q", "answer": 7}', "'answer' must be a string or a list"),
    ('{"question": "q", "answer": "a", "metadata": [1]}', "'metadata' must be an object"),
    ('[1, 2]', "must be a JSON object"),
])
def test_bad_row_error_names_path_line_and_reason(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", rows(2), ["", line])  # blank line 3 is fine; the bad one is 4
    with pytest.raises(BadRowError) as e:
        QADataset(path, 1, process_index=0, process_count=1)
    assert f"{path}:4: " in str(e.value) and reason in str(e.value)


def test_bad_parquet_row_names_row(tmp_path):
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "q1", "answer": "a"}, {"question": "", "answer": "b"}]), path)
    with pytest.raises(BadRowError, match=f"{path}:2: 'question' is empty"):
        read_qa_rows(path)


def test_skip_bad_rows_counts_and_logs_once(tmp_path, caplog):
    path = write_jsonl(tmp_path / "mixed.jsonl", rows(4), ["{oops", '{"question": "q"}'])
    with caplog.at_level(logging.WARNING, logger="mgrpo_jax.data.pipeline"):
        ds = QADataset(path, 2, on_bad_row="skip", process_index=0, process_count=1)
    assert ds.num_skipped == 2 and len(ds.records) == 4
    assert [(s.line, s.reason.split(" (")[0]) for s in ds.skipped] == [(5, "not valid JSON"),
                                                                       (6, "missing field 'answer'")]
    messages = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(messages) == 1 and f"{path}:5" in messages[0] and f"{path}:6" in messages[0]


def test_process_shards_are_disjoint_and_cover(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(12))
    seen = []
    for index in (0, 1):
        it = make_qa_iterator(path, 2, seed=3, num_epochs=1, process_index=index, process_count=2)
        seen.append({i for b in it for i in ids(b)})
    assert len(seen[0]) == len(seen[1]) == 6
    assert not seen[0] & seen[1] and seen[0] | seen[1] == {f"q{i}" for i in range(12)}


def test_skip_first_leaves_out_the_leading_rows_in_file_order(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(12))
    it = make_qa_iterator(path, 4, seed=5, num_epochs=1, process_index=0, process_count=1, skip_first=4)
    assert sorted(i for b in it for i in ids(b)) == sorted(f"q{i}" for i in range(4, 12))  # 8 rows, 2 batches
    assert it.dataset.fingerprint()["num_rows"] == 8
    for bad in (12, -1, 1.5):
        with pytest.raises(ValueError, match="skip_first"):
            QADataset(path, 1, skip_first=bad, process_index=0, process_count=1)
    subset = make_qa_iterator(path, 3, num_epochs=2, process_index=0, process_count=1, skip_first=4, max_rows=3)
    assert [sorted(ids(b)) for b in subset] == [["q4", "q5", "q6"]] * 2  # the same 3 rows, epoch after epoch
    with pytest.raises(ValueError, match="max_rows"):
        QADataset(path, 1, max_rows=-1, process_index=0, process_count=1)


def test_uneven_rows_give_equal_shards(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(7))
    sizes = [QADataset(path, 1, process_index=i, process_count=2).rows_per_process for i in (0, 1)]
    assert sizes == [3, 3]  # every process runs the same number of steps


def test_seeded_order(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(20))

    def order(seed):
        return [ids(b) for b in make_qa_iterator(path, 4, seed=seed, num_epochs=2, process_index=0, process_count=1)]

    first = order(7)
    assert first == order(7)
    assert first != order(8)
    assert first[:5] != first[5:]  # each epoch is shuffled anew
    for epoch in (first[:5], first[5:]):  # batches stay within an epoch: each covers every row once
        assert sorted(i for b in epoch for i in b) == sorted(f"q{i}" for i in range(20))


def test_drop_remainder_and_forever(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(10))
    finite = list(make_qa_iterator(path, 3, num_epochs=2, process_index=0, process_count=1))
    assert len(finite) == 6 and all(len(b) == 3 for b in finite)
    forever = make_qa_iterator(path, 3, num_epochs=None, process_index=0, process_count=1)
    assert len([next(forever) for _ in range(50)]) == 50


def test_resume_gives_identical_batches(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(10))
    kwargs = dict(seed=11, num_epochs=None, process_index=0, process_count=1)
    reference = make_qa_iterator(path, 3, **kwargs)
    expected = [ids(next(reference)) for _ in range(9)]  # crosses two epoch boundaries (3 batches per epoch)

    it = make_qa_iterator(path, 3, **kwargs)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as it comes back from a checkpoint
    resumed = make_qa_iterator(path, 3, **kwargs)
    resumed.set_state(state)
    assert [ids(next(resumed)) for _ in range(5)] == expected[4:]


def test_state_from_other_pipeline_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(10))
    state = make_qa_iterator(path, 3, seed=1, process_index=0, process_count=1).get_state()
    other = make_qa_iterator(path, 3, seed=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        other.set_state(state)


def test_config_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(3))
    with pytest.raises(ValueError, match="fewer than batch_size=4"):
        QADataset(path, 4, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="on_bad_row='drop'"):
        QADataset(path, 1, on_bad_row="drop", process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        QADataset(str(tmp_path / "*.parquet"), 1, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_index < process_count"):
        QADataset(path, 1, process_index=2, process_count=2)


# ------------------------------------------------------------------------- undecodable, empty, corpus files


def test_a_non_utf8_byte_is_a_bad_row_with_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(r).encode() for r in rows(3)]
    lines[1] = lines[1].replace(b"number", b"n\xfcmber")  # one Latin-1 byte in row 2
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(BadRowError, match=rf"{path}:2: not valid UTF-8 \(byte 0xfc at byte \d+ of the line\)"):
        read_qa_rows(str(path))
    ds = QADataset(str(path), 1, on_bad_row="skip", process_index=0, process_count=1)
    assert ids(ds.records) == ["q0", "q2"] and [(s.line, s.reason[:19]) for s in ds.skipped] == \
        [(2, "not valid UTF-8 (by")]
    # A UTF-8 byte-order mark is not a bad row.
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines[:1]) + b"\n")
    assert ids(read_qa_rows(str(path))[0]) == ["q0"]


def test_files_without_valid_rows_say_so(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match=rf"{empty}: no valid question rows: the files have no rows") as e:
        QADataset(str(empty), 1, process_index=0, process_count=1)
    assert "skip_first" not in str(e.value)
    bad = write_jsonl(tmp_path / "bad.jsonl", [], ["{oops", '{"question": "q"}'])
    with pytest.raises(ValueError, match=rf"no valid question rows: all 2 rows are bad \(the first: {bad}:1: not"):
        QADataset(bad, 1, on_bad_row="skip", process_index=0, process_count=1)


def write_corpus(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n"
                              for line in lines))
    return path


def test_bad_corpus_lines_name_path_and_line_or_are_skipped(tmp_path):
    from mgrpo_jax.data.corpus import read_corpus_jsonl, read_corpus_rows

    good = {"id": "d1", "title": "Quessa", "text": "Quessa is a river port."}
    cases = [(b'{"id": "d2", "title": "Caf\xe9", "text": "x"}\n', "not valid UTF-8"),
             ({"id": "d2", "title": " ", "text": ""}, "document 'd2' has neither title nor text"),
             ({"id": "d1", "title": "Again", "text": "y"}, "duplicate doc id 'd1' \\(first on line 1\\)"),
             ({"id": "d2"}, "bad corpus line: corpus record 'd2' has neither"),
             (b"{oops\n", "not valid JSON")]
    for line, reason in cases:
        path = write_corpus(tmp_path / "corpus.jsonl", [good, line])
        with pytest.raises(BadRowError, match=rf"{path}:2: {reason}"):
            read_corpus_jsonl(path)
        docs, skipped = read_corpus_rows(path, "skip")
        assert [d.doc_id for d in docs] == ["d1"] and [s.line for s in skipped] == [2]


def _files_config(tmp_path, corpus, on_bad_row="error"):
    from configs import tiny_cpu

    questions = write_jsonl(tmp_path / "q.jsonl", rows(4))
    config = tiny_cpu.get_config()
    config.task.update({"kind": "files", "train_files": (questions,), "corpus_file": str(corpus),
                        "on_bad_row": on_bad_row})
    config.tokenizer.vocab_size = 300
    return config


def test_a_corpus_of_one_empty_document_fails_at_load_with_its_line(tmp_path):
    from mgrpo_jax.data.task import load_task
    from mgrpo_jax.rollout.protocol import ProtocolConfig

    corpus = write_corpus(tmp_path / "corpus.jsonl", [{"id": "d1", "title": "", "text": ""}])
    with pytest.raises(BadRowError, match=rf"{corpus}:1: document 'd1' has neither title nor text"):
        load_task(_files_config(tmp_path, corpus), str(tmp_path / "w"), ProtocolConfig())
    with pytest.raises(ValueError, match=rf"{corpus}: no usable corpus documents: all 1 lines are bad"):
        load_task(_files_config(tmp_path, corpus, "skip"), str(tmp_path / "w"), ProtocolConfig())
    stop_words = write_corpus(tmp_path / "stop.jsonl", [{"id": "d1", "title": "", "text": "the of and"}])
    with pytest.raises(ValueError, match=rf"{stop_words}: LocalSearch: none of the 1 documents has a searchable"):
        load_task(_files_config(tmp_path, stop_words), str(tmp_path / "w"), ProtocolConfig())


def test_load_task_validates_question_files_and_skips_undecodable_rows(tmp_path):
    from mgrpo_jax.data.task import load_task
    from mgrpo_jax.rollout.protocol import ProtocolConfig

    corpus = write_corpus(tmp_path / "corpus.jsonl", [{"id": "d1", "title": "Quessa", "text": "A river port."}])
    config = _files_config(tmp_path, corpus)
    questions = config.task.train_files[0]
    with open(questions, "ab") as f:
        f.write(b'{"question": "Wh\xff?", "answer": "x"}\n')
    with pytest.raises(BadRowError, match=rf"{questions}:5: not valid UTF-8"):  # before any tokenizer or model
        load_task(config, str(tmp_path / "w"), ProtocolConfig())
    config.task.on_bad_row = "skip"
    data = load_task(config, str(tmp_path / "w"), ProtocolConfig())
    assert data.train_files == [questions] and [d.doc_id for d in data.documents] == ["d1"]
