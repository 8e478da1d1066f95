"""The group level: bias correction, accuracy on controls, model comparison and the clinical
statistics of both studies, from the participant-level tables plus participants.tsv/sessions.tsv.

Outputs (``OUTPUT_DIR/group/``): ``brainage.tsv`` (every participant-level row plus
``predicted_age_corrected``, ``brain_age_gap_corrected``, ``bias_method``),
``bias_correction.json``, one table per analysis in ``stats/`` (each starting with
:data:`~brainage_bids.stats.table.STATS_COLUMNS`), ``stats/skipped.tsv`` (analyses that could not
run, with the reason) and PNG figures in ``figures/``.

This module only orchestrates: the inputs (merged tables, analysis frames, the EDSS-worsening
frame) are built in stats/inputs.py, the analyses are the functions of stats/analyses.py and
stats/worsening.py, the figures are drawn by reports/group_figures.py. Rows feeding the clinical
statistics (spec ``rows``): per suffix, model ``ensemble`` when one ran on that suffix, else every
model separately; raw (not lesion-filled) rows; one row per participant, the baseline (first)
session, ordered by ``days_since_baseline``, else the session's age in sessions.tsv, else the
session label; the column ``gap`` of every clinical table names the gap used (bias-corrected when
a correction was fitted). Survival analyses are run on all patients and on each patient diagnosis
separately (as the NMOSD study did per disease), column ``subgroup``.

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
import traceback
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from ..models.cards import training_participants
from ..reports.group_figures import StatsFigures
from ..utils.images import atomic_write_text
from ..utils.output_schema import COLUMNS
from . import analyses, worsening
from .bias import apply_bias, bias_document, fit_group_correction, one_row_per_participant
from .collect import is_control as diagnosis_is_control
from .collect import is_lesion_filled, read_brainage_tables
from .inputs import (
    clinical_subsets,
    exclude_flagged,
    flagged,
    merge_clinical,
    read_clinical,
    worsening_frame,
)
from .table import STATS_COLUMNS, Skip, stats_frame

__all__ = ["GroupRun", "Skip", "merge_clinical", "read_clinical", "run_group_analyses",
           "training_participants"]

LOG = logging.getLogger("brainage_bids.stats.group")

CORRECTED_COLUMNS = ["predicted_age_corrected", "brain_age_gap_corrected", "bias_method"]

#: The analyses run on each (model, suffix) analysis frame, in order.
PER_SUBSET = ("gap_summary", "gap_longitudinal", "gap_by_diagnosis", "gap_by_phenotype",
              "sex_by_diagnosis", "edss_by_diagnosis", "lm_gap_diagnosis", "lm_gap_phenotype",
              "lm_gap_duration", "lm_edss_gap", "psm")


class GroupRun:
    """State of one group-level run; :func:`run_group_analyses` is the entry point."""

    def __init__(self, bids_dir, output_dir, spec: dict, *, bias_fit_file=None):
        self.bids_dir = Path(bids_dir)
        self.output_dir = Path(output_dir)
        self.spec = spec
        self.group_dir = self.output_dir / "group"
        self.stats_dir = self.group_dir / "stats"
        self.fig_dir = self.group_dir / "figures"
        self.figures = StatsFigures(self.fig_dir)
        self.fit_file = bias_fit_file or spec["bias"]["fit_file"]
        self.controls = [str(c) for c in spec["controls"]]
        self.written: dict[str, Path] = {}
        self.skipped: list[dict] = []

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

    def attempt_pairs(self, name: str, subsets: list, func, none_reason: str) -> None:
        """:meth:`attempt` ``func`` on each subset, or record ``none_reason`` when there is none."""
        if subsets:
            self.attempt(name, func, subsets)
            return

        def none():
            raise Skip(none_reason)
        self.attempt(name, none)

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
        has_dx = self.has_diagnosis = dx in merged
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
        flags = self.spec["exclude_qc_flags"]
        is_flagged = flagged(merged, flags).to_numpy(dtype=bool)
        bias, self.fit_rows = fit_group_correction(
            merged, is_control_honest & ~is_flagged, patients, self.spec,
            output_dir=self.output_dir, fit_file=self.fit_file,
            n_training_excluded=self.n_training_excluded)
        bias["excluded_rows"] = [
            {"participant_id": r.participant_id,
             "session_id": None if pd.isna(r.session_id) else r.session_id,
             "model": r.model, "suffix": r.suffix, "lesion_filled": r.lesion_filled,
             "qc_flags": r.qc_flags}
            for r in merged[is_control_honest & is_flagged].itertuples()]
        corrected = apply_bias(merged, bias)
        out_cols = list(COLUMNS) + CORRECTED_COLUMNS
        atomic_write_text(self.group_dir / "brainage.tsv",
                          corrected[out_cols].to_csv(sep="\t", index=False, na_rep="n/a"))
        atomic_write_text(self.group_dir / "bias_correction.json",
                          json.dumps(bias_document(bias, self.controls, self.fit_file), indent=2)
                          + "\n")

        all_rows = corrected
        corrected = exclude_flagged(corrected, flags)
        controls = corrected[is_control_honest[corrected.index]] if len(corrected) else corrected
        controls = one_row_per_participant(controls[~is_lesion_filled(controls)]) \
            if len(controls) else controls
        spec, figures = self.spec, self.figures
        self.attempt("evaluation", lambda: analyses.evaluation(
            controls, spec, fit_rows=self.fit_rows, n_training_excluded=self.n_training_excluded,
            has_diagnosis=has_dx))
        self.attempt("site_mae", lambda: analyses.site_mae(controls, spec))
        self.attempt("model_comparison", lambda: analyses.model_comparison(controls, spec))
        try:
            figures.scatter(corrected, spec["columns"]["diagnosis"])
        except Exception as exc:  # a figure must not cost the tables
            LOG.warning("scatter figures failed: %s", exc)

        subsets, all_sessions = clinical_subsets(corrected, spec, has_dx)
        survival = worsening_frame(participants, sessions, spec)
        for name in PER_SUBSET:
            func = getattr(analyses, name)
            if name == "gap_longitudinal":
                func = partial(func, all_sessions=all_sessions)
            self.attempt(name, lambda sub, f=func: f(sub, spec), subsets)
        self.attempt("edss_worsening",
                     lambda: worsening.worsening_table(survival, participants, spec))
        self.attempt("roc_worsening",
                     lambda sub: worsening.roc_worsening(sub, spec, survival, figures), subsets)
        self.attempt("km_worsening",
                     lambda sub: worsening.km_worsening(sub, spec, survival, figures), subsets)
        self.attempt("cox_worsening", lambda sub: worsening.cox_worsening(sub, spec, survival),
                     subsets)
        self.lesion_filling_agreement(all_rows)
        self.contrast_agreement(all_rows)
        self.finish()
        return {"brainage": str(self.group_dir / "brainage.tsv"),
                "bias_correction": str(self.group_dir / "bias_correction.json"),
                "bias": [{k: f.get(k) for k in ("model", "suffix", "status", "n", "reason",
                                                "source")} for f in bias["fits"]],
                "tables": {k: str(v) for k, v in sorted(self.written.items())},
                "figures": [str(p) for p in self.figures.written],
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
        keep = {p.name for p in self.figures.written}
        for f in self.fig_dir.glob("*.png") if self.fig_dir.is_dir() else []:
            if f.name not in keep:
                f.unlink()

    # ---- raw versus lesion-filled (stats/agreement.py)
    def lesion_filling_agreement(self, df: pd.DataFrame) -> None:
        """Agreement of raw and lesion-filled brain age per (model, suffix). Rows carrying an
        ``exclude_qc_flags`` flag are left out, except for ``lesion_filling_disagreement``, which
        this analysis measures."""
        from .agreement import ANALYSIS, agreement_subsets

        flags = set(self.spec["exclude_qc_flags"]) - {"lesion_filling_disagreement"}
        if flags and len(df):
            df = df[~flagged(df, flags)]
        self.attempt_pairs(ANALYSIS, agreement_subsets(df), self._agreement,
                           "no lesion-filled rows (run the participant level with --lesion-masks)")

    def _agreement(self, pairs: pd.DataFrame) -> pd.DataFrame:
        from .agreement import agreement

        model, suffix = pairs.attrs["key"]
        if len(pairs) < 2:
            raise Skip(f"{len(pairs)} participant(s) with both raw and lesion-filled rows: at "
                       "least 2 are needed")
        table = agreement(pairs["raw"], pairs["filled"])
        self.figures.lesion_agreement(pairs, table, model, suffix)
        return table

    # ---- ages of the same session from different contrasts (stats/contrast_agreement.py)
    def contrast_agreement(self, df: pd.DataFrame) -> None:
        """Agreement of the ages of the same session read in two contrasts, per pair of
        contrasts; rows carrying an ``exclude_qc_flags`` flag are left out."""
        from .contrast_agreement import ANALYSIS, agreement_subsets

        flags = set(self.spec["exclude_qc_flags"])
        if flags and len(df):
            df = df[~flagged(df, flags)]
        self.attempt_pairs(ANALYSIS, agreement_subsets(df) if len(df) else [],
                           self._contrast_agreement, "no session read in two contrasts (run the "
                           "participant level with e.g. --modalities T1w FLAIR)")

    def _contrast_agreement(self, pairs: pd.DataFrame) -> pd.DataFrame:
        from .contrast_agreement import contrast_agreement

        a, b = pairs.attrs["suffixes"]
        if len(pairs) < 2:
            raise Skip(f"{len(pairs)} session(s) read in both {a} and {b}: at least 2 are needed")
        table = contrast_agreement(pairs)
        self.figures.contrast_agreement(pairs, table, a, b)
        return table


def run_group_analyses(bids_dir, output_dir, spec: dict, *, bias_fit_file=None) -> dict:
    """Run the group level (see the module docstring) and return a summary: paths of
    ``brainage.tsv`` and ``bias_correction.json``, the bias fits, the tables written, the figures
    and the skipped analyses with their reasons."""
    return GroupRun(bids_dir, output_dir, spec, bias_fit_file=bias_fit_file).run()
