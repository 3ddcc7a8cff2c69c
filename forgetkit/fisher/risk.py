"""Forgetting risk before training: which records push hardest on what the model knows.

For each training record ``r`` with gradient ``g_r`` (of its canonical target's sequence
log-likelihood under the base model, the direction SFT's first step takes for it), against the
probe Fisher ``F`` with top directions ``u_j``:

- ``energy_share = sum_j (u_j . g_r)^2 / ||g_r||^2``: how much of the record's gradient lies in
  the probes' top Fisher directions (random directions score about ``k / P``);
- ``fisher_rayleigh = g_r' F g_r / ||g_r||^2``: the predicted probe KL (x2) of a unit step along
  the record's gradient;
- ``predicted_kl_step = 1/2 g_r' F g_r``: of a plain gradient step of size 1.

Records are ranked by ``fisher_rayleigh``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from forgetkit.data.records import Record
from forgetkit.fisher.pergrad import GradientStream, encode_data, evaluation_mode

__all__ = ["forgetting_risk"]


def forgetting_risk(model, tokenizer, records: Sequence[Record], fisher,
                    batch_size: int = 8) -> list[dict[str, Any]]:
    """Rank ``records`` by how strongly their gradients align with the Fisher of the probes.

    Args:
        model: the base model the Fisher was computed on.
        tokenizer: its tokenizer.
        records: the records a fine-tune would train on (prompt + canonical target).
        fisher: a ``LowRankFisher`` (energy share and Rayleigh quotient) or ``DiagonalFisher``
            (Rayleigh quotient only).
        batch_size: examples per per-example-gradient batch.

    Returns:
        One dict per record, highest ``fisher_rayleigh`` first: ``rank``, ``record_id``,
        ``prompt``, ``answer``, ``grad_norm``, ``energy_share`` (``None`` for a diagonal Fisher),
        ``fisher_rayleigh``, ``predicted_kl_step``.
    """
    named = dict(model.named_parameters())
    missing = [n for n in fisher.shapes if n not in named]
    if missing:
        raise ValueError(f"the Fisher covers parameters the model lacks, e.g. {missing[:2]}")
    params = {n: named[n] for n in fisher.shapes}
    encodings = encode_data(tokenizer, list(records))
    directions = getattr(fisher, "directions", None)
    rows: dict[int, dict[str, Any]] = {}
    with evaluation_mode(model):
        stream = GradientStream(model, encodings, params, estimator="empirical", mc_samples=1,
                                batch_size=batch_size, seed=0,
                                pad_token_id=tokenizer.pad_token_id or 0, per_example="auto")
        for block in stream:
            for row, index in enumerate(block.examples):
                g = {n: block.grads[n][row].double() for n in params}
                sq_norm = float(sum(v.square().sum() for v in g.values()))
                quad = fisher.quad_form(g)
                share = None
                if directions is not None:
                    coords = sum(u.flatten(1).double() @ g[n].flatten()
                                 for n, u in directions.items())
                    share = float(coords.square().sum()) / sq_norm if sq_norm > 0 else 0.0
                record = records[index]
                rows[index] = {
                    "record_id": record.id, "prompt": record.prompt, "answer": record.answer,
                    "grad_norm": sq_norm**0.5, "energy_share": share,
                    "fisher_rayleigh": quad / sq_norm if sq_norm > 0 else 0.0,
                    "predicted_kl_step": quad / 2,
                }
    ranked = sorted(rows.values(), key=lambda r: -r["fisher_rayleigh"])
    for position, row in enumerate(ranked, start=1):
        row["rank"] = position
    return [{"rank": r.pop("rank"), **r} for r in ranked]

