"""The inputs of the group statistics: the participant-level rows merged with participants.tsv
and sessions.tsv, the analysis frames (one row per participant, canonical column names) and the
EDSS-worsening frame.

Rows feeding the clinical statistics (spec ``rows``): per suffix, model ``ensemble`` when one ran
on that suffix, else every model separately; raw (not lesion-filled) rows; one row per
participant, the baseline (first) session. The gap is the bias-corrected one when a correction was
fitted for that model and suffix (else the raw gap, with a warning); the frame's
``attrs["gap"]`` names which. Patients are participants whose diagnosis is set and is not a
control label.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .bias import one_row_per_participant, session_rank
from .collect import is_control as diagnosis_is_control
from .collect import is_lesion_filled

LOG = logging.getLogger("brainage_bids.stats.group")

CANONICAL = ("diagnosis", "phenotype", "sex", "disease_duration", "edss", "site")
NUMERIC = ("age", "disease_duration", "edss")


def _parsed_ages(frame: pd.DataFrame, f: Path) -> pd.DataFrame:
    """``age`` read as participant level reads it (utils.bids.parse_age): unusable ages are NaN,
    with a warning naming the file, line and value."""
    from ..utils.bids import parse_age

    if "age" not in frame:
        return frame.drop(columns="_line", errors="ignore")
    frame = frame.copy()
    ages = []
    for value, line in zip(frame["age"], frame.get("_line", [None] * len(frame))):
        age, problem = parse_age(value)
        if problem:
            LOG.warning("%s line %s: %s%s", f, line, problem, "" if age is not None else
                        "; the age is n/a")
        ages.append(np.nan if age is None else age)
    frame["age"] = ages
    return frame.drop(columns="_line", errors="ignore")


def read_clinical(bids_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """participants.tsv (one row per participant, text; ``age`` parsed) and every
    sub-*_sessions.tsv stacked (participant_id, session_id, ...); empty frames where absent."""
    from ..utils.bids import read_participants, read_sessions

    bids_dir = Path(bids_dir)
    participants = _parsed_ages(read_participants(bids_dir).reset_index(),
                                bids_dir / "participants.tsv")
    frames = []
    for f in sorted(bids_dir.glob("sub-*/sub-*_sessions.tsv")):
        label = f.parent.name[len("sub-"):]
        s = read_sessions(bids_dir, label)
        if s is not None:
            s = _parsed_ages(s.reset_index(), f)
            s.insert(0, "participant_id", f"sub-{label}")
            frames.append(s)
    sessions = (pd.concat(frames, ignore_index=True) if frames
                else pd.DataFrame(columns=["participant_id", "session_id"]))
    return participants, sessions


def _numeric_session_order(sessions: pd.DataFrame) -> pd.Series:
    """Days from baseline of each session (days_since_baseline, else 365.25 * age)."""
    order = pd.Series(np.nan, index=sessions.index)
    if "age" in sessions:
        order = pd.to_numeric(sessions["age"], errors="coerce") * 365.25
    if "days_since_baseline" in sessions:
        days = pd.to_numeric(sessions["days_since_baseline"], errors="coerce")
        order = days.where(days.notna(), order)
    return order


def merge_clinical(table: pd.DataFrame, participants: pd.DataFrame,
                   sessions: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the participants.tsv and sessions.tsv columns of each row added (a session's
    value wins over the participant's), plus ``session_order``. Columns already in ``table`` are
    not overwritten. Rows of a session never take the participants.tsv ``age`` (an age at some
    other session): theirs comes from sessions.tsv or stays n/a."""
    d = table.copy()
    keep = [c for c in participants.columns if c == "participant_id" or c not in d.columns]
    if len(participants):
        d = d.merge(participants[keep].drop_duplicates("participant_id"), on="participant_id",
                    how="left")
        if "age" in keep and "session_id" in d:
            d.loc[d["session_id"].notna().to_numpy(), "age"] = np.nan
    d["session_order"] = np.nan
    if len(sessions):
        s = sessions.copy()
        s["session_order"] = _numeric_session_order(s)
        s = s.drop_duplicates(["participant_id", "session_id"])
        cols = [c for c in s.columns if c in ("participant_id", "session_id")
                or c not in table.columns]
        d = d.merge(s[cols], on=["participant_id", "session_id"], how="left",
                    suffixes=("", "__ses"))
        for c in [c for c in d.columns if c.endswith("__ses")]:
            base = c[:-len("__ses")]
            d[base] = d[c].where(d[c].notna(), d[base])
            d = d.drop(columns=c)
    return d


def _as_event(s: pd.Series) -> pd.Series:
    text = s.astype(str).str.strip().str.lower()
    mapping = {"1": 1.0, "0": 0.0, "1.0": 1.0, "0.0": 0.0, "true": 1.0, "false": 0.0,
               "yes": 1.0, "no": 0.0, "y": 1.0, "n": 0.0}
    return text.map(mapping).where(s.notna())


def _maybe_numeric(s: pd.Series) -> pd.Series:
    """Numbers when every non-missing value parses as one, else the text."""
    num = pd.to_numeric(s, errors="coerce")
    return num if num.notna().sum() == s.notna().sum() else s


def _ident(name: str) -> str:
    ident = re.sub(r"\W", "_", str(name))
    return ident if re.match(r"[A-Za-z_]", ident) else f"v_{ident}"


def frame_name(name: str) -> str:
    """Column of the analysis frame holding spec covariate ``name``: the canonical names
    (age, sex, edss, ...) as they are, any other participants.tsv column as ``cov_<name>``."""
    return name if name in ("age", "gap") + CANONICAL else f"cov_{_ident(name)}"


def covariate_names(spec: dict) -> dict[str, str]:
    """Analysis-frame column -> participants.tsv column of every non-canonical spec covariate."""
    return {frame_name(c): c for c in dict.fromkeys(spec["covariates"] + spec["psm"]["covariates"])
            if c not in ("age",) + CANONICAL}


def flagged(df: pd.DataFrame, flags) -> pd.Series:
    """True for rows carrying one of ``flags`` (the spec's ``exclude_qc_flags``)."""
    flags = set(flags)
    return df["qc_flags"].fillna("").astype(str).map(
        lambda s: bool(set(s.split(";")) & flags)).astype(bool)


def exclude_flagged(df: pd.DataFrame, flags) -> pd.DataFrame:
    """``df`` without the rows carrying one of ``flags``."""
    if not flags:
        return df
    bad = flagged(df, flags)
    if bad.any():
        LOG.info("%d row(s) with qc flags %s left out of the statistics", int(bad.sum()), flags)
    return df[~bad]


def analysis_frame(d: pd.DataFrame, spec: dict, has_diagnosis: bool) -> pd.DataFrame:
    """Canonical columns: participant_id, session_id, gap, age, sex, diagnosis, phenotype,
    disease_duration, edss, site, the spec covariates (as identifiers), patient.
    ``attrs``: ``gap`` (the gap column used), ``has_diagnosis`` (participants.tsv has the
    diagnosis column)."""
    cols = spec["columns"]
    a = pd.DataFrame({"participant_id": d["participant_id"].to_numpy(),
                      "session_id": d["session_id"].to_numpy()})
    corrected = pd.to_numeric(d["brain_age_gap_corrected"], errors="coerce")
    use_corrected = spec["rows"]["gap"] == "corrected" and corrected.notna().any()
    if spec["rows"]["gap"] == "corrected" and not use_corrected and "_rank" not in d:
        LOG.warning("no bias correction for %s/%s: clinical statistics use the raw gap",
                    d["model"].iloc[0], d["suffix"].iloc[0])
    gap_col = "brain_age_gap_corrected" if use_corrected else "brain_age_gap"
    a["gap"] = pd.to_numeric(d[gap_col], errors="coerce").to_numpy()
    a["predicted_age"] = pd.to_numeric(d["predicted_age"], errors="coerce").to_numpy()
    a["predicted_age_sd"] = pd.to_numeric(d["predicted_age_sd"], errors="coerce").to_numpy()
    if "_rank" in d:
        a["session_rank"] = d["_rank"].to_numpy()
    age = pd.to_numeric(d["chronological_age"], errors="coerce")
    if cols["age"] in d:
        age = age.fillna(pd.to_numeric(d[cols["age"]], errors="coerce"))
    a["age"] = age.to_numpy()
    for name in CANONICAL:
        src = cols[name]
        a[name] = d[src].to_numpy() if src in d else np.nan
    for name in ("disease_duration", "edss"):
        a[name] = pd.to_numeric(a[name], errors="coerce")
    for c in ("diagnosis", "phenotype", "sex", "site"):
        a[c] = a[c].map(lambda v: None if pd.isna(v) else str(v).strip()).astype(object)
    for ident, cov in covariate_names(spec).items():
        a[ident] = _maybe_numeric(d[cov]).to_numpy() if cov in d else np.nan
    if has_diagnosis:
        a["patient"] = (a["diagnosis"].notna().to_numpy(dtype=bool)
                        & ~diagnosis_is_control(a["diagnosis"], [str(c) for c in spec["controls"]]))
    else:
        a["patient"] = True
    a.attrs["gap"] = gap_col
    a.attrs["has_diagnosis"] = has_diagnosis
    return a


def clinical_subsets(df: pd.DataFrame, spec: dict, has_diagnosis: bool) -> tuple[list, dict]:
    """The rows of the clinical statistics (spec ``rows``): ``[((model, suffix), analysis frame
    of one baseline row per participant)]`` and ``{(model, suffix): analysis frame of every
    session, with session_rank}``."""
    rows = spec["rows"]
    d = df[is_lesion_filled(df)] if rows["lesion_filled"] == "filled" else df[~is_lesion_filled(df)]
    suffixes = sorted(d["suffix"].dropna().unique())
    if rows["suffix"] != "all":
        suffixes = [s for s in suffixes if s in rows["suffix"]]
    pairs = []
    for suffix in suffixes:
        # "auto": per modality, the ensemble when one ran on it, else every model
        models = sorted(d.loc[d["suffix"] == suffix, "model"].dropna().unique())
        if rows["model"] == "auto":
            models = ["ensemble"] if "ensemble" in models else models
        elif rows["model"] in models:
            models = [rows["model"]]
        else:
            LOG.warning("rows.model %r of the stats spec is not among the %s models %s",
                        rows["model"], suffix, models)
            models = []
        pairs += [(m, suffix) for m in models]
    out, all_sessions = [], {}
    for model, suffix in pairs:
        sub = d[(d["model"] == model) & (d["suffix"] == suffix)]
        if len(sub):
            a = analysis_frame(one_row_per_participant(sub), spec, has_diagnosis)
            a.attrs["key"] = (model, suffix)
            out.append(((model, suffix), a))
            all_sessions[(model, suffix)] = analysis_frame(
                sub.assign(_rank=session_rank(sub)), spec, has_diagnosis)
    if not out:
        LOG.warning("no rows selected for the clinical statistics (rows: %s)", rows)
    return out, all_sessions


def worsening_frame(participants: pd.DataFrame, sessions: pd.DataFrame, spec: dict):
    """participant_id, baseline_edss, time (years), event; or a Skip reason (str)."""
    w = spec["worsening"]
    edss = spec["columns"]["edss"]
    reasons = []
    if w["source"] in ("auto", "sessions"):
        res = _worsening_from_sessions(sessions, edss, w)
        if isinstance(res, pd.DataFrame):
            return res
        reasons.append(res)
    if w["source"] in ("auto", "participants"):
        ft, ev = w["followup_time"], w["event"]
        if ft in participants and ev in participants:
            p = participants
            f = pd.DataFrame({"participant_id": p["participant_id"],
                              "time": pd.to_numeric(p[ft], errors="coerce"),
                              "event": _as_event(p[ev])})
            if w["followup_unit"] == "days":
                f["time"] = f["time"] / 365.25
            f["baseline_edss"] = (pd.to_numeric(p[edss], errors="coerce")
                                  if edss in p else np.nan)
            f = f.dropna(subset=["time", "event"])
            if len(f):
                f.attrs["source"] = f"participants.tsv ({ft}, {ev})"
                return f
            reasons.append(f"participants.tsv columns {ft!r}/{ev!r} have no complete rows")
        else:
            reasons.append(f"participants.tsv lacks the follow-up columns {ft!r} and "
                           f"{ev!r}")
    return "; ".join(reasons)


def _worsening_from_sessions(sessions: pd.DataFrame, edss: str, w: dict):
    from .survival import edss_worsening

    if not len(sessions):
        return "no sessions.tsv files"
    if edss not in sessions:
        return f"sessions.tsv has no {edss!r} column"
    time = w["time"]
    if time == "auto":
        time = next((c for c in ("days_since_baseline", "age") if c in sessions), None)
        if time is None:
            return "sessions.tsv has neither days_since_baseline nor age"
    elif time not in sessions:
        return f"sessions.tsv has no {time!r} column"
    unit = w["time_unit"]
    if unit == "auto":
        unit = "days" if time.lower().startswith("days") else "years"
    v = pd.DataFrame({"participant_id": sessions["participant_id"],
                      "edss": pd.to_numeric(sessions[edss], errors="coerce"),
                      "time": pd.to_numeric(sessions[time], errors="coerce")}).dropna()
    if not (v.groupby("participant_id").size() >= 2).any():
        return f"no participant has two or more sessions with {edss!r} and {time!r}"
    f = edss_worsening(v, id_col="participant_id", time_col="time", edss_col="edss",
                       time_unit=unit)
    f.attrs["source"] = f"sessions.tsv ({edss}, {time} in {unit})"
    return f
