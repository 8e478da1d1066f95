"""Clinical statistics (brainage_bids.stats.clinical, .roc) on reference data and known effects."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from brainage_bids.stats import clinical, roc
from brainage_bids.stats.clinical import _match_order, nearest_neighbour
from brainage_bids.stats.table import STATS_COLUMNS

# R's datasets::PlantGrowth
PLANT = pd.DataFrame({
    "weight": [4.17, 5.58, 5.18, 6.11, 4.50, 4.61, 5.17, 4.53, 5.33, 5.14,
               4.81, 4.17, 4.41, 3.59, 5.87, 3.83, 6.03, 4.89, 4.32, 4.69,
               6.31, 5.12, 5.54, 5.50, 5.37, 5.29, 4.92, 6.15, 5.80, 5.26],
    "group": ["ctrl"] * 10 + ["trt1"] * 10 + ["trt2"] * 10})


def row(tab, term, method=None):
    sel = tab[tab["term"] == term]
    if method is not None:
        sel = sel[sel["method"] == method]
    assert len(sel) == 1, (term, method)
    return sel.iloc[0]


def test_anova_tukey_plantgrowth():
    tab = clinical.compare_groups(PLANT, "weight", "group")
    assert list(tab.columns[:7]) == STATS_COLUMNS
    a = row(tab, "group", "one-way ANOVA")
    assert a.statistic == pytest.approx(4.846, abs=5e-4)
    assert a.p_value == pytest.approx(0.01591, abs=5e-6)
    assert (a.df, a.df_resid, a.n) == (2, 27, 30)
    t = row(tab, "trt2 - trt1", "Tukey HSD")
    assert t.estimate == pytest.approx(0.865, abs=5e-4)
    assert t.p_value == pytest.approx(0.0120, abs=5e-5)
    # R: TukeyHSD lwr/upr 0.1737839 1.5562161
    assert (t.ci_low, t.ci_high) == pytest.approx((0.1737839, 1.5562161), abs=1e-6)
    # SE of a difference: sqrt(MSE * (1/10 + 1/10)), MSE = 10.49209 / 27
    assert t.se == pytest.approx(np.sqrt(10.49209 / 27 * 0.2), abs=1e-6)
    assert row(tab, "trt1 - ctrl").estimate == pytest.approx(-0.371)
    assert row(tab, "mean:trt2").estimate == pytest.approx(5.526)


def test_two_groups_student_and_welch():
    tab = clinical.compare_groups(PLANT[PLANT.group != "trt2"], "weight", "group")
    # R: t.test(trt1, ctrl, var.equal=TRUE): t = -1.1913, df = 18, p = 0.249, CI -1.0253003 0.2833003
    s = row(tab, "trt1 - ctrl", "Student t-test")
    assert s.estimate == pytest.approx(4.661 - 5.032)
    assert (s.ci_low, s.ci_high) == pytest.approx((-1.0253003, 0.2833003), abs=1e-7)
    assert s.statistic == pytest.approx(-1.1913, abs=1e-4) and s.df == 18
    assert s.p_value == pytest.approx(0.249, abs=5e-4)
    w = row(tab, "trt1 - ctrl", "Welch t-test")
    assert w.df == pytest.approx(16.524, abs=1e-3) and w.p_value == pytest.approx(0.2504, abs=1e-4)


def test_missing_values_are_dropped():
    d = PLANT.copy()
    d.loc[[0, 15], "weight"] = np.nan
    d.loc[25, "group"] = None
    tab = clinical.compare_groups(d, "weight", "group")
    assert row(tab, "group").n == 27
    with pytest.raises(ValueError, match="fewer than two levels"):
        clinical.compare_groups(PLANT[PLANT.group == "ctrl"], "weight", "group")


def _pearson(table, yates):
    obs = np.asarray(table, float)
    exp = obs.sum(1, keepdims=True) * obs.sum(0, keepdims=True) / obs.sum()
    dev = np.abs(obs - exp)
    if yates:
        dev = np.maximum(dev - 0.5, 0)
    return float((dev ** 2 / exp).sum())


def test_chi_square_yates_only_for_2x2():
    # 2x2 table [[12, 7], [5, 7]]: R chisq.test gives X-squared = 0.64112 (Yates)
    d = pd.DataFrame({"sex": ["F"] * 19 + ["M"] * 12,
                      "dx": ["A"] * 12 + ["B"] * 7 + ["A"] * 5 + ["B"] * 7})
    tab = clinical.chi_square(d, "sex", "dx")
    r = tab.iloc[0]
    assert "Yates" in r.method and r.df == 1
    assert r.statistic == pytest.approx(0.64112, abs=5e-6)
    assert r.statistic == pytest.approx(_pearson([[12, 7], [5, 7]], True))
    cell = row(tab, "sex=F | dx=A")
    assert cell.estimate == 12 and cell.percent == pytest.approx(100 * 12 / 17)
    d3 = pd.concat([d, pd.DataFrame({"sex": ["F", "M", "M"], "dx": ["C", "C", "C"]})])
    r3 = clinical.chi_square(d3, "sex", "dx").iloc[0]
    assert "Yates" not in r3.method and r3.df == 2
    assert r3.statistic == pytest.approx(_pearson([[12, 7, 1], [5, 7, 2]], False))


def test_rank_sum_exact_and_approximate():
    # R's ?wilcox.test example: W = 35, p-value = 0.2544 (exact)
    x = [0.80, 0.83, 1.89, 1.04, 1.45, 1.38, 1.91, 1.64, 0.73, 1.46]
    y = [1.15, 0.88, 0.90, 0.74, 1.21]
    d = pd.DataFrame({"v": x + y, "g": ["a"] * 10 + ["b"] * 5})
    r = row(clinical.rank_test(d, "v", "g"), "b - a")
    assert "exact" in r.method
    assert r.statistic == 35 and r.p_value == pytest.approx(0.2544, abs=5e-5)
    assert r.estimate == pytest.approx(np.median(y) - np.median(x))
    # ties force the normal approximation (with continuity correction), as R
    d2 = pd.DataFrame({"v": [1, 2, 2, 3, 4, 4, 5, 6, 6, 7], "g": list("aaaaabbbbb")})
    r2 = row(clinical.rank_test(d2, "v", "g"), "b - a")
    assert "normal approximation" in r2.method
    n1 = n2 = 5
    ranks = pd.Series(d2.v).rank().to_numpy()
    w = ranks[:5].sum() - n1 * (n1 + 1) / 2
    t = np.unique(d2.v, return_counts=True)[1]
    sigma = np.sqrt(n1 * n2 / 12 * ((n1 + n2 + 1) - (t ** 3 - t).sum() / ((n1 + n2) * (n1 + n2 - 1))))
    z = (abs(w - n1 * n2 / 2) - 0.5) / sigma
    from scipy.stats import norm
    assert r2.statistic == w and r2.p_value == pytest.approx(2 * norm.sf(z))


def test_signed_rank_paired():
    # R's ?wilcox.test depression example: V = 40, two-sided p = 0.03906 (exact)
    d = pd.DataFrame({"x": [1.83, 0.50, 1.62, 2.48, 1.68, 1.88, 1.55, 3.06, 1.30],
                      "y": [0.878, 0.647, 0.598, 2.05, 1.06, 1.29, 1.06, 3.14, 1.29]})
    r = clinical.rank_test(d, "x", paired_with="y").iloc[0]
    assert "exact" in r.method and r.statistic == 40
    assert r.p_value == pytest.approx(0.03906, abs=5e-6)
    with pytest.raises(ValueError):
        clinical.rank_test(d, "x")


def test_linear_model_recovers_known_effects():
    # Fixed seed: each 95 % CI covers its true value with probability 0.95, so another seed can
    # miss one of the four (seed 11 does, for sex, by 0.02).
    rng = np.random.default_rng(12)
    n = 3000
    dx = rng.choice(["HC", "NMOSD", "RRMS"], n)
    sex = rng.choice(["F", "M"], n)
    age = rng.uniform(20, 60, n)
    gap = (np.select([dx == "NMOSD", dx == "RRMS"], [3.0, 7.0], 0.0) + 0.1 * (age - 40)
           - 1.0 * (sex == "M") + rng.normal(0, 4, n))
    d = pd.DataFrame({"gap": gap, "diagnosis": dx, "sex": sex, "age": age})
    d.loc[:9, "age"] = np.nan
    tab = clinical.linear_model(d, "gap ~ C(diagnosis) + age + C(sex)", analysis="gap_lm")
    assert (tab["analysis"] == "gap_lm").all() and (tab["n"] == n - 10).all()
    truth = {"C(diagnosis)[T.NMOSD]": 3.0, "C(diagnosis)[T.RRMS]": 7.0, "age": 0.1,
             "C(sex)[T.M]": -1.0}
    for term, beta in truth.items():
        r = row(tab, term)
        assert r.ci_low < beta < r.ci_high, (term, r)
        assert r.t == pytest.approx(r.estimate / r.se)
    # ordinary least squares: the same coefficients as a direct solve
    dd = d.dropna()
    X = np.column_stack([np.ones(len(dd)), dd.diagnosis == "NMOSD", dd.diagnosis == "RRMS",
                         dd.sex == "M", dd.age]).astype(float)
    beta = np.linalg.lstsq(X, dd.gap.to_numpy(), rcond=None)[0]
    terms = ["Intercept", "C(diagnosis)[T.NMOSD]", "C(diagnosis)[T.RRMS]", "C(sex)[T.M]", "age"]
    assert [row(tab, t).estimate for t in terms] == pytest.approx(beta)
    # and the two-group comparison recovers the difference within its CI
    s = row(clinical.compare_groups(d[d.diagnosis != "HC"], "gap", "diagnosis"), "RRMS - NMOSD",
            "Student t-test")
    assert s.ci_low < 4.0 < s.ci_high


# --- matching -----------------------------------------------------------------------------------
def test_nearest_neighbour_rules():
    # nearest control wins, whichever side it is on
    assert nearest_neighbour([1, 0, 0, 0], [0.5, 0.1, 0.55, 0.9]).tolist() == [[2]]
    # equal distance below and above: the one below (MatchIt's rule)
    assert nearest_neighbour([1, 0, 0], [0.5, 0.4, 0.6]).tolist() == [[1]]
    # caliper: nothing within 0.2
    assert nearest_neighbour([1, 0, 0], [0.5, 0.1, 0.9], caliper=0.2).tolist() == [[-1]]
    # largest score first: unit 1 takes the only control, unit 0 gets none
    assert nearest_neighbour([1, 1, 0], [0.6, 0.7, 0.65]).tolist() == [[-1], [2]]
    # data order instead: unit 0 first
    assert nearest_neighbour([1, 1, 0], [0.6, 0.7, 0.65],
                             order=_match_order(np.array([0.6, 0.7]), "data", None)).tolist() \
        == [[2], [-1]]
    # ratio 2 in rounds: every treated unit gets its first control before any gets a second
    mm = nearest_neighbour([1, 1, 0, 0, 0, 0], [0.2, 0.8, 0.21, 0.79, 0.5, 0.55], ratio=2)
    assert mm.tolist() == [[2, 4], [3, 5]]


def _confounded(seed=3, n=400):
    rng = np.random.default_rng(seed)
    age = rng.normal(45, 10, n)
    sex = rng.choice(["F", "M"], n)
    p = 1 / (1 + np.exp(-(-1.5 + 0.08 * (age - 45) + 0.5 * (sex == "F"))))
    treat = np.where(rng.random(n) < p, "NMOSD", "RRMS")
    gap = 2.0 * (treat == "NMOSD") + 0.2 * (age - 45) + rng.normal(0, 2, n)
    return pd.DataFrame({"participant_id": [f"sub-{i:03d}" for i in range(n)], "dx": treat,
                         "age": age, "sex": sex, "gap": gap})


def test_propensity_match_structure_and_balance():
    d = _confounded()
    res = clinical.propensity_match(d, "dx", ["age", "sex"], treated_level="NMOSD",
                                    id_col="participant_id")
    pairs, bal, data = res["pairs"], res["balance"], res["data"]
    n_t = (d.dx == "NMOSD").sum()
    assert len(pairs) == n_t and pairs["control_index"].is_unique     # 1:1, no replacement
    assert set(d.loc[pairs.treated_index, "dx"]) == {"NMOSD"}
    assert set(d.loc[pairs.control_index, "dx"]) == {"RRMS"}
    assert np.allclose(pairs.distance, (pairs.treated_ps - pairs.control_ps).abs())
    assert len(data) == 2 * n_t and data.index.is_monotonic_increasing
    assert list(bal.columns[:7]) == STATS_COLUMNS and (bal.analysis == "psm_balance").all()
    b = bal.set_index("term")
    assert set(b.index) == {"age", "sex[F]", "sex[M]", "distance"}
    assert abs(b.loc["age", "smd_before"]) > 0.3
    assert abs(b.loc["age", "smd_after"]) < abs(b.loc["age", "smd_before"]) / 3
    # the standardised difference uses the SD of the treated units before matching
    t, c = d[d.dx == "NMOSD"].age, d[d.dx == "RRMS"].age
    assert b.loc["age", "smd_before"] == pytest.approx((t.mean() - c.mean()) / t.std())
    # a caliper drops treated units without a close control and never widens the distances
    cal = clinical.propensity_match(d, "dx", ["age", "sex"], treated_level="NMOSD", caliper=0.05)
    sd_ps = res["propensity_score"].std()
    assert len(cal["pairs"]) < n_t
    assert (cal["pairs"].distance <= 0.05 * sd_ps + 1e-12).all()
    # default treated level: the second sorted level
    assert clinical.propensity_match(d, "dx", ["age"])["treated_level"] == "RRMS"


def test_matched_comparison_recovers_effect():
    d = _confounded(seed=5, n=1500)
    res = clinical.propensity_match(d, "dx", ["age", "sex"], treated_level="NMOSD")
    data = res["data"].assign(treated=lambda x: (x.dx == "NMOSD").astype(int))
    tab = clinical.matched_comparison(data, "gap", "treated")
    assert (tab.analysis == "gap_after_matching").all()
    student = row(tab, "1 - 0", "Student t-test")
    paired = row(tab, "1 - 0", "paired t-test (matched pairs)")
    assert student.ci_low < 2.0 < student.ci_high and paired.ci_low < 2.0 < paired.ci_high
    # the naive comparison is confounded by age (treated are older)
    naive = row(clinical.compare_groups(d.assign(t=(d.dx == "NMOSD").astype(int)), "gap", "t"),
                "1 - 0", "Student t-test")
    assert naive.ci_low > 2.0


# --- ROC ----------------------------------------------------------------------------------------
def hanley_mcneil() -> pd.DataFrame:
    """Hanley & McNeil (1982) CT ratings: 58 normal (33, 6, 6, 11, 2 at ratings 1..5) and
    51 abnormal (3, 2, 2, 11, 33)."""
    normal = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
    abnormal = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
    return pd.DataFrame({"rating": np.r_[normal, abnormal],
                         "abnormal": np.r_[np.zeros(58, int), np.ones(51, int)]})


def test_roc_hanley_mcneil():
    tab = roc.roc_analysis(hanley_mcneil(), "rating", "abnormal")
    assert list(tab.columns[:7]) == STATS_COLUMNS
    auc = row(tab, "auc")
    assert auc.estimate == pytest.approx(0.8932, abs=5e-5)
    assert auc.n_cases == 51 and auc.n_controls == 58 and auc.n == 109
    assert auc.ci_low < auc.estimate < auc.ci_high
    assert auc.ci_high - auc.estimate == pytest.approx(1.959964 * auc.se, rel=1e-5)
    assert auc.p_value < 1e-10
    # Thresholds are midpoints 1.5, 2.5, 3.5, 4.5; positive when rating > threshold.
    #   > 3.5: specificity (33+6+6)/58 = 0.776  -> below 80 %
    #   > 4.5: specificity (58-2)/58 = 0.9655, sensitivity 33/51 = 0.6471  -> the cut-off
    cut = row(tab, "cutoff")
    assert cut.estimate == 4.5
    assert cut.specificity == pytest.approx(56 / 58) and cut.sensitivity == pytest.approx(33 / 51)
    # a lower required specificity moves the cut-off down: > 3.5 has 45/58, 44/51
    cut70 = row(roc.roc_analysis(hanley_mcneil(), "rating", "abnormal", specificity=0.7), "cutoff")
    assert cut70.estimate == 3.5 and cut70.sensitivity == pytest.approx(44 / 51)


def test_roc_cutoff_tie_goes_to_higher_specificity():
    # controls 1..10, cases 9.5, 11, 12: thresholds 8.5 (spec 0.8) and 9.25 (spec 0.9) both
    # have sensitivity 1; the rule picks 9.25
    d = pd.DataFrame({"m": list(range(1, 11)) + [9.5, 11, 12], "y": [0] * 10 + [1] * 3})
    cut = row(roc.roc_analysis(d, "m", "y"), "cutoff")
    assert cut.estimate == 9.25 and cut.sensitivity == 1.0 and cut.specificity == 0.9


def test_roc_curve_points_and_input_checks():
    pts = roc.roc_curve_points(hanley_mcneil(), "rating", "abnormal")
    assert list(pts.columns[:3]) == ["threshold", "fpr", "tpr"]
    assert pts.fpr.is_monotonic_increasing and pts.tpr.is_monotonic_increasing
    assert (pts.iloc[0][["fpr", "tpr"]] == 0).all() and (pts.iloc[-1][["fpr", "tpr"]] == 1).all()
    # trapezoidal area under the points equals the reported AUC
    area = np.sum(np.diff(pts.fpr) * (pts.tpr[1:].to_numpy() + pts.tpr[:-1].to_numpy()) / 2)
    assert area == pytest.approx(row(roc.roc_analysis(hanley_mcneil(), "rating", "abnormal"),
                                     "auc").estimate)
    with pytest.raises(ValueError, match="boolean or 0/1"):
        roc.roc_analysis(pd.DataFrame({"m": [1, 2], "y": ["a", "b"]}), "m", "y")
    with pytest.raises(ValueError, match="both cases and controls"):
        roc.roc_analysis(pd.DataFrame({"m": [1, 2], "y": [1, 1]}), "m", "y")


def test_roc_boolean_outcome_and_missing():
    d = hanley_mcneil().assign(abnormal=lambda x: x.abnormal.astype(bool))
    d.loc[0, "rating"] = np.nan
    auc = row(roc.roc_analysis(d, "rating", "abnormal"), "auc")
    assert auc.n == 108 and auc.n_controls == 57
