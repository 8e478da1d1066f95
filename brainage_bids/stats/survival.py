"""Time to EDSS worsening: event derivation, Kaplan-Meier, log-rank and Cox models (lifelines).

Durations are in years. Events are 1 (worsening) / 0 (censored); boolean event columns are
accepted. The defaults match R's ``survival`` package (``survfit``, ``survdiff``, ``coxph`` with
Efron ties); ``tests/test_stats_vs_r.py`` checks them against R.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy import stats

from .table import complete as _complete
from .table import stats_frame

LOG = logging.getLogger("brainage_bids.stats.survival")

DAYS_PER_YEAR = 365.25
#: EDSS worsening: +1.0 when baseline EDSS <= 5.5, else +0.5 (the NMOSD/RRMS study).
EDSS_STEP_LOW, EDSS_STEP_HIGH, EDSS_STEP_LIMIT = 1.0, 0.5, 5.5
_TOL = 1e-9  # EDSS is on a 0.5 grid; guards against float noise in the comparisons


def _event(s: pd.Series) -> np.ndarray:
    v = s.astype(float).to_numpy()
    if not set(np.unique(v)) <= {0.0, 1.0}:
        raise ValueError(f"event column {s.name!r} must be 0/1 or boolean")
    return v.astype(int)


def worsening_threshold(baseline_edss: float) -> float:
    """The EDSS increase that counts as worsening for a given baseline EDSS."""
    return EDSS_STEP_LOW if baseline_edss <= EDSS_STEP_LIMIT + _TOL else EDSS_STEP_HIGH


def edss_worsening(visits: pd.DataFrame, *, id_col: str = "participant_id", time_col: str,
                   edss_col: str = "edss", time_unit: str = "years",
                   confirmed: bool = False) -> pd.DataFrame:
    """Time to EDSS worsening from longitudinal visits (one row per visit).

    ``time_col`` is a time in ``time_unit`` ("years", e.g. age at the visit, or "days", e.g. days
    since baseline); visits without EDSS or time are ignored, the others sorted by time. Baseline
    is the first visit; worsening is an EDSS increase over baseline of >= 1.0 when baseline EDSS
    <= 5.5, else >= 0.5. ``time`` (years) runs from baseline to the first visit meeting the
    criterion (``event`` 1) or to the last visit (``event`` 0). With ``confirmed=True`` the
    increase must also be met at the next visit (a worsening at the last visit is then not
    counted). Participants with no follow-up visit are dropped and counted in a log message.

    Returns one row per participant: ``id_col``, ``baseline_edss``, ``time``, ``event``,
    ``baseline_time`` (in ``time_unit``), ``n_visits``.
    """
    if time_unit not in ("years", "days"):
        raise ValueError(f"time_unit must be 'years' or 'days', got {time_unit!r}")
    scale = 1.0 if time_unit == "years" else 1.0 / DAYS_PER_YEAR
    d = _complete(visits, [id_col, time_col, edss_col])
    d = d.assign(_t=d[time_col].astype(float), _e=d[edss_col].astype(float))
    rows, dropped = [], []
    for pid, g in d.groupby(id_col, sort=False):
        g = g.sort_values("_t", kind="stable")
        t, e = g["_t"].to_numpy(), g["_e"].to_numpy()
        if len(t) < 2 or t[-1] <= t[0]:
            dropped.append(pid)
            continue
        step = worsening_threshold(e[0])
        worse = (e - e[0]) >= step - _TOL
        worse[0] = False
        hit = None
        for k in range(1, len(t)):
            if worse[k] and (not confirmed or (k + 1 < len(t) and worse[k + 1])):
                hit = k
                break
        end = t[hit] if hit is not None else t[-1]
        rows.append({id_col: pid, "baseline_edss": float(e[0]), "time": (end - t[0]) * scale,
                     "event": int(hit is not None), "baseline_time": float(t[0]),
                     "n_visits": len(t)})
    if dropped:
        LOG.info("EDSS worsening: %d participant(s) without follow-up visit dropped: %s",
                 len(dropped), ", ".join(map(str, dropped[:20])) + (" ..." if len(dropped) > 20 else ""))
    return pd.DataFrame(rows, columns=[id_col, "baseline_edss", "time", "event", "baseline_time",
                                       "n_visits"])


def split_at_cutoff(df: pd.DataFrame, marker: str, cutoff: float, *,
                    name: str | None = None) -> pd.Series:
    """``"high"`` where ``marker > cutoff``, ``"low"`` where ``marker <= cutoff`` (the ROC cut-off
    convention of :mod:`brainage_bids.stats.roc`), missing where the marker is missing. The
    Series is named ``name`` (default ``"<marker>_group"``)."""
    x = df[marker].astype(float)
    out = pd.Series(np.where(x > cutoff, "high", "low"), index=df.index, dtype=object,
                    name=name or f"{marker}_group")
    out[x.isna()] = np.nan
    return out


def _groups(d: pd.DataFrame, group: str | None):
    if group is None:
        return [("all", d)]
    return [(lvl, d[d[group] == lvl]) for lvl in sorted(pd.unique(d[group]))]


def kaplan_meier(df: pd.DataFrame, duration: str, event: str, group: str | None = None, *,
                 analysis: str = "kaplan_meier", ci_level: float = 0.95) -> pd.DataFrame:
    """Kaplan-Meier estimates (lifelines ``KaplanMeierFitter``), per level of ``group`` or overall.

    For each group (column ``group``: the level, or ``"all"``): a ``"median"`` row (median
    survival time with its CI, NaN/inf when not reached; ``n``, ``events``), then one
    ``"S(t=<t>)"`` row per distinct event time: ``estimate`` S(t), CI, ``time``, ``at_risk``,
    ``events``. The pointwise CI is lifelines' exponential Greenwood interval, i.e. R's
    ``survfit(..., conf.type="log-log")`` (R's default is "log").
    """
    from lifelines import KaplanMeierFitter
    from lifelines.utils import median_survival_times

    cols = [duration, event] + ([group] if group else [])
    d = _complete(df, cols)
    rows = []
    for lvl, g in _groups(d, group):
        e = _event(g[event])
        kmf = KaplanMeierFitter(alpha=1 - ci_level).fit(g[duration].astype(float), e)
        med_ci = median_survival_times(kmf.confidence_interval_)
        rows.append({"analysis": analysis, "term": "median",
                     "estimate": float(kmf.median_survival_time_),
                     "ci_low": float(med_ci.iloc[0, 0]), "ci_high": float(med_ci.iloc[0, 1]),
                     "n": len(g), "group": str(lvl), "events": int(e.sum()),
                     "method": "Kaplan-Meier"})
        table = kmf.event_table
        sf = kmf.survival_function_.iloc[:, 0]
        ci = kmf.confidence_interval_
        for t in table.index[table["observed"] > 0]:
            rows.append({"analysis": analysis, "term": f"S(t={t:.10g})", "estimate": float(sf.loc[t]),
                         "ci_low": float(ci.loc[t].iloc[0]), "ci_high": float(ci.loc[t].iloc[1]),
                         "n": len(g), "group": str(lvl), "time": float(t),
                         "at_risk": int(table.loc[t, "at_risk"]),
                         "events": int(table.loc[t, "observed"]), "method": "Kaplan-Meier"})
    return stats_frame(rows)


def logrank(df: pd.DataFrame, duration: str, event: str, group: str, *,
            analysis: str = "logrank") -> pd.DataFrame:
    """Log-rank test of equal survival across the levels of ``group`` (lifelines
    ``logrank_test`` for two levels, ``multivariate_logrank_test`` for more; R's ``survdiff``).
    One row: ``term`` the group column, ``statistic`` chi2, ``df``, ``p_value``, ``n``,
    ``events``; ``estimate`` NaN."""
    from lifelines.statistics import logrank_test, multivariate_logrank_test

    d = _complete(df, [duration, event, group])
    levels = sorted(pd.unique(d[group]))
    if len(levels) < 2:
        raise ValueError(f"log-rank test needs two or more levels of {group!r}, got {levels}")
    e = _event(d[event])
    t = d[duration].astype(float).to_numpy()
    if len(levels) == 2:
        a = (d[group] == levels[0]).to_numpy()
        res = logrank_test(t[a], t[~a], e[a], e[~a])
    else:
        res = multivariate_logrank_test(t, d[group].to_numpy(), e)
    return stats_frame([{"analysis": analysis, "term": group, "p_value": float(res.p_value),
                         "n": len(d), "statistic": float(res.test_statistic),
                         "df": float(len(levels) - 1), "events": int(e.sum()),
                         "method": "log-rank", "groups": ", ".join(map(str, levels))}])


def _cox_design(d: pd.DataFrame, covariates: list[str]) -> pd.DataFrame:
    from .clinical import _design

    return _design(d, covariates)


def cox_model(df: pd.DataFrame, duration: str, event: str, covariates: list[str], *,
              analysis: str, ties: str = "efron", ci_level: float = 0.95) -> pd.DataFrame:
    """Cox proportional-hazards model (lifelines ``CoxPHFitter``, Efron's tie handling as R's
    ``coxph`` default; other ``ties`` are refused).

    ``covariates`` are column names: numeric and boolean columns enter as they are, string or
    categorical columns are dummy-coded against their first sorted level (``term``
    ``"sex[T.M]"``). One row per model term: ``estimate`` the hazard ratio exp(coef), its Wald CI,
    ``p_value`` (Wald), ``n``, ``coef``, ``se``, ``z``, ``events``.
    """
    from lifelines import CoxPHFitter

    if ties != "efron":
        raise ValueError(f"only Efron's tie handling is available (lifelines), got ties={ties!r}")
    d = _complete(df, [duration, event, *covariates])
    X = _cox_design(d, covariates)
    constant = [c for c in X.columns if X[c].nunique() < 2]
    if X.shape[1] == 0 or constant:
        raise ValueError(f"Cox model: covariate column(s) {constant or covariates} do not vary "
                         f"among the {len(d)} complete rows")
    fit_df = X.assign(_T=d[duration].astype(float).to_numpy(), _E=_event(d[event]))
    cph = CoxPHFitter(alpha=1 - ci_level)
    # lifelines' default stopping rule (Newton decrement < 1e-7) stops short of R's optimum in
    # the 6th digit; a tighter one converges to it (R's own rule, relative log-likelihood change
    # < 1e-9, still ends the iterations).
    cph.fit(fit_df, duration_col="_T", event_col="_E", fit_options={"precision": 1e-12})
    s = cph.summary
    z = stats.norm.ppf(0.5 + ci_level / 2)
    rows = []
    for term in X.columns:
        coef, se = float(s.loc[term, "coef"]), float(s.loc[term, "se(coef)"])
        rows.append({"analysis": analysis, "term": term, "estimate": float(np.exp(coef)),
                     "ci_low": float(np.exp(coef - z * se)), "ci_high": float(np.exp(coef + z * se)),
                     "p_value": float(s.loc[term, "p"]), "n": len(d), "coef": coef, "se": se,
                     "z": float(s.loc[term, "z"]), "events": int(fit_df["_E"].sum()),
                     "method": "Cox PH (Efron ties)"})
    return stats_frame(rows)


def cox_univariable_multivariable(df: pd.DataFrame, duration: str, event: str,
                                  covariates: list[str], *, analysis: str = "cox") -> pd.DataFrame:
    """Each covariate in its own Cox model (``model`` = "univariable", complete rows of that
    covariate) and all together (``model`` = "multivariable", complete rows of all), one table."""
    parts = []
    for cov in covariates:
        parts.append(cox_model(df, duration, event, [cov], analysis=analysis)
                     .assign(model="univariable"))
    parts.append(cox_model(df, duration, event, list(covariates), analysis=analysis)
                 .assign(model="multivariable"))
    return pd.concat(parts, ignore_index=True)


def __getattr__(name):
    if name == "plot_kaplan_meier":  # moved to the reports
        from ..reports.group_figures import plot_kaplan_meier
        return plot_kaplan_meier
    raise AttributeError(name)
