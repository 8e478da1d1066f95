"""The participant-level table's columns and their sidecar descriptions, read from
``data/output_columns.json`` (the one place they are written down): the predictor writes them,
the group level checks tables against them, the reports show them."""
from __future__ import annotations

import copy
import json
from pathlib import Path

_SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "data" / "output_columns.json")
                     .read_text(encoding="utf-8"))

#: The DESIGN.md contract: every participant-level table starts with these columns.
CONTRACT_COLUMNS: tuple[str, ...] = tuple(_SCHEMA["contract_columns"])
#: Columns added after the contract ones (n/a in tables written before they existed).
EXTRA_COLUMNS: tuple[str, ...] = tuple(_SCHEMA["extra_columns"])
COLUMNS = CONTRACT_COLUMNS + EXTRA_COLUMNS


def column_descriptions(flag_descriptions: dict | None = None) -> dict:
    """The sidecar's column descriptions (a fresh copy); ``flag_descriptions`` (flag -> meaning,
    reports/qc.py) add the ``qc_flags`` levels the file does not describe itself."""
    out = copy.deepcopy(_SCHEMA["descriptions"])
    levels = out["qc_flags"]["Levels"]
    levels.update({k: v for k, v in (flag_descriptions or {}).items() if k not in levels})
    return out
