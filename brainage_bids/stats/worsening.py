"""EDSS worsening at the group level: the worsening table and, among patients with a gap and
EDSS follow-up (on all patients and on each diagnosis, column ``subgroup``), the ROC of the gap
(``roc_worsening``), Kaplan-Meier curves and the log-rank test above and below its cut-off
(``km_worsening``, ``logrank_worsening``) and Cox models (``cox_worsening``: gap, age, sex,
baseline EDSS, disease duration, the spec covariates, and diagnosis for "all patients").
The worsening frame comes from :func:`brainage_bids.stats.inputs.worsening_frame`.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .inputs import frame_name
from .table import Skip, stats_frame

LOG = logging.getLogger("brainage_bids.stats.group")


def worsening_table(survival, participants: pd.DataFrame, spec: dict) -> pd.DataFrame:
    """``edss_worsening``: the event rate overall and per diagnosis, then each participant's time
    and event (``survival``: :func:`~brainage_bids.stats.inputs.worsening_frame`)."""
    if isinstance(survival, str):
        raise Skip(f"no EDSS follow-up: {survival}")
    s = survival.copy()
    dx = spec["columns"]["diagnosis"]
    if dx in participants:
        s = s.merge(participants[["participant_id", dx]].rename(columns={dx: "diagnosis"}),
                    on="participant_id", how="left")
    rows = []
    groups = [("all", s)] + ([(g, x) for g, x in s.groupby("diagnosis")]
                             if "diagnosis" in s else [])
    for g, x in groups:
        rows.append({"analysis": "edss_worsening", "term": f"event_rate[{g}]",
                     "estimate": float(x["event"].mean()), "n": len(x),
                     "events": int(x["event"].sum()),
                     "median_followup_years": float(x["time"].median())})
    for r in s.itertuples(index=False):
        rows.append({"analysis": "edss_worsening", "term": r.participant_id,
                     "estimate": float(r.time), "n": 1, "event": int(r.event),
                     "baseline_edss": getattr(r, "baseline_edss", np.nan),
                     "diagnosis": getattr(r, "diagnosis", None)})
    out = stats_frame(rows)
    out["time_unit"] = "years"
    out["source"] = survival.attrs.get("source")
    out["definition"] = "EDSS increase >= 1.0 if baseline EDSS <= 5.5, else >= 0.5"
    return out


def _survival_groups(d, survival):
    if isinstance(survival, str):
        raise Skip(f"no EDSS follow-up: {survival}")
    drop = [c for c in ("edss",) if c in survival]
    x = d[d["patient"]].merge(survival.drop(columns=drop, errors="ignore"),
                              on="participant_id", how="inner")
    x = x.dropna(subset=["gap", "time", "event"])
    if "baseline_edss" not in x or x["baseline_edss"].isna().all():
        x["baseline_edss"] = x["edss"]
    if not len(x):
        raise Skip("no patient has both a gap and EDSS follow-up")
    groups = [("all patients", x)]
    if d.attrs["has_diagnosis"] and x["diagnosis"].nunique() > 1:
        groups += [(str(g), y) for g, y in x.groupby("diagnosis")]
    return groups


def _events_ok(x, what):
    ev = int(x["event"].sum())
    if ev == 0:
        raise Skip(f"no EDSS worsening events among {len(x)} patients ({what})")
    if ev == len(x):
        raise Skip(f"every one of {len(x)} patients worsened ({what}): no contrast")


def _per_subgroup(d, survival, name, func):
    frames, reasons = [], []
    for label, x in _survival_groups(d, survival):
        try:
            _events_ok(x, label)
            out = func(x, label)
        except Skip as exc:
            reasons.append(str(exc))
            continue
        for tname, f in (out if isinstance(out, dict) else {name: out}).items():
            f = f.copy()
            f["subgroup"] = label
            frames.append((tname, f))
    if not frames:
        raise Skip("; ".join(reasons))
    for r in reasons:
        LOG.info("%s: %s", name, r)
    out: dict[str, list] = {}
    for tname, f in frames:
        out.setdefault(tname, []).append(f)
    return {k: pd.concat(v, ignore_index=True) for k, v in out.items()}


def _roc(x, spec):
    from .roc import roc_analysis

    return roc_analysis(x, "gap", "event", specificity=spec["roc"]["specificity"],
                        analysis="roc_worsening")


def roc_worsening(d, spec: dict, survival, figures=None):
    """ROC of the gap for EDSS worsening per subgroup, with the cut-off at the spec's
    specificity; ``figures`` (reports.group_figures.StatsFigures) draws each curve."""
    def one(x, label):
        if min(x["event"].sum(), (1 - x["event"]).sum()) < 2:
            raise Skip(f"fewer than 2 patients with and without worsening ({label})")
        out = _roc(x, spec)
        cut = out[out["term"] == "cutoff"]
        if figures is not None:
            figures.roc(x, label, d.attrs.get("key", ()),
                        cut.iloc[0].to_dict() if len(cut) else None)
        return out
    return _per_subgroup(d, survival, "roc_worsening", one)


def km_worsening(d, spec: dict, survival, figures=None):
    """Kaplan-Meier curves and the log-rank test of patients above and below the ROC cut-off of
    the gap (``km_worsening``, ``logrank_worsening``)."""
    from .survival import kaplan_meier, logrank, split_at_cutoff

    def one(x, label):
        if min(x["event"].sum(), (1 - x["event"]).sum()) < 2:
            raise Skip(f"fewer than 2 patients with and without worsening ({label}) for a "
                       "cut-off")
        roc = _roc(x, spec)
        cut = float(roc.loc[roc["term"] == "cutoff", "estimate"].iloc[0])
        x = x.assign(gap_group=split_at_cutoff(x, "gap", cut))
        if x["gap_group"].nunique() < 2:
            raise Skip(f"all patients on one side of the cut-off {cut:.2f} ({label})")
        km = kaplan_meier(x, "time", "event", group="gap_group", analysis="km_worsening")
        lr = logrank(x, "time", "event", "gap_group", analysis="logrank_worsening")
        km["cutoff"] = lr["cutoff"] = cut
        if figures is not None:
            figures.kaplan_meier(x, d.attrs.get("key", ()), label)
        return {"km_worsening": km, "logrank_worsening": lr}
    return _per_subgroup(d, survival, "km_worsening", one)


def cox_worsening(d, spec: dict, survival):
    """Univariable and multivariable Cox models of EDSS worsening on the gap and covariates."""
    from .survival import cox_univariable_multivariable

    def one(x, label):
        covs = ["gap", "age", "sex", "baseline_edss", "disease_duration"] + [
            frame_name(c) for c in spec["covariates"]]
        if label == "all patients" and d.attrs["has_diagnosis"]:
            covs.append("diagnosis")
        covs = [c for c in dict.fromkeys(covs) if c in x and x[c].dropna().nunique() > 1]
        if "gap" not in covs:
            raise Skip(f"the gap does not vary ({label})")
        complete = x.dropna(subset=covs)
        if complete["event"].sum() < 2 or len(complete) < len(covs) + 2:
            raise Skip(f"{len(complete)} patients with complete covariates ({', '.join(covs)}) "
                       f"and {int(complete['event'].sum())} events: too few for the "
                       f"multivariable model ({label})")
        out = cox_univariable_multivariable(x, "time", "event", covs,
                                            analysis="cox_worsening")
        return out.rename(columns={"model": "cox_model"})
    return _per_subgroup(d, survival, "cox_worsening", one)
