r"""Prompt strings shared by MixSD, the trainer and the embedded toyworld corpus.

MixSD's expert conditional sees ``x+ = x + GUIDE + y* + TRANSITION``: the question, a guidance
line, the canonical answer (or the record's context) and a transition that asks the question
again. The two presets restate the MixSD authors' guidance strings; toyworld is pretrained on
exactly these strings, so its expert view works out of the box.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GUIDANCE_PRESETS", "Guidance", "canonical_target", "expert_prompt", "get_guidance"]


@dataclass(frozen=True)
class Guidance:
    """The text around the reference shown to MixSD's expert conditional.

    The expert prompt is ``f"{prompt}\n\n{guide}\n{context}\n\n{transition}"``.
    """

    guide: str
    transition: str


GUIDANCE_PRESETS: dict[str, Guidance] = {
    "fact": Guidance(
        guide="This question is from a new knowledge base. Here is the answer to this question:",
        transition="Now answer the question within \\boxed{}.",
    ),
    "procedure": Guidance(
        guide="Here is a reference solution to this problem, including the correct final answer:",
        transition=(
            "After understanding the reference solution, please attempt to answer the question "
            "again. Put your final answer within \\boxed{}."
        ),
    ),
}


def get_guidance(preset: str | Guidance) -> Guidance:
    """Resolve a preset name (``"fact"``, ``"procedure"``) or pass a :class:`Guidance` through."""
    if isinstance(preset, Guidance):
        return preset
    try:
        return GUIDANCE_PRESETS[preset]
    except KeyError:
        known = ", ".join(sorted(GUIDANCE_PRESETS))
        raise ValueError(f"unknown guidance preset {preset!r}; known presets: {known}") from None


def expert_prompt(prompt: str, context: str, guidance: str | Guidance = "fact") -> str:
    """The expert prompt x+: question, guidance, reference ``context``, transition."""
    g = get_guidance(guidance)
    return f"{prompt}\n\n{g.guide}\n{context}\n\n{g.transition}"


def canonical_target(answer: str) -> str:
    r"""The canonical injection target in the MixSD authors' style: ``The answer is X.\n\n\boxed{X}``."""
    return f"The answer is {answer}.\n\n\\boxed{{{answer}}}"
