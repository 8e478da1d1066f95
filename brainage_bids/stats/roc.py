"""ROC analysis of a continuous marker (e.g. the brain-age gap) for a binary outcome.

Conventions (the same as ``pROC::roc(..., direction="<")``):

* higher marker values mean the event is more likely;
* thresholds are ``-inf``, the midpoints between consecutive distinct marker values, and ``+inf``;
* a participant is classified positive (case) when ``marker > threshold``. No threshold equals an
  observed value, so ``>`` and ``>=`` give the same table; the cut-off reads "marker > cut-off",
  as :func:`brainage_bids.stats.survival.split_at_cutoff` splits "high" vs "low".
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from .table import stats_frame


def _binary_outcome(s: pd.Series) -> np.ndarray:
    """Outcome as a boolean array: True/1 = case, False/0 = control."""
    if pd.api.types.is_bool_dtype(s):
        return s.to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(s):
        vals = set(np.unique(s.to_numpy(dtype=float)))
        if vals <= {0.0, 1.0}:
            return s.to_numpy(dtype=float) == 1.0
    raise ValueError(f"outcome {s.name!r} must be boolean or 0/1 (1 = case); "
                     f"found values {sorted(pd.unique(s))[:5]}")


def _split(df: pd.DataFrame, marker: str, outcome: str) -> tuple[np.ndarray, np.ndarray]:
    for col in (marker, outcome):
        if col not in df.columns:
            raise KeyError(f"column {col!r} not in the table")
    d = df.dropna(subset=[marker, outcome])
    y = _binary_outcome(d[outcome])
    x = d[marker].to_numpy(dtype=float)
    cases, controls = x[y], x[~y]
    if len(cases) == 0 or len(controls) == 0:
        raise ValueError(f"ROC needs both cases and controls in {outcome!r} "
                         f"(cases {len(cases)}, controls {len(controls)})")
    return cases, controls


def _thresholds(cases: np.ndarray, controls: np.ndarray) -> np.ndarray:
    u = np.unique(np.concatenate([cases, controls]))
    return np.concatenate([[-np.inf], (u[1:] + u[:-1]) / 2, [np.inf]])


def _sens_spec(cases, controls, thresholds):
    """Sensitivity P(case > t) and specificity P(control <= t) at each threshold."""
    sc, so = np.sort(cases), np.sort(controls)
    sens = (len(sc) - np.searchsorted(sc, thresholds, side="right")) / len(sc)
    spec = np.searchsorted(so, thresholds, side="right") / len(so)
    return sens, spec


def delong(cases: np.ndarray, controls: np.ndarray) -> tuple[float, float]:
    """AUC and its DeLong variance (DeLong et al. 1988; pROC's ``var(roc, method="delong")``).

    The placement of each case is the fraction of controls below it (ties count 1/2), that of
    each control the fraction of cases above it; AUC is the mean case placement and the variance
    ``var(case placements)/n_cases + var(control placements)/n_controls`` (sample variances)."""
    sc, so = np.sort(cases), np.sort(controls)
    v10 = (np.searchsorted(so, cases, side="left")
           + 0.5 * (np.searchsorted(so, cases, side="right") - np.searchsorted(so, cases, side="left"))
           ) / len(so)
    v01 = (len(sc) - np.searchsorted(sc, controls, side="right")
           + 0.5 * (np.searchsorted(sc, controls, side="right")
                    - np.searchsorted(sc, controls, side="left"))) / len(sc)
    auc = float(v10.mean())
    var = (v10.var(ddof=1) / len(cases) if len(cases) > 1 else np.nan) + \
          (v01.var(ddof=1) / len(controls) if len(controls) > 1 else np.nan)
    return auc, float(var)


def roc_analysis(df: pd.DataFrame, marker: str, outcome: str, *, specificity: float = 0.80,
                 analysis: str = "roc", ci_level: float = 0.95) -> pd.DataFrame:
    """ROC analysis of ``marker`` for the binary ``outcome`` (1/True = case).

    Rows:
      ``"auc"``: ``estimate`` the AUC, its CI by DeLong's method as ``pROC::ci.auc`` (normal
      interval on the AUC, clipped to [0, 1]), ``se``; ``p_value`` tests AUC = 0.5 with the
      Mann-Whitney U test (equivalent null hypothesis; R's ``wilcox.test`` rules, see
      :func:`brainage_bids.stats.clinical.rank_test`); ``n_cases``, ``n_controls``.
      ``"cutoff"``: among thresholds with specificity >= ``specificity``, the one with the highest
      sensitivity, ties going to the higher specificity; ``estimate`` is the threshold (classify
      positive when ``marker > threshold``, see the module docstring; ``inf`` when no finite
      threshold reaches the specificity), with columns ``sensitivity`` and ``specificity``.
    """
    cases, controls = _split(df, marker, outcome)
    auc, var = delong(cases, controls)
    se = float(np.sqrt(var)) if np.isfinite(var) else float("nan")
    z = stats.norm.ppf(0.5 + ci_level / 2)
    lo, hi = (max(0.0, auc - z * se), min(1.0, auc + z * se)) if np.isfinite(se) else (np.nan, np.nan)
    from .clinical import EXACT_RANK_LIMIT

    exact = (len(cases) < EXACT_RANK_LIMIT and len(controls) < EXACT_RANK_LIMIT
             and len(np.unique(np.concatenate([cases, controls]))) == len(cases) + len(controls))
    p = float(stats.mannwhitneyu(cases, controls, alternative="two-sided", use_continuity=True,
                                 method="exact" if exact else "asymptotic").pvalue)
    n = len(cases) + len(controls)
    thr = _thresholds(cases, controls)
    sens, spec = _sens_spec(cases, controls, thr)
    ok = np.flatnonzero(spec >= specificity)
    best = ok[np.lexsort((-spec[ok], -sens[ok]))[0]]   # highest sensitivity, then specificity
    rows = [
        {"analysis": analysis, "term": "auc", "estimate": auc, "ci_low": lo, "ci_high": hi,
         "p_value": p, "n": n, "se": se, "n_cases": len(cases), "n_controls": len(controls),
         "method": f"AUC, DeLong {ci_level:.0%} CI, Mann-Whitney p"},
        {"analysis": analysis, "term": "cutoff", "estimate": float(thr[best]), "n": n,
         "sensitivity": float(sens[best]), "specificity": float(spec[best]),
         "n_cases": len(cases), "n_controls": len(controls),
         "method": f"{marker} > cutoff; max sensitivity at specificity >= {specificity:g}"},
    ]
    return stats_frame(rows)


def roc_curve_points(df: pd.DataFrame, marker: str, outcome: str) -> pd.DataFrame:
    """The ROC curve: one row per threshold (same thresholds as :func:`roc_analysis`), from
    ``+inf`` (fpr = tpr = 0) down to ``-inf`` (fpr = tpr = 1); columns ``threshold``, ``fpr``,
    ``tpr``, ``sensitivity``, ``specificity``."""
    cases, controls = _split(df, marker, outcome)
    thr = _thresholds(cases, controls)[::-1]
    sens, spec = _sens_spec(cases, controls, thr)
    return pd.DataFrame({"threshold": thr, "fpr": 1 - spec, "tpr": sens,
                         "sensitivity": sens, "specificity": spec})
