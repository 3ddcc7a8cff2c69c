"""MixSD targets: completions of the frozen base model that mix its naive and expert
conditionals token by token (:func:`build_targets`).

Modules: :mod:`~forgetkit.mixsd.decode` (the batched two-branch decoder) and
:mod:`~forgetkit.mixsd.targets` (configs, rejection sampling, the resumable target file and
``python -m forgetkit.mixsd``) and :mod:`~forgetkit.mixsd.trl_format` (targets as a TRL
prompt-completion dataset).
"""

from forgetkit.mixsd.targets import (
    BuildConfig,
    BuildReport,
    MixConfig,
    MixedTarget,
    MixedTargets,
    Outcome,
    build_target_file,
    build_targets,
    main,
    progress_path,
    run,
)
from forgetkit.mixsd.trl_format import load_trl_dataset, to_trl_dataset, trl_rows, write_trl_jsonl

__all__ = [
    "BuildConfig",
    "BuildReport",
    "MixConfig",
    "MixedTarget",
    "MixedTargets",
    "Outcome",
    "build_target_file",
    "build_targets",
    "load_trl_dataset",
    "main",
    "progress_path",
    "run",
    "to_trl_dataset",
    "trl_rows",
    "write_trl_jsonl",
]
