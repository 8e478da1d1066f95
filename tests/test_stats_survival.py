"""Survival statistics (brainage_bids.stats.survival) on reference data and known effects."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from lifelines.datasets import load_leukemia, load_rossi

from brainage_bids.stats import survival
from brainage_bids.stats.table import STATS_COLUMNS

ROSSI_COVS = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]


def row(tab, term, **where):
    sel = tab[tab["term"] == term]
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, (term, where)
    return sel.iloc[0]


def test_cox_rossi_matches_r():
    # R: coxph(Surv(week, arrest) ~ fin + age + race + wexp + mar + paro + prio, data = Rossi)
    tab = survival.cox_model(load_rossi(), "week", "arrest", ROSSI_COVS, analysis="cox_rossi")
    assert list(tab.columns[:7]) == STATS_COLUMNS and list(tab.term) == ROSSI_COVS
    fin, prio = row(tab, "fin"), row(tab, "prio")
    assert fin.coef == pytest.approx(-0.379422, abs=5e-6) and fin.se == pytest.approx(0.19138, abs=5e-6)
    assert prio.coef == pytest.approx(0.091497, abs=5e-6) and prio.se == pytest.approx(0.02865, abs=5e-6)
    assert fin.estimate == pytest.approx(np.exp(fin.coef))
    assert (fin.ci_low, fin.ci_high) == pytest.approx(
        tuple(np.exp(fin.coef + np.array([-1, 1]) * 1.959964 * fin.se)), rel=1e-6)
    assert fin.p_value == pytest.approx(0.0474, abs=5e-5)        # R: Pr(>|z|) 0.04742
    assert fin.n == 432 and fin.events == 114
    with pytest.raises(ValueError, match="do not vary"):
        survival.cox_model(load_rossi().assign(k=1.0), "week", "arrest", ["fin", "k"], analysis="x")
    with pytest.raises(ValueError, match="Efron"):
        survival.cox_model(load_rossi(), "week", "arrest", ["fin"], analysis="x", ties="breslow")


def test_cox_string_covariate_is_dummy_coded():
    r = load_rossi()
    r["sex"] = np.where(r["mar"] == 1, "M", "F")     # a string column standing in for mar
    coded = survival.cox_model(r, "week", "arrest", ["fin", "sex"], analysis="c")
    numeric = survival.cox_model(r, "week", "arrest", ["fin", "mar"], analysis="c")
    assert list(coded.term) == ["fin", "sex[T.M]"]
    assert coded.coef.to_numpy() == pytest.approx(numeric.coef.to_numpy(), rel=1e-8)


def test_cox_univariable_multivariable():
    r = load_rossi()
    r.loc[:9, "prio"] = np.nan
    tab = survival.cox_univariable_multivariable(r, "week", "arrest", ["fin", "age", "prio"])
    assert (tab.analysis == "cox").all()
    uni, multi = tab[tab.model == "univariable"], tab[tab.model == "multivariable"]
    assert list(uni.term) == list(multi.term) == ["fin", "age", "prio"]
    assert row(uni, "fin").n == 432 and row(uni, "prio").n == 422 and (multi.n == 422).all()
    alone = survival.cox_model(r, "week", "arrest", ["age"], analysis="cox")
    assert row(uni, "age").coef == pytest.approx(alone.coef.iloc[0])
    assert row(uni, "age").coef != pytest.approx(row(multi, "age").coef, rel=1e-3)


def test_cox_recovers_known_hazard_ratio():
    rng = np.random.default_rng(4)
    n = 3000
    x = rng.normal(size=n)
    z = rng.integers(0, 2, n)
    t = rng.exponential(1 / (0.1 * np.exp(0.7 * x - 0.5 * z)))
    c = rng.uniform(2, 15, n)
    d = pd.DataFrame({"time": np.minimum(t, c), "event": (t <= c).astype(int), "x": x,
                      "z": np.where(z == 1, "yes", "no")})
    tab = survival.cox_model(d, "time", "event", ["x", "z"], analysis="sim")
    hx, hz = row(tab, "x"), row(tab, "z[T.yes]")
    assert hx.ci_low < np.exp(0.7) < hx.ci_high
    assert hz.ci_low < np.exp(-0.5) < hz.ci_high


def test_logrank_rossi_and_three_groups():
    tab = survival.logrank(load_rossi(), "week", "arrest", "fin")
    r = tab.iloc[0]
    assert r.statistic == pytest.approx(3.8376, abs=5e-5)     # R survdiff: Chisq= 3.8 on 1 df
    assert r.df == 1 and r.n == 432 and r.p_value == pytest.approx(0.0501, abs=5e-5)
    d = load_rossi().assign(prio_band=lambda x: pd.cut(x.prio, [-1, 1, 4, 99],
                                                       labels=["0-1", "2-4", "5+"]).astype(str))
    r3 = survival.logrank(d, "week", "arrest", "prio_band").iloc[0]
    assert r3.df == 2 and r3.groups == "0-1, 2-4, 5+" and r3.p_value < 0.05


def test_kaplan_meier_leukemia_6mp():
    lk = load_leukemia()                 # Rx 0 = 6-MP (Freireich/Gehan remission times)
    tab = survival.kaplan_meier(lk, "t", "status", "Rx")
    s23 = row(tab, "S(t=23)", group="0")
    assert s23.estimate == pytest.approx(0.4482, abs=5e-5)
    assert s23.at_risk == 6 and s23.events == 1
    assert row(tab, "median", group="0").estimate == 23
    assert row(tab, "median", group="1").estimate == 8           # placebo arm
    times = tab[(tab.group == "0") & (tab.term != "median")].time
    assert list(times) == [6, 7, 10, 13, 16, 22, 23]            # event times only
    assert (tab.ci_low <= tab.estimate).all() and (tab.estimate <= tab.ci_high).all()


def test_plot_kaplan_meier(tmp_path):
    out = survival.plot_kaplan_meier(load_leukemia(), "t", "status", "Rx", tmp_path / "f" / "km.png")
    assert out == tmp_path / "f" / "km.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_split_at_cutoff():
    d = pd.DataFrame({"gap": [6.2, 6.1, 5.0, np.nan]})
    s = survival.split_at_cutoff(d, "gap", 6.1)
    assert s.name == "gap_group" and s.tolist()[:3] == ["high", "low", "low"] and pd.isna(s[3])
    assert survival.split_at_cutoff(d, "gap", 6.1, name="g").name == "g"


def test_edss_worsening_rules(caplog):
    visits = pd.DataFrame([
        # baseline 5.5: +1.0 needed; reached at 3 y
        ("a", 40.0, 5.5), ("a", 41.0, 6.0), ("a", 43.0, 6.5), ("a", 44.0, 6.5),
        # baseline 6.0: +0.5 suffices; reached at 2 y (visits given out of order)
        ("b", 52.0, 6.5), ("b", 50.0, 6.0), ("b", 51.0, 6.0),
        # baseline 2.0: +0.5 is not worsening; censored at the last visit (4 y)
        ("c", 30.0, 2.0), ("c", 32.0, 2.5), ("c", 34.0, 2.5),
        # first visit lacks EDSS: baseline is the next one (3.0 at 21 y); +1.0 at 22.5 y
        ("d", 20.0, np.nan), ("d", 21.0, 3.0), ("d", 22.5, 4.0),
        # single visit: dropped
        ("e", 60.0, 4.0),
    ], columns=["participant_id", "age", "edss"])
    with caplog.at_level(logging.INFO, logger="brainage_bids.stats.survival"):
        out = survival.edss_worsening(visits, time_col="age").set_index("participant_id")
    assert "1 participant(s) without follow-up" in caplog.text and "e" not in out.index
    assert out.loc["a"].tolist()[:3] == [5.5, 3.0, 1]
    assert out.loc["b"].tolist()[:3] == [6.0, 2.0, 1]
    assert out.loc["c"].tolist()[:3] == [2.0, 4.0, 0]
    assert out.loc["d"].tolist()[:3] == [3.0, 1.5, 1]
    assert out.loc["d", "baseline_time"] == 21.0 and out.loc["d", "n_visits"] == 2


def test_edss_worsening_days_and_confirmation():
    visits = pd.DataFrame({"sub": ["x"] * 4, "day": [0, 365.25, 730.5, 1095.75],
                           "EDSS": [1.0, 2.0, 1.5, 2.5]})
    out = survival.edss_worsening(visits, id_col="sub", time_col="day", edss_col="EDSS",
                                  time_unit="days")
    assert out.iloc[0][["time", "event"]].tolist() == [1.0, 1]
    conf = survival.edss_worsening(visits, id_col="sub", time_col="day", edss_col="EDSS",
                                   time_unit="days", confirmed=True)
    # 2.0 at year 1 is not sustained (1.5 at year 2); 2.5 at year 3 is the last visit
    assert conf.iloc[0][["time", "event"]].tolist() == [3.0, 0]
    with pytest.raises(ValueError):
        survival.edss_worsening(visits, id_col="sub", time_col="day", time_unit="months")
