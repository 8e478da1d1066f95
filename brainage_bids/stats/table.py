"""The common shape of every table in ``group/stats/``."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

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


class Skip(Exception):
    """An analysis cannot run on these data; the message says why."""


def complete(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The rows of ``df`` with every one of ``columns`` present; KeyError naming absent ones."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"columns {missing} not in the table (has {list(df.columns)})")
    return df.dropna(subset=list(columns))


def t_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean of ``x`` (NaNs below two values)."""
    if len(x) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * np.std(x, ddof=1) / np.sqrt(len(x))
    return float(np.mean(x) - half), float(np.mean(x) + half)
