"""The trainer: SFT, MixSD, OPSD and the retention baselines (EWC, replay, Fisher-orthogonal
SFT) in one compact loop (:func:`train`, ``python -m forgetkit.train``).

Modules: :mod:`~forgetkit.train.config` (:class:`TrainConfig`), :mod:`~forgetkit.train.losses`
(losses as functions of model and batch), :mod:`~forgetkit.train.methods` (what an example is
and what loss a micro-batch gets, per method), :mod:`~forgetkit.train.retention` (the retention
split of the probes and what ewc, replay and fisher_orthogonal add to SFT), :mod:`~forgetkit.train.checkpoint` (checkpoints,
the output-folder guard, the final model), :mod:`~forgetkit.train.loop` (processes, data order,
the step loop) and :mod:`~forgetkit.train.run` (:func:`train` and the command line).
"""

from forgetkit.train.checkpoint import OutputDirError
from forgetkit.train.config import METHODS, TrainConfig
from forgetkit.train.run import TrainResult, main, train

__all__ = ["METHODS", "OutputDirError", "TrainConfig", "TrainResult", "main", "train"]
