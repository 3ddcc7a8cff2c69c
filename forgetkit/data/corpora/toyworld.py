"""The pretraining corpus and retention probes of the embedded toyworld model.

toyworld's world uses the KGFact relation schema (:mod:`forgetkit.data.corpora.kgfact`) with a
disjoint set of *known* entities. Its pretraining documents teach three abilities:

- known facts, asked with every question form (main question and ten paraphrases) and answered
  in the native style (``"X lives in Y."``) -> the ``known_fact`` retention probe;
- reading: a question after facts in context, or after MixSD's expert guidance quoting a
  reference answer in the canonical ``\\boxed`` style, answered in the native style. The names
  in these documents are KGFact's entities with *random* attributes, so every token of the
  KGFact/KGFunc records is trained while none of their facts is -> the ``in_context`` probe.
  A quarter of them state a counterfactual about a known entity instead: what is in context
  wins over what is remembered, which MixSD's expert view relies on;
- two-digit addition -> the held-out ``arithmetic`` capability.

A document is ``prompt + " " + completion``, exactly what :func:`forgetkit.models.encode`
builds for a tokenizer without a chat template.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from forgetkit.data.corpora.kgfact import (
    PARAPHRASE_TEMPLATES,
    RELATIONS,
    SIZES,
    Fact,
    World,
    build_world,
    kgfact,
    relations_of,
)
from forgetkit.data.corpora.kgfunc import OPERATIONS, UNSEEN_OPERATIONS, few_shot_prompt, kgfunc
from forgetkit.data.corpora.names import invented_names
from forgetkit.data.prompts import canonical_target, expert_prompt
from forgetkit.data.records import Probe

__all__ = ["ToyWorld", "arithmetic_text", "toyworld_probes", "toyworld_world"]

KNOWN_SHAPE = (5, 12, 2)  # domains, entities per domain, relations: 120 known facts
HELDOUT_SUMS = 200  # addition pairs kept out of pretraining for the probe


def arithmetic_text(a: int, b: int) -> tuple[str, str]:
    """Question and native worked answer for ``a + b`` (0 <= a, b <= 99): units first, then
    tens with the carry, then the result; e.g. ``3 plus 8 is 11. 6 plus 1 plus 1 is 8. So 63
    plus 18 is 81.``"""
    units = a % 10 + b % 10
    tens = a // 10 + b // 10 + units // 10
    steps = (f"{a % 10} plus {b % 10} is {units}. "
             f"{a // 10} plus {b // 10} plus {units // 10} is {tens}.")
    return f"What is {a} plus {b}?", f"{steps} So {a} plus {b} is {a + b}."


def native_answer(fact: Fact) -> str:
    return fact.statement


@dataclass
class ToyWorld:
    """The known world, the reading pool and the arithmetic split."""

    known: World
    reading_names: dict[str, list[str]]  # domain -> names used only in context
    reading_pools: dict[str, tuple[str, ...]]
    heldout_pairs: list[tuple[int, int]]
    seed: int

    def random_fact(self, rng: random.Random, counterfactual: float = 0.0) -> Fact:
        """A fact with a random object about a reading-pool entity, or (with probability
        ``counterfactual``) about a known entity, contradicting what toyworld knows: context
        must win over memory, as MixSD's expert view needs."""
        relation = rng.choice(RELATIONS)
        names = self.reading_names[relation.subject]
        if rng.random() < counterfactual:
            names = [f.subject for f in self.known.facts if f.relation == relation] or names
        subject = rng.choice(names)
        pool = self.reading_names.get(relation.object) or self.reading_pools[relation.object]
        obj = rng.choice([o for o in pool if o != subject])
        return Fact(subject, relation, obj)


def toyworld_world(seed: int = 0) -> ToyWorld:
    """The toyworld: known facts plus the names it may only read about.

    The reading pool holds every KGFact entity (small and large, seed 0) plus fresh names, so
    those tokens are trained without their facts being seen.
    """
    corpora = [kgfact(size, seed=0).world for size in SIZES]
    exclude = {n for w in corpora for names in w.entities.values() for n in names}
    exclude |= {v for w in corpora for pool in w.pools.values() for v in pool}
    known = build_world(*KNOWN_SHAPE, seed=seed, exclude=exclude, salt="toyworld-known")
    known_names = {n for names in known.entities.values() for n in names}
    rng = random.Random(f"toyworld-reading-{seed}")
    reading: dict[str, list[str]] = {}
    for domain in known.entities:
        kg_names = sorted({n for w in corpora for n in w.entities[domain]})
        fresh = invented_names(20, rng, exclude=exclude | known_names | set(kg_names))
        exclude |= set(fresh)
        reading[domain] = kg_names + fresh
    pools = dict(known.pools)
    for pool in ("language", "currency"):
        pools[pool] = tuple(sorted({v for w in corpora for v in w.pools[pool]}))
    pairs = [(a, b) for a in range(100) for b in range(100)]
    heldout = random.Random(f"toyworld-arith-{seed}").sample(pairs, HELDOUT_SUMS)
    return ToyWorld(known, reading, pools, heldout, seed)


def _passage(world: ToyWorld, rng: random.Random, gold: Fact, max_distractors: int) -> str:
    shown = [world.random_fact(rng) for _ in range(rng.randint(0, max_distractors))]
    shown = [f for f in shown if f.subject != gold.subject] + [gold]
    rng.shuffle(shown)
    return " ".join(f.statement for f in shown)


def _question(fact: Fact, rng: random.Random, paraphrase_rate: float = 0.5) -> str:
    if rng.random() < paraphrase_rate:
        return rng.choice(PARAPHRASE_TEMPLATES).format(p=fact.phrase)
    return fact.question


def documents(world: ToyWorld, seed: int) -> Iterator[tuple[str, str]]:
    """An endless, seeded stream of ``(prompt, completion)`` pretraining documents."""
    rng = random.Random(f"toyworld-docs-{seed}")
    known = world.known.facts
    index = world.known.fact_index()
    heldout = set(world.heldout_pairs)
    chains = [(f, index[(f.object, r.name)]) for f in known
              for r in relations_of(f.relation.object) if (f.object, r.name) in index]
    kinds = ["known"] * 2 + ["two_hop"] + ["context"] * 5 + ["expert"] * 3 + ["arithmetic"] * 3 + [
        "procedure"]
    while True:
        kind = rng.choice(kinds)
        if kind == "known":
            fact = rng.choice(known)
            yield _question(fact, rng), native_answer(fact)
        elif kind == "two_hop":
            first, hop = rng.choice(chains)
            phrase = hop.relation.phrase.format(s=first.phrase)
            yield f"What is {phrase}?", f"{first.statement} {hop.statement}"
        elif kind == "context":
            fact = world.random_fact(rng, counterfactual=0.25)
            passage = _passage(world, rng, fact, max_distractors=9 if rng.random() < 0.7 else 0)
            yield f"{passage}\n{_question(fact, rng)}", native_answer(fact)
        elif kind == "expert":
            fact = world.random_fact(rng, counterfactual=0.25)
            question = _question(fact, rng, paraphrase_rate=0.3)
            yield expert_prompt(question, canonical_target(fact.object), "fact"), native_answer(fact)
        elif kind == "arithmetic":
            a, b = rng.randrange(100), rng.randrange(100)
            if (a, b) in heldout:
                continue
            yield arithmetic_text(a, b)
        else:
            op = rng.choice(OPERATIONS + UNSEEN_OPERATIONS)
            inputs = rng.sample(range(10, 1000), 4)
            question = few_shot_prompt(op, inputs[:3], inputs[3])
            worked = op.worked(inputs[3])
            yield expert_prompt(question, worked, "procedure"), worked


def vocabulary_texts(world: ToyWorld) -> Iterator[str]:
    """Every text whose tokens toyworld must know: records, probes and guidance of the
    built-in corpora, plus a sample of pretraining documents."""
    for size in SIZES:
        corpus = kgfact(size, seed=0)
        for record in corpus.records:
            yield record.prompt
            yield record.target
            yield from record.paraphrases
            yield expert_prompt(record.prompt, record.target, "fact")
        for probe in corpus.probes:
            yield probe.prompt
    func = kgfunc(seed=0)
    for record in func.records:
        yield expert_prompt(record.prompt, record.target, "procedure")
    for probe in func.probes:
        yield probe.prompt
    for probe in toyworld_probes(world):
        yield probe.prompt
        yield probe.answer
    for a in range(100):
        for b in range(0, 100, 7):
            yield " ".join(arithmetic_text(a, b))
    stream = documents(world, seed=world.seed)
    for _ in range(20000):
        yield " ".join(next(stream))


def toyworld_probes(world: ToyWorld | None = None, n_per_capability: int = 100) -> list[Probe]:
    """Retention probes for toyworld, scored by greedy generation (the answer must appear in
    the reply; the last number for arithmetic):

    - ``known_fact``: every fact of the known world, asked with the main question;
    - ``in_context``: one fact about a never-seen-as-fact entity in context, then the question;
    - ``retrieval``: the same with 1-5 distractor facts beside the gold one;
    - ``arithmetic``: two-digit additions held out of pretraining.
    """
    world = world or toyworld_world()
    probes = [Probe(id=f"toyworld-known-{i:04d}", prompt=f.question, answer=f.object,
                    capability="known_fact", meta={"relation": f.relation.name})
              for i, f in enumerate(world.known.facts)]
    rng = random.Random(f"toyworld-probe-context-{world.seed}")
    for capability, distractors in (("in_context", 0), ("retrieval", 5)):
        for i in range(n_per_capability):
            fact = world.random_fact(rng)
            shown = [world.random_fact(rng) for _ in range(rng.randint(min(1, distractors), distractors))]
            shown = [f for f in shown if f.subject != fact.subject] + [fact]
            rng.shuffle(shown)
            passage = " ".join(f.statement for f in shown)
            probes.append(Probe(id=f"toyworld-{capability}-{i:04d}",
                                prompt=f"{passage}\n{fact.question}", answer=fact.object,
                                capability=capability))
    for i, (a, b) in enumerate(world.heldout_pairs[:n_per_capability]):
        probes.append(Probe(id=f"toyworld-arith-{i:04d}", prompt=arithmetic_text(a, b)[0],
                            answer=str(a + b), capability="arithmetic",
                            meta={"answer_mode": "number"}))
    return probes
