"""Synthetic deep-research worlds: determinism, answers derivable from the documents alone, hop quotas,
uniqueness, JSONL round trips, leakage-free splits, argument errors."""
import collections
import json
import re
import subprocess
import sys

import pytest

from mgrpo_jax.data import corpus, synthetic


@pytest.fixture(scope="module")
def world():
    return synthetic.generate_world(7, num_entities=120)


@pytest.fixture(scope="module")
def questions(world):
    return synthetic.generate_questions(world, 240, hops=(1, 2, 3, 4), seed=3)


# An independent reader of the rendered text: one pattern per relation, written from the English we expect in
# the documents (not from the generator's templates). "{s}" is the subject's name; the group is the answer.
_PATTERNS = {
    "born_in": r"{s} was born in (?!the year )([^.\d]+)\.",
    "birth_year": r"{s} was born in the year (\d{{4}})\.",
    "profession": r"The profession of {s} was ([a-z]+)\.",
    "mentor": r"{s} was mentored by ([^.]+)\.",
    "employer": r"{s} worked for ([^.]+)\.",
    "founder": r"{s} was founded by ([^.]+)\.",
    "headquarters": r"{s} is headquartered in ([^.]+)\.",
    "founding_year": r"{s} was established in (\d{{4}})\.",
    "industry": r"{s} works in the field of ([a-z]+)\.",
    "country": r"{s} lies in the country of ([^.]+)\.",
    "mayor": r"The mayor of {s} is ([^.]+)\.",
    "settled_year": r"{s} was first settled in (\d{{3,4}})\.",
    "capital": r"The capital of {s} is ([^.]+)\.",
    "currency": r"The currency of {s} is the ([a-z]+)\.",
    "language": r"The official language of {s} is ([A-Za-z]+)\.",
    "creator": r"{s} was created by ([^.]+)\.",
    "kept_at": r"{s} is kept at ([^.]+)\.",
    "creation_year": r"{s} was completed in (\d{{4}})\.",
    "material": r"{s} is made of ([a-z]+)\.",
}


def _resolve(documents, head, relations):
    """Follows `relations` from `head` reading only document titles and text: returns [(answer, doc_id)]."""
    steps = []
    subject = head
    for rel in relations:
        # An entity's documents are titled with its name, or its name and a section in parentheses.
        docs = [d for d in documents if d.title == subject or d.title.startswith(subject + " (")]
        assert docs, f"no document about {subject!r}"
        pattern = re.compile("^" + _PATTERNS[rel].format(s=re.escape(subject)) + "$")
        found = [(m.group(1), d.doc_id) for d in docs for sentence in re.split(r"(?<=\.) ", d.text)
                 if (m := pattern.match(sentence))]
        assert len(found) == 1, f"{rel} of {subject!r}: expected one stating sentence, found {found}"
        steps.append(found[0])
        subject = found[0][0]
    return steps


def test_answers_follow_from_the_documents_alone(world, questions):
    docs = list(world.documents)
    for q in questions:
        head = q.chain[0].subject
        relations = [h.relation for h in q.chain]
        steps = _resolve(docs, head, relations)
        assert steps[-1][0] == q.answer, q.question
        # Each hop's sub-answer and the document that states it match the chain, and those are the support.
        assert [a for a, _ in steps] == [h.answer for h in q.chain]
        assert [d for _, d in steps] == [h.doc_id for h in q.chain]
        assert set(q.supporting_docs) == {d for _, d in steps}
        assert head in q.question and q.answer not in q.question
        # Each sub-question names its subject (answerable from one document).
        assert all(h.subject in h.question for h in q.chain)
        # Every entity along the chain is distinct (no question that loops back to an entity it named).
        names = [head] + [h.answer for h in q.chain if not h.answer.isdigit()]
        assert len(names) == len(set(names))


def test_answer_question_follows_every_chain_and_rejects_other_text(world, questions):
    for q in questions:  # composed questions of 1-4 hops, and each hop's one-document sub-question
        assert synthetic.answer_question(world, q.question) == q.answer, q.question
        for hop in q.chain:
            assert synthetic.answer_question(world, hop.question) == hop.answer, hop.question
    q = next(q for q in questions if q.hops == 2)
    assert synthetic.answer_question(world, "  " + q.question.replace(" ", "\n ", 1)) == q.answer  # whitespace
    head = q.chain[0].subject
    assert synthetic.answer_question(world, q.question.replace(head, head + "x")) is None  # no such entity
    assert synthetic.answer_question(world, q.question.rstrip("?")) is None  # not the template
    assert synthetic.answer_question(world, f"Tell me about {head}.") is None
    person = next(e for e in world.entities if e.kind == "person")
    assert synthetic.answer_question(world, f"Who founded {person.name}?") is None  # a person founds nothing


def test_question_chain_is_the_generator_s_chain(world, questions):
    for q in questions:
        assert synthetic.question_chain(world, q.question) == q.chain, q.question
    assert synthetic.question_chain(world, "Who is everyone?") is None


def test_delegation_judge_scores_each_hop_against_what_the_main_agent_knew(world, questions):
    import types

    q = next(q for q in questions if q.hops == 2)
    h0, h1 = q.chain
    main = types.SimpleNamespace(task=q.question)
    sub = lambda task, final, ok=True: types.SimpleNamespace(task=task, final=final, format_ok=ok)  # noqa: E731
    soft, exact = synthetic.DelegationJudge(world), synthetic.DelegationJudge(world, soft=False)
    for judge in (soft, exact):
        assert judge(main, [sub(h0.question, h0.answer), sub(h1.question, h1.answer)]) == 1.0
        assert judge(main, [sub(h0.question, h0.answer)]) == 0.5  # answered before the last hop
        assert judge(main, []) == 0.0
        # The sub-agent reported a wrong name: delegating that name is the main agent's job done right.
        wrong = next(e.name for e in world.entities if e.name not in (h0.answer, h1.subject))
        asked = h1.question.replace(h1.subject, wrong)
        assert judge(main, [sub(h0.question, wrong), sub(asked, "?")]) == 1.0
        # No report (a broken sub episode): the chain's own subject is expected.
        assert judge(main, [sub(h0.question, wrong, ok=False), sub(h1.question, "?")]) == 1.0
        assert judge(types.SimpleNamespace(task="Who is everyone?"), [sub(h0.question, h0.answer)]) == 0.0
    # The head's name with one letter changed: no credit for that hop when exact, near-full credit when soft.
    name = h0.subject
    typo = name[:-1] + ("a" if name[-1] != "a" else "e")
    subs = [sub(h0.question.replace(name, typo), h0.answer), sub(h1.question, h1.answer)]
    assert exact(main, subs) == 0.5 and 0.5 + 0.5 * 0.9 < soft(main, subs) < 1.0
    assert soft(main, [sub(f"Tell me about {h0.answer}.", h0.answer), sub(h1.question, h1.answer)]) < soft(main, subs)


def test_fact_judge_scores_the_sub_answer_against_the_world(world, questions):
    import types

    judge = synthetic.FactJudge(world)
    hop = next(q for q in questions if q.hops == 2).chain[1]
    episode = lambda task, final: types.SimpleNamespace(task=task, final=final)  # noqa: E731
    assert judge(episode(hop.question, hop.answer)) == 1.0
    assert judge(episode(hop.question, f" the {hop.answer.upper()}. ")) == 1.0  # normalized exact match
    assert judge(episode(hop.question, hop.answer + " and more")) == 0.0
    assert judge(episode(hop.question, None)) == 0.0
    assert judge(episode(f"What about {hop.subject}?", hop.answer)) == 0.0  # a task the world cannot answer


def test_generation_is_deterministic_and_seed_dependent():
    a = synthetic.generate_world(11, num_entities=60)
    b = synthetic.generate_world(11, num_entities=60)
    c = synthetic.generate_world(12, num_entities=60)
    assert a.documents == b.documents and a.entities == b.entities
    assert a.documents != c.documents
    qa = synthetic.generate_questions(a, 50, seed=5)
    assert qa == synthetic.generate_questions(b, 50, seed=5)
    assert qa != synthetic.generate_questions(a, 50, seed=6)


def test_hop_counts_are_exact_quotas():
    w = synthetic.generate_world(1, num_entities=100)
    qs = synthetic.generate_questions(w, 100, hops=(1, 3), hop_weights=(1, 3), seed=0)
    assert collections.Counter(q.hops for q in qs) == {1: 25, 3: 75}
    # Uneven split: largest remainders, ties to the earlier entry; 10 over 3 equal weights -> 4, 3, 3.
    qs = synthetic.generate_questions(w, 10, hops=(2, 1, 4), seed=0)
    assert collections.Counter(q.hops for q in qs) == {2: 4, 1: 3, 4: 3}
    assert all(len(q.chain) == q.hops == q.to_record()["metadata"]["hops"] for q in qs)


def test_no_duplicate_questions_and_content_ids(world, questions):
    assert len({q.question for q in questions}) == len(questions)
    assert len({q.qid for q in questions}) == len(questions)
    # The id is a function of the text: regenerating with another seed gives the same id for the same text.
    other = {q.question: q.qid for q in synthetic.generate_questions(world, 240, seed=99)}
    shared = [q for q in questions if q.question in other]
    assert shared and all(other[q.question] == q.qid for q in shared)


def test_documents_unique_ids_and_every_entity_has_a_titled_doc(world):
    ids = [d.doc_id for d in world.documents]
    assert len(ids) == len(set(ids))
    titles = {d.title for d in world.documents}
    assert all(e.name in titles for e in world.entities)
    names = [e.name for e in world.entities]
    assert len(names) == len(set(names))
    assert collections.Counter(e.kind for e in world.entities).keys() == set(synthetic.KINDS)
    # Distractors exist: some sentences state no relation at all.
    all_patterns = [re.compile(p.format(s=r".+?")) for p in _PATTERNS.values()]
    sentences = [s for d in world.documents for s in re.split(r"(?<=\.) ", d.text)]
    assert any(not any(p.fullmatch(s) for p in all_patterns) for s in sentences)


def test_multi_doc_entities_spread_their_facts():
    w = synthetic.generate_world(3, num_entities=40, max_docs_per_entity=3)
    titled = collections.Counter(d.title.split(" (")[0] for d in w.documents)
    assert max(titled.values()) > 1
    one = synthetic.generate_world(3, num_entities=40, max_docs_per_entity=1, distractors=(0, 0))
    assert len(one.documents) == 40


def test_jsonl_round_trips(tmp_path, world, questions):
    cpath, qpath = tmp_path / "corpus.jsonl", tmp_path / "qa.jsonl"
    assert corpus.write_corpus_jsonl(world.documents, cpath) == len(world.documents)
    assert corpus.read_corpus_jsonl(cpath) == list(world.documents)
    # Search-R1's reader only sees "contents": the title is its quoted first line.
    first = json.loads(cpath.read_text().splitlines()[0])
    assert first["contents"] == f'"{first["title"]}"\n{first["text"]}'
    assert corpus.Document.from_record({"id": first["id"], "contents": first["contents"]}) == world.documents[0]

    assert synthetic.write_questions_jsonl(questions, qpath) == len(questions)
    assert synthetic.read_questions_jsonl(qpath) == questions
    row = json.loads(qpath.read_text().splitlines()[0])
    assert set(row) == {"question", "answer", "id", "metadata"}
    assert {"hops", "chain", "supporting_docs"} <= set(row["metadata"])


def test_bad_jsonl_lines_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "a", "title": "t", "text": "x"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        corpus.read_corpus_jsonl(p)
    p.write_text('{"id": "a", "title": "t", "text": "x"}\n{"id": "a", "contents": "\\"t\\"\\ny"}\n')
    with pytest.raises(ValueError, match="duplicate doc id 'a'"):
        corpus.read_corpus_jsonl(p)
    p.write_text('{"question": "q", "answer": "a", "id": "1", "metadata": {}}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1.*chain"):
        synthetic.read_questions_jsonl(p)


@pytest.mark.parametrize("group_by", synthetic.SPLIT_GROUPS)
def test_split_is_disjoint_and_complete(questions, group_by):
    train, held = synthetic.split_questions(questions, 0.25, seed=1, group_by=group_by)
    assert len(train) + len(held) == len(questions)
    assert not {q.qid for q in train} & {q.qid for q in held}
    assert not {q.question for q in train} & {q.question for q in held}
    assert len(held) >= 0.25 * len(questions)
    if group_by == "head":
        assert not {q.chain[0].subject for q in train} & {q.chain[0].subject for q in held}
    assert (train, held) == synthetic.split_questions(questions, 0.25, seed=1, group_by=group_by)
    with pytest.raises(ValueError, match="duplicate"):
        synthetic.split_questions(questions + questions[:1], 0.25)


def test_three_way_split_shares_no_head_and_keeps_the_two_way_held_out_side(questions):
    warm, rl, held = synthetic.split_questions_three_ways(questions, 0.3, 0.2, seed=4)
    heads = [{q.chain[0].subject for q in side} for side in (warm, rl, held)]
    assert not heads[0] & heads[1] and not heads[0] & heads[2] and not heads[1] & heads[2]
    assert sorted(q.qid for q in warm + rl + held) == sorted(q.qid for q in questions)
    assert held == synthetic.split_questions(questions, 0.2, seed=4)[1]  # the same evaluation questions
    assert len(rl) >= 0.3 * len(questions) and warm
    # Whole head groups, stopped at the first boundary past the target: without its largest head RL falls short.
    largest = max(collections.Counter(q.chain[0].subject for q in rl).values())
    assert len(rl) - largest < 0.3 * len(questions)
    order = {q.qid: i for i, q in enumerate(questions)}
    for side in (warm, rl, held):
        assert [order[q.qid] for q in side] == sorted(order[q.qid] for q in side)  # input order kept
    assert (warm, rl, held) == synthetic.split_questions_three_ways(questions, 0.3, 0.2, seed=4)
    assert rl != synthetic.split_questions_three_ways(questions, 0.3, 0.2, seed=5)[1]
    with pytest.raises(ValueError, match="must be < 1"):
        synthetic.split_questions_three_ways(questions, 0.5, 0.5)
    with pytest.raises(ValueError, match="rl_fraction must be in"):
        synthetic.split_questions_three_ways(questions, 0.0, 0.2)
    with pytest.raises(ValueError, match="left a side empty"):
        synthetic.split_questions_three_ways(questions, 0.79, 0.2)


def test_argument_errors(world):
    with pytest.raises(ValueError, match="num_entities"):
        synthetic.generate_world(0, num_entities=5)
    with pytest.raises(ValueError, match="max_docs_per_entity"):
        synthetic.generate_world(0, max_docs_per_entity=0)
    with pytest.raises(ValueError, match="distractors"):
        synthetic.generate_world(0, distractors=(3, 1))
    with pytest.raises(ValueError, match="hops"):
        synthetic.generate_questions(world, 5, hops=(0, 2))
    with pytest.raises(ValueError, match="hops"):
        synthetic.generate_questions(world, 5, hops=(2, 2))
    with pytest.raises(ValueError, match="hop_weights"):
        synthetic.generate_questions(world, 5, hops=(1, 2), hop_weights=(1,))
    with pytest.raises(ValueError, match="n must be"):
        synthetic.generate_questions(world, 0)
    with pytest.raises(ValueError, match="larger world"):
        synthetic.generate_questions(synthetic.generate_world(0, 20), 500, hops=(1,), max_attempts_per_question=20)
    with pytest.raises(ValueError, match="group_by='entity'.*choose one of"):
        synthetic.split_questions([], group_by="entity")
    with pytest.raises(ValueError, match="held_out_fraction"):
        synthetic.split_questions([], held_out_fraction=1.0)


def test_host_side_only():
    # The data modules run in data loaders and tool servers: importing them must not pull in JAX.
    code = "import sys, mgrpo_jax.data.synthetic; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
