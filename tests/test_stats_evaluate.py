"""Accuracy on controls, the site check and model comparison against known answers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import r2_score

from brainage_bids.stats.evaluate import (
    accuracy,
    bootstrap_mae_difference,
    compare_models,
    default_pairs,
    evaluate_controls,
    site_anova,
)
from brainage_bids.stats.table import STATS_COLUMNS


def test_accuracy_known_values():
    age = np.array([20.0, 30.0, 40.0, 50.0, 60.0])
    pred = np.array([22.0, 29.0, 43.0, 50.0, 56.0])  # errors 2, -1, 3, 0, -4
    a = accuracy(age, pred)
    assert a["n"] == 5
    assert a["mae"] == pytest.approx(2.0)
    assert a["mean_error"] == pytest.approx(0.0)
    # R2: 1 - SSres/SStot = 1 - 30/1000, as sklearn's r2_score
    assert a["r2"] == pytest.approx(0.97)
    assert a["r2"] == pytest.approx(r2_score(age, pred))
    r, p = stats.pearsonr(age, pred)
    assert a["pearson_r"] == pytest.approx(r) and a["pearson_p"] == pytest.approx(p)
    z = np.arctanh(r)
    assert a["pearson_ci"][0] == pytest.approx(np.tanh(z - 1.959964 / np.sqrt(2)), rel=1e-5)
    assert a["mae_ci"][0] < 2.0 < a["mae_ci"][1]


def test_r2_is_not_squared_correlation():
    age = np.linspace(20, 80, 50)
    pred = age + 10  # perfectly correlated, but 10 years off
    a = accuracy(age, pred)
    assert a["pearson_r"] == pytest.approx(1.0)
    assert a["r2"] == pytest.approx(r2_score(age, pred)) and a["r2"] < 0.7


def _hc_table(n=80, seed=0, noise=None):
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 80, n)
    noise = noise or {("m1", "T1w"): 2.0, ("m1", "FLAIR"): 6.0}
    rows = []
    for (model, suffix), sd in noise.items():
        for i, a in enumerate(age):
            rows.append({"participant_id": f"sub-{i:03d}", "session_id": np.nan, "model": model,
                         "suffix": suffix, "chronological_age": a,
                         "predicted_age": a + rng.normal(0, sd),
                         "site": "A" if i % 2 else "B"})
    return pd.DataFrame(rows)


def test_evaluate_controls_raw_and_corrected_rows():
    df = _hc_table()
    df["predicted_age_corrected"] = df["chronological_age"] + 0.5
    fit = df[df["participant_id"] < "sub-040"][["participant_id", "session_id", "model", "suffix"]]
    out = evaluate_controls(df, fit_rows=fit)
    assert list(out.columns[:7]) == STATS_COLUMNS
    assert set(out["prediction"]) == {"raw", "corrected"}
    assert set(out["term"]) == {"mae", "r2", "pearson_r", "mean_error"}
    corr = out[(out["prediction"] == "corrected") & (out["term"] == "mae")]
    assert np.allclose(corr["estimate"], 0.5)
    assert np.allclose(corr["bias_fit_overlap"], 0.5)  # half of the rows were fitted on
    raw = out[(out["prediction"] == "raw") & (out["term"] == "mae")].set_index("suffix")
    assert raw.loc["T1w", "estimate"] < raw.loc["FLAIR", "estimate"]
    assert (out["n"] == 80).all()


def test_site_anova_detects_a_worse_site():
    df = _hc_table(n=120, noise={("m1", "T1w"): 2.0})
    worse = df["site"] == "A"
    df.loc[worse, "predicted_age"] += np.random.default_rng(5).normal(0, 8, worse.sum())
    out = site_anova(df, "site")
    anova = out[out["term"] == "anova_abs_error"].iloc[0]
    err = (df["predicted_age"] - df["chronological_age"]).abs()
    f, p = stats.f_oneway(err[df["site"] == "A"], err[df["site"] == "B"])
    assert anova["estimate"] == pytest.approx(f) and anova["p_value"] == pytest.approx(p)
    assert anova["p_value"] < 0.001
    assert set(out["term"]) == {"mae[A]", "mae[B]", "anova_abs_error"}
    with pytest.raises(ValueError, match="fewer than two sites"):
        site_anova(df.assign(site="A"), "site")


def test_paired_bootstrap_detects_known_noise_difference():
    rng = np.random.default_rng(1)
    ea, eb = rng.normal(0, 2, 150), rng.normal(0, 5, 150)
    r = bootstrap_mae_difference(ea, eb, paired=True, n_boot=2000, seed=7)
    assert r["difference"] == pytest.approx(np.abs(ea).mean() - np.abs(eb).mean())
    # true MAE difference: (2 - 5) * sqrt(2/pi)
    true = (2 - 5) * np.sqrt(2 / np.pi)
    assert r["ci_low"] < true < r["ci_high"]
    assert r["p_value"] < 1e-6 and r["df"] == 149
    assert r["t"] == pytest.approx(r["difference"] / r["se"])
    # bootstrap SE of the paired difference close to the analytic SE of mean |ea| - |eb|
    analytic = np.std(np.abs(ea) - np.abs(eb), ddof=1) / np.sqrt(150)
    assert r["se"] == pytest.approx(analytic, rel=0.1)
    # seedable
    assert bootstrap_mae_difference(ea, eb, paired=True, n_boot=2000, seed=7) == r


def test_unpaired_bootstrap_formula():
    rng = np.random.default_rng(2)
    ea, eb = rng.normal(0, 3, 100), rng.normal(0, 3, 60)
    r = bootstrap_mae_difference(ea, eb, paired=False, n_boot=3000, seed=3)
    assert r["se"] == pytest.approx(np.hypot(r["se_a"], r["se_b"]))
    ws = (r["se_a"] ** 2 + r["se_b"] ** 2) ** 2 / (r["se_a"] ** 4 / 99 + r["se_b"] ** 4 / 59)
    assert r["df"] == pytest.approx(ws)
    assert r["p_value"] == pytest.approx(2 * stats.t.sf(abs(r["difference"] / r["se"]), ws))
    # the SEs approximate the analytic SE of a mean of absolute errors
    assert r["se_a"] == pytest.approx(np.std(np.abs(ea), ddof=1) / 10, rel=0.1)
    assert r["p_value"] > 0.05  # same noise level: no difference


def test_identical_models_give_zero_difference():
    e = np.random.default_rng(3).normal(0, 3, 50)
    r = bootstrap_mae_difference(e, e.copy(), paired=True, n_boot=500, seed=0)
    assert r["difference"] == 0 and r["se"] == 0 and r["p_value"] == 1.0
    assert r["ci_low"] == r["ci_high"] == 0


def test_compare_models_pairs_and_tests():
    df = _hc_table(noise={("m1", "T1w"): 2.0, ("m1", "FLAIR"): 6.0, ("ensemble", "T1w"): 1.5})
    assert default_pairs(df) == [(("m1", "FLAIR"), ("m1", "T1w")),
                                 (("ensemble", "T1w"), ("m1", "T1w"))]
    out = compare_models(df, n_boot=500, seed=1)
    assert list(out.columns[:7]) == STATS_COLUMNS
    assert len(out) == 4 and set(out["test"]) == {"paired", "unpaired"}
    fl = out[(out["model_a"] == "m1") & (out["test"] == "paired")].iloc[0]
    assert fl["estimate"] > 0 and fl["p_value"] < 0.001 and fl["n"] == 80
    un = out[(out["model_a"] == "m1") & (out["test"] == "unpaired")].iloc[0]
    assert un["n"] == 160 and un["estimate"] == pytest.approx(fl["estimate"])
    # explicit pairs; disjoint participants give only the unpaired test
    half = df[~((df["suffix"] == "FLAIR") & (df["participant_id"] < "sub-040"))]
    half = half[~((half["suffix"] == "T1w") & (half["participant_id"] >= "sub-040"))]
    out = compare_models(half, [[("m1", "FLAIR"), ("m1", "T1w")]], n_boot=200, seed=1)
    assert list(out["test"]) == ["unpaired"]
    with pytest.raises(ValueError, match="no pair"):
        compare_models(df[df["suffix"] == "T1w"].query("model == 'm1'"), n_boot=100)
