"""Retention probes for a real small chat model (e.g. SmolLM2-135M-Instruct).

Four capabilities, each a list of multiple-choice :class:`~forgetkit.data.records.Probe` items with
four choices, scored by log-likelihood:

- ``known_fact``: capitals (of countries and of states and provinces), chemical element symbols
  and names, school science, geography, currencies and languages, culture (books, art, music,
  history), animals and everyday knowledge, stored in ``data/known_facts.jsonl`` (one row per
  item: ``{"id", "prompt", "answer", "choices", "category"}``; new items are appended, so the
  ids and order of the earlier ones never change).
- ``arithmetic``: generated ``a + b``, ``a - b`` (never negative) and ``a × b`` questions with 1-2
  digit operands (the multiplier of a product is a single digit 2-9) and near-miss numeric
  distractors.
- ``retrieval``: a generated passage about 5-8 invented people (names built from syllables), each
  with one attribute of the same kind (job, city, pet, color or instrument), then a question
  about one of them; the choices are attributes taken from the passage.
- ``format_following``: 30 stored base questions, each asked under two format instructions; the
  four choices carry the same content and differ in format, and exactly one complies.

Choice convention: every choice is the full assistant reply to ``prompt``, with no leading space
and no trailing newline. The evaluator joins prompt and choice through the model's chat template
(``prompt`` as the user turn, the choice as the assistant reply) and sums the log-probabilities of
the choice tokens; the highest sum wins. ``answer`` is always one of ``choices``.

Determinism: everything depends only on ``seed``. Generated items come from
``random.Random(f"{capability}-{seed}")`` and each probe's choice order from
``random.Random(f"{seed}-{probe_id}")``; string seeds are hashed with SHA-512 by :mod:`random`,
so nothing depends on ``PYTHONHASHSEED``. Items come in a fixed order that mixes categories, so a
prefix (``per_capability``) is a fair sample; ids (``"known_fact-0001"``, ``"arithmetic-0001"``,
...) follow that order.

Example:
    >>> probes = general_probes(seed=0, per_capability=2)
    >>> [p.id for p in probes][:2]
    ['known_fact-0001', 'known_fact-0002']
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path

from forgetkit.data.records import Probe, RecordError
from forgetkit.files import read_jsonl

__all__ = [
    "PROBE_CAPABILITIES",
    "arithmetic_probes",
    "format_following_probes",
    "general_probes",
    "known_fact_probes",
    "retrieval_probes",
]

PROBE_CAPABILITIES = ("known_fact", "arithmetic", "retrieval", "format_following")

KNOWN_FACTS_PATH = Path(__file__).parent / "data" / "known_facts.jsonl"


def general_probes(seed: int = 0, per_capability: int | None = None) -> list[Probe]:
    """All retention probes, grouped by capability in the order of :data:`PROBE_CAPABILITIES`.

    Args:
        seed: decides the generated items and every probe's choice order.
        per_capability: keep only the first N probes of each capability (for quick runs);
            ``None`` keeps all.

    Returns:
        The probes; ids are unique across capabilities.

    Raises:
        ValueError: ``per_capability`` is negative.
    """
    if per_capability is not None and per_capability < 0:
        raise ValueError(f"per_capability must be >= 0 or None, got {per_capability}")
    probes: list[Probe] = []
    for capability in PROBE_CAPABILITIES:
        items = _BUILDERS[capability](seed)
        probes.extend(items if per_capability is None else items[:per_capability])
    return probes


def _shuffled(choices: list[str], seed: int, probe_id: str) -> tuple[str, ...]:
    """The choices in an order fixed by ``seed`` and ``probe_id`` alone."""
    if len(set(choices)) != len(choices):
        raise ValueError(f"{probe_id}: duplicate choices {choices}")
    order = list(choices)
    random.Random(f"{seed}-{probe_id}").shuffle(order)
    return tuple(order)


def known_fact_probes(seed: int = 0) -> list[Probe]:
    """The stored known-fact items (``data/known_facts.jsonl``), choices shuffled by ``seed``.

    ``meta["category"]`` is one of ``capital``, ``element_symbol``, ``element_name``,
    ``science``, ``geography``, ``currency``, ``language``, ``culture``, ``animal``, ``general``.
    """
    probes = []
    for line, row in enumerate(read_jsonl(KNOWN_FACTS_PATH), start=1):
        if row["answer"] not in row["choices"]:
            raise RecordError("answer is not among the choices", path=str(KNOWN_FACTS_PATH),
                              line=line, field="answer")
        probes.append(Probe(id=row["id"], prompt=row["prompt"], answer=row["answer"],
                            capability="known_fact",
                            choices=_shuffled(row["choices"], seed, row["id"]),
                            meta={"category": row["category"]}))
    return probes


_OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "×": lambda a, b: a * b,
}


def _operands(rng: random.Random, op: str) -> tuple[int, int]:
    """Two operands for ``op``: 1-2 digits; ``a >= b`` for subtraction; a 2-9 multiplier."""
    if op == "×":
        return rng.randint(2, 19), rng.randint(2, 9)
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    return (max(a, b), min(a, b)) if op == "-" else (a, b)


def arithmetic_probes(seed: int = 0, count: int = 100) -> list[Probe]:
    """``count`` arithmetic questions ("What is 23 + 45?" -> "68"), operations in turn.

    Distractors are three distinct non-negative near misses: off by 1, 2 or 10 for sums and
    differences; off by 1, 10 or one operand (a times-table slip) for products.
    """
    rng = random.Random(f"arithmetic-{seed}")
    probes, seen = [], set()
    for op in itertools.islice(itertools.cycle(_OPERATIONS), count):
        while True:
            a, b = _operands(rng, op)
            prompt = f"What is {a} {op} {b}?"
            if prompt not in seen:
                break
        seen.add(prompt)
        result = _OPERATIONS[op](a, b)
        offsets = {1, 10, a, b} if op == "×" else {1, 2, 10}
        near = {result + sign * offset for offset in offsets for sign in (1, -1)}
        near = sorted(n for n in near if n >= 0 and n != result)
        probe_id = f"arithmetic-{len(probes) + 1:04d}"
        choices = [str(result), *map(str, rng.sample(near, 3))]
        probes.append(Probe(id=probe_id, prompt=prompt, answer=str(result),
                            capability="arithmetic",
                            choices=_shuffled(choices, seed, probe_id),
                            meta={"operation": op, "operands": [a, b]}))
    return probes


_FIRST_SYLLABLES = ("mi", "ra", "os", "ka", "tel", "dor", "vin", "sa", "lu", "bren", "ta", "no",
                    "fa", "ril", "zem", "pa", "quil", "ven", "lo", "ar", "e", "ma", "ith", "ko")
_LAST_SYLLABLES = ("tol", "ven", "ar", "den", "mor", "kel", "stra", "bin", "gar", "vel", "dun",
                   "holt", "rin", "wick", "sor", "lan", "bek", "tam", "orn", "fis", "ley", "grav")

# attribute -> (sentence template, question template, values); values suit the article used.
_ATTRIBUTES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "job": ("{name} works as a {value}.", "What is {name}'s job?",
            ("baker", "pilot", "teacher", "nurse", "farmer", "carpenter", "dentist", "painter",
             "lawyer", "chef", "librarian", "plumber", "tailor", "firefighter")),
    "city": ("{name} lives in {value}.", "In which city does {name} live?",
             ("Denver", "Lyon", "Osaka", "Perth", "Munich", "Porto", "Seville", "Krakow",
              "Bergen", "Glasgow", "Toronto", "Milan", "Boston", "Geneva")),
    "pet": ("{name} has a pet {value}.", "What pet does {name} have?",
            ("cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "ferret",
             "lizard", "canary", "snake", "pony")),
    "color": ("{name}'s favorite color is {value}.", "What is {name}'s favorite color?",
              ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "gray",
               "white", "black", "teal")),
    "instrument": ("{name} plays the {value}.", "Which instrument does {name} play?",
                   ("piano", "violin", "guitar", "flute", "drums", "cello", "trumpet", "harp",
                    "clarinet", "banjo", "saxophone", "trombone")),
}


def _invented_names(rng: random.Random, count: int) -> list[str]:
    """``count`` invented full names with distinct first and distinct last names."""
    firsts: set[str] = set()
    lasts: set[str] = set()
    names = []
    while len(names) < count:
        first = "".join(rng.sample(_FIRST_SYLLABLES, 2)).capitalize()
        last = "".join(rng.sample(_LAST_SYLLABLES, rng.choice((2, 2, 3)))).capitalize()
        if first in firsts or last in lasts:
            continue
        firsts.add(first)
        lasts.add(last)
        names.append(f"{first} {last}")
    return names


def retrieval_probes(seed: int = 0, count: int = 100) -> list[Probe]:
    """``count`` in-context retrieval questions, attribute kinds in turn.

    The prompt is the passage, a blank line, then the question. Each person in a passage has a
    distinct value, so the answer is the only choice the passage supports.
    """
    rng = random.Random(f"retrieval-{seed}")
    probes = []
    for attribute in itertools.islice(itertools.cycle(_ATTRIBUTES), count):
        sentence, question, values = _ATTRIBUTES[attribute]
        people = rng.randint(5, 8)
        names = _invented_names(rng, people)
        assigned = rng.sample(values, people)
        passage = " ".join(sentence.format(name=n, value=v) for n, v in zip(names, assigned, strict=True))
        target = rng.randrange(people)
        others = rng.sample([v for i, v in enumerate(assigned) if i != target], 3)
        probe_id = f"retrieval-{len(probes) + 1:04d}"
        probes.append(Probe(id=probe_id,
                            prompt=f"{passage}\n\n{question.format(name=names[target])}",
                            answer=assigned[target], capability="retrieval",
                            choices=_shuffled([assigned[target], *others], seed, probe_id),
                            meta={"attribute": attribute, "people": people}))
    return probes


# (question, word, sentence): the word is the one-word answer, the sentence a full reply.
_WORD_QUESTIONS = (
    ("what color is the sky on a clear day?", "blue", "The sky is blue."),
    ("what color is fresh grass?", "green", "Grass is green."),
    ("what color is snow?", "white", "Snow is white."),
    ("what color is a ripe banana?", "yellow", "A ripe banana is yellow."),
    ("which animal barks?", "dog", "A dog barks."),
    ("which animal says meow?", "cat", "A cat says meow."),
    ("what is the opposite of hot?", "cold", "The opposite of hot is cold."),
    ("what is the opposite of up?", "down", "The opposite of up is down."),
    ("what is frozen water called?", "ice", "Frozen water is called ice."),
    ("which season comes after winter?", "spring", "Spring comes after winter."),
    ("what sweet food do bees make?", "honey", "Bees make honey."),
    ("what do cows produce that people drink?", "milk", "Cows produce milk."),
)
# (question, number, number in words, unit, sentence with {n} for the number).
_NUMBER_QUESTIONS = (
    ("how many days are in a week?", 7, "seven", "days", "There are {n} days in a week."),
    ("how many legs does a spider have?", 8, "eight", "legs", "A spider has {n} legs."),
    ("how many months are in a year?", 12, "twelve", "months", "There are {n} months in a year."),
    ("how many sides does a triangle have?", 3, "three", "sides", "A triangle has {n} sides."),
    ("how many hours are in a day?", 24, "twenty-four", "hours", "There are {n} hours in a day."),
    ("how many wheels does a bicycle have?", 2, "two", "wheels", "A bicycle has {n} wheels."),
    ("how many legs does a dog have?", 4, "four", "legs", "A dog has {n} legs."),
    ("how many minutes are in an hour?", 60, "sixty", "minutes",
     "There are {n} minutes in an hour."),
    ("how many fingers are on one human hand?", 5, "five", "fingers",
     "A human hand has {n} fingers."),
    ("how many sides does a square have?", 4, "four", "sides", "A square has {n} sides."),
)
# (question, true if the answer is yes, sentence stating the fact).
_YES_NO_QUESTIONS = (
    ("is ice cold?", True, "Ice is cold."),
    ("is the sun hot?", True, "The sun is hot."),
    ("do fish live in water?", True, "Fish live in water."),
    ("is the sky green on a clear day?", False, "The sky is blue on a clear day."),
    ("can dogs fly?", False, "Dogs cannot fly."),
    ("is two plus two equal to four?", True, "Two plus two equals four."),
    ("is a spider an insect?", False, "A spider is an arachnid, not an insect."),
    ("does the sun rise in the west?", False, "The sun rises in the east."),
)


def _word_items(question: str, word: str, sentence: str) -> list[tuple[str, str, str, list[str]]]:
    """(format, prompt, answer, distractors) for one word question."""
    upper, lower, title = word.upper(), word.lower(), word.capitalize()
    return [
        ("uppercase_word", f"Answer with a single word in uppercase: {question}", upper,
         [lower, title, sentence]),
        ("lowercase_word", f"Answer with a single word in lowercase: {question}", lower,
         [upper, title, sentence]),
    ]


def _number_items(question: str, number: int, words: str, unit: str,
                  sentence: str) -> list[tuple[str, str, str, list[str]]]:
    """(format, prompt, answer, distractors) for one number question."""
    digits = str(number)
    return [
        ("digits_only", f"Reply with only the number, in digits: {question}", digits,
         [words.capitalize(), f"{digits} {unit}", sentence.format(n=digits)]),
        ("words_only", f"Reply with only the number, written in words: {question}", words,
         [digits, f"{words} {unit}", sentence.format(n=words)]),
    ]


def _yes_no_items(question: str, yes: bool, sentence: str) -> list[tuple[str, str, str, list[str]]]:
    """(format, prompt, answer, distractors) for one yes/no question."""
    word = "yes" if yes else "no"
    return [
        ("yes_no", f"Answer with only yes or no: {question}", word.capitalize(),
         [f"{word.capitalize()}, {sentence[0].lower()}{sentence[1:]}", sentence,
          f"The answer is {word}."]),
        ("json", 'Reply only with JSON of the form {"answer": "yes"} or {"answer": "no"}: '
         + question, f'{{"answer": "{word}"}}',
         [word.capitalize(), f"answer: {word}", f'{{"answer": "{sentence}"}}']),
    ]


def format_following_probes(seed: int = 0) -> list[Probe]:
    """The 60 format-following items: 30 base questions x 2 format instructions.

    Word, number and yes/no questions alternate so that any prefix mixes the formats.
    ``meta["format"]`` names the instruction: ``uppercase_word``, ``lowercase_word``,
    ``digits_only``, ``words_only``, ``yes_no`` or ``json``.
    """
    groups = (
        [_word_items(*row) for row in _WORD_QUESTIONS],
        [_number_items(*row) for row in _NUMBER_QUESTIONS],
        [_yes_no_items(*row) for row in _YES_NO_QUESTIONS],
    )
    bases = [base for row in itertools.zip_longest(*groups) for base in row if base is not None]
    probes = []
    for fmt, prompt, answer, distractors in itertools.chain.from_iterable(bases):
        probe_id = f"format_following-{len(probes) + 1:04d}"
        probes.append(Probe(id=probe_id, prompt=prompt, answer=answer,
                            capability="format_following",
                            choices=_shuffled([answer, *distractors], seed, probe_id),
                            meta={"format": fmt}))
    return probes


_BUILDERS: dict[str, Callable[[int], list[Probe]]] = {
    "known_fact": known_fact_probes,
    "arithmetic": arithmetic_probes,
    "retrieval": retrieval_probes,
    "format_following": format_following_probes,
}
