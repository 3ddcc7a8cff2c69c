"""forgetkit: measure and explain what a knowledge-injection fine-tune costs a language model.

The public API, in the order data flows (``import forgetkit as fk``):

- records and probes: :func:`load_records`, :func:`load_probes`, :class:`Record`, :class:`Probe`
  (:mod:`forgetkit.data`);
- models: :func:`load_model`, :func:`encode` (:mod:`forgetkit.models`);
- MixSD targets: :class:`MixConfig`, :func:`build_targets` (:mod:`forgetkit.mixsd`);
- diagnostics: :func:`target_nll`, :func:`compare_targets`, :func:`evaluate`, :func:`retention`
  (:mod:`forgetkit.diagnostics`);
- training: :class:`TrainConfig`, :func:`train` (:mod:`forgetkit.train`);
- Fisher information and the report: the :mod:`fisher` namespace (``fk.fisher.low_rank``,
  ``fk.fisher.project``, ...) and :func:`run_report`.

Example:
    >>> import forgetkit as fk
    >>> model, tokenizer = fk.load_model("toyworld")  # doctest: +SKIP
    >>> scores = fk.evaluate(model, tokenizer, fk.load_records("kgfact"),  # doctest: +SKIP
    ...                      fk.load_probes("toyworld"))
"""

__version__ = "0.1.0"

from forgetkit import fisher
from forgetkit.data import (
    Probe,
    Record,
    RecordError,
    load_probe_sets,
    load_probes,
    load_records,
)
from forgetkit.diagnostics import (
    Retention,
    Scores,
    TargetNLL,
    compare_targets,
    evaluate,
    retention,
    target_nll,
)
from forgetkit.fisher.report import ReportConfig, run_report, spread_sample
from forgetkit.mixsd import MixConfig, MixedTarget, build_targets
from forgetkit.models import Encoding, ModelNotFoundError, encode, load_model
from forgetkit.train import TrainConfig, TrainResult, train

__all__ = [
    "Encoding",
    "MixConfig",
    "MixedTarget",
    "ModelNotFoundError",
    "Probe",
    "Record",
    "RecordError",
    "ReportConfig",
    "Retention",
    "Scores",
    "TargetNLL",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "build_targets",
    "compare_targets",
    "encode",
    "evaluate",
    "fisher",
    "load_model",
    "load_probe_sets",
    "load_probes",
    "load_records",
    "retention",
    "run_report",
    "spread_sample",
    "target_nll",
    "train",
]
