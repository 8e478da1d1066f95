"""The group level: bias correction, accuracy on controls, model comparison and the clinical
statistics of both studies, from the participant-level tables plus participants.tsv/sessions.tsv.

Outputs (``OUTPUT_DIR/group/``): ``brainage.tsv`` (every participant-level row plus
``predicted_age_corrected``, ``brain_age_gap_corrected``, ``bias_method``),
``bias_correction.json``, one table per analysis in ``stats/`` (each starting with
:data:`~brainage_bids.stats.table.STATS_COLUMNS`), ``stats/skipped.tsv`` (analyses that could not
run, with the reason) and PNG figures in ``figures/``.

Rows feeding the clinical statistics (spec ``rows``): per suffix, model ``ensemble`` when one ran on
that suffix, else every model separately; raw (not lesion-filled) rows; one row per participant,
the baseline (first) session, ordered by ``days_since_baseline``, else the session's age in
sessions.tsv, else the session label. The gap is the bias-corrected one when a correction was
fitted for that model and suffix (else the raw gap, with a warning); the column ``gap`` of every
clinical table names which. Patients are participants whose diagnosis is set and is not a control
label. Survival analyses are run on all patients and on each patient diagnosis separately (as the
NMOSD study did per disease), column ``subgroup``.

Tables (``stats/<name>.tsv``; clinical ones carry ``model``, ``suffix`` and ``gap`` columns):
evaluation, site_mae, model_comparison (controls; raw and corrected predictions); gap_summary,
gap_longitudinal (first vs last session); gap_by_diagnosis, gap_by_phenotype, sex_by_diagnosis,
edss_by_diagnosis; lm_gap_diagnosis, lm_gap_phenotype, lm_gap_duration, lm_edss_gap (adjusted for
age, sex and the spec covariates; among patients, diagnosis too when there are several);
psm_balance, psm_pairs, psm_gap; edss_worsening, roc_worsening, km_worsening, logrank_worsening,
cox_worsening (Cox covariates: gap, age, sex, baseline EDSS, disease duration, spec covariates,
and diagnosis for "all patients"); lesion_filling_agreement (raw against lesion-filled brain age
per model and suffix, every model, see stats/agreement.py, with a Bland-Altman figure). Controls the model was trained or selected on (its model card,
when it was trained on this dataset) are left out of the bias fit and the accuracy figures.
"""
from __future__ import annotations

import json
import logging
import re
import traceback
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..utils.images import atomic_write_bytes, atomic_write_text
from ..utils.output_schema import COLUMNS
from .bias import (
    apply_bias,
    choose_fit_rows,
    fit_bias,
    one_row_per_participant,
    session_rank,
)
from .collect import is_lesion_filled, read_brainage_tables
from .evaluate import compare_models, evaluate_controls, site_anova
from .collect import is_control as diagnosis_is_control
from .table import STATS_COLUMNS, stats_frame

LOG = logging.getLogger("brainage_bids.stats.group")

CORRECTED_COLUMNS = ["predicted_age_corrected", "brain_age_gap_corrected", "bias_method"]
CANONICAL = ("diagnosis", "phenotype", "sex", "disease_duration", "edss", "site")
NUMERIC = ("age", "disease_duration", "edss")


class Skip(Exception):
    """An analysis cannot run on these data; the message says why."""


# ---------------------------------------------------------------------------------------------
# inputs
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


def _card_files(output_dir: Path) -> list[Path]:
    packaged = Path(__file__).resolve().parent.parent / "data" / "models"
    return sorted(Path(output_dir).glob("models/*/*_card.json")) + sorted(packaged.glob("*_card.json"))


def _card_covers(card: dict, model: str) -> bool:
    """Whether a card describes ``model``: its own name, one of its ensemble members, or any card
    for ``ensemble`` rows (which average whichever members ran)."""
    names = {card.get("name")} | {m.get("name") for m in card.get("members") or []
                                  if isinstance(m, dict)}
    return model == "ensemble" or model in names


def training_participants(bids_dir: Path, output_dir: Path, model: str) -> set[str]:
    """Participants of this dataset that ``model`` was trained or selected on, when a model card
    (``OUTPUT_DIR/models/*/<name>_card.json`` or a packaged one) naming the model (or one of its
    ensemble members) says it was trained on this dataset: the train and validation lists of
    ``split_participants``, of its ``members`` and of any ``folds``. Their predictions are
    in-sample: they are kept out of the accuracy figures and of a bias fit on the table's own
    controls. Rows ``model=ensemble`` get the union over every such card."""
    ids: set[str] = set()
    for card_file in _card_files(output_dir):
        try:
            card = json.loads(card_file.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(card, dict) or not _card_covers(card, model):
            continue
        td = card.get("training_data") or {}
        same = False
        if td.get("bids_dir"):
            same = Path(td["bids_dir"]).resolve() == Path(bids_dir).resolve()
        desc = Path(bids_dir) / "dataset_description.json"
        if not same and td.get("dataset") and desc.is_file():
            try:
                same = json.loads(desc.read_text()).get("Name") == td["dataset"]
            except ValueError:
                pass
        if not same:
            continue
        sp = card.get("split_participants") or {}
        splits = [sp] + list(sp.get("members") or []) + list(card.get("folds") or [])
        for part in splits:
            if isinstance(part, dict):
                for k in ("train", "validation"):
                    if isinstance(part.get(k), list):
                        ids |= {str(i) for i in part[k]}
    return ids


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


# ---------------------------------------------------------------------------------------------
# the run
class GroupRun:
    """State of one group-level run; :func:`run_group_analyses` is the entry point."""

    def __init__(self, bids_dir, output_dir, spec: dict, *, bias_fit_file=None):
        self.bids_dir = Path(bids_dir)
        self.output_dir = Path(output_dir)
        self.spec = spec
        self.group_dir = self.output_dir / "group"
        self.stats_dir = self.group_dir / "stats"
        self.fig_dir = self.group_dir / "figures"
        self.fit_file = bias_fit_file or spec["bias"]["fit_file"]
        self.controls = [str(c) for c in spec["controls"]]
        self.written: dict[str, Path] = {}
        self.figures: list[Path] = []
        self.skipped: list[dict] = []
        self.cov_names: dict[str, str] = {}
        self.all_sessions: dict[tuple, pd.DataFrame] = {}

    # ---- bookkeeping
    def skip(self, analysis: str, reason: str, *, level=logging.INFO, **where):
        where_txt = " ".join(f"{k}={v}" for k, v in where.items() if v is not None)
        LOG.log(level, "analysis %s skipped%s: %s", analysis,
                f" ({where_txt})" if where_txt else "", reason)
        self.skipped.append({"analysis": analysis, "reason": reason, **where})

    def write_table(self, name: str, frame: pd.DataFrame) -> None:
        cols = STATS_COLUMNS + [c for c in frame.columns if c not in STATS_COLUMNS]
        frame = frame.reindex(columns=cols)
        path = self.stats_dir / f"{name}.tsv"
        atomic_write_text(path, frame.to_csv(sep="\t", index=False, na_rep="n/a"))
        self.written[name] = path

    def attempt(self, name: str, func, subsets=None) -> None:
        """Run ``func`` (on each subset) and write its table(s); record skips and failures.

        ``func(sub)`` returns a frame, or a dict ``{table name: frame}``; a :class:`Skip` records
        the reason, any other exception is logged with its traceback and recorded as an error."""
        if name in self.spec["skip_analyses"]:
            self.skip(name, "listed in skip_analyses of the stats spec")
            return
        results: dict[str, list[pd.DataFrame]] = {}
        for key, sub in (subsets if subsets is not None else [(None, None)]):
            where = {"model": key[0], "suffix": key[1]} if key else {}
            try:
                out = func(sub) if key else func()
            except Skip as exc:
                self.skip(name, str(exc), **where)
                continue
            except Exception as exc:  # one analysis must not stop the others
                LOG.error("analysis %s failed%s: %s\n%s", name,
                          f" ({where['model']}/{where['suffix']})" if where else "", exc,
                          traceback.format_exc())
                self.skip(name, f"error: {type(exc).__name__}: {exc}", level=logging.ERROR,
                          **where)
                continue
            if not isinstance(out, dict):
                out = {name: out}
            for tname, frame in out.items():
                if frame is None or not len(frame):
                    continue
                frame = frame.copy()
                if key:
                    tags = {"model": key[0], "suffix": key[1], "gap": sub.attrs.get("gap")}
                    for col, val in tags.items():
                        if col in frame:  # keep the function's own column under another name
                            frame = frame.rename(columns={col: f"{tname}_{col}"})
                        frame[col] = val
                results.setdefault(tname, []).append(frame)
        for tname, frames in results.items():
            self.write_table(tname, pd.concat(frames, ignore_index=True))

    # ---- the steps
    def run(self) -> dict:
        from ..cli.parser import EXIT_NO_INPUT, UsageError

        try:
            table = read_brainage_tables(self.output_dir)
        except FileNotFoundError as exc:
            raise UsageError(str(exc), EXIT_NO_INPUT) from exc
        participants, sessions = read_clinical(self.bids_dir)
        merged = merge_clinical(table, participants, sessions)
        cols = self.spec["columns"]
        dx = cols["diagnosis"]
        if dx in merged:
            diag = merged[dx].astype("string")
            is_control = diagnosis_is_control(diag, self.controls)
            patients = set(merged.loc[diag.notna().to_numpy(dtype=bool) & ~is_control,
                                      "participant_id"])
        else:
            LOG.warning("participants.tsv has no %r column: no healthy controls are known", dx)
            is_control = np.zeros(len(merged), dtype=bool)
            patients = set()
        self.has_diagnosis = dx in merged
        self.training = {m: training_participants(self.bids_dir, self.output_dir, m)
                         for m in sorted(merged["model"].dropna().unique())}
        in_training = np.array([p in self.training.get(m, ()) for p, m in
                                zip(merged["participant_id"], merged["model"])], dtype=bool)
        if (is_control & in_training).any():
            LOG.warning("%d control row(s) of participants the model was trained or selected on "
                        "are left out of the bias fit and the accuracy figures (in-sample "
                        "predictions)", int((is_control & in_training).sum()))
        self.n_training_excluded = pd.Series(is_control & in_training).groupby(
            [merged["model"].to_numpy(), merged["suffix"].to_numpy()]).sum()
        is_control_honest = is_control & ~in_training

        # Rows excluded by exclude_qc_flags are out of the statistics, the bias fit included.
        flagged = self.flagged(merged).to_numpy(dtype=bool)
        bias = self.fit_correction(merged, is_control_honest & ~flagged, patients)
        bias["excluded_rows"] = [
            {"participant_id": r.participant_id,
             "session_id": None if pd.isna(r.session_id) else r.session_id,
             "model": r.model, "suffix": r.suffix, "lesion_filled": r.lesion_filled,
             "qc_flags": r.qc_flags}
            for r in merged[is_control_honest & flagged].itertuples()]
        corrected = apply_bias(merged, bias)
        out_cols = list(COLUMNS) + CORRECTED_COLUMNS
        atomic_write_text(self.group_dir / "brainage.tsv",
                          corrected[out_cols].to_csv(sep="\t", index=False, na_rep="n/a"))
        self.write_bias_json(bias)

        all_rows = corrected
        corrected = self.exclude_flagged(corrected)
        controls = corrected[is_control_honest[corrected.index]] if len(corrected) else corrected
        controls = one_row_per_participant(controls[~is_lesion_filled(controls)]) \
            if len(controls) else controls
        self.attempt("evaluation", lambda: self.evaluation(controls))
        self.attempt("site_mae", lambda: self.site_check(controls))
        self.attempt("model_comparison", lambda: self.model_comparison(controls))
        try:
            self.figure_scatter(corrected)
        except Exception as exc:  # a figure must not cost the tables
            LOG.warning("scatter figures failed: %s", exc)

        subsets = self.clinical_subsets(corrected)
        survival = self.worsening_frame(participants, sessions)
        for name, func in [
            ("gap_summary", self.gap_summary), ("gap_longitudinal", self.gap_longitudinal),
            ("gap_by_diagnosis", self.gap_by_diagnosis),
            ("gap_by_phenotype", self.gap_by_phenotype),
            ("sex_by_diagnosis", self.sex_by_diagnosis),
            ("edss_by_diagnosis", self.edss_by_diagnosis),
            ("lm_gap_diagnosis", self.lm_gap_diagnosis),
            ("lm_gap_phenotype", self.lm_gap_phenotype),
            ("lm_gap_duration", self.lm_gap_duration), ("lm_edss_gap", self.lm_edss_gap),
            ("psm", self.psm),
        ]:
            self.attempt(name, func, subsets)
        self.attempt("edss_worsening", lambda: self.worsening_table(survival, participants))
        for name, func in [("roc_worsening", self.roc_worsening),
                           ("km_worsening", self.km_worsening),
                           ("cox_worsening", self.cox_worsening)]:
            self.attempt(name, lambda sub, f=func: f(sub, survival), subsets)
        self.lesion_filling_agreement(all_rows)
        self.contrast_agreement(all_rows)
        self.finish()
        return {"brainage": str(self.group_dir / "brainage.tsv"),
                "bias_correction": str(self.group_dir / "bias_correction.json"),
                "bias": [{k: f.get(k) for k in ("model", "suffix", "status", "n", "reason",
                                                "source")} for f in bias["fits"]],
                "tables": {k: str(v) for k, v in sorted(self.written.items())},
                "figures": [str(p) for p in self.figures],
                "skipped": list(self.skipped)}

    def finish(self) -> None:
        """Write skipped.tsv and remove tables/figures left from earlier runs."""
        rows = [{"analysis": s["analysis"], "term": "skipped", "reason": s["reason"],
                 "model": s.get("model"), "suffix": s.get("suffix")} for s in self.skipped]
        skipped = stats_frame(rows) if rows else stats_frame([]).reindex(
            columns=STATS_COLUMNS + ["reason", "model", "suffix"])
        self.write_table("skipped", skipped)
        for f in self.stats_dir.glob("*.tsv"):
            if f.stem not in self.written:
                f.unlink()
        keep = {p.name for p in self.figures}
        for f in self.fig_dir.glob("*.png") if self.fig_dir.is_dir() else []:
            if f.name not in keep:
                f.unlink()

    # ---- bias correction
    def fit_correction(self, merged, is_control, patients) -> dict:
        method = self.spec["bias"]["method"]
        fit_rows = choose_fit_rows(merged, is_control, output_dir=self.output_dir,
                                   fit_file=self.fit_file, patient_ids=patients,
                                   controls=self.controls,
                                   diagnosis_col=self.spec["columns"]["diagnosis"])
        fit_rows = fit_rows.loc[~fit_rows["participant_id"].isin(list(patients)).to_numpy(bool)]
        self.fit_rows = fit_rows
        params = fit_bias(fit_rows, method, min_n=self.spec["bias"]["min_controls"])
        fitted = {(f["model"], f["suffix"]) for f in params["fits"]}
        for model, suffix in sorted(set(zip(merged["model"], merged["suffix"]))):
            if (model, suffix) not in fitted:
                reason = (f"no healthy controls ({', '.join(self.controls)}) with an age among the "
                          "rows of this model and suffix, and no out-of-fold predictions")
                n_train = int(self.n_training_excluded.get((model, suffix), 0))
                if n_train:
                    reason += (f" ({n_train} control row(s) left out: the model was trained on "
                               "them)")
                LOG.warning("bias correction of %s/%s skipped: %s", model, suffix, reason)
                params["fits"].append({"model": model, "suffix": suffix, "status": "skipped",
                                       "reason": reason, "n": 0, "rows": []})
        return params

    def write_bias_json(self, params: dict) -> None:
        doc = {"Description": "linear age-bias correction fitted on healthy controls only",
               "GeneratedBy": {"Name": "brainage-bids", "Version": __version__},
               "Date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "ControlLabels": self.controls,
               "FitFile": str(self.fit_file) if self.fit_file else None,
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
        atomic_write_text(self.group_dir / "bias_correction.json",
                          json.dumps(_json_ready(doc), indent=2) + "\n")

    # ---- helpers on rows
    def flagged(self, df: pd.DataFrame) -> pd.Series:
        """True for rows carrying one of the spec's ``exclude_qc_flags``."""
        flags = set(self.spec["exclude_qc_flags"])
        return df["qc_flags"].fillna("").astype(str).map(
            lambda s: bool(set(s.split(";")) & flags)).astype(bool)

    def exclude_flagged(self, df: pd.DataFrame) -> pd.DataFrame:
        if not self.spec["exclude_qc_flags"]:
            return df
        bad = self.flagged(df)
        if bad.any():
            LOG.info("%d row(s) with qc flags %s left out of the statistics", int(bad.sum()),
                     self.spec["exclude_qc_flags"])
        return df[~bad]

    def clinical_subsets(self, df: pd.DataFrame) -> list:
        """(model, suffix) -> analysis frame of one baseline row per participant."""
        rows = self.spec["rows"]
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
        out = []
        for model, suffix in pairs:
            sub = d[(d["model"] == model) & (d["suffix"] == suffix)]
            if len(sub):
                a = self.analysis_frame(one_row_per_participant(sub))
                a.attrs["key"] = (model, suffix)
                out.append(((model, suffix), a))
                self.all_sessions[(model, suffix)] = self.analysis_frame(
                    sub.assign(_rank=session_rank(sub)))
        if not out:
            LOG.warning("no rows selected for the clinical statistics (rows: %s)", rows)
        return out

    def analysis_frame(self, d: pd.DataFrame) -> pd.DataFrame:
        """Canonical columns: participant_id, session_id, gap, age, sex, diagnosis, phenotype,
        disease_duration, edss, site, the spec covariates (as identifiers), patient."""
        cols = self.spec["columns"]
        a = pd.DataFrame({"participant_id": d["participant_id"].to_numpy(),
                          "session_id": d["session_id"].to_numpy()})
        corrected = pd.to_numeric(d["brain_age_gap_corrected"], errors="coerce")
        use_corrected = self.spec["rows"]["gap"] == "corrected" and corrected.notna().any()
        if self.spec["rows"]["gap"] == "corrected" and not use_corrected and "_rank" not in d:
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
        for cov in dict.fromkeys(self.spec["covariates"] + self.spec["psm"]["covariates"]):
            if cov in ("age",) + CANONICAL:
                continue
            ident = self._frame_name(cov)
            self.cov_names[ident] = cov
            a[ident] = _maybe_numeric(d[cov]).to_numpy() if cov in d else np.nan
        if self.has_diagnosis:
            a["patient"] = (a["diagnosis"].notna().to_numpy(dtype=bool)
                            & ~diagnosis_is_control(a["diagnosis"], self.controls))
        else:
            a["patient"] = True
        a.attrs["gap"] = gap_col
        return a

    @staticmethod
    def _frame_name(name: str) -> str:
        """Column of the analysis frame holding spec covariate ``name``: the canonical names
        (age, sex, edss, ...) as they are, any other participants.tsv column as ``cov_<name>``."""
        return name if name in ("age", "gap") + CANONICAL else f"cov_{_ident(name)}"

    def _levels(self, d: pd.DataFrame, col: str, wanted) -> pd.DataFrame:
        """Rows whose ``col`` is among ``wanted`` (all when None) and in a level with at least
        ``min_group_size`` rows."""
        d = d[d[col].notna()]
        if wanted is not None:
            d = d[d[col].isin(wanted)]
        counts = d[col].value_counts()
        small = counts[counts < self.spec["min_group_size"]]
        if len(small):
            LOG.info("%s levels with fewer than %d participants left out: %s", col,
                     self.spec["min_group_size"], dict(small))
        return d[d[col].isin(counts[counts >= self.spec["min_group_size"]].index)]

    def _need_levels(self, d, col, what, k=2):
        levels = sorted(d[col].dropna().unique())
        if len(levels) < k:
            raise Skip(f"fewer than {k} {what} with at least {self.spec['min_group_size']} "
                       f"participants (found {levels or 'none'})")
        return levels

    def _need_column(self, key: str, d: pd.DataFrame | None = None):
        src = self.spec["columns"].get(key, key)
        if d is not None and d[key].notna().sum() == 0:
            raise Skip(f"no values in column {src!r} (participants.tsv/sessions.tsv)")

    # ---- accuracy on controls
    def evaluation(self, controls: pd.DataFrame) -> pd.DataFrame:
        frames = []
        if len(controls):
            ok = controls.dropna(subset=["chronological_age", "predicted_age"])
            if len(ok):
                ev = evaluate_controls(ok, source="table", fit_rows=self.fit_rows)
                ev["n_training_excluded"] = [
                    int(self.n_training_excluded.get((m, s), 0)) for m, s in zip(ev["model"],
                                                                                ev["suffix"])]
                frames.append(ev)
        ext = self.fit_rows[self.fit_rows["fit_source"] != "table"] if len(self.fit_rows) else []
        if len(ext):
            ext = one_row_per_participant(ext.dropna(subset=["chronological_age", "predicted_age"]))
            for src, e in ext.groupby("fit_source"):
                frames.append(evaluate_controls(e.drop(columns=["predicted_age_corrected"],
                                                       errors="ignore"), source=src))
        if not frames:
            raise Skip(f"no healthy controls (diagnosis in {self.controls}) with an age and a "
                       "prediction" + ("" if self.has_diagnosis else
                                       f"; participants.tsv has no "
                                       f"{self.spec['columns']['diagnosis']!r} column"))
        return pd.concat(frames, ignore_index=True)

    def site_check(self, controls: pd.DataFrame) -> pd.DataFrame:
        site = self.spec["columns"]["site"]
        if not len(controls):
            raise Skip(f"no healthy controls (diagnosis in {self.controls})")
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

    def model_comparison(self, controls: pd.DataFrame) -> pd.DataFrame:
        if not len(controls):
            raise Skip("no healthy controls to compare models on")
        keys = set(zip(controls["model"], controls["suffix"]))
        if len(keys) < 2:
            raise Skip(f"a single model and suffix ({'/'.join(next(iter(keys)))}): nothing to "
                       "compare")
        pairs = self.spec["model_comparison"]["pairs"]
        boot = self.spec["bootstrap"]
        frames = []
        for col in ("predicted_age", "predicted_age_corrected"):
            rows = controls.dropna(subset=[col])
            if not len(rows):
                continue
            try:
                frames.append(compare_models(rows, None if pairs == "auto" else pairs,
                                             pred_col=col, n_boot=boot["n"], seed=boot["seed"],
                                             min_n=max(2, self.spec["min_group_size"])))
            except ValueError as exc:
                if col == "predicted_age":
                    raise Skip(str(exc)) from exc
        return pd.concat(frames, ignore_index=True)

    # ---- clinical statistics
    def gap_summary(self, d):
        """Mean gap per diagnosis (and over everyone) with its t interval and a one-sample t-test
        against 0, and the mean per-scan uncertainty (predicted_age_sd)."""
        from scipy import stats as st

        x = d.dropna(subset=["gap"])
        if not len(x):
            raise Skip("no participant has a gap (no chronological age?)")
        groups = [("all", x)]
        if self.has_diagnosis:
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

    def gap_longitudinal(self, d):
        """Change of the gap from the first to the last session of participants scanned more than
        once: paired t-test of the change, its rate per year (change / years between the scans),
        and the Wilcoxon signed-rank test (R's wilcox.test(paired=TRUE))."""
        from scipy import stats as st

        from .clinical import rank_test

        allses = self.all_sessions.get(d.attrs.get("key"))
        if allses is None or "session_rank" not in allses:
            raise Skip("no session information")
        x = allses.dropna(subset=["gap", "age"]).sort_values(["participant_id", "session_rank"])
        first = x.groupby("participant_id").first()
        last = x.groupby("participant_id").last()
        n_ses = x.groupby("participant_id").size()
        ids = n_ses[n_ses >= 2].index
        if len(ids) < self.spec["min_group_size"]:
            raise Skip(f"{len(ids)} participant(s) with a gap at two or more sessions; need "
                       f"{self.spec['min_group_size']}")
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

    def gap_by_diagnosis(self, d):
        from .clinical import compare_groups

        if not self.has_diagnosis:
            raise Skip(f"no {self.spec['columns']['diagnosis']!r} column in participants.tsv")
        x = self._levels(d.dropna(subset=["gap"]), "diagnosis", self.spec["groups"]["diagnosis"])
        self._need_levels(x, "diagnosis", "diagnosis groups")
        return compare_groups(x, "gap", "diagnosis", analysis="gap_by_diagnosis")

    def gap_by_phenotype(self, d):
        from .clinical import compare_groups

        self._need_column("phenotype", d)
        x = self._levels(d[d["patient"]].dropna(subset=["gap"]), "phenotype",
                         self.spec["groups"]["phenotype"])
        self._need_levels(x, "phenotype", "phenotypes among patients")
        return compare_groups(x, "gap", "phenotype", analysis="gap_by_phenotype")

    def sex_by_diagnosis(self, d):
        from .clinical import chi_square

        if not self.has_diagnosis:
            raise Skip(f"no {self.spec['columns']['diagnosis']!r} column in participants.tsv")
        self._need_column("sex", d)
        x = self._levels(d.dropna(subset=["sex"]), "diagnosis", self.spec["groups"]["diagnosis"])
        self._need_levels(x, "diagnosis", "diagnosis groups")
        if x["sex"].nunique() < 2:
            raise Skip(f"a single sex ({x['sex'].iloc[0]}) among the participants")
        return chi_square(x, "sex", "diagnosis", analysis="sex_by_diagnosis")

    def edss_by_diagnosis(self, d):
        from .clinical import rank_test

        self._need_column("edss", d)
        x = self._levels(d[d["patient"]].dropna(subset=["edss"]), "diagnosis",
                         self.spec["groups"]["diagnosis"])
        levels = self._need_levels(x, "diagnosis", "patient diagnoses with an EDSS")
        frames = [rank_test(x[x["diagnosis"].isin(pair)], "edss", "diagnosis",
                            analysis="edss_by_diagnosis") for pair in combinations(levels, 2)]
        out = pd.concat(frames, ignore_index=True).drop_duplicates(subset=["term"])
        if len(levels) > 2:
            out["note"] = "pairwise tests, p-values not adjusted for multiple comparisons"
        return out

    def _model_terms(self, x: pd.DataFrame, terms: list[str], outcome: str) -> tuple[str, list]:
        """Formula of ``outcome`` on ``terms`` (categorical ones wrapped in C()), leaving out terms
        without variation; raises Skip when too few rows remain for the parameters."""
        kept, dropped, k = [], [], 1
        for t in terms:
            s = x[t]
            categorical = not pd.api.types.is_numeric_dtype(s)
            nlev = s.nunique()
            if nlev < 2:
                dropped.append(f"{self.cov_names.get(t, t)} (no variation)")
                continue
            kept.append(f"C({t})" if categorical else t)
            k += (nlev - 1) if categorical else 1
        if len(x) < k + 2:
            raise Skip(f"{len(x)} participants with complete data for {k} model parameters "
                       f"({outcome} ~ {' + '.join(kept) or '1'}"
                       + (f"; left out: {', '.join(dropped)}" if dropped else "")
                       + f"); need at least {k + 2}")
        return f"{outcome} ~ " + " + ".join(kept or ["1"]), dropped

    def _linear(self, x: pd.DataFrame, outcome: str, main: list[str], analysis: str,
                extra: list[str] = ()) -> pd.DataFrame:
        from .clinical import linear_model

        covs = [self._frame_name(c) for c in self.spec["covariates"]]
        terms = list(dict.fromkeys(main + ["age", "sex"] + list(extra) + covs))
        x = x.dropna(subset=[outcome] + terms)
        for t in main:
            if x[t].nunique() < 2:
                raise Skip(f"{t} does not vary among the {len(x)} participants with complete "
                           f"data ({outcome}, {', '.join(terms)})")
        formula, dropped = self._model_terms(x, terms, outcome)
        for col in ("diagnosis", "phenotype"):
            if col not in main + list(extra):
                continue
            present = set(x[col].dropna())
            wanted = self.spec["groups"][col] or []
            ref = [c for c in wanted if c in present] or (
                [c for c in self.controls if c in present] if col == "diagnosis" else [])
            order = list(dict.fromkeys(ref + sorted(present)))
            x = x.assign(**{col: pd.Categorical(x[col], categories=order)})
        out = linear_model(x, formula, analysis=analysis)
        out["formula"] = formula
        if dropped:
            out["note"] = "left out: " + ", ".join(dropped)
        return out

    def lm_gap_diagnosis(self, d):
        if not self.has_diagnosis:
            raise Skip(f"no {self.spec['columns']['diagnosis']!r} column in participants.tsv")
        x = self._levels(d, "diagnosis", self.spec["groups"]["diagnosis"])
        self._need_levels(x, "diagnosis", "diagnosis groups")
        return self._linear(x, "gap", ["diagnosis"], "lm_gap_diagnosis")

    def lm_gap_phenotype(self, d):
        self._need_column("phenotype", d)
        x = self._levels(d[d["patient"]], "phenotype", self.spec["groups"]["phenotype"])
        self._need_levels(x, "phenotype", "phenotypes among patients")
        return self._linear(x, "gap", ["phenotype"], "lm_gap_phenotype")

    def _patient_extra(self, x):
        return ["diagnosis"] if self.has_diagnosis and x["diagnosis"].nunique() > 1 else []

    def lm_gap_duration(self, d):
        self._need_column("disease_duration", d)
        x = d[d["patient"]]
        return self._linear(x, "gap", ["disease_duration"], "lm_gap_duration",
                            self._patient_extra(x))

    def lm_edss_gap(self, d):
        self._need_column("edss", d)
        x = d[d["patient"]]
        return self._linear(x, "edss", ["gap"], "lm_edss_gap", self._patient_extra(x))

    def psm(self, d):
        from .clinical import matched_comparison, propensity_match

        p = self.spec["psm"]
        col = "diagnosis"
        if not self.has_diagnosis:
            raise Skip(f"no {self.spec['columns']['diagnosis']!r} column in participants.tsv")
        x = d
        levels = sorted(x[col].dropna().unique())
        if p["treatment"]:
            treated, control = p["treatment"]
        else:
            pats = sorted(x.loc[x["patient"], col].dropna().unique())
            ctrl = [c for c in self.controls if c in levels]
            if len(pats) == 2:
                treated, control = pats[0], pats[1]
            elif len(pats) == 1 and ctrl:
                treated, control = pats[0], ctrl[0]
            else:
                raise Skip(f"cannot choose two {col} levels to match (found {levels}); set "
                           "psm.treatment in the stats spec")
        covs = [self._frame_name(c) for c in p["covariates"]]
        missing = [c for c, name in zip(p["covariates"], covs) if x[name].isna().all()]
        if missing:
            raise Skip(f"no values for the matching covariates {missing} "
                       "(participants.tsv/sessions.tsv)")
        x = x[x[col].isin([treated, control])].dropna(subset=["gap"] + covs)
        counts = x[col].value_counts()
        if len(counts) < 2 or counts.min() < self.spec["min_group_size"]:
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
                               seed=self.spec["bootstrap"]["seed"], treated_level=treated,
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

    # ---- EDSS worsening and survival
    def worsening_frame(self, participants: pd.DataFrame, sessions: pd.DataFrame):
        """participant_id, baseline_edss, time (years), event; or a Skip reason (str)."""
        w = self.spec["worsening"]
        edss = self.spec["columns"]["edss"]
        reasons = []
        if w["source"] in ("auto", "sessions"):
            res = self._worsening_from_sessions(sessions, edss)
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

    def _worsening_from_sessions(self, sessions: pd.DataFrame, edss: str):
        from .survival import edss_worsening

        w = self.spec["worsening"]
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

    def worsening_table(self, survival, participants):
        if isinstance(survival, str):
            raise Skip(f"no EDSS follow-up: {survival}")
        s = survival.copy()
        dx = self.spec["columns"]["diagnosis"]
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

    def _survival_groups(self, d, survival):
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
        if self.has_diagnosis and x["diagnosis"].nunique() > 1:
            groups += [(str(g), y) for g, y in x.groupby("diagnosis")]
        return groups

    def _events_ok(self, x, what):
        ev = int(x["event"].sum())
        if ev == 0:
            raise Skip(f"no EDSS worsening events among {len(x)} patients ({what})")
        if ev == len(x):
            raise Skip(f"every one of {len(x)} patients worsened ({what}): no contrast")

    def _per_subgroup(self, d, survival, name, func):
        frames, reasons = [], []
        for label, x in self._survival_groups(d, survival):
            try:
                self._events_ok(x, label)
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

    def _roc(self, x):
        from .roc import roc_analysis

        return roc_analysis(x, "gap", "event", specificity=self.spec["roc"]["specificity"],
                            analysis="roc_worsening")

    def roc_worsening(self, d, survival):
        def one(x, label):
            if min(x["event"].sum(), (1 - x["event"]).sum()) < 2:
                raise Skip(f"fewer than 2 patients with and without worsening ({label})")
            out = self._roc(x)
            cut = out[out["term"] == "cutoff"]
            self.figure_roc(x, label, d, cut.iloc[0].to_dict() if len(cut) else None)
            return out
        return self._per_subgroup(d, survival, "roc_worsening", one)

    def km_worsening(self, d, survival):
        from .survival import kaplan_meier, logrank, plot_kaplan_meier, split_at_cutoff

        def one(x, label):
            if min(x["event"].sum(), (1 - x["event"]).sum()) < 2:
                raise Skip(f"fewer than 2 patients with and without worsening ({label}) for a "
                           "cut-off")
            roc = self._roc(x)
            cut = float(roc.loc[roc["term"] == "cutoff", "estimate"].iloc[0])
            x = x.assign(gap_group=split_at_cutoff(x, "gap", cut))
            if x["gap_group"].nunique() < 2:
                raise Skip(f"all patients on one side of the cut-off {cut:.2f} ({label})")
            km = kaplan_meier(x, "time", "event", group="gap_group", analysis="km_worsening")
            lr = logrank(x, "time", "event", "gap_group", analysis="logrank_worsening")
            km["cutoff"] = lr["cutoff"] = cut
            path = self.fig_dir / f"km_worsening_{_slug(*d.attrs.get('key', ()), label)}.png"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                plot_kaplan_meier(x, "time", "event", "gap_group", str(path))
                self.figures.append(path)
            except Exception as exc:  # a figure must not cost the table
                LOG.warning("Kaplan-Meier figure %s failed: %s", path, exc)
            return {"km_worsening": km, "logrank_worsening": lr}
        return self._per_subgroup(d, survival, "km_worsening", one)

    def cox_worsening(self, d, survival):
        from .survival import cox_univariable_multivariable

        def one(x, label):
            covs = ["gap", "age", "sex", "baseline_edss", "disease_duration"] + [
                self._frame_name(c) for c in self.spec["covariates"]]
            if label == "all patients" and self.has_diagnosis:
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
        return self._per_subgroup(d, survival, "cox_worsening", one)

    # ---- raw versus lesion-filled (stats/agreement.py)
    def lesion_filling_agreement(self, df: pd.DataFrame) -> None:
        """Agreement of raw and lesion-filled brain age per (model, suffix). Rows carrying an
        ``exclude_qc_flags`` flag are left out, except for ``lesion_filling_disagreement``, which
        this analysis measures."""
        from .agreement import ANALYSIS, agreement_subsets

        flags = set(self.spec["exclude_qc_flags"]) - {"lesion_filling_disagreement"}
        if flags and len(df):
            bad = df["qc_flags"].fillna("").astype(str).map(
                lambda s: bool(set(s.split(";")) & flags))
            df = df[~bad]
        subsets = agreement_subsets(df)
        if not subsets:
            def none():
                raise Skip("no lesion-filled rows (run the participant level with "
                           "--lesion-masks)")
            self.attempt(ANALYSIS, none)
            return
        self.attempt(ANALYSIS, self._agreement, subsets)

    def _agreement(self, pairs: pd.DataFrame) -> pd.DataFrame:
        from .agreement import agreement, bland_altman_figure

        model, suffix = pairs.attrs["key"]
        if len(pairs) < 2:
            raise Skip(f"{len(pairs)} participant(s) with both raw and lesion-filled rows: at "
                       "least 2 are needed")
        table = agreement(pairs["raw"], pairs["filled"])
        try:
            import matplotlib.pyplot as plt

            fig = bland_altman_figure(pairs, table, f"{model} {suffix}: raw vs lesion-filled "
                                                    "brain age")
            self._save(fig, self.fig_dir / f"lesion_agreement_{_slug(model, suffix)}.png")
            plt.close(fig)
        except Exception as exc:  # a figure must not cost the table
            LOG.warning("Bland-Altman figure for %s/%s failed: %s", model, suffix, exc)
        return table

    # ---- ages of the same session from different contrasts (stats/contrast_agreement.py)
    def contrast_agreement(self, df: pd.DataFrame) -> None:
        """Agreement of the ages of the same session read in two contrasts, per pair of
        contrasts; rows carrying an ``exclude_qc_flags`` flag are left out."""
        from .contrast_agreement import ANALYSIS, agreement_subsets

        flags = set(self.spec["exclude_qc_flags"])
        if flags and len(df):
            bad = df["qc_flags"].fillna("").astype(str).map(
                lambda s: bool(set(s.split(";")) & flags))
            df = df[~bad]
        subsets = agreement_subsets(df) if len(df) else []
        if not subsets:
            def none():
                raise Skip("no session read in two contrasts (run the participant level with "
                           "e.g. --modalities T1w FLAIR)")
            self.attempt(ANALYSIS, none)
            return
        self.attempt(ANALYSIS, self._contrast_agreement, subsets)

    def _contrast_agreement(self, pairs: pd.DataFrame) -> pd.DataFrame:
        from .agreement import bland_altman_figure
        from .contrast_agreement import contrast_agreement

        a, b = pairs.attrs["suffixes"]
        if len(pairs) < 2:
            raise Skip(f"{len(pairs)} session(s) read in both {a} and {b}: at least 2 are needed")
        table = contrast_agreement(pairs)
        try:
            import matplotlib.pyplot as plt

            fig = bland_altman_figure(pairs.rename(columns={"age_a": "raw", "age_b": "filled"}),
                                      table, f"brain age from {b} against {a} (same sessions)")
            for ax, (x, y) in zip(fig.axes, ((f"{a} brain age (years)", f"{b} brain age (years)"),
                                             (f"mean of {a} and {b} (years)",
                                              f"{b} - {a} (years)"))):
                ax.set_xlabel(x)
                ax.set_ylabel(y)
            self._save(fig, self.fig_dir / f"contrast_agreement_{_slug(a, b)}.png")
            plt.close(fig)
        except Exception as exc:  # a figure must not cost the table
            LOG.warning("Bland-Altman figure for %s/%s failed: %s", a, b, exc)
        return table

    # ---- figures
    def figure_scatter(self, df: pd.DataFrame) -> None:
        """Predicted against chronological age, raw and bias-corrected, per (model, suffix)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception as exc:  # pragma: no cover - matplotlib is a dependency
            LOG.warning("no figures: %s", exc)
            return
        dx = self.spec["columns"]["diagnosis"]
        d = df[~is_lesion_filled(df)]
        for (model, suffix), g in d.groupby(["model", "suffix"], sort=True):
            fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
            labels = g[dx].fillna("n/a").astype(str) if dx in g else pd.Series("all", index=g.index)
            for ax, col, title in ((axes[0], "predicted_age", "raw"),
                                   (axes[1], "predicted_age_corrected", "bias-corrected")):
                for lab in sorted(labels.unique()):
                    s = g[labels == lab]
                    ax.scatter(s["chronological_age"], s[col], s=14, alpha=0.7, label=lab)
                lim = [np.nanmin(g[["chronological_age", "predicted_age"]].to_numpy(float)) - 5,
                       np.nanmax(g[["chronological_age", "predicted_age"]].to_numpy(float)) + 5]
                if np.all(np.isfinite(lim)):
                    ax.plot(lim, lim, "k--", lw=0.8)
                ax.set_xlabel("chronological age (years)")
                ax.set_title(f"{model} {suffix}: {title}")
            axes[0].set_ylabel("predicted brain age (years)")
            axes[0].legend(fontsize=8)
            fig.tight_layout()
            path = self.fig_dir / f"scatter_{_slug(model, suffix)}.png"
            self._save(fig, path)
            plt.close(fig)

    def figure_roc(self, x, label, d, cutoff=None) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            from .roc import roc_curve_points

            pts = roc_curve_points(x, "gap", "event")
            fig, ax = plt.subplots(figsize=(4.2, 4.2))
            ax.plot(pts["fpr"], pts["tpr"], "-")
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            if cutoff is not None and cutoff.get("sensitivity") is not None:
                ax.plot(1 - cutoff["specificity"], cutoff["sensitivity"], "o",
                        label=f"gap > {cutoff['estimate']:.1f}")
                ax.legend(loc="lower right", fontsize=8)
            ax.set_xlabel("1 - specificity")
            ax.set_ylabel("sensitivity")
            ax.set_title(f"{' '.join(d.attrs.get('key', ()))}: gap for EDSS worsening\n{label}",
                         fontsize=10)
            fig.tight_layout()
            name = f"roc_worsening_{_slug(*d.attrs.get('key', ()), label)}.png"
            self._save(fig, self.fig_dir / name)
            plt.close(fig)
        except Exception as exc:  # a figure must not cost the table
            LOG.warning("ROC figure for %s failed: %s", label, exc)

    def _save(self, fig, path: Path) -> None:
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        atomic_write_bytes(path, buf.getvalue())
        self.figures.append(path)


def _slug(*parts: str) -> str:
    """File-name-safe join of ``parts`` with underscores."""
    return "_".join(re.sub(r"[^A-Za-z0-9]+", "-", str(p)).strip("-") for p in parts if p)


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


def run_group_analyses(bids_dir, output_dir, spec: dict, *, bias_fit_file=None) -> dict:
    """Run the group level (see the module docstring) and return a summary: paths of
    ``brainage.tsv`` and ``bias_correction.json``, the bias fits, the tables written, the figures
    and the skipped analyses with their reasons."""
    return GroupRun(bids_dir, output_dir, spec, bias_fit_file=bias_fit_file).run()
