"""The analyses of the group level, each a plain function of its frame and the stats spec that
returns its table (STATS_COLUMNS first) or raises :class:`~brainage_bids.stats.table.Skip` with
the reason it cannot run.

On the healthy controls (one raw row per participant and model, every model): ``evaluation``,
``site_mae``, ``model_comparison``. On an analysis frame of one (model, suffix)
(:func:`brainage_bids.stats.inputs.analysis_frame`): ``gap_summary``, ``gap_longitudinal`` (first
against last session), ``gap_by_diagnosis``, ``gap_by_phenotype``, ``sex_by_diagnosis``,
``edss_by_diagnosis``, the linear models ``lm_gap_diagnosis``, ``lm_gap_phenotype``,
``lm_gap_duration``, ``lm_edss_gap`` (adjusted for age, sex and the spec covariates; among
patients, diagnosis too when there are several) and ``psm`` (propensity-score matching:
``psm_balance``, ``psm_pairs``, ``psm_gap``). EDSS worsening is in stats/worsening.py.
"""
from __future__ import annotations

import logging
from itertools import combinations

import numpy as np
import pandas as pd

from .bias import one_row_per_participant
from .evaluate import compare_models, evaluate_controls, site_anova
from .inputs import covariate_names, frame_name
from .table import Skip, stats_frame

LOG = logging.getLogger("brainage_bids.stats.group")


def _controls(spec: dict) -> list[str]:
    return [str(c) for c in spec["controls"]]


def _levels(d: pd.DataFrame, col: str, wanted, spec: dict) -> pd.DataFrame:
    """Rows whose ``col`` is among ``wanted`` (all when None) and in a level with at least
    ``min_group_size`` rows."""
    d = d[d[col].notna()]
    if wanted is not None:
        d = d[d[col].isin(wanted)]
    counts = d[col].value_counts()
    small = counts[counts < spec["min_group_size"]]
    if len(small):
        LOG.info("%s levels with fewer than %d participants left out: %s", col,
                 spec["min_group_size"], dict(small))
    return d[d[col].isin(counts[counts >= spec["min_group_size"]].index)]


def _need_levels(d, col, what, spec: dict, k=2):
    levels = sorted(d[col].dropna().unique())
    if len(levels) < k:
        raise Skip(f"fewer than {k} {what} with at least {spec['min_group_size']} "
                   f"participants (found {levels or 'none'})")
    return levels


def _need_column(key: str, d: pd.DataFrame | None, spec: dict):
    src = spec["columns"].get(key, key)
    if d is not None and d[key].notna().sum() == 0:
        raise Skip(f"no values in column {src!r} (participants.tsv/sessions.tsv)")

# ---- accuracy on controls
def evaluation(controls: pd.DataFrame, spec: dict, *, fit_rows: pd.DataFrame,
               n_training_excluded: pd.Series, has_diagnosis: bool) -> pd.DataFrame:
    frames = []
    if len(controls):
        ok = controls.dropna(subset=["chronological_age", "predicted_age"])
        if len(ok):
            ev = evaluate_controls(ok, source="table", fit_rows=fit_rows)
            ev["n_training_excluded"] = [
                int(n_training_excluded.get((m, s), 0)) for m, s in zip(ev["model"],
                                                                            ev["suffix"])]
            frames.append(ev)
    ext = fit_rows[fit_rows["fit_source"] != "table"] if len(fit_rows) else []
    if len(ext):
        ext = one_row_per_participant(ext.dropna(subset=["chronological_age", "predicted_age"]))
        for src, e in ext.groupby("fit_source"):
            frames.append(evaluate_controls(e.drop(columns=["predicted_age_corrected"],
                                                   errors="ignore"), source=src))
    if not frames:
        raise Skip(f"no healthy controls (diagnosis in {_controls(spec)}) with an age and a "
                   "prediction" + ("" if has_diagnosis else
                                   f"; participants.tsv has no "
                                   f"{spec['columns']['diagnosis']!r} column"))
    return pd.concat(frames, ignore_index=True)


def site_mae(controls: pd.DataFrame, spec: dict) -> pd.DataFrame:
    site = spec["columns"]["site"]
    if not len(controls):
        raise Skip(f"no healthy controls (diagnosis in {_controls(spec)})")
    if site not in controls:
        raise Skip(f"no {site!r} column in participants.tsv/sessions.tsv")
    try:
        out = [site_anova(controls.dropna(subset=[site]), site)]
    except ValueError as exc:
        raise Skip(str(exc)) from exc
    if controls["predicted_age_corrected"].notna().any():
        try:
            out.append(site_anova(controls.dropna(subset=["predicted_age_corrected", site]),
                                  site, pred_col="predicted_age_corrected"))
        except ValueError as exc:
            LOG.info("site_mae of corrected predictions: %s", exc)
    return pd.concat(out, ignore_index=True)


def model_comparison(controls: pd.DataFrame, spec: dict) -> pd.DataFrame:
    if not len(controls):
        raise Skip("no healthy controls to compare models on")
    keys = set(zip(controls["model"], controls["suffix"]))
    if len(keys) < 2:
        raise Skip(f"a single model and suffix ({'/'.join(next(iter(keys)))}): nothing to "
                   "compare")
    pairs = spec["model_comparison"]["pairs"]
    boot = spec["bootstrap"]
    frames = []
    for col in ("predicted_age", "predicted_age_corrected"):
        rows = controls.dropna(subset=[col])
        if not len(rows):
            continue
        try:
            frames.append(compare_models(rows, None if pairs == "auto" else pairs,
                                         pred_col=col, n_boot=boot["n"], seed=boot["seed"],
                                         min_n=max(2, spec["min_group_size"])))
        except ValueError as exc:
            if col == "predicted_age":
                raise Skip(str(exc)) from exc
    return pd.concat(frames, ignore_index=True)

# ---- clinical statistics
def gap_summary(d, spec: dict):
    """Mean gap per diagnosis (and over everyone) with its t interval and a one-sample t-test
    against 0, and the mean per-scan uncertainty (predicted_age_sd)."""
    from scipy import stats as st

    x = d.dropna(subset=["gap"])
    if not len(x):
        raise Skip("no participant has a gap (no chronological age?)")
    groups = [("all", x)]
    if d.attrs["has_diagnosis"]:
        groups += [(str(g), y) for g, y in x.groupby("diagnosis", sort=True)]
    rows = []
    for label, y in groups:
        g = y["gap"].to_numpy(float)
        row = {"analysis": "gap_summary", "term": f"mean_gap[{label}]",
               "estimate": float(g.mean()), "n": len(g),
               "sd": float(g.std(ddof=1)) if len(g) > 1 else np.nan,
               "mean_predicted_age_sd": float(y["predicted_age_sd"].mean()),
               "method": "mean, t interval, one-sample t-test against 0"}
        if len(g) > 1 and g.std() > 0:
            t = st.ttest_1samp(g, 0.0)
            ci = t.confidence_interval(0.95)
            row.update(ci_low=float(ci.low), ci_high=float(ci.high), p_value=float(t.pvalue))
        rows.append(row)
    return stats_frame(rows)


def gap_longitudinal(d, spec: dict, all_sessions: dict):
    """Change of the gap from the first to the last session of participants scanned more than
    once: paired t-test of the change, its rate per year (change / years between the scans),
    and the Wilcoxon signed-rank test (R's wilcox.test(paired=TRUE))."""
    from scipy import stats as st

    from .clinical import rank_test

    allses = all_sessions.get(d.attrs.get("key"))
    if allses is None or "session_rank" not in allses:
        raise Skip("no session information")
    x = allses.dropna(subset=["gap", "age"]).sort_values(["participant_id", "session_rank"])
    first = x.groupby("participant_id").first()
    last = x.groupby("participant_id").last()
    n_ses = x.groupby("participant_id").size()
    ids = n_ses[n_ses >= 2].index
    if len(ids) < spec["min_group_size"]:
        raise Skip(f"{len(ids)} participant(s) with a gap at two or more sessions; need "
                   f"{spec['min_group_size']}")
    w = pd.DataFrame({"gap_baseline": first.loc[ids, "gap"], "gap_last": last.loc[ids, "gap"],
                      "years": last.loc[ids, "age"] - first.loc[ids, "age"]})
    w["change"] = w["gap_last"] - w["gap_baseline"]
    rows = []
    for term, v in (("change", w["change"]),
                    ("change_per_year", (w["change"] / w["years"])[w["years"] > 0])):
        v = v.to_numpy(float)
        row = {"analysis": "gap_longitudinal", "term": term,
               "estimate": float(v.mean()) if len(v) else np.nan, "n": len(v),
               "method": "paired t-test (last - first session)",
               "mean_years_between": float(w["years"].mean())}
        if len(v) > 1 and v.std() > 0:
            t = st.ttest_1samp(v, 0.0)
            ci = t.confidence_interval(0.95)
            row.update(ci_low=float(ci.low), ci_high=float(ci.high), p_value=float(t.pvalue),
                       statistic=float(t.statistic), df=float(t.df))
        rows.append(row)
    out = stats_frame(rows)
    try:
        out = pd.concat([out, rank_test(w, "gap_last", paired_with="gap_baseline",
                                        analysis="gap_longitudinal")], ignore_index=True)
    except ValueError as exc:
        LOG.info("gap_longitudinal: no signed-rank test: %s", exc)
    return out


def gap_by_diagnosis(d, spec: dict):
    from .clinical import compare_groups

    if not d.attrs["has_diagnosis"]:
        raise Skip(f"no {spec['columns']['diagnosis']!r} column in participants.tsv")
    x = _levels(d.dropna(subset=["gap"]), "diagnosis", spec["groups"]["diagnosis"], spec)
    _need_levels(x, "diagnosis", "diagnosis groups", spec)
    return compare_groups(x, "gap", "diagnosis", analysis="gap_by_diagnosis")


def gap_by_phenotype(d, spec: dict):
    from .clinical import compare_groups

    _need_column("phenotype", d, spec)
    x = _levels(d[d["patient"]].dropna(subset=["gap"]), "phenotype",
                spec["groups"]["phenotype"], spec)
    _need_levels(x, "phenotype", "phenotypes among patients", spec)
    return compare_groups(x, "gap", "phenotype", analysis="gap_by_phenotype")


def sex_by_diagnosis(d, spec: dict):
    from .clinical import chi_square

    if not d.attrs["has_diagnosis"]:
        raise Skip(f"no {spec['columns']['diagnosis']!r} column in participants.tsv")
    _need_column("sex", d, spec)
    x = _levels(d.dropna(subset=["sex"]), "diagnosis", spec["groups"]["diagnosis"], spec)
    _need_levels(x, "diagnosis", "diagnosis groups", spec)
    if x["sex"].nunique() < 2:
        raise Skip(f"a single sex ({x['sex'].iloc[0]}) among the participants")
    return chi_square(x, "sex", "diagnosis", analysis="sex_by_diagnosis")


def edss_by_diagnosis(d, spec: dict):
    from .clinical import rank_test

    _need_column("edss", d, spec)
    x = _levels(d[d["patient"]].dropna(subset=["edss"]), "diagnosis",
                spec["groups"]["diagnosis"], spec)
    levels = _need_levels(x, "diagnosis", "patient diagnoses with an EDSS", spec)
    frames = [rank_test(x[x["diagnosis"].isin(pair)], "edss", "diagnosis",
                        analysis="edss_by_diagnosis") for pair in combinations(levels, 2)]
    out = pd.concat(frames, ignore_index=True).drop_duplicates(subset=["term"])
    if len(levels) > 2:
        out["note"] = "pairwise tests, p-values not adjusted for multiple comparisons"
    return out


def _model_terms(x: pd.DataFrame, terms: list[str], outcome: str,
                 spec: dict) -> tuple[str, list]:
    """Formula of ``outcome`` on ``terms`` (categorical ones wrapped in C()), leaving out terms
    without variation; raises Skip when too few rows remain for the parameters."""
    kept, dropped, k = [], [], 1
    for t in terms:
        s = x[t]
        categorical = not pd.api.types.is_numeric_dtype(s)
        nlev = s.nunique()
        if nlev < 2:
            dropped.append(f"{covariate_names(spec).get(t, t)} (no variation)")
            continue
        kept.append(f"C({t})" if categorical else t)
        k += (nlev - 1) if categorical else 1
    if len(x) < k + 2:
        raise Skip(f"{len(x)} participants with complete data for {k} model parameters "
                   f"({outcome} ~ {' + '.join(kept) or '1'}"
                   + (f"; left out: {', '.join(dropped)}" if dropped else "")
                   + f"); need at least {k + 2}")
    return f"{outcome} ~ " + " + ".join(kept or ["1"]), dropped


def _linear(x: pd.DataFrame, spec: dict, outcome: str, main: list[str], analysis: str,
            extra: list[str] = ()) -> pd.DataFrame:
    from .clinical import linear_model

    covs = [frame_name(c) for c in spec["covariates"]]
    terms = list(dict.fromkeys(main + ["age", "sex"] + list(extra) + covs))
    x = x.dropna(subset=[outcome] + terms)
    for t in main:
        if x[t].nunique() < 2:
            raise Skip(f"{t} does not vary among the {len(x)} participants with complete "
                       f"data ({outcome}, {', '.join(terms)})")
    formula, dropped = _model_terms(x, terms, outcome, spec)
    for col in ("diagnosis", "phenotype"):
        if col not in main + list(extra):
            continue
        present = set(x[col].dropna())
        wanted = spec["groups"][col] or []
        ref = [c for c in wanted if c in present] or (
            [c for c in _controls(spec) if c in present] if col == "diagnosis" else [])
        order = list(dict.fromkeys(ref + sorted(present)))
        x = x.assign(**{col: pd.Categorical(x[col], categories=order)})
    out = linear_model(x, formula, analysis=analysis)
    out["formula"] = formula
    if dropped:
        out["note"] = "left out: " + ", ".join(dropped)
    return out


def lm_gap_diagnosis(d, spec: dict):
    if not d.attrs["has_diagnosis"]:
        raise Skip(f"no {spec['columns']['diagnosis']!r} column in participants.tsv")
    x = _levels(d, "diagnosis", spec["groups"]["diagnosis"], spec)
    _need_levels(x, "diagnosis", "diagnosis groups", spec)
    return _linear(x, spec, "gap", ["diagnosis"], "lm_gap_diagnosis")


def lm_gap_phenotype(d, spec: dict):
    _need_column("phenotype", d, spec)
    x = _levels(d[d["patient"]], "phenotype", spec["groups"]["phenotype"], spec)
    _need_levels(x, "phenotype", "phenotypes among patients", spec)
    return _linear(x, spec, "gap", ["phenotype"], "lm_gap_phenotype")


def _patient_extra(x, has_diagnosis: bool):
    return ["diagnosis"] if has_diagnosis and x["diagnosis"].nunique() > 1 else []


def lm_gap_duration(d, spec: dict):
    _need_column("disease_duration", d, spec)
    x = d[d["patient"]]
    return _linear(x, spec, "gap", ["disease_duration"], "lm_gap_duration",
                        _patient_extra(x, d.attrs["has_diagnosis"]))


def lm_edss_gap(d, spec: dict):
    _need_column("edss", d, spec)
    x = d[d["patient"]]
    return _linear(x, spec, "edss", ["gap"], "lm_edss_gap", _patient_extra(x, d.attrs["has_diagnosis"]))


def psm(d, spec: dict):
    from .clinical import matched_comparison, propensity_match

    p = spec["psm"]
    col = "diagnosis"
    if not d.attrs["has_diagnosis"]:
        raise Skip(f"no {spec['columns']['diagnosis']!r} column in participants.tsv")
    x = d
    levels = sorted(x[col].dropna().unique())
    if p["treatment"]:
        treated, control = p["treatment"]
    else:
        pats = sorted(x.loc[x["patient"], col].dropna().unique())
        ctrl = [c for c in _controls(spec) if c in levels]
        if len(pats) == 2:
            treated, control = pats[0], pats[1]
        elif len(pats) == 1 and ctrl:
            treated, control = pats[0], ctrl[0]
        else:
            raise Skip(f"cannot choose two {col} levels to match (found {levels}); set "
                       "psm.treatment in the stats spec")
    covs = [frame_name(c) for c in p["covariates"]]
    missing = [c for c, name in zip(p["covariates"], covs) if x[name].isna().all()]
    if missing:
        raise Skip(f"no values for the matching covariates {missing} "
                   "(participants.tsv/sessions.tsv)")
    x = x[x[col].isin([treated, control])].dropna(subset=["gap"] + covs)
    counts = x[col].value_counts()
    if len(counts) < 2 or counts.min() < spec["min_group_size"]:
        raise Skip(f"too few participants to match {treated} with {control} "
                   f"(complete data: {dict(counts)})")
    varying = [c for c in covs if x[c].nunique() > 1]
    if not varying:
        raise Skip(f"none of the covariates {covs} varies")
    if len(x) < len(varying) + 3:
        raise Skip(f"{len(x)} participants for a propensity model with {len(varying)} "
                   "covariates")
    res = propensity_match(x.rename(columns={col: "group"}), "group", varying,
                           caliper=p["caliper"], ratio=p["ratio"],
                           seed=spec["bootstrap"]["seed"], treated_level=treated,
                           id_col="participant_id")
    pairs = res["pairs"]
    if not len(pairs):
        raise Skip("no matched pairs (caliper too narrow?)")
    pair_rows = stats_frame([{"analysis": "psm_pairs", "term": f"pair {r.subclass}",
                              "estimate": r.distance, "n": 2, **r._asdict()}
                             for r in pairs.drop(columns=["treated_index", "control_index"])
                             .itertuples(index=False)])
    pair_rows["treated_level"], pair_rows["control_level"] = treated, control
    balance = res["balance"]
    balance["treated_level"], balance["control_level"] = treated, control
    balance["covariates"] = ", ".join(varying)
    gap = matched_comparison(res["data"], "gap", "group", analysis="psm_gap")
    gap["treated_level"], gap["control_level"] = treated, control
    return {"psm_balance": balance, "psm_pairs": pair_rows, "psm_gap": gap}
