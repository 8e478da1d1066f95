"""Age-bias correction: known slopes are recovered, only controls are used, raw columns survive."""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from brainage_bids.stats.bias import (
    apply_bias,
    choose_fit_rows,
    fit_bias,
    one_row_per_participant,
)

SLOPE, INTERCEPT = 0.7, 15.0  # predicted = 0.7 * age + 15: the young look older, the old younger


def cohort(n_hc=120, n_pat=40, seed=0, model="m1", suffix="T1w", noise=3.0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_hc):
        age = rng.uniform(20, 80)
        rows.append({"participant_id": f"sub-hc{i:03d}", "session_id": np.nan, "suffix": suffix,
                     "model": model, "chronological_age": age, "diagnosis": "HC",
                     "predicted_age": SLOPE * age + INTERCEPT + rng.normal(0, noise)})
    for i in range(n_pat):
        age = rng.uniform(20, 60)
        # patients look 10 years older on top of the bias, and would pull a fit upward
        rows.append({"participant_id": f"sub-ms{i:03d}", "session_id": np.nan, "suffix": suffix,
                     "model": model, "chronological_age": age, "diagnosis": "RRMS",
                     "predicted_age": SLOPE * (age + 10) + INTERCEPT + rng.normal(0, noise)})
    df = pd.DataFrame(rows)
    df["brain_age_gap"] = df["predicted_age"] - df["chronological_age"]
    df["lesion_filled"] = "false"
    return df


def _fit_on_table(df, method):
    fit_rows = choose_fit_rows(df, df["diagnosis"].eq("HC"), patient_ids=set(
        df.loc[df["diagnosis"] != "HC", "participant_id"]))
    return fit_rows, fit_bias(fit_rows, method)


@pytest.mark.parametrize("method,true_slope,true_intercept",
                         [("cole", SLOPE, INTERCEPT), ("beheshti", SLOPE - 1, INTERCEPT)])
def test_known_slope_recovered_and_patients_excluded(method, true_slope, true_intercept, caplog):
    df = cohort()
    with caplog.at_level(logging.WARNING):
        _, params = _fit_on_table(df, method)
    assert "optimistic" in caplog.text  # fitted on the table's own controls: say so
    (fit,) = params["fits"]
    assert fit["status"] == "fitted" and fit["n"] == 120
    assert fit["slope_ci"][0] < true_slope < fit["slope_ci"][1]
    assert fit["intercept_ci"][0] < true_intercept < fit["intercept_ci"][1]
    ids = {r["participant_id"] for r in fit["rows"]}
    assert ids == {f"sub-hc{i:03d}" for i in range(120)}  # exactly the controls, no patient
    assert fit["age_range"][0] >= 20 and fit["age_range"][1] <= 80
    json.dumps(params)  # JSON-ready

    out = apply_bias(df, params)
    # raw columns untouched, corrected ones added
    pd.testing.assert_series_equal(out["predicted_age"], df["predicted_age"])
    pd.testing.assert_series_equal(out["brain_age_gap"], df["brain_age_gap"])
    assert set(out["bias_method"]) == {method}
    hc = out[out["diagnosis"] == "HC"]
    # the corrected gap of the controls no longer depends on age
    slope_after = np.polyfit(hc["chronological_age"], hc["brain_age_gap_corrected"], 1)[0]
    slope_before = np.polyfit(hc["chronological_age"], hc["brain_age_gap"], 1)[0]
    assert abs(slope_before - (SLOPE - 1)) < 0.05
    assert abs(slope_after) < 1e-8
    assert abs(hc["brain_age_gap_corrected"].mean()) < 1e-6
    # the patients' excess (10 * slope in raw prediction units) is recovered after correction
    ms = out[out["diagnosis"] == "RRMS"]
    expected = 10.0 if method == "cole" else 10 * SLOPE
    assert abs(ms["brain_age_gap_corrected"].mean() - expected) < 1.5
    assert np.allclose(out["predicted_age_corrected"] - out["chronological_age"],
                       out["brain_age_gap_corrected"])


def test_new_controls_have_no_age_slope_after_correction():
    params = fit_bias(cohort(n_pat=0, seed=1), "cole")
    new = apply_bias(cohort(n_hc=400, n_pat=0, seed=2), params)
    slope = np.polyfit(new["chronological_age"], new["brain_age_gap_corrected"], 1)[0]
    assert abs(slope) < 0.05


def test_fit_per_model_and_suffix():
    a = cohort(n_pat=0, seed=3, model="m1", suffix="T1w")
    b = cohort(n_pat=0, seed=4, model="m1", suffix="FLAIR")
    b["predicted_age"] = 0.5 * b["chronological_age"] + 25  # a different bias, no noise
    params = fit_bias(pd.concat([a, b]), "cole")
    fits = {(f["model"], f["suffix"]): f for f in params["fits"]}
    assert set(fits) == {("m1", "T1w"), ("m1", "FLAIR")}
    assert fits[("m1", "FLAIR")]["slope"] == pytest.approx(0.5)
    assert fits[("m1", "FLAIR")]["intercept"] == pytest.approx(25)
    assert abs(fits[("m1", "T1w")]["slope"] - SLOPE) < 0.05


def test_too_few_controls_skips_with_reason(caplog):
    df = cohort(n_hc=6, n_pat=5)
    with caplog.at_level(logging.WARNING):
        _, params = _fit_on_table(df, "cole")
    (fit,) = params["fits"]
    assert fit["status"] == "skipped" and "fewer than the minimum of 10" in fit["reason"]
    assert "skipped" in caplog.text
    out = apply_bias(df, params)
    assert out["brain_age_gap_corrected"].isna().all()
    assert out["bias_method"].isna().all()


def test_flat_model_not_inverted():
    df = cohort(n_pat=0)
    df["predicted_age"] = 50 + np.random.default_rng(0).normal(0, 1, len(df))
    (fit,) = fit_bias(df, "cole")["fits"]
    assert fit["status"] == "skipped" and "slope" in fit["reason"]


def test_one_row_per_participant_first_session_raw_first():
    df = pd.DataFrame({
        "participant_id": ["sub-1"] * 4 + ["sub-2"],
        "session_id": ["ses-10", "ses-2", "ses-2", "ses-2", np.nan],
        "lesion_filled": ["false", "true", "false", "false", "false"],
        "model": ["m", "m", "m", "x", "m"], "suffix": ["T1w"] * 5, "value": [1, 2, 3, 4, 5]})
    out = one_row_per_participant(df)
    # ses-2 precedes ses-10 (natural order), the raw row precedes the lesion-filled one
    assert sorted(out["value"]) == [3, 4, 5]


def test_oof_predictions_preferred_over_table(tmp_path, caplog):
    df = cohort(n_pat=10)
    oof_dir = tmp_path / "models" / "m1"
    oof_dir.mkdir(parents=True)
    rng = np.random.default_rng(9)
    ages = rng.uniform(20, 80, 50)
    oof = pd.DataFrame({"participant_id": [f"sub-train{i}" for i in range(50)],
                        "session_id": "n/a", "suffix": "T1w", "model": "m1",
                        "chronological_age": ages, "predicted_age": 0.6 * ages + 20,
                        "fold": np.arange(50) % 5})
    oof.loc[0, "participant_id"] = "sub-ms000"  # a patient of participants.tsv: must be ignored
    oof.to_csv(oof_dir / "oof_predictions.tsv", sep="\t", index=False)
    with caplog.at_level(logging.WARNING):
        rows = choose_fit_rows(df, df["diagnosis"].eq("HC"), output_dir=tmp_path,
                               patient_ids={"sub-ms000"})
    assert "optimistic" not in caplog.text
    assert set(rows["fit_source"]) == {"oof"} and len(rows) == 49
    assert "sub-ms000" not in set(rows["participant_id"])
    (fit,) = fit_bias(rows, "cole")["fits"]
    assert fit["source"] == "oof" and fit["slope"] == pytest.approx(0.6)

    # an explicit file wins over the train level's out-of-fold predictions
    explicit = oof.iloc[1:30].assign(predicted_age=lambda d: 0.8 * d["chronological_age"] + 5,
                                     diagnosis="HC")
    explicit.loc[explicit.index[:3], "diagnosis"] = "RRMS"
    path = tmp_path / "fit.tsv"
    explicit.to_csv(path, sep="\t", index=False)
    rows = choose_fit_rows(df, df["diagnosis"].eq("HC"), output_dir=tmp_path, fit_file=path)
    assert len(rows) == 26 and rows["fit_source"].iloc[0] == "file:fit.tsv"
    assert fit_bias(rows, "cole")["fits"][0]["slope"] == pytest.approx(0.8)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown bias-correction method"):
        fit_bias(cohort(n_pat=0), "smith2020")
