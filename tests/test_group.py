"""Group level end to end: synthetic participant-level outputs with HC/RRMS/NMOSD and EDSS
follow-up, the stats spec, the command line, and the clinical data of the real datasets in
../shared/data (skipped when absent) with participant-level outputs written by the test."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import shared_dataset, write_participant_outputs, write_tsv

from brainage_bids.cli.parser import EXIT_USAGE, UsageError
from brainage_bids.cli.run import main
from brainage_bids.interfaces.predict import COLUMNS
from brainage_bids.stats.group import run_group_analyses
from brainage_bids.stats.spec import ANALYSES, DEFAULTS, load_spec, validate_spec
from brainage_bids.stats.table import STATS_COLUMNS

EFFECT = {"HC": 0.0, "NMOSD": 5.0, "RRMS": 10.0}  # true (bias-free) brain-age gap by diagnosis
SLOPE, INTERCEPT = 0.7, 15.0                      # model bias: predicted = 0.7 * brain age + 15
LOG_HR = 0.08                                     # hazard of EDSS worsening per year of gap
LONGITUDINAL_CHANGE = 2.0                         # extra gap at the follow-up scan of 12 RRMS


def write_brainage(out: Path, rows: list[dict]) -> None:
    """Participant-level desc-brainage TSVs (DESIGN.md contract), one file per scan."""
    df = pd.DataFrame(rows)
    for (pid, ses, suffix), g in df.groupby(["participant_id", "session_id", "suffix"],
                                            dropna=False, sort=False):
        sesdir = "" if pd.isna(ses) else f"/{ses}"
        stem = pid + ("" if pd.isna(ses) else f"_{ses}")
        d = out / f"{pid}{sesdir}" / "anat"
        d.mkdir(parents=True, exist_ok=True)
        g.reindex(columns=list(COLUMNS)).to_csv(d / f"{stem}_desc-brainage_{suffix}.tsv",
                                                sep="\t", index=False, na_rep="n/a")


def make_cohort(root: Path, n=(60, 45, 45), seed=0) -> tuple[Path, Path, pd.DataFrame]:
    """BIDS dir (participants.tsv, sessions.tsv with EDSS follow-up) and an output dir with
    predictions of two models (m1, ensemble) on T1w and FLAIR for HC, NMOSD and RRMS."""
    rng = np.random.default_rng(seed)
    bids, out = root / "bids", root / "out"
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "synthetic", "BIDSVersion": "1.9.0"}))
    people, rows = [], []
    for dx, k in zip(("HC", "NMOSD", "RRMS"), n):
        for i in range(k):
            pid = f"sub-{dx.lower()}{i:03d}"
            age = float(rng.uniform(20, 75))
            sex = "F" if rng.random() < (0.5 if dx == "HC" else 0.75) else "M"
            true_gap = EFFECT[dx] + rng.normal(0, 3)
            p = {"participant_id": pid, "age": round(age, 2), "sex": sex, "diagnosis": dx,
                 "phenotype": None if dx == "HC" else ("RRMS" if dx == "RRMS" else "NMOSD"),
                 "site": "A" if i % 2 else "B", "true_gap": true_gap,
                 "disease_duration": None if dx == "HC" else round(float(rng.uniform(0, 15)), 1)}
            people.append(p)
            # patients are scanned at baseline (ses-1); 12 RRMS again 2 years later (ses-3), their
            # brain having aged 2 years more than they did
            scans = [(None if dx == "HC" else "ses-1", 0.0, 0.0)]
            if dx == "RRMS" and i < 12:
                scans.append(("ses-3", 2.0, LONGITUDINAL_CHANGE))
            for ses, years, extra in scans:
                for model, suffix, sd in (("m1", "T1w", 3.0), ("m1", "FLAIR", 5.0),
                                          ("ensemble", "T1w", 2.0), ("ensemble", "FLAIR", 2.5)):
                    a = round(age + years, 2)
                    pred = SLOPE * (a + true_gap + extra) + INTERCEPT + rng.normal(0, sd)
                    rows.append({"participant_id": pid, "session_id": ses,
                                 "source_file": f"{pid}/anat/{pid}_{suffix}.nii.gz",
                                 "suffix": suffix, "model": model, "chronological_age": a,
                                 "predicted_age": pred, "predicted_age_sd": 4.0,
                                 "brain_age_gap": pred - a, "lesion_filled": "false",
                                 "qc_flags": None})
    write_tsv(bids / "participants.tsv",
              ["participant_id", "age", "sex", "diagnosis", "phenotype", "site",
               "disease_duration"],
              [[p[c] for c in ("participant_id", "age", "sex", "diagnosis", "phenotype", "site",
                               "disease_duration")] for p in people])
    # EDSS follow-up of patients: yearly visits for 6 years; worsening at an exponential time
    # whose hazard grows with the true gap
    for p in people:
        if p["diagnosis"] == "HC":
            continue
        base = float(rng.choice([1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0]))
        p["edss"] = base
        t_event = rng.exponential(1 / (0.08 * np.exp(LOG_HR * (p["true_gap"] - 7))))
        sdir = bids / p["participant_id"]
        sdir.mkdir(parents=True, exist_ok=True)
        visits = []
        for year in range(7):
            step = (1.0 if base <= 5.5 else 0.5) if year >= t_event else 0.0
            visits.append([f"ses-{year + 1}", round(p["age"] + year, 2), int(year * 365.25),
                           base + step])
        write_tsv(sdir / f"{p['participant_id']}_sessions.tsv",
                  ["session_id", "age", "days_since_baseline", "edss"], visits)
    write_brainage(out, rows)
    return bids, out, pd.DataFrame(people)


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    bids, out, people = make_cohort(root)
    spec = validate_spec({"bootstrap": {"n": 300, "seed": 1},
                          "psm": {"treatment": ["NMOSD", "RRMS"]}})
    summary = run_group_analyses(bids, out, spec)
    return bids, out, people, summary


def _read(path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)


def test_group_writes_every_table_with_stats_columns(cohort_run):
    _, out, _, summary = cohort_run
    stats_dir = out / "group" / "stats"
    expected = {"evaluation", "site_mae", "model_comparison", "gap_summary", "gap_longitudinal",
                "gap_by_diagnosis",
                "gap_by_phenotype", "sex_by_diagnosis", "edss_by_diagnosis", "lm_gap_diagnosis",
                "lm_gap_phenotype", "lm_gap_duration", "lm_edss_gap", "psm_balance", "psm_pairs",
                "psm_gap", "edss_worsening", "roc_worsening", "km_worsening",
                "logrank_worsening", "cox_worsening", "skipped"}
    written = {p.stem for p in stats_dir.glob("*.tsv")}
    assert expected <= written, expected - written
    for f in stats_dir.glob("*.tsv"):
        df = _read(f)
        assert list(df.columns[:7]) == STATS_COLUMNS, f.name
        if f.stem != "skipped":
            assert len(df), f.name
    assert set(summary["tables"]) == written
    figures = {p.name for p in (out / "group" / "figures").glob("*.png")}
    assert "scatter_ensemble_T1w.png" in figures
    assert any(f.startswith("km_worsening_ensemble_T1w") for f in figures)
    assert any(f.startswith("roc_worsening_ensemble_FLAIR") for f in figures)


def test_group_contrast_agreement_of_t1w_and_flair_sessions(cohort_run):
    """Every session of the cohort has T1w and FLAIR rows: the table's Bland-Altman figures are
    those of the ensemble rows' FLAIR - T1w differences, recomputed here."""
    _, out, _, _ = cohort_run
    table = _read(out / "group" / "stats" / "contrast_agreement.tsv").set_index("term")
    rows = _read(out / "group" / "brainage.tsv")
    ens = rows[(rows["model"] == "ensemble") & (rows["lesion_filled"].astype(str).str.lower() == "false")]
    wide = ens.assign(session_id=ens["session_id"].fillna("")).pivot(
        index=["participant_id", "session_id"], columns="suffix", values="predicted_age").dropna()
    diff = wide["FLAIR"] - wide["T1w"]
    assert table.loc["mean_difference", "n"] == len(diff) > 100
    assert table.loc["mean_difference", "estimate"] == pytest.approx(diff.mean(), abs=1e-6)
    assert table.loc["sd_difference", "estimate"] == pytest.approx(diff.std(ddof=1), abs=1e-6)
    assert table.loc["mean_absolute_difference", "estimate"] == pytest.approx(diff.abs().mean(),
                                                                             abs=1e-6)
    assert table.loc["loa_upper", "estimate"] == pytest.approx(
        diff.mean() + 1.96 * diff.std(ddof=1), abs=1e-6)
    assert set(table["suffix_a"]) == {"T1w"} and set(table["suffix_b"]) == {"FLAIR"}
    assert any(p.name.startswith("contrast_agreement_")
               for p in (out / "group" / "figures").glob("*.png"))


def test_group_table_and_bias_json(cohort_run):
    _, out, people, _ = cohort_run
    table = _read(out / "group" / "brainage.tsv")
    assert list(table.columns) == list(COLUMNS) + ["predicted_age_corrected",
                                                   "brain_age_gap_corrected", "bias_method"]
    assert len(table) == (150 + 12) * 4 and set(table["bias_method"]) == {"cole"}
    bias = json.loads((out / "group" / "bias_correction.json").read_text())
    assert bias["method"] == "cole" and len(bias["fits"]) == 4
    hc = set(people.loc[people["diagnosis"] == "HC", "participant_id"])
    for fit in bias["fits"]:
        assert fit["status"] == "fitted" and fit["n"] == 60 and fit["source"] == "table"
        assert {r["participant_id"] for r in fit["rows"]} == hc  # controls only
        assert abs(fit["slope"] - SLOPE) < 3 * fit["slope_se"]  # four fits: 3 SE, not the 95 % CI
    # corrected gaps of controls ~ 0 and uncorrelated with age
    hc_rows = table[table["participant_id"].isin(hc)]
    for _, g in hc_rows.groupby(["model", "suffix"]):
        assert abs(np.polyfit(g["chronological_age"], g["brain_age_gap_corrected"], 1)[0]) < 1e-6


def test_group_clinical_effects_recovered(cohort_run):
    _, out, _, _ = cohort_run
    stats_dir = out / "group" / "stats"
    lm = _read(stats_dir / "lm_gap_diagnosis.tsv")
    lm = lm[(lm["model"] == "ensemble") & (lm["suffix"] == "T1w")].set_index("term")
    assert lm["gap"].eq("brain_age_gap_corrected").all()
    for dx in ("NMOSD", "RRMS"):  # the true gap differences against HC are inside the CIs
        row = lm.loc[f"C(diagnosis)[T.{dx}]"]
        assert row["ci_low"] < EFFECT[dx] < row["ci_high"], (dx, row)
    gbd = _read(stats_dir / "gap_by_diagnosis.tsv")
    assert {"one-way ANOVA", "Tukey HSD"} <= set(gbd["method"])
    ev = _read(stats_dir / "evaluation.tsv")
    assert {"raw", "corrected"} == set(ev["prediction"])
    assert (ev.loc[ev["prediction"] == "corrected", "bias_fit_overlap"] == 1.0).all()
    mc = _read(stats_dir / "model_comparison.tsv")
    assert set(mc["prediction"]) == {"predicted_age", "predicted_age_corrected"}
    # raw MAE equals the evaluation's
    raw = mc[(mc["model_a"] == "m1") & (mc["suffix_a"] == "FLAIR") & (mc["test"] == "paired")
             & (mc["prediction"] == "predicted_age")].iloc[0]
    mae = ev[(ev["term"] == "mae") & (ev["prediction"] == "raw") & (ev["model"] == "m1")]
    mae = mae.set_index("suffix")["estimate"]
    assert raw["estimate"] == pytest.approx(mae["FLAIR"] - mae["T1w"])
    # after bias correction the noise dominates: FLAIR (sd 5) is worse than T1w (sd 3)
    row = mc[(mc["model_a"] == "m1") & (mc["suffix_a"] == "FLAIR") & (mc["test"] == "paired")
             & (mc["prediction"] == "predicted_age_corrected")]
    # corrected error = true gap (sd 3) + noise / 0.7: true MAE difference sqrt(2/pi) * (sd1 - sd2)
    sd = {s: np.sqrt(9 + (n / SLOPE) ** 2) for s, n in (("FLAIR", 5.0), ("T1w", 3.0))}
    true = np.sqrt(2 / np.pi) * (sd["FLAIR"] - sd["T1w"])
    assert len(row) == 1 and row["estimate"].iloc[0] > 0
    assert row["ci_low"].iloc[0] < true < row["ci_high"].iloc[0]
    cox = _read(stats_dir / "cox_worsening.tsv")
    gap = cox[(cox["term"] == "gap") & (cox["model"] == "ensemble") & (cox["suffix"] == "T1w")
              & (cox["subgroup"] == "all patients")]
    assert sorted(gap["cox_model"]) == ["multivariable", "univariable"]
    uni = gap[gap["cox_model"] == "univariable"].iloc[0]
    assert uni["estimate"] > 1 and uni["p_value"] < 0.05
    assert uni["ci_low"] < np.exp(LOG_HR) < uni["ci_high"]
    lon = _read(stats_dir / "gap_longitudinal.tsv")
    lon = lon[(lon["model"] == "ensemble") & (lon["suffix"] == "T1w")].set_index("term")
    assert lon.loc["change", "n"] == 12
    assert lon.loc["change", "ci_low"] < LONGITUDINAL_CHANGE < lon.loc["change", "ci_high"]
    assert "Wilcoxon signed-rank" in lon.loc["gap_last - gap_baseline", "method"]
    summ = _read(stats_dir / "gap_summary.tsv")
    summ = summ[(summ["model"] == "ensemble") & (summ["suffix"] == "T1w")].set_index("term")
    assert abs(summ.loc["mean_gap[HC]", "estimate"]) < 1e-6  # in-sample Cole correction
    rrms = summ.loc["mean_gap[RRMS]"]
    assert rrms["ci_low"] < EFFECT["RRMS"] < rrms["ci_high"]
    psm = _read(stats_dir / "psm_gap.tsv")
    assert set(psm["treated_level"]) == {"NMOSD"}
    wors = _read(stats_dir / "edss_worsening.tsv")
    assert wors["source"].iloc[0].startswith("sessions.tsv (edss, days_since_baseline")
    skipped = _read(stats_dir / "skipped.tsv")
    assert not skipped["reason"].astype(str).str.startswith("error").any(), skipped


def test_group_skips_with_reasons(tmp_path, caplog):
    """Patients only, no follow-up, no phenotype: what cannot run is listed with a reason."""
    bids, out, _ = make_cohort(tmp_path, n=(0, 0, 8))
    for f in bids.glob("sub-*/sub-*_sessions.tsv"):
        f.unlink()
    with caplog.at_level(logging.INFO, logger="brainage_bids"):
        summary = run_group_analyses(bids, out, validate_spec({}))
    skipped = _read(out / "group" / "stats" / "skipped.tsv")
    assert list(skipped.columns[:7]) == STATS_COLUMNS and "reason" in skipped
    reasons = dict(zip(skipped["analysis"], skipped["reason"]))
    assert "no healthy controls" in reasons["evaluation"]
    assert "fewer than 2 diagnosis groups" in reasons["gap_by_diagnosis"]
    assert "no EDSS follow-up" in reasons["cox_worsening"]
    assert "no EDSS follow-up" in reasons["edss_worsening"]
    assert not any(str(r).startswith("error") for r in reasons.values())
    assert "analysis gap_by_diagnosis skipped" in caplog.text
    bias = json.loads((out / "group" / "bias_correction.json").read_text())
    assert all(f["status"] == "skipped" for f in bias["fits"])
    table = _read(out / "group" / "brainage.tsv")
    assert table["brain_age_gap_corrected"].isna().all()
    # without correction, clinical tables use the raw gap and say so
    assert set(_read(out / "group" / "stats" / "lm_gap_duration.tsv")["gap"]) == {"brain_age_gap"}
    assert {s["analysis"] for s in summary["skipped"]} == set(skipped["analysis"])


def test_followup_from_participants_and_covariates(tmp_path):
    """Follow-up time and event straight from participants.tsv (names from the spec), and an
    extra covariate in the linear, Cox and matching models."""
    bids, out, _ = make_cohort(tmp_path, n=(20, 30, 30))
    for f in bids.glob("sub-*/sub-*_sessions.tsv"):
        f.unlink()
    rng = np.random.default_rng(5)
    p = _read(bids / "participants.tsv")
    patient = p["diagnosis"] != "HC"
    p["fu_days"] = np.where(patient, rng.uniform(300, 3000, len(p)).round(), np.nan)
    p["worse"] = np.where(patient, rng.choice(["yes", "no"], len(p)), None)
    p["EDSS"] = np.where(patient, rng.choice([1.0, 2.0, 3.5], len(p)), np.nan)
    p["nbv"] = rng.normal(0.74, 0.04, len(p)).round(3)
    p.to_csv(bids / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    spec = validate_spec({"columns": {"edss": "EDSS"}, "covariates": ["nbv"],
                          "worsening": {"followup_time": "fu_days", "followup_unit": "days",
                                        "event": "worse"},
                          "psm": {"covariates": ["age", "sex", "nbv"]},
                          "rows": {"model": "m1", "suffix": ["T1w"]}, "bootstrap": {"n": 50}})
    run_group_analyses(bids, out, spec)
    stats_dir = out / "group" / "stats"
    w = _read(stats_dir / "edss_worsening.tsv")
    assert w["source"].iloc[0] == "participants.tsv (fu_days, worse)"
    per = w[w["term"].str.startswith("sub-")].set_index("term")
    assert len(per) == 60
    assert per["estimate"].max() <= 3000 / 365.25 + 1e-9  # days turned into years
    cox = _read(stats_dir / "cox_worsening.tsv")
    assert {"cov_nbv", "gap", "baseline_edss"} <= set(cox["term"])
    assert set(cox["model"]) == {"m1"} and set(cox["suffix"]) == {"T1w"}
    lm = _read(stats_dir / "lm_gap_diagnosis.tsv")
    assert "cov_nbv" in set(lm["term"]) and "nbv" in lm["formula"].iloc[0]
    assert set(_read(stats_dir / "lm_edss_gap.tsv")["n"]) == {60}
    bal = _read(stats_dir / "psm_balance.tsv")
    assert "cov_nbv" in set(bal["term"])


def test_failing_analysis_does_not_stop_others(tmp_path, monkeypatch):
    bids, out, _ = make_cohort(tmp_path, n=(20, 15, 15))
    from brainage_bids.stats import clinical

    def boom(*a, **k):
        raise RuntimeError("synthetic failure")
    monkeypatch.setattr(clinical, "chi_square", boom)
    run_group_analyses(bids, out, validate_spec({"bootstrap": {"n": 50}}))
    skipped = _read(out / "group" / "stats" / "skipped.tsv")
    reason = skipped.loc[skipped["analysis"] == "sex_by_diagnosis", "reason"]
    assert len(reason) and reason.str.contains("RuntimeError: synthetic failure").all()
    assert (out / "group" / "stats" / "gap_by_diagnosis.tsv").exists()
    assert not (out / "group" / "stats" / "sex_by_diagnosis.tsv").exists()


def test_training_participants_left_out(tmp_path, caplog):
    """Controls the model was trained on (model card of this dataset) are in-sample: they are
    kept out of the bias fit and the accuracy figures."""
    bids, out, people = make_cohort(tmp_path, n=(40, 10, 10))
    train = sorted(people.loc[people["diagnosis"] == "HC", "participant_id"])[:25]
    card = {"name": "m1", "training_data": {"bids_dir": str(bids)},
            "split_participants": {"train": train[:20], "validation": train[20:],
                                   "test": ["sub-hc039"]}}
    (out / "models" / "m1").mkdir(parents=True)
    (out / "models" / "m1" / "m1_card.json").write_text(json.dumps(card))
    with caplog.at_level(logging.WARNING):
        run_group_analyses(bids, out, validate_spec({"bootstrap": {"n": 50}}))
    assert "trained or selected on" in caplog.text
    fits = {(f["model"], f["suffix"]): f for f in
            json.loads((out / "group" / "bias_correction.json").read_text())["fits"]}
    # the ensemble averages m1 with other members, so it is in-sample for m1's training set too
    assert fits[("m1", "T1w")]["n"] == 15 and fits[("ensemble", "T1w")]["n"] == 15
    assert not {r["participant_id"] for r in fits[("m1", "T1w")]["rows"]} & set(train)
    ev = _read(out / "group" / "stats" / "evaluation.tsv").query("term == 'mae'")
    assert set(ev.loc[ev["model"] == "m1", "n"]) == {15}
    assert set(ev.loc[ev["model"] == "m1", "n_training_excluded"]) == {25}
    assert set(ev.loc[ev["model"] == "ensemble", "n"]) == {15}
    # a card of another dataset changes nothing
    card["training_data"] = {"bids_dir": str(tmp_path / "elsewhere"), "dataset": "other"}
    (out / "models" / "m1" / "m1_card.json").write_text(json.dumps(card))
    run_group_analyses(bids, out, validate_spec({"bootstrap": {"n": 50}}))
    ev = _read(out / "group" / "stats" / "evaluation.tsv").query("term == 'mae'")
    assert set(ev["n"]) == {40}


def test_bias_fit_file_and_oof(tmp_path):
    bids, out, _ = make_cohort(tmp_path, n=(30, 10, 10))
    rng = np.random.default_rng(3)
    ages = rng.uniform(20, 80, 40)
    oof = pd.DataFrame({"participant_id": [f"sub-train{i}" for i in range(40)], "session_id": None,
                        "suffix": "T1w", "model": "m1", "chronological_age": ages,
                        "predicted_age": 0.6 * ages + 20 + rng.normal(0, 2, 40), "fold": 0})
    (out / "models" / "m1").mkdir(parents=True)
    oof.to_csv(out / "models" / "m1" / "oof_predictions.tsv", sep="\t", index=False, na_rep="n/a")
    run_group_analyses(bids, out, validate_spec({"bootstrap": {"n": 50}}))
    bias = {(f["model"], f["suffix"]): f for f in
            json.loads((out / "group" / "bias_correction.json").read_text())["fits"]}
    assert bias[("m1", "T1w")]["source"] == "oof" and bias[("m1", "T1w")]["n"] == 40
    assert bias[("m1", "FLAIR")]["source"] == "table"
    ev = _read(out / "group" / "stats" / "evaluation.tsv")
    assert "oof" in set(ev["source"])
    # the command line: --bias-fit-file wins, --bias-method beheshti
    fit = tmp_path / "fit.tsv"
    oof.assign(model="ensemble").to_csv(fit, sep="\t", index=False, na_rep="n/a")
    assert main([str(bids), str(out), "group", "--bias-fit-file", str(fit), "--bias-method",
                 "beheshti", "-w", str(tmp_path / "w")]) == 0
    doc = json.loads((out / "group" / "bias_correction.json").read_text())
    bias = {(f["model"], f["suffix"]): f for f in doc["fits"]}
    assert doc["method"] == "beheshti" and bias[("ensemble", "T1w")]["source"] == "file:fit.tsv"
    assert bias[("m1", "T1w")]["source"] == "oof"  # the file has no m1 rows: next preference
    assert bias[("m1", "FLAIR")]["source"] == "table"


# ---------------------------------------------------------------------------------------------
# the spec
def test_spec_defaults_and_example_file():
    spec = validate_spec(None)
    assert spec["controls"] == ["HC"] and spec["bias"]["method"] == "cole"
    assert spec["roc"]["specificity"] == 0.8 and spec["columns"] == DEFAULTS["columns"]
    example = (Path(__file__).resolve().parents[1] / "brainage_bids" / "data"
               / "stats_spec_example.yml")
    assert load_spec(example) == spec  # the example documents the defaults


@pytest.mark.parametrize("doc,key", [
    ({"bias": {"methd": "cole"}}, "bias.methd"),
    ({"colums": {}}, "colums"),
    ({"bias": {"method": "smith"}}, "bias.method"),
    ({"bootstrap": {"n": "many"}}, "bootstrap.n"),
    ({"roc": {"specificity": 1.5}}, "roc.specificity"),
    ({"controls": [{"a": 1}]}, "controls"),
    ({"psm": {"treatment": ["RRMS"]}}, "psm.treatment"),
    ({"bootstrap": {"seed": True}}, "bootstrap.seed"),
    ({"skip_analyses": ["cox"]}, "skip_analyses"),
])
def test_spec_errors_name_the_key(doc, key):
    with pytest.raises(UsageError) as err:
        validate_spec(doc)
    assert err.value.exit_code == EXIT_USAGE and repr(key) in str(err.value)


def test_spec_values(tmp_path):
    f = tmp_path / "spec.yml"
    f.write_text("controls: healthy\ncolumns:\n  edss: EDSS\nmodel_comparison:\n"
                 "  pairs: [[ensemble/FLAIR, ensemble/T1w]]\n")
    spec = load_spec(f)
    assert spec["controls"] == ["healthy"] and spec["columns"]["edss"] == "EDSS"
    assert spec["columns"]["sex"] == "sex"
    assert spec["model_comparison"]["pairs"] == [[("ensemble", "FLAIR"), ("ensemble", "T1w")]]


def test_cli_bad_spec_exits_64(tmp_path, caplog):
    bids, out, _ = make_cohort(tmp_path, n=(3, 0, 3))
    spec = tmp_path / "bad.yml"
    spec.write_text("bias:\n  methd: cole\n")
    code = main([str(bids), str(out), "group", "--stats-spec", str(spec),
                 "-w", str(tmp_path / "w")])
    assert code == 64
    assert "unknown key 'bias.methd'" in caplog.text
    assert not (out / "group").exists()
    spec.write_text("bias: [1, 2\n")
    assert main([str(bids), str(out), "group", "--stats-spec", str(spec)]) == 64
    assert main([str(bids), str(out), "group", "--stats-spec", str(tmp_path / "none.yml")]) == 66


def test_skip_analyses(tmp_path):
    bids, out, _ = make_cohort(tmp_path, n=(12, 6, 6))
    run_group_analyses(bids, out, validate_spec({"skip_analyses": ["psm", "cox_worsening"],
                                                 "bootstrap": {"n": 50}}))
    skipped = _read(out / "group" / "stats" / "skipped.tsv")
    reasons = dict(zip(skipped["analysis"], skipped["reason"]))
    assert reasons["psm"] == reasons["cox_worsening"] == "listed in skip_analyses of the stats spec"
    assert not (out / "group" / "stats" / "psm_gap.tsv").exists()
    # every analysis the group level runs is a known name, and can be switched off
    summary = run_group_analyses(bids, out, validate_spec({"skip_analyses": list(ANALYSES)}))
    assert [s["analysis"] for s in summary["skipped"]] == list(ANALYSES)
    assert [p.name for p in (out / "group" / "stats").glob("*.tsv")] == ["skipped.tsv"]


def test_cli_no_participant_tables(tmp_path):
    bids, _, _ = make_cohort(tmp_path, n=(2, 0, 0))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(bids), str(empty), "group", "-w", str(tmp_path / "w")]) == 66


# ---------------------------------------------------------------------------------------------
# the real datasets of ../shared/data (participants.tsv, sessions.tsv, scans) with participant-level
# outputs written by the test (conftest.write_participant_outputs)
def _group_on_shared(tmp_path, dataset: str, models: dict, participants=None):
    bids = shared_dataset(dataset)
    out = tmp_path / "out"
    rows = write_participant_outputs(bids, out, models, participants=participants)
    code = main([str(bids), str(out), "group", "-w", str(tmp_path / "w")])
    assert code == 0
    stats_dir = out / "group" / "stats"
    for f in stats_dir.glob("*.tsv"):
        assert list(_read(f).columns[:7]) == STATS_COLUMNS, f.name
    skipped = _read(stats_dir / "skipped.tsv")
    assert not skipped["reason"].astype(str).str.startswith("error").any(), skipped
    return out, rows, skipped


def test_group_on_ms_patients_only(tmp_path):
    """The 3 MS patients of ms-lesjak2018-mni (T1w, default model): no controls, so no accuracy
    figures and no bias fit; EDSS at one visit only, so no worsening analyses."""
    out, rows, skipped = _group_on_shared(tmp_path, "ms-lesjak2018-mni",
                                          {"T1w": ["ixi-sfcn-2mm"]})
    reasons = dict(zip(skipped["analysis"], skipped["reason"]))
    assert "no healthy controls" in reasons["evaluation"]
    assert "no EDSS follow-up" in reasons["cox_worsening"]
    bias = json.loads((out / "group" / "bias_correction.json").read_text())
    assert [f["status"] for f in bias["fits"]] == ["skipped"]
    table = _read(out / "group" / "brainage.tsv")
    assert len(table) == len(rows) == 3
    assert table["brain_age_gap_corrected"].isna().all()
    # the group table carries the participant tables' predictions and the BIDS ages
    t = table.set_index("participant_id")
    r = rows.set_index("participant_id")
    assert t.loc[r.index, "predicted_age"].tolist() == pytest.approx(r["predicted_age"].tolist())
    assert t.loc[r.index, "chronological_age"].tolist() == [53.0, 47.0, 40.0]


def test_group_on_ixi_test_split(tmp_path):
    """Three IXI controls of the default model's test split and two of its training split: the
    accuracy is reported on the three (the two are in-sample, per the packaged model card), too
    few for a bias correction."""
    test, train = ["sub-IXI049", "sub-IXI093", "sub-IXI095"], ["sub-IXI012", "sub-IXI014"]
    out, rows, _ = _group_on_shared(tmp_path, "ixi-t1-2mm", {"T1w": ["ixi-sfcn-2mm"]},
                                    participants=test + train)
    ev = _read(out / "group" / "stats" / "evaluation.tsv")
    assert set(ev["n"]) == {3} and set(ev["n_training_excluded"]) == {2}
    held = rows[rows["participant_id"].isin(test)]
    mae = ev[(ev["term"] == "mae") & (ev["prediction"] == "raw")]["estimate"]
    assert mae.tolist() == pytest.approx([held["brain_age_gap"].abs().mean()], abs=1e-3)
    fit = json.loads((out / "group" / "bias_correction.json").read_text())["fits"][0]
    assert fit["status"] == "skipped" and "minimum of 10" in fit["reason"]


def test_group_on_longitudinal_ms(tmp_path):
    """The 8 T1w scans of ms-lesjak2016-longitudinal (two patients scanned twice): session ages
    from sessions.tsv, the gap change from the first to the second scan, no EDSS so no worsening
    analysis."""
    out, rows, skipped = _group_on_shared(tmp_path, "ms-lesjak2016-longitudinal",
                                          {"T1w": ["ixi-sfcn-2mm"]})
    reasons = dict(zip(skipped["analysis"], skipped["reason"]))
    assert "edss" in reasons["edss_worsening"]
    table = _read(out / "group" / "brainage.tsv")
    assert len(table) == len(rows) == 8
    ages = table.set_index(["participant_id", "session_id"])["chronological_age"]
    assert ages[("sub-patient03", "ses-2")] == 20.84 and ages[("sub-patient12", "ses-2")] == 19.22
    lon = _read(out / "group" / "stats" / "gap_longitudinal.tsv").set_index("term")
    gap = rows.pivot(index="participant_id", columns="session_id",
                     values="brain_age_gap").dropna()
    assert sorted(gap.index) == ["sub-patient01", "sub-patient12"]
    assert lon.loc["change", "n"] == 2
    assert lon.loc["change", "estimate"] == pytest.approx((gap["ses-2"] - gap["ses-1"]).mean(),
                                                         abs=1e-3)


def test_bias_fit_leaves_out_qc_flagged_controls(tmp_path):
    """A control excluded by ``exclude_qc_flags`` (here predicted at 150) is not in the bias fit,
    and bias_correction.json lists it as excluded."""
    bids, out, people = make_cohort(tmp_path, n=(30, 10, 10))
    f = out / "sub-hc000" / "anat" / "sub-hc000_desc-brainage_T1w.tsv"
    t = pd.read_csv(f, sep="\t", dtype=str, keep_default_na=False)
    t.loc[t["model"] == "m1", ["predicted_age", "qc_flags"]] = ["150.0", "low_registration"]
    t.to_csv(f, sep="\t", index=False, na_rep="n/a")
    spec = validate_spec({"bootstrap": {"n": 50}, "exclude_qc_flags": ["low_registration"]})
    run_group_analyses(bids, out, spec)
    doc = json.loads((out / "group" / "bias_correction.json").read_text())
    fits = {(g["model"], g["suffix"]): g for g in doc["fits"]}
    fit = fits[("m1", "T1w")]
    assert fit["n"] == 29 and "sub-hc000" not in {r["participant_id"] for r in fit["rows"]}
    assert fits[("ensemble", "T1w")]["n"] == 30  # the unflagged rows of that scan stay
    # the slope is the one of the 29 unflagged controls
    table = _read(out / "group" / "brainage.tsv")
    hc = table[table["participant_id"].str.startswith("sub-hc") & (table["model"] == "m1")
               & (table["suffix"] == "T1w") & (table["participant_id"] != "sub-hc000")]
    expected = np.polyfit(hc["chronological_age"], hc["predicted_age"], 1)[0]
    assert fit["slope"] == pytest.approx(expected, rel=1e-9)
    excluded = doc["excluded_rows"]
    assert excluded == [{"participant_id": "sub-hc000", "session_id": None, "model": "m1",
                         "suffix": "T1w", "lesion_filled": "false",
                         "qc_flags": "low_registration"}]


def test_group_ages_parsed_and_sessions_not_given_participant_age(tmp_path, caplog):
    """The group level reads ages as the participant level does: impossible or unreadable ones
    are n/a with a warning naming file and line, and a session row without its own age does not
    take the participants.tsv one."""
    from brainage_bids.stats.group import merge_clinical, read_clinical

    bids = tmp_path / "bids"
    (bids / "sub-02").mkdir(parents=True)
    write_tsv(bids / "participants.tsv", ["participant_id", "age", "sex"],
              [["sub-01", "300", "F"], ["sub-02", "40", "M"], ["sub-03", "45Y", "F"]])
    write_tsv(bids / "sub-02" / "sub-02_sessions.tsv", ["session_id", "age"],
              [["ses-1", "40"], ["ses-2", "n/a"]])
    with caplog.at_level(logging.WARNING):
        participants, sessions = read_clinical(bids)
    assert f"{bids / 'participants.tsv'} line 2: age '300' is outside 0-120 years" in caplog.text
    table = pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-02", "sub-03"],
                          "session_id": [None, "ses-1", "ses-2", None],
                          "chronological_age": np.nan})
    merged = merge_clinical(table, participants, sessions)
    assert merged["age"].tolist()[:1] == [pytest.approx(np.nan, nan_ok=True)]
    assert merged["age"].iloc[1] == 40.0
    assert np.isnan(merged["age"].iloc[2])  # ses-2 has no age: not the participants.tsv 40
    assert merged["age"].iloc[3] == 45.0


def test_bad_participant_tables_are_named_and_left_out(tmp_path, caplog):
    """A truncated table, a binary-garbage one and one without contract columns are named in a
    warning and left out; the group table has no junk row. With no valid table: exit 65."""
    bids, out, _ = make_cohort(tmp_path, n=(12, 4, 4))
    anat = out / "sub-hc000" / "anat"
    truncated = anat / "sub-hc000_desc-brainage_T1w.tsv"
    text = truncated.read_text()
    truncated.write_text(text[: text.index("\n", text.index("\n") + 1) + 20])  # cut in row 2
    garbage = out / "sub-hc001" / "anat" / "sub-hc001_desc-brainage_T1w.tsv"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    nocols = out / "sub-hc002" / "anat" / "sub-hc002_desc-brainage_T1w.tsv"
    nocols.write_text("participant_id\tpredicted_age\nsub-hc002\t50\n")
    with caplog.at_level(logging.WARNING):
        assert main([str(bids), str(out), "group", "-w", str(tmp_path / "w")]) == 0
    for f in (truncated, garbage, nocols):
        assert f"{f} " in caplog.text and "left out of the group level" in caplog.text
    table = _read(out / "group" / "brainage.tsv")
    assert table["model"].notna().all() and table["suffix"].notna().all()
    assert set(table["model"]) == {"m1", "ensemble"}
    left = table[table["suffix"] == "T1w"]["participant_id"]
    assert not {"sub-hc000", "sub-hc001", "sub-hc002"} & set(left)
    bias = json.loads((out / "group" / "bias_correction.json").read_text())
    assert {f["model"] for f in bias["fits"]} == {"m1", "ensemble"}
    # nothing valid: exit 65 naming the file
    only = tmp_path / "only"
    (only / "sub-x" / "anat").mkdir(parents=True)
    (only / "sub-x" / "anat" / "sub-x_desc-brainage_T1w.tsv").write_bytes(b"\x00\xff" * 500)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main([str(bids), str(only), "group", "-w", str(tmp_path / "w2")]) == 65
    assert "sub-x_desc-brainage_T1w.tsv" in caplog.text
