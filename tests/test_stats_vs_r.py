"""Cross-check of the clinical statistics against R (stats, survival, pROC, MatchIt).

One synthetic cohort (fixed seed) is written to CSV; ``tests/r/stats_reference.R`` computes the
reference results in R and every number here must agree to a relative 1e-4, and matched pairs
must be identical. Skipped when ``Rscript`` or one of the R packages is missing.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brainage_bids.stats import clinical, roc, survival
from brainage_bids.stats.clinical import _match_order, nearest_neighbour

R_SCRIPT = Path(__file__).parent / "r" / "stats_reference.R"
RTOL = 1e-4


def make_cohort(seed: int = 2026) -> pd.DataFrame:
    """HC/RRMS/NMOSD cohort with brain-age gap, EDSS, follow-up and events (known effects)."""
    rng = np.random.default_rng(seed)
    sizes = {"HC": 70, "RRMS": 90, "NMOSD": 60}
    dx = np.repeat(list(sizes), list(sizes.values()))
    n = len(dx)
    p_female = np.select([dx == "NMOSD", dx == "RRMS"], [0.8, 0.65], 0.5)
    sex = np.where(rng.random(n) < p_female, "F", "M")
    age = rng.uniform(18, 65, n)
    mean_gap = np.select([dx == "RRMS", dx == "NMOSD"], [6.0, 3.0], 0.0)
    gap = mean_gap + 0.05 * (age - 40) + 0.5 * (sex == "M") + rng.normal(0, 4.5, n)
    patient = dx != "HC"
    edss = np.where(patient, np.clip(np.round(2 * rng.gamma(2.0, 1.2, n)) / 2, 0, 7.5), np.nan)
    edss_fu = np.where(patient, np.clip(edss + rng.choice([-0.5, 0, 0, 0.5, 1, 1.5], n), 0, 9.5),
                       np.nan)
    hazard = 0.15 * np.exp(0.08 * gap - 0.1 * np.nan_to_num(edss) + 0.01 * (age - 40))
    t_event = rng.exponential(1 / hazard)
    t_cens = rng.uniform(1, 8, n)
    time = np.maximum(np.round(np.minimum(t_event, t_cens), 1), 0.1)   # ties for Efron
    event = (t_event <= t_cens).astype(int)
    small = np.zeros(n, dtype=int)
    for g in ("RRMS", "NMOSD"):
        small[np.flatnonzero(dx == g)[:15]] = 1
    df = pd.DataFrame({
        "participant_id": [f"sub-{i:03d}" for i in range(1, n + 1)], "diagnosis": dx, "sex": sex,
        "age": age, "gap": gap, "gap2": gap + rng.normal(0.5, 1.0, n), "edss": edss,
        "edss_followup": edss_fu, "time": np.where(patient, time, np.nan),
        "event": np.where(patient, event, np.nan), "site": rng.choice(["A", "B", "C"], n),
        "small": small})
    return df


def make_ties(seed: int = 7) -> pd.DataFrame:
    """Integer-valued distances with many ties, 20 treated and 40 controls."""
    rng = np.random.default_rng(seed)
    treat = rng.permutation(np.r_[np.ones(20, int), np.zeros(40, int)])
    return pd.DataFrame({"id": [f"u{i:02d}" for i in range(60)], "treat": treat,
                         "d": rng.integers(0, 12, 60).astype(float), "x": rng.normal(size=60)})


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    if shutil.which("Rscript") is None:
        pytest.skip("Rscript not on PATH: the R cross-check needs R with survival, MatchIt, pROC")
    tmp = tmp_path_factory.mktemp("r_ref")
    cohort, ties = make_cohort(), make_ties()
    cohort.to_csv(tmp / "cohort.csv", index=False)
    ties.to_csv(tmp / "ties.csv", index=False)
    proc = subprocess.run(["Rscript", str(R_SCRIPT), str(tmp / "cohort.csv"), str(tmp / "ties.csv"),
                           str(tmp)], capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"R package missing: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    values = pd.read_csv(tmp / "values.csv", keep_default_na=False)
    vals = {k: float(v) if v != "NA" else np.nan for k, v in zip(values["name"], values["value"])}
    versions = dict(pd.read_csv(tmp / "versions.csv").to_numpy())
    return {"vals": vals, "dir": tmp, "cohort": cohort, "ties": ties, "versions": versions}


def close(ours, theirs, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float),
                               rtol=rtol, atol=1e-12)


def vec(vals, name):
    out, i = [], 1
    while f"{name}[{i}]" in vals:
        out.append(vals[f"{name}[{i}]"])
        i += 1
    return out


def row(tab, term, method=None):
    sel = tab[tab["term"] == term]
    if method is not None:
        sel = sel[sel["method"] == method]
    assert len(sel) == 1, (term, method, tab)
    return sel.iloc[0]


def patients(ref):
    return ref["cohort"][ref["cohort"]["diagnosis"] != "HC"]


def test_t_tests(ref):
    v = ref["vals"]
    tab = clinical.compare_groups(patients(ref), "gap", "diagnosis")
    for method, k in (("Student t-test", "student"), ("Welch t-test", "welch")):
        r = row(tab, "RRMS - NMOSD", method)
        close([r.estimate, r.ci_low, r.ci_high, r.p_value, r.statistic, r.df],
              [v[f"{k}.estimate"], *vec(v, f"{k}.ci"), v[f"{k}.p"], v[f"{k}.t"], v[f"{k}.df"]])


def test_anova_tukey(ref):
    v = ref["vals"]
    tab = clinical.compare_groups(ref["cohort"], "gap", "diagnosis")
    a = row(tab, "diagnosis", "one-way ANOVA")
    close([a.statistic, a.p_value], [v["anova.F"], v["anova.p"]])
    for pair in ("NMOSD-HC", "RRMS-HC", "RRMS-NMOSD"):
        r = row(tab, pair.replace("-", " - "), "Tukey HSD")
        close([r.estimate, r.ci_low, r.ci_high, r.p_value],
              [v[f"tukey.{pair}.{s}"] for s in ("diff", "lwr", "upr", "p")])


def test_chi_square(ref):
    v = ref["vals"]
    r = clinical.chi_square(ref["cohort"], "sex", "diagnosis").iloc[0]
    close([r.statistic, r.p_value], [v["chisq3.stat"], v["chisq3.p"]])
    assert "Yates" not in r.method
    r = clinical.chi_square(patients(ref), "sex", "diagnosis").iloc[0]
    close([r.statistic, r.p_value], [v["chisq2.stat"], v["chisq2.p"]])
    assert "Yates" in r.method


def test_rank_tests(ref):
    v = ref["vals"]
    pat = patients(ref)
    r = row(clinical.rank_test(pat, "edss", "diagnosis"), "RRMS - NMOSD")
    assert "normal approximation" in r.method
    close([r.statistic, r.p_value], [v["mw_ties.W"], v["mw_ties.p"]])
    small = pat[pat["small"] == 1]
    r = row(clinical.rank_test(small, "gap", "diagnosis"), "RRMS - NMOSD")
    assert "exact" in r.method
    close([r.statistic, r.p_value], [v["mw_exact.W"], v["mw_exact.p"]])
    r = clinical.rank_test(pat, "edss_followup", paired_with="edss").iloc[0]
    assert "normal approximation" in r.method
    close([r.statistic, r.p_value], [v["sr_ties.V"], v["sr_ties.p"]])
    r = clinical.rank_test(small, "gap2", paired_with="gap").iloc[0]
    assert "exact" in r.method
    close([r.statistic, r.p_value], [v["sr_exact.V"], v["sr_exact.p"]])


def test_linear_model(ref):
    v = ref["vals"]
    tab = clinical.linear_model(ref["cohort"], "gap ~ C(diagnosis) + age + C(sex)", analysis="lm")
    names = {"Intercept": "(Intercept)", "C(diagnosis)[T.NMOSD]": "diagnosisNMOSD",
             "C(diagnosis)[T.RRMS]": "diagnosisRRMS", "C(sex)[T.M]": "sexM", "age": "age"}
    assert set(tab["term"]) == set(names)
    for ours, theirs in names.items():
        r = row(tab, ours)
        close([r.estimate, r.se, r.t, r.p_value, r.ci_low, r.ci_high],
              [v[f"lm.{theirs}.{s}"] for s in ("est", "se", "t", "p")] + vec(v, f"lm.{theirs}.ci"))


def _check_cox(tab, v, prefix):
    names = {"gap": "gap", "age": "age", "sex[T.M]": "sexM", "edss": "edss"}
    for ours, theirs in names.items():
        if f"{prefix}.{theirs}.coef" not in v:
            continue
        r = row(tab, ours)
        close([r.coef, r.se, r.p_value, r.ci_low, r.ci_high],
              [v[f"{prefix}.{theirs}.{s}"] for s in ("coef", "se", "p")]
              + vec(v, f"{prefix}.{theirs}.ci"))
        close(r.estimate, np.exp(v[f"{prefix}.{theirs}.coef"]))


def test_cox(ref):
    v = ref["vals"]
    covs = ["gap", "age", "sex", "edss"]
    tab = survival.cox_univariable_multivariable(patients(ref), "time", "event", covs)
    # the cohort has tied times, so Efron's method matters
    assert patients(ref)["time"][patients(ref)["event"] == 1].duplicated().any()
    _check_cox(tab[tab["model"] == "multivariable"], v, "coxm")
    for cov in covs:
        uni = tab[(tab["model"] == "univariable")]
        term = "sex[T.M]" if cov == "sex" else cov
        _check_cox(uni[uni["term"] == term], v, f"coxu_{cov}")


def test_logrank_and_km(ref):
    v = ref["vals"]
    pat = patients(ref)
    close(survival.logrank(pat, "time", "event", "diagnosis").iloc[0].statistic,
          v["logrank2.chisq"])
    close(survival.logrank(pat, "time", "event", "site").iloc[0].statistic, v["logrank3.chisq"])
    km = survival.kaplan_meier(pat, "time", "event")
    km = km[km["term"] != "median"]
    close(km["time"], vec(v, "km.time"))
    close(km["estimate"], vec(v, "km.surv"))
    close(km["ci_low"], vec(v, "km.lower"))
    close(km["ci_high"], vec(v, "km.upper"))


def test_roc(ref):
    v = ref["vals"]
    tab = roc.roc_analysis(patients(ref), "gap", "event")
    a, c = row(tab, "auc"), row(tab, "cutoff")
    close([a.estimate, a.ci_low, a.ci_high, a.se ** 2, a.p_value],
          [v["roc.auc"], *vec(v, "roc.ci"), v["roc.var"], v["roc.wilcox.p"]])
    close([c.estimate, c.sensitivity, c.specificity],
          [v["roc.cutoff"], v["roc.sens"], v["roc.spec"]])


def _r_pairs(ref, name):
    p = pd.read_csv(ref["dir"] / f"pairs_{name}.csv")
    return sorted(zip(p["treated"], p["control"], p["match"]))


def _affected(versions) -> bool:
    """MatchIt 4.5.1-4.5.3 truncate propensity-score differences to integers in the vectorised
    nearest-neighbour matcher (kosukeimai/MatchIt#163): nearest controls and calipers are wrong."""
    v = tuple(int(x) for x in str(versions["MatchIt"]).split(".")[:3])
    return (4, 5, 1) <= v < (4, 5, 4)


@pytest.mark.parametrize("name, subset, covs, kwargs", [
    ("psm1", "patients", ["age", "sex", "edss"], {}),
    ("psm_cal", "patients", ["age", "sex", "edss"], {"caliper": 0.1}),
    ("psm_r2", "hc_nmosd", ["age", "sex"], {"ratio": 2}),
])
def test_propensity_matching(ref, name, subset, covs, kwargs):
    v = ref["vals"]
    coh = ref["cohort"]
    d = patients(ref) if subset == "patients" else coh[coh["diagnosis"] != "RRMS"]
    res = clinical.propensity_match(d, "diagnosis", covs, treated_level="NMOSD",
                                    id_col="participant_id", **kwargs)
    close(res["propensity_score"], vec(v, f"{name}.ps"), rtol=1e-6)
    assert res["propensity_score"].nunique() == len(d)   # no ties: both R matchers must agree
    ours = sorted(zip(res["pairs"]["treated_id"], res["pairs"]["control_id"],
                      res["pairs"]["match"]))
    assert ours == _r_pairs(ref, f"{name}_general")
    if not _affected(ref["versions"]):
        assert ours == _r_pairs(ref, f"{name}_default")
    if "caliper" in kwargs:
        assert len(ours) < (d["diagnosis"] == "NMOSD").sum()    # the caliper dropped some
    bal = res["balance"].set_index("term")
    names = {"distance": "distance", "age": "age", "sex[F]": "sexF", "sex[M]": "sexM",
             "edss": "edss"}
    for o, r in names.items():
        if f"{name}.smd_before.{r}" in v:
            close([bal.loc[o, "smd_before"], bal.loc[o, "smd_after"]],
                  [v[f"{name}.smd_before.{r}"], v[f"{name}.smd_after.{r}"]])


@pytest.mark.parametrize("name, m_order, ratio, caliper", [
    ("ties_largest", "largest", 1, None), ("ties_smallest", "smallest", 1, None),
    ("ties_data", "data", 1, None), ("ties_caliper", "largest", 1, 2.0),
    ("ties_ratio2", "largest", 2, None),
])
def test_matching_tie_rules(ref, name, m_order, ratio, caliper):
    """The matcher's order and tie rules equal MatchIt's on integer distances with many ties."""
    ties = ref["ties"]
    treat, dist = ties["treat"].to_numpy(), ties["d"].to_numpy()
    treated = np.flatnonzero(treat == 1)
    mm = nearest_neighbour(treat, dist, order=_match_order(dist[treated], m_order, None),
                           ratio=ratio, caliper=caliper)
    ids = ties["id"].to_numpy()
    ours = sorted((ids[treated[i]], ids[c], j + 1) for i in range(len(treated))
                  for j, c in enumerate(mm[i]) if c >= 0)
    assert ours == _r_pairs(ref, name)


def test_lesion_filling_agreement(ref):
    """Raw (gap) against lesion-filled (gap2) agreement: cor.test, paired t.test, lm in R."""
    from brainage_bids.stats.agreement import agreement

    v, c = ref["vals"], ref["cohort"]
    tab = agreement(c["gap"], c["gap2"])
    r = row(tab, "pearson_r")
    close([r.estimate, r.ci_low, r.ci_high, r.p_value],
          [v["agree.r"], *vec(v, "agree.r_ci"), v["agree.r_p"]])
    close(row(tab, "r_squared").estimate, v["agree.r"] ** 2)
    m = row(tab, "mean_difference")
    close([m.estimate, m.ci_low, m.ci_high, m.p_value],
          [v["agree.mean"], *vec(v, "agree.mean_ci"), v["agree.mean_p"]])
    s = row(tab, "sd_difference")
    close([s.estimate, s.ci_low, s.ci_high], [v["agree.sd"], *vec(v, "agree.sd_ci")])
    for k in ("lower", "upper"):
        lim = row(tab, f"loa_{k}")
        close([lim.estimate, lim.ci_low, lim.ci_high],
              [v[f"agree.loa_{k}"], *vec(v, f"agree.loa_{k}_ci")])
    b = row(tab, "proportional_bias")
    close([b.estimate, b.ci_low, b.ci_high, b.p_value],
          [v["agree.slope"], *vec(v, "agree.slope_ci"), v["agree.slope_p"]])
