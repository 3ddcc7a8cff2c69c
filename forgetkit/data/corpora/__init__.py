"""Built-in corpora, registered by name with :func:`forgetkit.data.records.load_records` and
:func:`forgetkit.data.records.load_probes`.

Records: ``kgfact`` (= ``kgfact-small``), ``kgfact-large``, ``kgfunc``.
Probes: ``kgfact`` (2-hop and retrieval), ``kgfact-large``, ``kgfunc`` (held-out inputs and
unseen operations), ``toyworld`` (toyworld's retention probes), ``general`` (retention probes
for real models: known facts, arithmetic, in-context retrieval, format following).
"""

from __future__ import annotations

from forgetkit.data.corpora.kgfact import kgfact
from forgetkit.data.corpora.kgfunc import kgfunc
from forgetkit.data.records import register_probes, register_records

__all__ = ["kgfact", "kgfunc"]


def _general_probes():
    from forgetkit.data.corpora.general import general_probes

    return general_probes()


def _toyworld_probes():
    from forgetkit.data.corpora.toyworld import toyworld_probes

    return toyworld_probes()


register_records("kgfact", lambda: kgfact("small").records)
register_records("kgfact-small", lambda: kgfact("small").records)
register_records("kgfact-large", lambda: kgfact("large").records)
register_records("kgfunc", lambda: kgfunc().records)
register_probes("kgfact", lambda: kgfact("small").probes)
register_probes("kgfact-small", lambda: kgfact("small").probes)
register_probes("kgfact-large", lambda: kgfact("large").probes)
register_probes("kgfunc", lambda: kgfunc().probes)
register_probes("toyworld", _toyworld_probes)
register_probes("general", _general_probes)
