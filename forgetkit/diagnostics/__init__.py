"""Diagnostics of a model and its training targets: per-token log-likelihood, the NLL of
supervision targets (and their comparison), and evaluation (memorization, paraphrase,
retention, error buckets).

Modules: :mod:`~forgetkit.diagnostics.loglik` (the one per-token log-likelihood),
:mod:`~forgetkit.diagnostics.nll` (:func:`target_nll`, :func:`compare_targets` and
``python -m forgetkit.nll``) and :mod:`~forgetkit.diagnostics.evaluation` (:func:`evaluate`,
:func:`retention`).
"""

from forgetkit.diagnostics.evaluation import (
    INJECTED_CAPABILITIES,
    Prediction,
    Retention,
    Scores,
    evaluate,
    retention,
)
from forgetkit.diagnostics.loglik import (
    completion_logprobs,
    forward_logits,
    model_logprobs,
    sequence_loglik,
)
from forgetkit.diagnostics.nll import NLLConfig, TargetNLL, compare_targets, target_nll

__all__ = [
    "INJECTED_CAPABILITIES",
    "NLLConfig",
    "Prediction",
    "Retention",
    "Scores",
    "TargetNLL",
    "compare_targets",
    "completion_logprobs",
    "evaluate",
    "forward_logits",
    "model_logprobs",
    "retention",
    "sequence_loglik",
    "target_nll",
]
