"""Offline deep-research worlds: fictional entities, a document corpus about them, and k-hop questions.

A *world* is a seeded set of made-up entities (people, organizations, cities, countries, artifacts) whose
names are built from syllables, so no pretrained model can answer from memory: it has to search and read.
Each entity has attributes (a birth year, a profession, ...) and relations to other entities (born_in,
mentor, founder, located in a country, ...). Every relation is a function (one object per subject), so a
chain of relations has exactly one answer. Each entity is rendered into 1..`max_docs_per_entity` short
documents, one sentence per fact, mixed with distractor sentences that name other entities and years
("X once visited Y", "X moved to Y in 1802") so that lexical search alone does not find the answer.

A *k-hop question* follows k facts from a head entity, e.g. (3 hops)

    "In which city was the mentor of the founder of Velmor Guild born?"
    chain: Who founded Velmor Guild?          -> Tarin Oskello   (doc of Velmor Guild)
           Who was the mentor of Tarin Oskello? -> Mira Drovane  (doc of Tarin Oskello)
           In which city was Mira Drovane born? -> Quessa        (doc of Mira Drovane)

The chain's sub-questions each need exactly one document; they feed scripted or demonstration policies.
Everything is deterministic for a seed (Python's `random.Random` seeded with strings, which does not
depend on PYTHONHASHSEED or the platform).

JSONL: the corpus uses `mgrpo_jax.data.corpus` (Search-R1's corpus format); questions use the QA format
{"question", "answer", "id", "metadata": {"hops", "chain", "supporting_docs", ...}}.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from mgrpo_jax.data.corpus import Document, read_jsonl
from mgrpo_jax.rollout.rewards import exact_match  # host-side (no JAX), like this module

KINDS = ("person", "organization", "city", "country", "artifact")

# Share of each kind in a world, and the fewest of each that keeps every relation satisfiable.
_KIND_SHARE = {"person": 0.40, "organization": 0.20, "city": 0.20, "country": 0.05, "artifact": 0.15}
_KIND_MIN = {"person": 6, "organization": 2, "city": 3, "country": 2, "artifact": 2}
MIN_ENTITIES = 20
MAX_HOPS = 8
SPLIT_GROUPS = ("head", "question")


@dataclasses.dataclass(frozen=True)
class Relation:
    """A fact type. `target` is an entity kind, or None for an attribute (a literal value)."""

    key: str
    subject: str
    target: str | None
    sentence: str  # the document sentence, "{s}" subject name, "{o}" object name or value
    question: str  # a question whose answer is the object, "{s}" the subject (a name or a noun phrase)
    phrase: str | None = None  # noun phrase naming the object, for inner hops: "the founder of {s}"


RELATIONS: dict[str, Relation] = {
    r.key: r
    for r in (
        Relation("born_in", "person", "city", "{s} was born in {o}.", "In which city was {s} born?",
                 "the city where {s} was born"),
        Relation("birth_year", "person", None, "{s} was born in the year {o}.", "In what year was {s} born?"),
        Relation("profession", "person", None, "The profession of {s} was {o}.",
                 "What was the profession of {s}?"),
        Relation("mentor", "person", "person", "{s} was mentored by {o}.", "Who was the mentor of {s}?",
                 "the mentor of {s}"),
        Relation("employer", "person", "organization", "{s} worked for {o}.",
                 "Which organization did {s} work for?", "the organization that {s} worked for"),
        Relation("founder", "organization", "person", "{s} was founded by {o}.", "Who founded {s}?",
                 "the founder of {s}"),
        Relation("headquarters", "organization", "city", "{s} is headquartered in {o}.",
                 "In which city is {s} headquartered?", "the city where {s} is headquartered"),
        Relation("founding_year", "organization", None, "{s} was established in {o}.",
                 "In what year was {s} established?"),
        Relation("industry", "organization", None, "{s} works in the field of {o}.",
                 "In which field does {s} work?"),
        Relation("country", "city", "country", "{s} lies in the country of {o}.",
                 "In which country does {s} lie?", "the country in which {s} lies"),
        Relation("mayor", "city", "person", "The mayor of {s} is {o}.", "Who is the mayor of {s}?",
                 "the mayor of {s}"),
        Relation("settled_year", "city", None, "{s} was first settled in {o}.",
                 "In what year was {s} first settled?"),
        Relation("capital", "country", "city", "The capital of {s} is {o}.", "What is the capital of {s}?",
                 "the capital of {s}"),
        Relation("currency", "country", None, "The currency of {s} is the {o}.",
                 "What is the currency of {s}?"),
        Relation("language", "country", None, "The official language of {s} is {o}.",
                 "What is the official language of {s}?"),
        Relation("creator", "artifact", "person", "{s} was created by {o}.", "Who created {s}?",
                 "the creator of {s}"),
        Relation("kept_at", "artifact", "organization", "{s} is kept at {o}.",
                 "Which organization keeps {s}?", "the organization that keeps {s}"),
        Relation("creation_year", "artifact", None, "{s} was completed in {o}.",
                 "In what year was {s} completed?"),
        Relation("material", "artifact", None, "{s} is made of {o}.", "What material is {s} made of?"),
    )
}

# Distractor sentences: true-sounding facts that no question asks about. They name other entities and years
# with wording close to the real relations, so that lexical search returns near misses. "{o}" is an entity
# of the given kind, "{y}" a year.
_DISTRACTORS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "person": (("{s} once visited {o}.", "city"), ("{s} corresponded with {o}.", "person"),
               ("{s} moved to {o} in {y}.", "city"), ("{s} gave a lecture at {o}.", "organization")),
    "organization": (("{s} opened a branch office in {o}.", "city"), ("{s} once competed with {o}.", "organization"),
                     ("{s} was reorganized in {y}.", None), ("{s} hired {o} as an adviser.", "person")),
    "city": (("{s} hosts a yearly festival in honor of {o}.", "person"), ("{s} is twinned with {o}.", "city"),
             ("{s} was rebuilt after a flood in {y}.", None)),
    "country": (("{s} signed a trade pact with {o}.", "country"), ("{s} held a census in {y}.", None)),
    "artifact": (("{s} was exhibited in {o}.", "city"), ("{s} was restored in {y}.", None),
                 ("{s} was once owned by {o}.", "person")),
}

# Titles of an entity's second, third, ... document (the first is titled with the bare name).
_SECTIONS = {
    "person": ("early life", "career", "legacy"),
    "organization": ("history", "activities", "legacy"),
    "city": ("history", "civic life", "geography"),
    "country": ("history", "economy", "culture"),
    "artifact": ("provenance", "description", "exhibitions"),
}

_PROFESSIONS = ("cartographer", "astronomer", "glassblower", "botanist", "engraver", "architect", "physician",
                "composer", "clockmaker", "linguist", "sculptor", "navigator", "chemist", "weaver")
_INDUSTRIES = ("shipbuilding", "cartography", "glassmaking", "astronomy", "textiles", "printing",
               "clockmaking", "botany", "metallurgy", "ceramics", "brewing", "optics")
_MATERIALS = ("bronze", "oak", "silver", "glass", "parchment", "copper", "marble", "walnut", "tin", "linen")
_ORG_SUFFIXES = ("Guild", "Institute", "Foundry", "Society", "Company", "Academy", "Observatory", "Press",
                 "Collective", "Works")
_ARTIFACT_NOUNS = ("Codex", "Astrolabe", "Tapestry", "Chronicle", "Orrery", "Atlas", "Lantern", "Chalice",
                   "Globe", "Clock")
_LANGUAGE_SUFFIXES = ("ish", "ic", "ese", "an")

# Syllable parts, weighted towards plain consonant-vowel syllables so that names stay short and
# pronounceable (fewer tokenizer pieces per name). Names are 2-3 syllables of 5 to 9 letters, which keeps
# most of them out of English.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "b", "d", "k", "l", "m", "r",
           "s", "t", "v", "th", "dr", "br", "tr", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ae", "ou", "y")
_CODAS = ("", "", "", "", "", "n", "r", "l", "s", "m", "k", "th", "x")


@dataclasses.dataclass(frozen=True)
class Entity:
    """A fictional entity. `facts` maps a relation key to an entity id (relations) or a value (attributes)."""

    eid: str
    kind: str
    name: str
    facts: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class World:
    """A generated world: entities, the corpus rendered from them, and where each fact is written.

    `fact_docs[(eid, relation_key)]` is the id of the one document whose text states that fact.
    Lookups: `entity(eid)`, `entity_named(name)`, `document(doc_id)`.
    """

    seed: int
    entities: tuple[Entity, ...]
    documents: tuple[Document, ...]
    fact_docs: Mapping[tuple[str, str], str]

    def __post_init__(self):
        # Indexes built once; the dataclass is frozen, so set them around __setattr__.
        object.__setattr__(self, "_by_id", {e.eid: e for e in self.entities})
        object.__setattr__(self, "_by_name", {e.name: e for e in self.entities})
        object.__setattr__(self, "_docs", {d.doc_id: d for d in self.documents})

    def entity(self, eid: str) -> Entity:
        return self._by_id[eid]

    def entity_named(self, name: str) -> Entity:
        return self._by_name[name]

    def document(self, doc_id: str) -> Document:
        return self._docs[doc_id]

    def fact(self, entity: Entity, key: str) -> str:
        """The object of `entity`'s fact `key` as text: the related entity's name, or the attribute's value."""
        value = entity.facts[key]
        return self.entity(value).name if RELATIONS[key].target is not None else value

    def hop(self, entity: Entity, key: str) -> Hop:
        """`entity`'s fact `key` as a chain step: its one-document sub-question, answer and document."""
        return Hop(RELATIONS[key].question.format(s=entity.name), entity.name, key, self.fact(entity, key),
                   self.fact_docs[(entity.eid, key)])


@dataclasses.dataclass(frozen=True)
class Hop:
    """One step of a question's chain: a one-document sub-question and its answer."""

    question: str
    subject: str  # the subject's name
    relation: str  # a key of RELATIONS
    answer: str
    doc_id: str  # the document that states the fact

    def to_record(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Question:
    """A k-hop question with its gold answer, its chain of sub-questions and the documents that support it."""

    qid: str
    question: str
    answer: str
    chain: tuple[Hop, ...]

    @property
    def hops(self) -> int:
        return len(self.chain)

    @property
    def supporting_docs(self) -> tuple[str, ...]:
        """The documents to read, in chain order, without repeats."""
        return tuple(dict.fromkeys(h.doc_id for h in self.chain))

    def to_record(self) -> dict[str, Any]:
        """The QA JSONL row: {"question", "answer", "id", "metadata"}."""
        return {
            "question": self.question,
            "answer": self.answer,
            "id": self.qid,
            "metadata": {
                "hops": self.hops,
                "chain": [h.to_record() for h in self.chain],
                "supporting_docs": list(self.supporting_docs),
                "head": self.chain[0].subject,
                "relations": [h.relation for h in self.chain],
            },
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Question:
        for key in ("question", "answer", "id", "metadata"):
            if key not in record:
                raise ValueError(f"question record lacks {key!r}: {record!r}")
        meta = record["metadata"]
        if not isinstance(meta, Mapping) or "chain" not in meta:
            raise ValueError(f"question {record['id']!r}: metadata needs a 'chain' (synthetic questions only)")
        chain = tuple(Hop(**h) for h in meta["chain"])
        q = cls(str(record["id"]), record["question"], record["answer"], chain)
        if "hops" in meta and meta["hops"] != q.hops:
            raise ValueError(f"question {q.qid!r}: metadata hops={meta['hops']} but the chain has {q.hops}")
        return q


# ---------------------------------------------------------------------------------------------- worlds


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")


def _kind_counts(num_entities: int) -> dict[str, int]:
    counts = {k: max(_KIND_MIN[k], int(num_entities * _KIND_SHARE[k])) for k in KINDS}
    counts["person"] += num_entities - sum(counts.values())  # people absorb the rounding
    return counts


class _Namer:
    """Unique made-up words; every word it returns is new in this world."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self) -> str:
        for _ in range(10_000):
            n = self.rng.choice((2, 2, 3))
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                        for _ in range(n))
            if 5 <= len(w) <= 9 and w not in self.used:
                self.used.add(w)
                return w.capitalize()
        raise RuntimeError("ran out of syllable names")  # unreachable for any world that fits in memory


def generate_world(
    seed: int,
    num_entities: int = 200,
    *,
    max_docs_per_entity: int = 2,
    distractors: tuple[int, int] = (1, 3),
) -> World:
    """Generates a world of `num_entities` fictional entities and its corpus.

    Args:
      seed: any int; the same seed and arguments give the same world.
      num_entities: total entities (>= 20), split over KINDS (40% people, 20% organizations, 20% cities,
        5% countries, 15% artifacts, with a minimum of each).
      max_docs_per_entity: each entity's sentences are dealt over 1..this many documents (1..4).
      distractors: (min, max) distractor sentences per entity, inclusive.

    Returns:
      A World with one or more documents per entity (doc ids "doc-00000", ...).
    """
    _check_int("seed", seed, -(2**63))
    _check_int("num_entities", num_entities, MIN_ENTITIES)
    _check_int("max_docs_per_entity", max_docs_per_entity, 1, 1 + min(len(s) for s in _SECTIONS.values()))
    if (not isinstance(distractors, (tuple, list)) or len(distractors) != 2
            or any(isinstance(d, bool) or not isinstance(d, int) for d in distractors)
            or not 0 <= distractors[0] <= distractors[1]):
        raise ValueError(f"distractors must be (min, max) ints with 0 <= min <= max, got {distractors!r}")

    rng = random.Random(f"mgrpo-world:{seed}")
    namer = _Namer(rng)
    counts = _kind_counts(num_entities)

    # Names. People share family names (about two per family), so a search for a surname finds relatives.
    families = [namer.word() for _ in range(max(2, counts["person"] // 2))]
    names: dict[str, list[str]] = {
        "person": [f"{namer.word()} {rng.choice(families)}" for _ in range(counts["person"])],
        "organization": [f"{namer.word()} {rng.choice(_ORG_SUFFIXES)}" for _ in range(counts["organization"])],
        "city": [namer.word() for _ in range(counts["city"])],
        "country": [namer.word() for _ in range(counts["country"])],
        "artifact": [f"{namer.word()} {rng.choice(_ARTIFACT_NOUNS)}" for _ in range(counts["artifact"])],
    }
    ids: dict[str, list[str]] = {}
    next_id = 0
    for kind in KINDS:
        ids[kind] = [f"e{next_id + i:05d}" for i in range(counts[kind])]
        next_id += counts[kind]
    name_of = {eid: name for kind in KINDS for eid, name in zip(ids[kind], names[kind])}
    facts: dict[str, dict[str, str]] = {eid: {} for eid in name_of}

    people, orgs, cities, countries, artifacts = (ids[k] for k in KINDS)
    birth = {p: rng.randint(1650, 1950) for p in people}
    for p in people:
        facts[p]["born_in"] = rng.choice(cities)
        facts[p]["birth_year"] = str(birth[p])
        facts[p]["profession"] = rng.choice(_PROFESSIONS)
        facts[p]["employer"] = rng.choice(orgs)
        # Mentors are at least 15 years older, so mentorship never cycles; the oldest people have none.
        elders = [q for q in people if birth[q] <= birth[p] - 15]
        if elders:
            facts[p]["mentor"] = rng.choice(elders)
    for o in orgs:
        founder = rng.choice(people)
        facts[o]["founder"] = founder
        facts[o]["headquarters"] = rng.choice(cities)
        facts[o]["founding_year"] = str(birth[founder] + rng.randint(25, 60))
        facts[o]["industry"] = rng.choice(_INDUSTRIES)
    # Every country gets at least one city, so that every country has a capital.
    city_country = {c: countries[i] if i < len(countries) else rng.choice(countries) for i, c in enumerate(cities)}
    for c in cities:
        facts[c]["country"] = city_country[c]
        facts[c]["mayor"] = rng.choice(people)
        facts[c]["settled_year"] = str(rng.randint(700, 1600))
    for k in countries:
        facts[k]["capital"] = rng.choice([c for c in cities if city_country[c] == k])
        facts[k]["currency"] = namer.word().lower()
        facts[k]["language"] = namer.word() + rng.choice(_LANGUAGE_SUFFIXES)
    for a in artifacts:
        creator = rng.choice(people)
        facts[a]["creator"] = creator
        facts[a]["kept_at"] = rng.choice(orgs)
        facts[a]["creation_year"] = str(birth[creator] + rng.randint(20, 70))
        facts[a]["material"] = rng.choice(_MATERIALS)

    entities = tuple(Entity(eid, kind, name_of[eid], MappingProxyType(facts[eid]))
                     for kind in KINDS for eid in ids[kind])

    # Documents: each entity's fact sentences and distractors, shuffled and dealt round-robin over its docs.
    documents: list[Document] = []
    fact_docs: dict[tuple[str, str], str] = {}
    for e in entities:
        lines: list[tuple[str | None, str]] = []  # (relation key or None for a distractor, sentence)
        for key, value in e.facts.items():
            rel = RELATIONS[key]
            obj = name_of[value] if rel.target is not None else value
            lines.append((key, rel.sentence.format(s=e.name, o=obj)))
        for _ in range(rng.randint(*distractors)):
            template, kind = rng.choice(_DISTRACTORS[e.kind])
            others = [x for x in ids[kind] if x != e.eid] if kind else [None]
            other = rng.choice(others)
            lines.append((None, template.format(s=e.name, o=name_of.get(other, ""), y=rng.randint(1600, 1990))))
        rng.shuffle(lines)
        n_docs = min(rng.randint(1, max_docs_per_entity), len(lines))
        titles = [e.name] + [f"{e.name} ({section})" for section in _SECTIONS[e.kind][: n_docs - 1]]
        doc_ids = [f"doc-{len(documents) + j:05d}" for j in range(n_docs)]
        parts: list[list[str]] = [[] for _ in range(n_docs)]
        for i, (key, sentence) in enumerate(lines):
            parts[i % n_docs].append(sentence)
            if key is not None:
                fact_docs[(e.eid, key)] = doc_ids[i % n_docs]
        documents.extend(Document(d, t, " ".join(p)) for d, t, p in zip(doc_ids, titles, parts))

    return World(seed, entities, tuple(documents), MappingProxyType(fact_docs))


# ------------------------------------------------------------------------------------------- questions


def _hop_quotas(n: int, hops: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Exact per-hop counts summing to n (largest remainder), so the distribution is as asked, not noisy."""
    total = float(sum(weights))
    raw = [n * w / total for w in weights]
    quotas = [math.floor(r) for r in raw]
    # Ties go to the earlier entry of `hops` (a stable sort), which keeps the result deterministic.
    for i in sorted(range(len(hops)), key=lambda i: quotas[i] - raw[i])[: n - sum(quotas)]:
        quotas[i] += 1
    return quotas


def _compose(head: str, relations: Sequence[str]) -> str:
    """The question text for following `relations` from `head`: inner hops become noun phrases."""
    subject = head
    for key in relations[:-1]:
        subject = RELATIONS[key].phrase.format(s=subject)
    return RELATIONS[relations[-1]].question.format(s=subject)


# ----------------------------------------------------------------------------------------------- judging


def _template_pattern(template: str) -> re.Pattern:
    """A relation's question or phrase template as a full-match pattern; "{s}" captures the subject."""
    head, tail = template.split("{s}")
    return re.compile(re.escape(head) + "(?P<s>.+)" + re.escape(tail))


_QUESTION_PATTERNS = tuple((key, _template_pattern(r.question)) for key, r in RELATIONS.items())
_PHRASE_PATTERNS = tuple((key, _template_pattern(r.phrase)) for key, r in RELATIONS.items() if r.phrase)


def _resolve(world: World, subject: str, depth: int = 0) -> tuple[Entity, list[Hop]] | None:
    """The entity a subject names and the hops that lead to it: a name (no hops), or a noun phrase over one
    ("the founder of Velmor Guild": one hop, from Velmor Guild)."""
    if subject in world._by_name:  # World's own index
        return world._by_name[subject], []
    if depth >= MAX_HOPS:
        return None
    for key, pattern in _PHRASE_PATTERNS:
        m = pattern.fullmatch(subject)
        inner = _resolve(world, m["s"], depth + 1) if m else None
        if inner is not None and key in inner[0].facts:
            entity, hops = inner
            return world.entity(entity.facts[key]), [*hops, world.hop(entity, key)]
    return None


def question_chain(world: World, text: str) -> tuple[Hop, ...] | None:
    """The chain of a question phrased with the generator's templates (any number of hops, e.g. a sub-question
    a main agent delegated), or None when the text is not such a question about this world."""
    text = " ".join(text.split())
    for key, pattern in _QUESTION_PATTERNS:
        m = pattern.fullmatch(text)
        found = _resolve(world, m["s"]) if m else None
        if found is not None and key in found[0].facts:
            entity, hops = found
            return (*hops, world.hop(entity, key))
    return None


def answer_question(world: World, text: str) -> str | None:
    """The world's answer to a question phrased with the generator's templates, or None (`question_chain`)."""
    chain = question_chain(world, text)
    return chain[-1].answer if chain else None


class FactJudge:
    """A sub-agent judge (`RewardConfig.sub_judge`) for a generated world: 1.0 when the sub-agent's final answer
    is the world's answer to the sub-task it was given (normalized exact match), else 0.0, also when the
    sub-task is not a question about this world (a delegation that names no entity of it cannot be answered).

    It plays the part of the paper's LLM judge with the reference at hand, so the sub-agent is scored on its
    own job (read the right document, report its fact) whatever the main agent then makes of the report.
    """

    def __init__(self, world: World):
        self.world = world

    def __call__(self, trajectory: Any) -> float:
        gold = answer_question(self.world, trajectory.task)
        return 0.0 if gold is None or trajectory.final is None else exact_match(trajectory.final, gold)


class DelegationJudge:
    """A main-agent judge (`RewardConfig.main_judge`) for a generated world: how faithfully the main agent
    delegated its question's hops, in [0, 1], whatever the sub-agents then reported.

    Hop i of the question's chain should be delegated as its sub-question about the subject the main agent
    knows: the question's head for the first hop, the previous sub-agent's report for the others (so a wrong
    report, the sub-agent's error, costs the main agent nothing; copying it faithfully is its job; after no
    report, the chain's own subject). `subs`: the rollout's sub trajectories in call order. Each hop
    scores 1.0 for exactly that sub-question, 0.0 for none (the main agent answered first); a different one
    scores 0.0, or with `soft` its similarity to the expected text (difflib's ratio, in [0, 1)): a name
    copied with one syllable wrong is closer than another name. The score is the mean over the chain's hops;
    delegations past its end are not scored. A question that is not one of this world's scores 0.0.

    `soft` is what gives the main agent's all-fail groups variance: its delegations of an unseen name differ
    from sample to sample in how close they come, while whole-name matches rarely differ within a group.
    """

    def __init__(self, world: World, soft: bool = True):
        self.world, self.soft = world, soft

    def __call__(self, main: Any, subs: Sequence[Any]) -> float:
        chain = question_chain(self.world, main.task)
        if not chain:
            return 0.0
        total, known = 0.0, chain[0].subject
        for hop, sub in zip(chain, subs):
            expected = RELATIONS[hop.relation].question.format(s=known)
            given = " ".join(sub.task.split())
            if given == expected:
                total += 1.0
            elif self.soft:
                total += difflib.SequenceMatcher(None, given, expected).ratio()
            report = " ".join((sub.final or "").split()) if sub.format_ok else ""
            known = report or hop.answer
        return total / len(chain)


def _question_id(world: World, text: str) -> str:
    # A content hash: the same question always gets the same id, which makes leakage checks one set operation.
    return "syn-" + hashlib.sha1(f"{world.seed}\x00{text}".encode()).hexdigest()[:16]


def _sample_chain(world: World, rng: random.Random, hops: int, heads: Sequence[Entity]) -> Question | None:
    """One random walk of `hops` facts from a random head, or None when it hits a dead end."""
    entity = rng.choice(heads)
    visited = {entity.eid}
    chain: list[Hop] = []
    keys: list[str] = []
    for step in range(hops):
        last = step == hops - 1
        options = [k for k, v in entity.facts.items()
                   if (RELATIONS[k].target is None and last)
                   or (RELATIONS[k].target is not None and v not in visited)]
        if not options:
            return None
        key = rng.choice(options)
        rel = RELATIONS[key]
        value = entity.facts[key]
        chain.append(world.hop(entity, key))
        keys.append(key)
        if rel.target is not None:
            visited.add(value)
            entity = world.entity(value)
    text = _compose(chain[0].subject, keys)
    return Question(_question_id(world, text), text, chain[-1].answer, tuple(chain))


def generate_questions(
    world: World,
    n: int,
    hops: Sequence[int] = (1, 2, 3, 4),
    *,
    seed: int = 0,
    hop_weights: Sequence[float] | None = None,
    max_attempts_per_question: int = 200,
) -> list[Question]:
    """Generates `n` distinct questions over `world`.

    Args:
      world: from `generate_world`.
      n: how many questions (>= 1).
      hops: the hop counts to draw from (each in 1..MAX_HOPS, no repeats).
      seed: question seed, independent of the world's seed.
      hop_weights: relative weight of each entry of `hops` (default uniform). The counts per hop are exact:
        n * w / sum(w), rounded by largest remainder (ties to the earlier entry).
      max_attempts_per_question: random walks tried per question before giving up.

    Returns:
      `n` Questions in a seeded random order, no two with the same text. The answer never names an entity
      that the chain already passed through, so a question never contains its own answer.

    Raises:
      ValueError: bad arguments, or the world is too small to give `n` distinct questions of these hops.
    """
    if not isinstance(world, World):
        raise ValueError(f"world must be a World from generate_world, got {type(world).__name__}")
    _check_int("n", n, 1)
    _check_int("seed", seed, -(2**63))
    _check_int("max_attempts_per_question", max_attempts_per_question, 1)
    hops = tuple(hops)
    if not hops or len(set(hops)) != len(hops):
        raise ValueError(f"hops must be a non-empty sequence of distinct ints, got {hops!r}")
    for h in hops:
        _check_int("each entry of hops", h, 1, MAX_HOPS)
    if hop_weights is None:
        hop_weights = [1.0] * len(hops)
    hop_weights = list(hop_weights)
    if (len(hop_weights) != len(hops) or any(not isinstance(w, (int, float)) or isinstance(w, bool)
                                             or not math.isfinite(w) or w < 0 for w in hop_weights)
            or sum(hop_weights) <= 0):
        raise ValueError(f"hop_weights must be {len(hops)} finite weights >= 0 with a positive sum "
                         f"(one per entry of hops={hops}), got {hop_weights!r}")

    rng = random.Random(f"mgrpo-questions:{world.seed}:{seed}")
    heads = [e for e in world.entities if e.facts]
    questions: list[Question] = []
    seen: set[str] = set()
    for h, quota in zip(hops, _hop_quotas(n, hops, hop_weights)):
        made, attempts = 0, 0
        while made < quota:
            attempts += 1
            if attempts > quota * max_attempts_per_question:
                raise ValueError(
                    f"could only make {made} distinct {h}-hop questions of the {quota} asked after {attempts - 1} "
                    f"tries; use a larger world (num_entities={len(world.entities)}) or fewer questions")
            q = _sample_chain(world, rng, h, heads)
            if q is None or q.question in seen:
                continue
            seen.add(q.question)
            questions.append(q)
            made += 1
    rng.shuffle(questions)
    return questions


def _check_split(questions: Sequence[Question], group_by: str, seed) -> list[Question]:
    if group_by not in SPLIT_GROUPS:
        raise ValueError(f"group_by={group_by!r} is not supported; choose one of {list(SPLIT_GROUPS)}")
    _check_int("seed", seed, -(2**63))
    questions = list(questions)
    if len({q.qid for q in questions}) != len(questions) or len({q.question for q in questions}) != len(questions):
        raise ValueError("questions contain duplicate ids or texts; deduplicate them before splitting")
    return questions


def _split_key(group_by: str):
    return (lambda q: q.chain[0].subject) if group_by == "head" else (lambda q: q.qid)


def _take_groups(questions: list[Question], target: float, key, label: str) -> set[str]:
    """Whole groups, in a seeded order (`label` seeds it), until they hold >= `target` questions."""
    groups = sorted({key(q) for q in questions})  # sorted: independent of input order
    random.Random(label).shuffle(groups)
    size: dict[str, int] = {}
    for q in questions:
        size[key(q)] = size.get(key(q), 0) + 1
    taken: set[str] = set()
    count = 0
    for g in groups:
        if count >= target:
            break
        taken.add(g)
        count += size[g]
    return taken


def split_questions(
    questions: Sequence[Question],
    held_out_fraction: float = 0.2,
    *,
    seed: int = 0,
    group_by: str = "head",
) -> tuple[list[Question], list[Question]]:
    """Splits questions into (train, held_out) with no leakage between them.

    `group_by="head"` (default) keeps all questions about the same head entity on one side, so no held-out
    question starts from an entity that a training question starts from; `"question"` splits questions
    individually (ids and texts are still disjoint). Whole groups move, so the held-out share is
    `held_out_fraction` rounded up to the next group boundary. Input order is kept on each side.

    Raises:
      ValueError: a bad fraction or group_by, duplicate ids or texts in the input, or a side left empty.
    """
    questions = _check_split(questions, group_by, seed)
    if not isinstance(held_out_fraction, (int, float)) or not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction!r}")
    key = _split_key(group_by)
    held = _take_groups(questions, held_out_fraction * len(questions), key, f"mgrpo-split:{seed}")
    train = [q for q in questions if key(q) not in held]
    held_out = [q for q in questions if key(q) in held]
    if not train or not held_out:
        raise ValueError(f"split of {len(questions)} questions into {len({key(q) for q in questions})} {group_by!r} "
                         f"groups left a side empty (train {len(train)}, held-out {len(held_out)}); use more questions "
                         f"or another held_out_fraction")
    return train, held_out


def split_questions_three_ways(
    questions: Sequence[Question],
    rl_fraction: float,
    held_out_fraction: float = 0.2,
    *,
    seed: int = 0,
    group_by: str = "head",
) -> tuple[list[Question], list[Question], list[Question]]:
    """Splits questions into (warm_start, rl, held_out), pairwise without leakage: with `group_by="head"` no
    two sides share a head entity, so RL trains on questions whose heads the warm start's demonstrations never
    started from, exactly as held-out evaluation does.

    The held-out side is `split_questions(questions, held_out_fraction, seed=seed, group_by=group_by)`'s (the
    same questions as the two-way split); the rest is split again, whole groups in another seeded order, until
    the RL side holds >= `rl_fraction` of all the questions. Input order is kept on each side.

    Raises:
      ValueError: bad fractions (each in (0, 1), summing to < 1) or group_by, duplicates, or a side left empty.
    """
    for name, value in (("rl_fraction", rl_fraction), ("held_out_fraction", held_out_fraction)):
        if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    if rl_fraction + held_out_fraction >= 1.0:
        raise ValueError(f"rl_fraction + held_out_fraction must be < 1 (the rest is the warm start's), got "
                         f"{rl_fraction} + {held_out_fraction}")
    train, held_out = split_questions(questions, held_out_fraction, seed=seed, group_by=group_by)
    key = _split_key(group_by)
    rl_groups = _take_groups(train, rl_fraction * len(questions), key, f"mgrpo-split-rl:{seed}")
    warm = [q for q in train if key(q) not in rl_groups]
    rl = [q for q in train if key(q) in rl_groups]
    if not warm or not rl:
        raise ValueError(f"the three-way split of {len(questions)} questions left a side empty (warm start "
                         f"{len(warm)}, RL {len(rl)}, held-out {len(held_out)}); use more questions or other fractions")
    return warm, rl, held_out


# ------------------------------------------------------------------------------------------------ JSONL


def write_questions_jsonl(questions: Iterable[Question], path: str | os.PathLike) -> int:
    """Writes one QA row per question ({"question", "answer", "id", "metadata"}); returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps(q.to_record(), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_questions_jsonl(path: str | os.PathLike) -> list[Question]:
    """Reads questions written by `write_questions_jsonl`; blank lines are skipped."""
    return read_jsonl(path, Question.from_record, "question")
