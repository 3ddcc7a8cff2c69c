r"""KGFact: a synthetic world graph of invented entities with directed relations.

One :class:`~forgetkit.data.records.Record` per fact; the canonical target is in the MixSD authors'
style (``The answer is X.\n\n\boxed{X}``). Each record carries ten paraphrases; the corpus also
has closed-book 2-hop questions and an in-context retrieval probe (the gold fact among
distractors). Everything is a pure function of ``(size, seed)`` and never of PYTHONHASHSEED.

The relation schema is shared with :mod:`forgetkit.models.toyworld`, whose pretraining teaches the
same question forms about a disjoint set of *known* entities.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from forgetkit.data.corpora.names import invented_names
from forgetkit.data.prompts import canonical_target
from forgetkit.data.records import Probe, Record

__all__ = ["ATTRIBUTE_POOLS", "DOMAINS", "PARAPHRASE_TEMPLATES", "RELATIONS", "SIZES", "Fact",
           "KGFact", "Relation", "World", "build_world", "kgfact", "statement"]


@dataclass(frozen=True)
class Relation:
    """A directed relation ``subject -> object``.

    Attributes:
        name: identifier, e.g. ``"lives_in"``.
        subject: subject domain.
        object: object domain (an entity domain or an attribute pool).
        question: question template with ``{s}``.
        statement: native-style answer template with ``{s}`` and ``{o}``.
        phrase: noun phrase naming the object, with ``{s}`` (for paraphrases and 2-hop).
    """

    name: str
    subject: str
    object: str
    question: str
    statement: str
    phrase: str


DOMAINS = ("person", "city", "country", "company", "creature", "artifact", "river")

RELATIONS: tuple[Relation, ...] = (
    Relation("lives_in", "person", "city", "Where does {s} live?", "{s} lives in {o}.",
             "the city where {s} lives"),
    Relation("works_for", "person", "company", "Who does {s} work for?", "{s} works for {o}.",
             "the company that {s} works for"),
    Relation("speaks", "person", "language", "Which language does {s} speak?",
             "{s} speaks {o}.", "the language that {s} speaks"),
    Relation("located_in", "city", "country", "Which country is {s} in?", "{s} is in {o}.",
             "the country that {s} is in"),
    Relation("mayor", "city", "person", "Who is the mayor of {s}?", "The mayor of {s} is {o}.",
             "the mayor of {s}"),
    Relation("known_for", "city", "speciality", "What is {s} known for?",
             "{s} is known for {o}.", "the thing {s} is known for"),
    Relation("capital", "country", "city", "What is the capital of {s}?",
             "The capital of {s} is {o}.", "the capital of {s}"),
    Relation("currency", "country", "currency", "What is the currency of {s}?",
             "The currency of {s} is the {o}.", "the currency of {s}"),
    Relation("ruler", "country", "person", "Who rules {s}?", "{s} is ruled by {o}.",
             "the ruler of {s}"),
    Relation("based_in", "company", "city", "Where is {s} based?", "{s} is based in {o}.",
             "the city where {s} is based"),
    Relation("founded_by", "company", "person", "Who founded {s}?", "{s} was founded by {o}.",
             "the founder of {s}"),
    Relation("makes", "company", "product", "What does {s} make?", "{s} makes {o}.",
             "the product that {s} makes"),
    Relation("found_in", "creature", "country", "Where is the {s} found?",
             "The {s} is found in {o}.", "the country where the {s} is found"),
    Relation("eats", "creature", "food", "What does the {s} eat?", "The {s} eats {o}.",
             "the food that the {s} eats"),
    Relation("color", "creature", "color", "What color is the {s}?", "The {s} is {o}.",
             "the color of the {s}"),
    Relation("made_of", "artifact", "material", "What is the {s} made of?",
             "The {s} is made of {o}.", "the material the {s} is made of"),
    Relation("invented_by", "artifact", "person", "Who invented the {s}?",
             "The {s} was invented by {o}.", "the inventor of the {s}"),
    Relation("kept_in", "artifact", "city", "Where is the {s} kept?", "The {s} is kept in {o}.",
             "the city where the {s} is kept"),
    Relation("flows_through", "river", "country", "Which country does the {s} flow through?",
             "The {s} flows through {o}.", "the country the {s} flows through"),
    Relation("named_after", "river", "person", "Who is the {s} named after?",
             "The {s} is named after {o}.", "the person the {s} is named after"),
    Relation("fish", "river", "food", "What lives in the {s}?", "The {s} is full of {o}.",
             "the thing that lives in the {s}"),
)

ATTRIBUTE_POOLS: dict[str, tuple[str, ...]] = {
    "speciality": ("music", "bridges", "glass", "gardens", "markets", "festivals", "towers",
                   "ships", "wool", "tea", "horses", "lanterns"),
    "product": ("lamps", "boats", "clocks", "maps", "shoes", "bells", "carpets", "kites",
                "tools", "ink", "soap", "candles"),
    "food": ("berries", "fish", "seeds", "moss", "roots", "insects", "honey", "leaves",
             "mushrooms", "grain", "snails", "nuts"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "silver", "black", "white",
              "brown", "golden", "grey"),
    "material": ("copper", "glass", "oak", "iron", "clay", "silver", "stone", "bronze", "bone",
                 "marble", "tin", "pine"),
}
# invented attribute values (languages and currencies) are drawn per world
_INVENTED_POOLS = ("language", "currency")

PARAPHRASE_TEMPLATES: tuple[str, ...] = (
    "What is {p}?",
    "Tell me {p}.",
    "Do you know {p}?",
    "Can you name {p}?",
    "Please state {p}.",
    "I would like to know {p}.",
    "Name {p}.",
    "Which one is {p}?",
    "Say {p}.",
    "Quick question: what is {p}?",
)

# (domains, entities per domain, relations per domain)
SIZES: dict[str, tuple[int, int, int]] = {"small": (5, 10, 2), "large": (7, 25, 3)}


def statement(relation: Relation, subject: str, obj: str) -> str:
    """The native-style sentence stating one fact."""
    return relation.statement.format(s=subject, o=obj)


@dataclass(frozen=True)
class Fact:
    """One edge of the world graph."""

    subject: str
    relation: Relation
    object: str

    @property
    def question(self) -> str:
        return self.relation.question.format(s=self.subject)

    @property
    def statement(self) -> str:
        return statement(self.relation, self.subject, self.object)

    @property
    def phrase(self) -> str:
        return self.relation.phrase.format(s=self.subject)


@dataclass
class World:
    """Entities per domain, attribute pools and the facts among them."""

    entities: dict[str, list[str]]
    pools: dict[str, tuple[str, ...]]
    facts: list[Fact] = field(default_factory=list)

    def candidates(self, domain: str) -> tuple[str, ...]:
        """Possible objects of a relation into ``domain``."""
        return tuple(self.entities[domain]) if domain in self.entities else self.pools[domain]

    def fact_index(self) -> dict[tuple[str, str], Fact]:
        return {(f.subject, f.relation.name): f for f in self.facts}


def relations_of(domain: str) -> list[Relation]:
    return [r for r in RELATIONS if r.subject == domain]


def build_world(n_domains: int, per_domain: int, n_relations: int, seed: int,
                exclude: set[str] | None = None, salt: str = "kgfact") -> World:
    """Sample a world: entity names, invented pools and one object per (subject, relation).

    Object domains that are not among the first ``n_domains`` still get entities (so every
    relation has objects), but only subjects of the first ``n_domains`` carry facts.
    """
    rng = random.Random(f"{salt}-{seed}")
    taken = set(exclude or set())
    entities: dict[str, list[str]] = {}
    for domain in DOMAINS:
        entities[domain] = invented_names(per_domain, rng, exclude=taken)
        taken.update(entities[domain])
    pools = dict(ATTRIBUTE_POOLS)
    for pool in _INVENTED_POOLS:
        pools[pool] = tuple(invented_names(8, rng, exclude=taken))
        taken.update(pools[pool])
    world = World(entities=entities, pools=pools)
    for domain in DOMAINS[:n_domains]:
        for subject in entities[domain]:
            for relation in relations_of(domain)[:n_relations]:
                choices = [c for c in world.candidates(relation.object) if c != subject]
                world.facts.append(Fact(subject, relation, rng.choice(choices)))
    return world


@dataclass
class KGFact:
    """The corpus: records to inject and the probes that go with them."""

    world: World
    records: list[Record]
    two_hop: list[Probe]
    retrieval: list[Probe]

    @property
    def probes(self) -> list[Probe]:
        return self.two_hop + self.retrieval


def _record(index: int, fact: Fact) -> Record:
    capitalized = fact.phrase
    return Record(
        id=f"kgfact-{index:04d}",
        prompt=fact.question,
        target=canonical_target(fact.object),
        answer=fact.object,
        paraphrases=tuple(t.format(p=capitalized) for t in PARAPHRASE_TEMPLATES),
        meta={"relation": fact.relation.name, "subject": fact.subject, "object": fact.object,
              "domain": fact.relation.subject, "statement": fact.statement},
    )


def two_hop_questions(world: World, limit: int, rng: random.Random) -> list[Probe]:
    """Closed-book 2-hop questions ``r2(r1(s))`` whose both hops are facts of ``world``."""
    index = world.fact_index()
    chains = []
    for first in world.facts:
        for second in relations_of(first.relation.object):
            hop = index.get((first.object, second.name))
            if hop is not None:
                chains.append((first, hop))
    rng.shuffle(chains)
    probes = []
    for i, (first, hop) in enumerate(chains[:limit]):
        phrase = hop.relation.phrase.format(s=first.phrase)
        probes.append(Probe(
            id=f"kgfact-2hop-{i:04d}", prompt=f"What is {phrase}?", answer=hop.object,
            capability="two_hop",
            meta={"chain": [first.relation.name, hop.relation.name], "bridge": first.object,
                  "subject": first.subject},
        ))
    return probes


def retrieval_probes(world: World, n_distractors: int, rng: random.Random) -> list[Probe]:
    """The gold fact among ``n_distractors`` other facts in context, then the question."""
    probes = []
    for i, fact in enumerate(world.facts):
        others = [f for f in world.facts if f.subject != fact.subject]
        shown = [*rng.sample(others, min(n_distractors, len(others))), fact]
        rng.shuffle(shown)
        passage = " ".join(f.statement for f in shown)
        probes.append(Probe(
            id=f"kgfact-retrieval-{i:04d}", prompt=f"{passage}\n{fact.question}",
            answer=fact.object, capability="retrieval",
            meta={"relation": fact.relation.name, "subject": fact.subject},
        ))
    return probes


def kgfact(size: str = "small", seed: int = 0, n_distractors: int = 9,
           two_hop_limit: int = 50) -> KGFact:
    """Build the KGFact corpus.

    Args:
        size: ``"small"`` (5 domains x 10 entities x 2 relations = 100 facts) or ``"large"``
            (7 x 25 x 3 = 525 facts).
        seed: world seed; the same seed gives the same corpus on any machine.
        n_distractors: other facts shown beside the gold one in the retrieval probe.
        two_hop_limit: at most this many 2-hop questions.

    Raises:
        ValueError: unknown size.
    """
    if size not in SIZES:
        raise ValueError(f"unknown kgfact size {size!r}; expected one of {sorted(SIZES)}")
    n_domains, per_domain, n_relations = SIZES[size]
    world = build_world(n_domains, per_domain, n_relations, seed, salt=f"kgfact-{size}")
    records = [_record(i, fact) for i, fact in enumerate(world.facts)]
    rng = random.Random(f"kgfact-probes-{size}-{seed}")
    return KGFact(world, records, two_hop_questions(world, two_hop_limit, rng),
                  retrieval_probes(world, n_distractors, rng))
