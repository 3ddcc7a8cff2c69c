"""Fisher information of a causal LM on probes or records: the exact quadratic form of an
update (matrix-free), diagonal, low-rank and Kronecker-factored (EK-FAC) representations.

Example:
    >>> from forgetkit import fisher
    >>> D = fisher.displacement(model, tokenizer, probes, fisher.delta(model, ft))  # doctest: +SKIP
    >>> D.mean, D.ci  # d'Fd with its 95% bootstrap interval over probes  # doctest: +SKIP
    >>> F = fisher.diagonal(model, tokenizer, probes, estimator="true")  # doctest: +SKIP
    >>> L = fisher.low_rank(model, tokenizer, probes, rank=16, params="mlp")  # doctest: +SKIP
    >>> K = fisher.kfac(model, tokenizer, probes)  # doctest: +SKIP
    >>> L.save("out/fisher_lr"); fisher.load("out/fisher_lr", model)  # doctest: +SKIP

Every representation implements one interface (:class:`FisherMatrix`): ``quad_form``,
``coordinates``, ``top``, ``project``, ``trace``, ``summary``, ``save`` / ``load``.
"""

from forgetkit.fisher.delta import LoraFactor, ParamDelta, delta
from forgetkit.fisher.diagonal import DiagonalFisher, diagonal
from forgetkit.fisher.directions import (
    AxisDirection,
    DenseDirection,
    Direction,
    Eigenpairs,
    KroneckerDirection,
)
from forgetkit.fisher.exact import Displacement, FisherOperator, displacement
from forgetkit.fisher.io import FisherMatrix, Provenance, load
from forgetkit.fisher.kfac import kfac
from forgetkit.fisher.kl import MeasuredKL, measured_kl
from forgetkit.fisher.kronecker import KroneckerFactors, KroneckerFisher
from forgetkit.fisher.low_rank import LowRankFisher, exact_low_rank, low_rank
from forgetkit.fisher.pergrad import FisherError, select_parameters
from forgetkit.fisher.project import Projection, project
from forgetkit.fisher.risk import forgetting_risk

__all__ = [
    "AxisDirection",
    "DenseDirection",
    "DiagonalFisher",
    "Direction",
    "Displacement",
    "Eigenpairs",
    "FisherError",
    "FisherMatrix",
    "FisherOperator",
    "KroneckerDirection",
    "KroneckerFactors",
    "KroneckerFisher",
    "LoraFactor",
    "LowRankFisher",
    "MeasuredKL",
    "ParamDelta",
    "Projection",
    "Provenance",
    "delta",
    "diagonal",
    "displacement",
    "exact_low_rank",
    "forgetting_risk",
    "kfac",
    "load",
    "low_rank",
    "measured_kl",
    "project",
    "select_parameters",
]
