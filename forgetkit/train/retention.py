"""What the retention baselines (``ewc``, ``replay``, ``fisher_orthogonal``) add to SFT.

All three protect the base model's behaviour on *retention data*: a split of the probe sets
(:func:`split_probes`), disjoint from the probes evaluation scores, so a method is never
rewarded for having trained on the items it is judged on.

- ``ewc`` (Kirkpatrick et al. 2017): the loss gains ``(strength/2) sum_j F_jj (theta_j -
  theta0_j)^2`` (:func:`forgetkit.train.losses.ewc_penalty`), ``F`` the diagonal Fisher of the
  base on the retention probes (:func:`forgetkit.fisher.diagonal`, true-Fisher labels).
- ``replay``: the base model's greedy answers to the retention prompts (:func:`replay_examples`,
  generated once before training) fill a fixed share of every batch (:func:`replay_count`).
- ``fisher_orthogonal`` (after orthogonal gradient descent, Farajtabar et al. 2020): after every
  optimizer step the *parameter change* ``theta - theta0`` loses its component in the span of
  the base's top-k Fisher directions (:class:`OrthogonalProjection`). The change is projected,
  not the gradient: AdamW rescales each coordinate and adds weight decay, so the step of a
  projected gradient still has components along the removed directions; projecting the total
  change keeps it exactly orthogonal (to rounding) whatever the optimizer does, and projecting
  the total rather than each step stops rounding errors from accumulating.

The Fisher covers the parameters being trained, at their starting values: every weight for a
full fine-tune; under LoRA the adapter's ``A`` and ``B`` (the adapted model starts as the base,
``B = 0``, so this is the base's Fisher in the adapter's coordinates; ``F`` on ``A`` is zero
there, since ``d(BA)/dA = 0`` at ``B = 0``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from forgetkit.data.records import Probe
from forgetkit.fisher import FisherError, FisherMatrix
from forgetkit.fisher.io import weights_hash
from forgetkit.models import Encoding, encode
from forgetkit.seeding import stable_hash
from forgetkit.train.methods import Example, sample_completions

__all__ = ["OrthogonalProjection", "check_fisher_file", "replay_count", "replay_examples",
           "retention_share", "split_probes"]

logger = logging.getLogger(__name__)


def retention_share(probe_id: str) -> float:
    """A number in [0, 1) fixed by the probe id alone (a stable hash, not Python's ``hash``)."""
    return int(stable_hash("retention-split", probe_id), 16) / 16**16


def split_probes(probes: Sequence[Probe], fraction: float) -> tuple[list[Probe], list[Probe]]:
    """``(retention, evaluation)``: the probes whose :func:`retention_share` is below
    ``fraction``, and the others, each in the given order.

    The split depends only on each probe's id, so it is the same for every method, seed and
    probe order, and a larger ``fraction`` only moves probes from evaluation to retention.

    Raises:
        ValueError: ``fraction`` outside [0, 1).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"retention fraction {fraction} must be in [0, 1)")
    retention, evaluation = [], []
    for probe in probes:
        (retention if retention_share(probe.id) < fraction else evaluation).append(probe)
    return retention, evaluation


def replay_count(batch: int, ratio: float) -> int:
    """Replay examples in a global batch of ``batch``: ``round(ratio * batch)``, leaving at
    least one record (``ratio`` in [0, 1))."""
    return min(round(ratio * batch), batch - 1)


def replay_examples(model, tokenizer, probes: Sequence[Probe], *, max_new_tokens: int,
                    batch_size: int, end_ids: Sequence[int], first_index: int = 0
                    ) -> list[Example]:
    """The base model's greedy answers to the probes' prompts, as training examples.

    The answer is the token sequence :func:`~forgetkit.train.methods.sample_completions`
    decodes greedily after ``encode(tokenizer, probe.prompt)`` (its end token kept when one was
    produced), so the model is trained on exactly the tokens it produced, not a re-tokenized
    string. Scored like an SFT target: NLL on the answer tokens.

    Args:
        model: the base model (run in eval mode, its mode restored).
        tokenizer: its tokenizer.
        probes: the retention probes (choices are ignored: the prompt is answered freely).
        max_new_tokens, batch_size: generation length cap and prompts per batch.
        end_ids: tokens that end an answer.
        first_index: :attr:`Example.index` of the first example.
    """
    pad = tokenizer.pad_token_id
    prompts = [encode(tokenizer, p.prompt).input_ids for p in probes]
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        answers += sample_completions(model, chunk, [None] * len(chunk), 0.0, max_new_tokens,
                                      end_ids, pad)
    return [Example(first_index + i, p.id, Encoding.from_ids(prompt, answer))
            for i, (p, prompt, answer) in enumerate(zip(probes, prompts, answers, strict=True))]


def check_fisher_file(fisher: FisherMatrix, model: torch.nn.Module, path: str | Path) -> None:
    """Refuse a saved Fisher computed on other weights than ``model``'s (its provenance's
    ``weights_hash``: names, shapes, dtypes and values of every parameter).

    Raises:
        FisherError: naming ``fisher_path``, the Fisher's model and the two hashes.
    """
    mine = weights_hash(model)
    if fisher.provenance.weights_hash != mine:
        raise FisherError(
            f"fisher_path {path}: the Fisher belongs to another model ({fisher.provenance.model}, "
            f"weights {fisher.provenance.weights_hash}); the model being trained has weights "
            f"{mine} (same names, shapes, dtype and values are required)")


class OrthogonalProjection:
    """Keeps ``theta - theta0`` orthogonal to the top-k directions of a Fisher.

    Args:
        fisher: any :class:`~forgetkit.fisher.FisherMatrix` covering exactly the trained
            parameters (its ``project`` is used, so the representation does not matter).
        k: directions removed, 1 <= k <= ``fisher.rank``.
        params: name -> the trained parameters, at their starting values (copied as theta0).

    Raises:
        FisherError: k larger than the Fisher's rank, or a Fisher that does not cover exactly
            the trained parameters.
    """

    def __init__(self, fisher: FisherMatrix, k: int, params: dict[str, Tensor]):
        if not 1 <= k <= fisher.rank:
            raise FisherError(f"orthogonal_k={k} is larger than the rank of the Fisher "
                              f"({fisher.rank} directions); use orthogonal_k <= {fisher.rank}")
        if set(fisher.shapes) != set(params):
            missing = sorted(set(params) - set(fisher.shapes))[:3]
            extra = sorted(set(fisher.shapes) - set(params))[:3]
            raise FisherError(f"the Fisher must cover exactly the trained parameters (not "
                              f"covered: {missing}, not trained: {extra})")
        self.fisher, self.k, self.params = fisher, k, params
        self.anchor = {name: p.detach().clone() for name, p in params.items()}

    def change(self) -> dict[str, Tensor]:
        """name -> ``theta - theta0`` (the parameters' dtype)."""
        return {name: p.detach() - self.anchor[name] for name, p in self.params.items()}

    @torch.no_grad()
    def apply(self) -> float:
        """Remove the change's component in the span of the top-k directions, in place.

        Returns:
            The norm of the removed component (float64).
        """
        removed = self.fisher.project(self.change(), self.k)  # name -> float64
        for name, p in self.params.items():
            p.sub_(removed[name].to(p.device, p.dtype))
        return float(sum(r.square().sum() for r in removed.values()) ** 0.5)
