"""Forgetting risk before training: which records push hardest on what the model knows.

For each training record ``r`` with gradient ``g_r`` (of its canonical target's sequence
log-likelihood under the base model, the direction SFT's first step takes for it), against the
probe Fisher ``F`` (any :class:`~forgetkit.fisher.io.FisherMatrix`) with k leading directions
``u_j``:

- ``energy_share = sum_j (u_j . g_r)^2 / ||g_r||^2`` (``F.coordinates(g_r, k)``): how much of the
  record's gradient lies in the probes' top Fisher directions (random directions score about
  ``k / P``; for the diagonal representation the directions are the k largest ``F_jj``'s axes);
- ``fisher_rayleigh = g_r' F g_r / ||g_r||^2`` (``F.quad_form(g_r)``, the representation's own
  form): the predicted probe KL (x2) of a unit step along
  the record's gradient;
- ``predicted_kl_step = 1/2 g_r' F g_r``: of a plain gradient step of size 1.

Records are ranked by ``fisher_rayleigh``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from forgetkit.data.records import Record
from forgetkit.fisher.io import FisherMatrix
from forgetkit.fisher.pergrad import GradientStream, encode_data, evaluation_mode
from forgetkit.fisher.project import leading_directions

__all__ = ["forgetting_risk"]


def forgetting_risk(model, tokenizer, records: Sequence[Record], fisher: FisherMatrix,
                    batch_size: int = 8, rank: int | None = None) -> list[dict[str, Any]]:
    """Rank ``records`` by how strongly their gradients align with the Fisher of the probes.

    Args:
        model: the base model the Fisher was computed on.
        tokenizer: its tokenizer.
        records: the records a fine-tune would train on (prompt + canonical target).
        fisher: the probes' Fisher, any representation.
        batch_size: examples per per-example-gradient batch.
        rank: leading directions k of the energy share (default ``min(16, fisher.rank)``, as
            :func:`~forgetkit.fisher.project.project`).

    Returns:
        One dict per record, highest ``fisher_rayleigh`` first: ``rank``, ``record_id``,
        ``prompt``, ``answer``, ``grad_norm``, ``energy_share``,
        ``fisher_rayleigh``, ``predicted_kl_step``.

    Raises:
        ValueError: the Fisher covers parameters the model lacks, or a bad ``rank``.
    """
    named = dict(model.named_parameters())
    missing = [n for n in fisher.shapes if n not in named]
    if missing:
        raise ValueError(f"the Fisher covers parameters the model lacks, e.g. {missing[:2]}")
    params = {n: named[n] for n in fisher.shapes}
    k = leading_directions(fisher, rank)
    encodings = encode_data(tokenizer, list(records))
    rows: dict[int, dict[str, Any]] = {}
    with evaluation_mode(model):
        stream = GradientStream(model, encodings, params, estimator="empirical", mc_samples=1,
                                batch_size=batch_size, seed=0,
                                pad_token_id=tokenizer.pad_token_id or 0, per_example="auto")
        for block in stream:
            grads = {n: block.grads[n] for n in params}  # each formed once per block
            for row, index in enumerate(block.examples):
                g = {n: v[row].double() for n, v in grads.items()}
                sq_norm = float(sum(v.square().sum() for v in g.values()))
                quad = fisher.quad_form(g)
                coordinates = fisher.coordinates(g, k)
                share = float(coordinates.square().sum()) / sq_norm if sq_norm > 0 else 0.0
                record = records[index]
                rows[index] = {
                    "record_id": record.id, "prompt": record.prompt, "answer": record.answer,
                    "grad_norm": sq_norm**0.5, "energy_share": share,
                    "fisher_rayleigh": quad / sq_norm if sq_norm > 0 else 0.0,
                    "predicted_kl_step": quad / 2,
                }
    ranked = sorted(rows.values(), key=lambda r: -r["fisher_rayleigh"])
    return [{"rank": position, **row} for position, row in enumerate(ranked, start=1)]

