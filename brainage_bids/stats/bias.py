"""Linear age-bias correction of brain-age predictions, fitted on healthy controls only.

Brain-age models regress towards the mean age of their training data: the young look older and the
old younger, so the raw gap correlates with age. Two corrections are offered:

``cole``  ("inverse linear bias correction", Cole et al. 2018; both studies)
    fit ``predicted = a * age + b`` on controls; ``predicted_corrected = (predicted - b) / a``;
    ``gap_corrected = predicted_corrected - age``.
``beheshti``  (Beheshti et al. 2019; Smith et al. 2019)
    fit ``gap = a * age + b`` on controls; ``gap_corrected = gap - (a * age + b)``;
    ``predicted_corrected = age + gap_corrected``.

Parameters are fitted separately for every (model, suffix) pair: each model and contrast has its own
bias. They are not fitted per ``lesion_filled``: controls have no lesions, so the raw control rows
are used (lesion-filled control rows only when no raw ones exist) and the parameters of a
(model, suffix) are applied to its raw and lesion-filled rows alike. Each participant enters a fit
once (its first session), so repeated scans do not weigh more. Patients are never used; neither are
controls the model was trained on, when its model card says so (see ``stats.group``).

The fit rows come, in this order of preference, from an explicit file (``--bias-fit-file``), the
out-of-fold predictions of the train level (``OUTPUT_DIR/models/<name>/oof_predictions.tsv``), or
the control rows of the group table itself; in the last case the corrected accuracy of those rows is
optimistic (fitted and evaluated on the same rows) and a warning says so.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .collect import is_control as diagnosis_is_control
from .collect import is_lesion_filled

LOG = logging.getLogger("brainage_bids.stats.bias")

METHODS = ("cole", "beheshti")
#: Smallest Cole slope that is still inverted; below it the model barely tracks age.
MIN_COLE_SLOPE = 0.1
FIT_COLUMNS = ["participant_id", "session_id", "suffix", "model", "chronological_age",
               "predicted_age"]
KEYS = ("model", "suffix")


def _session_key(session_id) -> tuple:
    """Sort key of a session label: missing first, then natural order (ses-2 before ses-10)."""
    if session_id is None or (isinstance(session_id, float) and np.isnan(session_id)):
        return (0, ())
    parts = re.split(r"(\d+)", str(session_id))
    return (1, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p))


def session_rank(df: pd.DataFrame) -> pd.Series:
    """Rank of each row's session within the table: ``session_order`` when given (e.g. days since
    baseline from sessions.tsv, missing last), else the natural order of the label."""
    keys = [_session_key(s) for s in df["session_id"]]
    if "session_order" in df:
        order = pd.to_numeric(df["session_order"], errors="coerce").fillna(np.inf)
        keys = [(float(o), k) for o, k in zip(order, keys)]
    ranked = {k: i for i, k in enumerate(sorted(set(keys)))}
    return pd.Series([ranked[k] for k in keys], index=df.index)


def one_row_per_participant(df: pd.DataFrame, keys=KEYS) -> pd.DataFrame:
    """Keep the first session (raw before lesion-filled) of each participant within ``keys``."""
    if df.empty:
        return df
    d = df.copy()
    d["_ses"] = session_rank(d)
    d["_filled"] = is_lesion_filled(d).astype(int) if "lesion_filled" in d else 0
    d = d.sort_values(list(keys) + ["participant_id", "_filled", "_ses"], kind="mergesort")
    d = d.drop_duplicates(list(keys) + ["participant_id"], keep="first")
    return d.drop(columns=["_ses", "_filled"])


def _linregress(x: np.ndarray, y: np.ndarray) -> dict:
    """OLS of y on x with 95 % CIs (t with n - 2 df)."""
    res = stats.linregress(x, y)
    n = len(x)
    t = stats.t.ppf(0.975, n - 2)
    return {"slope": float(res.slope), "intercept": float(res.intercept),
            "slope_se": float(res.stderr), "intercept_se": float(res.intercept_stderr),
            "slope_ci": [float(res.slope - t * res.stderr), float(res.slope + t * res.stderr)],
            "intercept_ci": [float(res.intercept - t * res.intercept_stderr),
                             float(res.intercept + t * res.intercept_stderr)],
            "r": float(res.rvalue), "p_value": float(res.pvalue)}


def fit_bias(fit_rows: pd.DataFrame, method: str = "cole", *, min_n: int = 10,
             source: str = "table") -> dict:
    """Fit the age bias of every (model, suffix) in ``fit_rows`` (healthy-control rows only).

    ``fit_rows`` needs :data:`FIT_COLUMNS`; rows without age or prediction are dropped and each
    participant is used once (first session, raw before lesion-filled). Returns a JSON-ready dict
    ``{"method", "min_n", "fits": [...]}``; each fit records model, suffix, status ("fitted" or
    "skipped" with a reason), slope, intercept with SEs and 95 % CIs, n, the age range and the
    exact rows (participant_id, session_id) used.
    """
    if method not in METHODS:
        raise ValueError(f"unknown bias-correction method {method!r}; choose from {METHODS}")
    missing = [c for c in FIT_COLUMNS if c not in fit_rows]
    if missing:
        raise ValueError(f"bias-fit rows lack columns {missing}")
    d = fit_rows.copy()
    d["chronological_age"] = pd.to_numeric(d["chronological_age"], errors="coerce")
    d["predicted_age"] = pd.to_numeric(d["predicted_age"], errors="coerce")
    d = d.dropna(subset=["chronological_age", "predicted_age", "model", "suffix"])
    d = one_row_per_participant(d)
    fits = []
    for (model, suffix), g in d.groupby(list(KEYS), sort=True):
        age = g["chronological_age"].to_numpy(float)
        pred = g["predicted_age"].to_numpy(float)
        fit = {"model": model, "suffix": suffix, "source": _source_of(g, source), "n": len(g),
               "age_range": [float(age.min()), float(age.max())],
               "rows": [{"participant_id": p, "session_id": None if pd.isna(s) else s}
                        for p, s in zip(g["participant_id"], g["session_id"])]}
        if len(g) < min_n:
            fit.update(status="skipped", reason=f"{len(g)} healthy-control rows, fewer than the "
                                                f"minimum of {min_n}")
        elif np.ptp(age) == 0:
            fit.update(status="skipped", reason="all healthy controls have the same age")
        else:
            y = pred if method == "cole" else pred - age
            reg = _linregress(age, y)
            fit.update(reg)
            if method == "cole" and reg["slope"] < MIN_COLE_SLOPE:
                fit.update(status="skipped", reason=f"slope of predicted on age is "
                           f"{reg['slope']:.3f} (< {MIN_COLE_SLOPE}); inverting it would amplify "
                           "noise")
            else:
                fit["status"] = "fitted"
        if fit["status"] == "skipped":
            LOG.warning("bias correction of %s/%s skipped: %s", model, suffix, fit["reason"])
        fits.append(fit)
    return {"method": method, "min_n": int(min_n), "fits": fits}


def _source_of(g: pd.DataFrame, default: str) -> str:
    if "fit_source" in g:
        vals = sorted(set(g["fit_source"].dropna().astype(str)))
        if vals:
            return ",".join(vals)
    return default


def apply_bias(rows: pd.DataFrame, params: dict) -> pd.DataFrame:
    """Copy of ``rows`` with ``predicted_age_corrected``, ``brain_age_gap_corrected`` and
    ``bias_method`` added (NaN/None where no fit exists for the row's model and suffix, or the age
    is missing). Raw columns are left as they are."""
    out = rows.copy()
    age = pd.to_numeric(out["chronological_age"], errors="coerce").to_numpy(float)
    pred = pd.to_numeric(out["predicted_age"], errors="coerce").to_numpy(float)
    pc = np.full(len(out), np.nan)
    gc = np.full(len(out), np.nan)
    method = np.full(len(out), None, dtype=object)
    for fit in params.get("fits", []):
        if fit.get("status") != "fitted":
            continue
        sel = ((out["model"] == fit["model"]) & (out["suffix"] == fit["suffix"])).to_numpy()
        a, b = fit["slope"], fit["intercept"]
        if params["method"] == "cole":
            pc[sel] = (pred[sel] - b) / a
            gc[sel] = pc[sel] - age[sel]
        else:
            gc[sel] = (pred[sel] - age[sel]) - (a * age[sel] + b)
            pc[sel] = age[sel] + gc[sel]
        method[sel] = params["method"]
    out["predicted_age_corrected"] = pc
    out["brain_age_gap_corrected"] = gc
    out["bias_method"] = method
    return out


def read_fit_file(path: str | Path, default_model: str | None = None) -> pd.DataFrame:
    """A TSV of control predictions (participant_id, session_id, suffix, model, chronological_age,
    predicted_age[, fold][, diagnosis]); a missing ``model`` column takes ``default_model``."""
    df = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False,
                     dtype={"participant_id": str, "session_id": str, "suffix": str, "model": str})
    if "model" not in df and default_model:
        df["model"] = default_model
    if "session_id" not in df:
        df["session_id"] = np.nan
    if "model" in df and default_model:
        df["model"] = df["model"].fillna(default_model)
    missing = [c for c in FIT_COLUMNS if c not in df]
    if missing:
        raise ValueError(f"{path}: lacks columns {missing}")
    df["participant_id"] = [p if str(p).startswith("sub-") else f"sub-{p}"
                            for p in df["participant_id"]]
    return df


def find_oof_files(output_dir: str | Path) -> list[Path]:
    """Out-of-fold prediction tables written by the train level."""
    return sorted(Path(output_dir).glob("models/*/oof_predictions.tsv"))


def choose_fit_rows(table: pd.DataFrame, is_control, *, output_dir: str | Path | None = None,
                    fit_file: str | Path | None = None, patient_ids=(), controls=("HC",),
                    diagnosis_col: str = "diagnosis") -> pd.DataFrame:
    """Rows the bias is fitted on, with a ``fit_source`` column, for every (model, suffix) of
    ``table``.

    Per (model, suffix), the first of: the explicit ``fit_file``; the train level's out-of-fold
    files under ``output_dir``; the control rows of ``table`` (boolean ``is_control``), with a
    warning that corrected accuracy on those rows is then optimistic. External rows of
    ``patient_ids`` are dropped, and when an external file has a ``diagnosis_col`` column only its
    ``controls`` are kept.
    """
    def clean(ext: pd.DataFrame) -> pd.DataFrame:
        if diagnosis_col in ext:
            keep = diagnosis_is_control(ext[diagnosis_col], controls)
            if (~keep).any():
                LOG.info("bias fit: %d external row(s) that are not controls ignored",
                         int((~keep).sum()))
            ext = ext[keep]
        dropped = ext["participant_id"].isin(set(patient_ids))
        if dropped.any():
            LOG.warning("bias fit: %d external row(s) of participants who are patients in "
                        "participants.tsv ignored", int(dropped.sum()))
        return ext[~dropped]

    sources: list[pd.DataFrame] = []  # in order of preference
    if fit_file:
        ext = read_fit_file(fit_file)
        ext["fit_source"] = f"file:{Path(fit_file).name}"
        sources.append(clean(ext))
    if output_dir is not None:
        oof = []
        for f in find_oof_files(output_dir):
            try:
                ext = read_fit_file(f, default_model=f.parent.name)
            except (ValueError, OSError, pd.errors.ParserError) as exc:
                LOG.warning("ignoring %s: %s", f, exc)
                continue
            ext["fit_source"] = "oof"
            oof.append(ext)
        if oof:
            sources.append(clean(pd.concat(oof, ignore_index=True)))
    own = table[np.asarray(is_control, dtype=bool)].copy()
    own["fit_source"] = "table"
    cols = FIT_COLUMNS + ["lesion_filled", "session_order", "fit_source"]
    parts = []
    for (model, suffix), _ in table.groupby(list(KEYS), sort=True):
        found = [e[(e["model"] == model) & (e["suffix"] == suffix)] for e in sources]
        found = [e for e in found if len(e)]
        if found:
            parts.append(found[0].reindex(columns=cols))
            continue
        o = own[(own["model"] == model) & (own["suffix"] == suffix)]
        if len(o):
            LOG.warning("bias correction of %s/%s is fitted on the healthy controls of this table "
                        "(no out-of-fold predictions); their corrected accuracy is optimistic",
                        model, suffix)
            parts.append(o.reindex(columns=cols))
    if not parts:
        return pd.DataFrame(columns=cols)
    return pd.concat(parts, ignore_index=True)


def fit_group_correction(merged: pd.DataFrame, is_control, patients: set, spec: dict, *,
                         output_dir, fit_file, n_training_excluded: pd.Series
                         ) -> tuple[dict, pd.DataFrame]:
    """The group level's bias fits (spec ``bias``) and the rows they were fitted on: the
    healthy-control rows (``is_control``), or the fit file's or out-of-fold predictions (see
    :func:`choose_fit_rows`), never a patient's. A (model, suffix) without a fit gets a
    ``skipped`` entry with the reason (``n_training_excluded``: control rows left out per
    (model, suffix) because the model was trained on them)."""
    controls = [str(c) for c in spec["controls"]]
    fit_rows = choose_fit_rows(merged, is_control, output_dir=output_dir, fit_file=fit_file,
                               patient_ids=patients, controls=controls,
                               diagnosis_col=spec["columns"]["diagnosis"])
    fit_rows = fit_rows.loc[~fit_rows["participant_id"].isin(list(patients)).to_numpy(bool)]
    params = fit_bias(fit_rows, spec["bias"]["method"], min_n=spec["bias"]["min_controls"])
    fitted = {(f["model"], f["suffix"]) for f in params["fits"]}
    for model, suffix in sorted(set(zip(merged["model"], merged["suffix"]))):
        if (model, suffix) not in fitted:
            reason = (f"no healthy controls ({', '.join(controls)}) with an age among the "
                      "rows of this model and suffix, and no out-of-fold predictions")
            n_train = int(n_training_excluded.get((model, suffix), 0))
            if n_train:
                reason += (f" ({n_train} control row(s) left out: the model was trained on "
                           "them)")
            LOG.warning("bias correction of %s/%s skipped: %s", model, suffix, reason)
            params["fits"].append({"model": model, "suffix": suffix, "status": "skipped",
                                   "reason": reason, "n": 0, "rows": []})
    return params, fit_rows


def bias_document(params: dict, controls: list[str], fit_file) -> dict:
    """``bias_correction.json``: the fits with their formula, grouping and provenance (valid JSON:
    numpy scalars made plain, NaN/inf null)."""
    from datetime import datetime, timezone

    from .. import __version__

    doc = {"Description": "linear age-bias correction fitted on healthy controls only",
           "GeneratedBy": {"Name": "brainage-bids", "Version": __version__},
           "Date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "ControlLabels": controls,
           "FitFile": str(fit_file) if fit_file else None,
           "Formula": ("predicted = slope * age + intercept; predicted_corrected = "
                       "(predicted - intercept) / slope; gap_corrected = "
                       "predicted_corrected - age")
           if params["method"] == "cole" else
           ("gap = slope * age + intercept; gap_corrected = gap - (slope * age + intercept); "
            "predicted_corrected = age + gap_corrected"),
           "Grouping": "one fit per (model, suffix); raw rows, first session of each "
                       "participant; applied to raw and lesion-filled rows alike",
           "ExcludedRowsDescription": "control rows left out of the fit because they carry "
                                      "a flag of exclude_qc_flags",
           **params}
    return _json_ready(doc)


def _json_ready(obj):
    """``obj`` with numpy scalars made plain and NaN/inf made null (valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    return None if pd.isna(obj) else str(obj)
