"""What flows in: records (facts to inject), probes (capabilities to keep), their file formats,
answer checking, MixSD's prompt strings and the built-in synthetic corpora.

Modules, in the order data flows: :mod:`~forgetkit.data.records` (Record, Probe, the loaders),
:mod:`~forgetkit.data.formats` (one adapter per dataset layout), :mod:`~forgetkit.data.answers`
(answer extraction and normalization), :mod:`~forgetkit.data.prompts` (the expert prompt and the
canonical target) and :mod:`~forgetkit.data.corpora` (kgfact, kgfunc, retention probes).
"""

from forgetkit.data.records import (
    Probe,
    Record,
    RecordError,
    load_probe_sets,
    load_probes,
    load_records,
    records_hash,
    register_probes,
    register_records,
)

__all__ = [
    "Probe",
    "Record",
    "RecordError",
    "load_probe_sets",
    "load_probes",
    "load_records",
    "records_hash",
    "register_probes",
    "register_records",
]
