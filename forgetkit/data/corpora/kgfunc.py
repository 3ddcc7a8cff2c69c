r"""KGFunc: novel digit-level integer operations with worked (chain-of-thought) targets.

Each operation has an invented name; a record asks ``name(n)`` after a few solved examples and
its canonical target works the answer out step by step, ending in ``\boxed{}``. Held-out inputs
of the same operations test generalization; unseen easy operations, shown only in few-shot
examples, are the forgetting probe. Deterministic given the seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from forgetkit.data.records import Probe, Record

__all__ = ["OPERATIONS", "UNSEEN_OPERATIONS", "KGFunc", "Operation", "kgfunc"]


def _digits(n: int) -> list[int]:
    return [int(d) for d in str(n)]


def _listed(n: int) -> str:
    return ", ".join(str(d) for d in _digits(n))


@dataclass(frozen=True)
class Operation:
    """An integer operation with a worked solution.

    Attributes:
        name: invented name used in questions, e.g. ``"zarp"``.
        description: one line stating the rule.
        fn: the operation.
        steps: ``n -> list of sentences`` working out ``fn(n)``.
    """

    name: str
    description: str
    fn: Callable[[int], int]
    steps: Callable[[int], list[str]]

    def worked(self, n: int) -> str:
        """The canonical target: the steps, then ``The answer is X.`` and ``\\boxed{X}``."""
        value = self.fn(n)
        body = " ".join(self.steps(n))
        return f"{body} The answer is {value}.\n\n\\boxed{{{value}}}"


def _sum_max(n: int) -> list[str]:
    d = _digits(n)
    return [f"The digits of {n} are {_listed(n)}.", f"Their sum is {sum(d)}.",
            f"The largest digit is {max(d)}.", f"{sum(d)} times {max(d)} is {sum(d) * max(d)}."]


def _squares(n: int) -> list[str]:
    d = _digits(n)
    squares = " + ".join(str(x * x) for x in d)
    return [f"The digits of {n} are {_listed(n)}.", f"Their squares add up to {squares}.",
            f"That is {sum(x * x for x in d)}."]


def _nonzero_product(n: int) -> list[str]:
    d = [x for x in _digits(n) if x]
    prod = 1
    for x in d:
        prod *= x
    return [f"The nonzero digits of {n} are {', '.join(map(str, d))}.",
            f"Their product is {prod}."]


def _reverse_add(n: int) -> list[str]:
    r = int(str(n)[::-1])
    return [f"{n} reversed is {r}.", f"{n} plus {r} is {n + r}."]


def _spread(n: int) -> list[str]:
    d = _digits(n)
    return [f"The digits of {n} are {_listed(n)}.",
            f"The largest is {max(d)} and the smallest is {min(d)}.",
            f"Their difference is {max(d) - min(d)}.",
            f"{n} has {len(d)} digits.",
            f"{max(d) - min(d)} times {len(d)} is {(max(d) - min(d)) * len(d)}."]


def _alternating(n: int) -> list[str]:
    d = _digits(n)
    total = sum(x if i % 2 == 0 else -x for i, x in enumerate(d))
    signed = " ".join(("+ " if i % 2 == 0 else "- ") + str(x) for i, x in enumerate(d))[2:]
    return [f"The digits of {n} are {_listed(n)}.", f"{signed} is {total}.",
            f"Its absolute value is {abs(total)}."]


def _odd_even(n: int) -> list[str]:
    d = _digits(n)
    odd = sum(1 for x in d if x % 2)
    even = len(d) - odd
    return [f"The digits of {n} are {_listed(n)}.", f"{odd} of them are odd.",
            f"{even} of them are even.", f"{odd} times 10 plus {even} is {odd * 10 + even}."]


def _prod(d: list[int]) -> int:
    out = 1
    for x in d:
        out *= x if x else 1
    return out


OPERATIONS: tuple[Operation, ...] = (
    Operation("zarp", "digit sum times largest digit",
              lambda n: sum(_digits(n)) * max(_digits(n)), _sum_max),
    Operation("quell", "sum of the squares of the digits",
              lambda n: sum(x * x for x in _digits(n)), _squares),
    Operation("brin", "product of the nonzero digits", lambda n: _prod(_digits(n)),
              _nonzero_product),
    Operation("tovel", "the number plus its reverse", lambda n: n + int(str(n)[::-1]),
              _reverse_add),
    Operation("mixa", "(largest digit - smallest digit) times the number of digits",
              lambda n: (max(_digits(n)) - min(_digits(n))) * len(_digits(n)), _spread),
    Operation("dorn", "absolute alternating digit sum",
              lambda n: abs(sum(x if i % 2 == 0 else -x for i, x in enumerate(_digits(n)))),
              _alternating),
    Operation("fenn", "10 times the count of odd digits plus the count of even digits",
              lambda n: 10 * sum(x % 2 for x in _digits(n))
              + sum(1 - x % 2 for x in _digits(n)), _odd_even),
)


def _easy(name: str, description: str, fn: Callable[[int], int]) -> Operation:
    return Operation(name, description, fn, lambda n, fn=fn: [f"The result is {fn(n)}."])


UNSEEN_OPERATIONS: tuple[Operation, ...] = tuple(
    _easy(name, desc, fn) for name, desc, fn in (
        ("gilo", "digit sum", lambda n: sum(_digits(n))),
        ("pexa", "largest digit", lambda n: max(_digits(n))),
        ("muro", "smallest digit", lambda n: min(_digits(n))),
        ("tasi", "number of digits", lambda n: len(str(n))),
        ("bolk", "last digit", lambda n: n % 10),
        ("wena", "first digit", lambda n: _digits(n)[0]),
        ("rupi", "plus one", lambda n: n + 1),
        ("kavo", "double", lambda n: 2 * n),
        ("sefu", "minus one", lambda n: n - 1),
        ("lomi", "plus ten", lambda n: n + 10),
        ("dasu", "reverse", lambda n: int(str(n)[::-1])),
        ("nira", "count of odd digits", lambda n: sum(x % 2 for x in _digits(n))),
        ("pomo", "count of even digits", lambda n: sum(1 - x % 2 for x in _digits(n))),
        ("tilu", "triple", lambda n: 3 * n),
        ("vexo", "sum of first and last digit", lambda n: _digits(n)[0] + n % 10),
        ("gumo", "number mod 7", lambda n: n % 7),
        ("hiza", "half, rounded down", lambda n: n // 2),
        ("jupe", "square of the last digit", lambda n: (n % 10) ** 2),
        ("kiro", "plus the digit sum", lambda n: n + sum(_digits(n))),
        ("lafe", "largest digit times 10", lambda n: 10 * max(_digits(n))),
    )
)


def few_shot_prompt(op: Operation, examples: list[int], query: int) -> str:
    """Solved examples of ``op`` (bare results), then the question about ``query``."""
    shots = "\n".join(f"{op.name}({x}) = {op.fn(x)}" for x in examples)
    return f"{shots}\nWhat is {op.name}({query})?"


@dataclass
class KGFunc:
    """Records (train inputs), held-out probes and unseen-operation probes."""

    records: list[Record]
    heldout: list[Probe]
    unseen: list[Probe]

    @property
    def probes(self) -> list[Probe]:
        return self.heldout + self.unseen


def kgfunc(seed: int = 0, train_per_op: int = 10, heldout_per_op: int = 5, shots: int = 10,
           unseen_per_op: int = 3, low: int = 10, high: int = 999) -> KGFunc:
    """Build the KGFunc corpus.

    Args:
        seed: the corpus seed.
        train_per_op: records per operation.
        heldout_per_op: held-out inputs per operation (never among the training inputs).
        shots: solved examples before each question.
        unseen_per_op: probes per unseen easy operation.
        low: smallest input (inclusive).
        high: largest input (inclusive).
    """
    rng = random.Random(f"kgfunc-{seed}")
    records, heldout = [], []
    for op in OPERATIONS:
        inputs = rng.sample(range(low, high + 1), shots + train_per_op + heldout_per_op)
        examples = inputs[:shots]
        train = inputs[shots : shots + train_per_op]
        held = inputs[shots + train_per_op :]
        for n in train:
            value = str(op.fn(n))
            records.append(Record(
                id=f"kgfunc-{op.name}-{n}", prompt=few_shot_prompt(op, examples, n),
                target=op.worked(n), answer=value,
                meta={"operation": op.name, "input": n, "description": op.description},
            ))
        for n in held:
            heldout.append(Probe(
                id=f"kgfunc-heldout-{op.name}-{n}", prompt=few_shot_prompt(op, examples, n),
                answer=str(op.fn(n)), capability="kgfunc_heldout",
                meta={"operation": op.name, "input": n},
            ))
    unseen = []
    for op in UNSEEN_OPERATIONS:
        inputs = rng.sample(range(low, high + 1), shots + unseen_per_op)
        for n in inputs[shots:]:
            unseen.append(Probe(
                id=f"kgfunc-unseen-{op.name}-{n}", prompt=few_shot_prompt(op, inputs[:shots], n),
                answer=str(op.fn(n)), capability="unseen_operation",
                meta={"operation": op.name, "input": n},
            ))
    return KGFunc(records, heldout, unseen)
