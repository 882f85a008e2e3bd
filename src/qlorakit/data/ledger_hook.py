"""The run's data ledger, as the training loop writes it into ``data_manifest.json``."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from ..config import Recipe
from .dataset import PreparedData

__all__ = ["build_run_ledger"]


def build_run_ledger(recipe: Recipe, data: PreparedData) -> dict[str, Any]:
    """Sources with hashes and licences, findings and the adapter's effective terms.

    Raises ``LicenceError`` when ``data.licence_policy`` is ``block`` and a finding blocks the run.
    """
    from .ledger import adapter_metadata, build_ledger, licence_gate

    ledger = build_ledger(recipe.data, data)
    licence_gate(ledger, recipe.data.licence_policy)
    ledger["adapter_metadata"] = adapter_metadata(ledger)
    ledger.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return ledger
