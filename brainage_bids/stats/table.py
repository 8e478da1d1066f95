"""The common shape of every table in ``group/stats/``."""
from __future__ import annotations

import pandas as pd

#: Columns every analysis table starts with; analyses may add more after these.
STATS_COLUMNS = ["analysis", "term", "estimate", "ci_low", "ci_high", "p_value", "n"]


def stats_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a frame whose first columns are :data:`STATS_COLUMNS` (missing ones are NaN)."""
    df = pd.DataFrame(rows)
    for col in STATS_COLUMNS:
        if col not in df:
            df[col] = float("nan")
    extra = [c for c in df.columns if c not in STATS_COLUMNS]
    return df[STATS_COLUMNS + extra]
