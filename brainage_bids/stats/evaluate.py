"""Accuracy of brain-age predictions on healthy controls, and comparison of models.

Conventions (also written into the tables):

* error = predicted - chronological age; MAE = mean |error|, its 95 % CI is the t interval of the
  mean of the absolute errors; mean error (the signed bias) has a t interval and a one-sample t-test
  against 0.
* R2 follows scikit-learn's ``r2_score(age, predicted)``: ``1 - sum(error^2) / sum((age -
  mean(age))^2)``. It measures agreement with the identity line and can be negative; it is not the
  squared Pearson correlation.
* Pearson r of predicted with age, with the Fisher-z 95 % CI and scipy's two-sided p-value.
* Site check (the NMOSD study's across-scanner check): MAE per site and a one-way ANOVA of the
  absolute errors across sites.
* Model comparison (the FLAIR study's t-test on bootstrapped standard errors), difference
  ``d = MAE_a - MAE_b``:

  - paired (same participants in both): B bootstrap resamples of the participants, the same
    resample for both models; ``SE = sd_b(MAE_a* - MAE_b*)`` (ddof 1); ``t = d / SE`` with
    ``n - 1`` degrees of freedom;
  - unpaired (independent samples): ``SE_a`` and ``SE_b`` from independent resamples of each
    model's participants; ``t = d / sqrt(SE_a^2 + SE_b^2)`` with Welch-Satterthwaite degrees of
    freedom ``(SE_a^2 + SE_b^2)^2 / (SE_a^4 / (n_a - 1) + SE_b^4 / (n_b - 1))``.

  Both give the two-sided p-value of t and the CI ``d +/- t_{0.975, df} * SE``. The generator is
  ``numpy.random.default_rng(seed)``, so a seed reproduces the numbers.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from scipy import stats

from .table import stats_frame
from .table import t_interval as _t_interval

R2_CONVENTION = "1 - SSres/SStot of predicted vs age (sklearn r2_score)"


def accuracy(age, predicted) -> dict:
    """MAE, R2, Pearson r and mean error of ``predicted`` against ``age``, with CIs and p-values."""
    age = np.asarray(age, float)
    pred = np.asarray(predicted, float)
    ok = np.isfinite(age) & np.isfinite(pred)
    age, pred = age[ok], pred[ok]
    n = len(age)
    err = pred - age
    out = {"n": n, "mae": float(np.mean(np.abs(err))) if n else np.nan,
           "mae_ci": _t_interval(np.abs(err)), "mean_error": float(np.mean(err)) if n else np.nan,
           "mean_error_ci": _t_interval(err), "mean_error_p": np.nan, "r2": np.nan,
           "pearson_r": np.nan, "pearson_ci": (np.nan, np.nan), "pearson_p": np.nan}
    if n >= 2 and np.std(err) > 1e-12 * max(1.0, abs(float(np.mean(err)))):
        out["mean_error_p"] = float(stats.ttest_1samp(err, 0.0).pvalue)
    ss_tot = float(np.sum((age - age.mean()) ** 2)) if n else 0.0
    if ss_tot > 0:
        out["r2"] = 1.0 - float(np.sum(err ** 2)) / ss_tot
    if n >= 3 and np.ptp(age) > 0 and np.ptp(pred) > 0:
        r, p = stats.pearsonr(age, pred)
        out["pearson_r"], out["pearson_p"] = float(r), float(p)
        if n > 3 and abs(r) < 1:
            z, h = np.arctanh(r), 1.959963984540054 / np.sqrt(n - 3)
            out["pearson_ci"] = (float(np.tanh(z - h)), float(np.tanh(z + h)))
    return out


def accuracy_rows(age, predicted, *, analysis: str = "evaluation", **extra) -> list[dict]:
    """:func:`accuracy` as table rows (terms mae, r2, pearson_r, mean_error); ``extra`` columns
    are added to each row."""
    a = accuracy(age, predicted)
    n = a["n"]
    rows = [
        {"term": "mae", "estimate": a["mae"], "ci_low": a["mae_ci"][0], "ci_high": a["mae_ci"][1]},
        {"term": "r2", "estimate": a["r2"], "note": R2_CONVENTION},
        {"term": "pearson_r", "estimate": a["pearson_r"], "ci_low": a["pearson_ci"][0],
         "ci_high": a["pearson_ci"][1], "p_value": a["pearson_p"]},
        {"term": "mean_error", "estimate": a["mean_error"], "ci_low": a["mean_error_ci"][0],
         "ci_high": a["mean_error_ci"][1], "p_value": a["mean_error_p"]},
    ]
    return [{"analysis": analysis, **r, "n": n, **extra} for r in rows]


def evaluate_controls(df: pd.DataFrame, *, age_col: str = "chronological_age",
                      analysis: str = "evaluation", source: str = "table",
                      fit_rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """Accuracy per (model, suffix) on control rows ``df``: raw predictions, and bias-corrected
    ones (``predicted_age_corrected``) in separate rows with ``prediction == "corrected"``.

    ``fit_rows`` (participant_id, session_id, model, suffix of the bias fit) gives the column
    ``bias_fit_overlap``: the share of the evaluated corrected rows that the correction was fitted
    on (1.0 means the corrected figures are in-sample, hence optimistic).
    """
    rows: list[dict] = []
    for (model, suffix), g in df.groupby(["model", "suffix"], sort=True):
        age = pd.to_numeric(g[age_col], errors="coerce")
        base = {"model": model, "suffix": suffix, "source": source}
        rows += accuracy_rows(age, pd.to_numeric(g["predicted_age"], errors="coerce"),
                              analysis=analysis, prediction="raw", **base)
        if "predicted_age_corrected" in g and g["predicted_age_corrected"].notna().any():
            pc = pd.to_numeric(g["predicted_age_corrected"], errors="coerce")
            overlap = np.nan
            if fit_rows is not None and len(fit_rows):
                f = fit_rows[(fit_rows["model"] == model) & (fit_rows["suffix"] == suffix)]
                fitted = set(zip(f["participant_id"], f["session_id"].fillna("n/a")))
                used = g[pc.notna() & age.notna()]
                keys = list(zip(used["participant_id"], used["session_id"].fillna("n/a")))
                overlap = (sum(k in fitted for k in keys) / len(keys)) if keys else np.nan
            rows += accuracy_rows(age, pc, analysis=analysis, prediction="corrected",
                                  bias_fit_overlap=overlap, **base)
    return stats_frame(rows)


def site_anova(df: pd.DataFrame, site_col: str, *, age_col: str = "chronological_age",
               pred_col: str = "predicted_age", analysis: str = "site_mae") -> pd.DataFrame:
    """MAE per site and a one-way ANOVA of absolute errors across sites, per (model, suffix).

    Sites with fewer than 2 rows are reported but left out of the ANOVA; raises ValueError when
    no (model, suffix) has two sites with at least 2 rows each.
    """
    rows: list[dict] = []
    tested = False
    for (model, suffix), g in df.groupby(["model", "suffix"], sort=True):
        err = (pd.to_numeric(g[pred_col], errors="coerce")
               - pd.to_numeric(g[age_col], errors="coerce")).abs()
        d = pd.DataFrame({"site": g[site_col], "abs_error": err}).dropna()
        base = {"analysis": analysis, "model": model, "suffix": suffix, "prediction": pred_col}
        groups = []
        for site, s in d.groupby("site", sort=True):
            lo, hi = _t_interval(s["abs_error"].to_numpy())
            rows.append({**base, "term": f"mae[{site}]", "estimate": float(s["abs_error"].mean()),
                         "ci_low": lo, "ci_high": hi, "n": len(s)})
            if len(s) >= 2:
                groups.append(s["abs_error"].to_numpy())
        if len(groups) >= 2:
            res = stats.f_oneway(*groups)
            n = sum(len(x) for x in groups)
            rows.append({**base, "term": "anova_abs_error", "estimate": float(res.statistic),
                         "p_value": float(res.pvalue), "n": n, "statistic": "F",
                         "df_between": len(groups) - 1, "df_within": n - len(groups)})
            tested = True
    if not tested:
        raise ValueError(f"fewer than two sites with at least 2 controls in column {site_col!r}")
    return stats_frame(rows)


def bootstrap_mae_difference(err_a, err_b, *, paired: bool, n_boot: int = 2000,
                             seed: int | None = 0) -> dict:
    """Difference in MAE between two models and its t-test on bootstrapped standard errors.

    ``err_a`` and ``err_b`` are prediction errors (predicted - age); when ``paired`` they belong to
    the same participants in the same order. See the module docstring for the formulas.
    """
    a = np.abs(np.asarray(err_a, float))
    b = np.abs(np.asarray(err_b, float))
    if paired and len(a) != len(b):
        raise ValueError("paired comparison needs the same participants in both models")
    if min(len(a), len(b)) < 2:
        raise ValueError("at least 2 participants per model are needed")
    rng = np.random.default_rng(seed)
    diff = float(a.mean() - b.mean())
    out = {"mae_a": float(a.mean()), "mae_b": float(b.mean()), "difference": diff,
           "n_a": len(a), "n_b": len(b), "n_boot": int(n_boot), "seed": seed,
           "test": "paired" if paired else "unpaired"}
    if paired:
        idx = rng.integers(0, len(a), size=(n_boot, len(a)))
        boots = a[idx].mean(axis=1) - b[idx].mean(axis=1)
        se = float(np.std(boots, ddof=1))
        dof = float(len(a) - 1)
        out.update(se_a=float(np.std(a[idx].mean(axis=1), ddof=1)),
                   se_b=float(np.std(b[idx].mean(axis=1), ddof=1)))
    else:
        se_a = float(np.std(a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(axis=1), ddof=1))
        se_b = float(np.std(b[rng.integers(0, len(b), size=(n_boot, len(b)))].mean(axis=1), ddof=1))
        se = float(np.sqrt(se_a ** 2 + se_b ** 2))
        den = se_a ** 4 / (len(a) - 1) + se_b ** 4 / (len(b) - 1)
        dof = float((se_a ** 2 + se_b ** 2) ** 2 / den) if den > 0 else float("nan")
        out.update(se_a=se_a, se_b=se_b)
    out.update(se=se, df=dof)
    if se > 0 and np.isfinite(dof):
        t = diff / se
        h = stats.t.ppf(0.975, dof) * se
        out.update(t=float(t), p_value=float(2 * stats.t.sf(abs(t), dof)),
                   ci_low=diff - h, ci_high=diff + h)
    else:  # identical errors in every resample: no difference to test
        out.update(t=float("nan"), p_value=1.0 if diff == 0 else float("nan"),
                   ci_low=diff, ci_high=diff)
    return out


def _label(model, suffix) -> str:
    return f"{model}/{suffix}"


def default_pairs(df: pd.DataFrame) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Comparisons made by default: for each model, every pair of suffixes (e.g. FLAIR vs T1w);
    for each suffix, the ensemble against each other model (single vs ensemble)."""
    keys = sorted(set(zip(df["model"], df["suffix"])))
    pairs = []
    for model in sorted({m for m, _ in keys}):
        sufs = sorted(s for m, s in keys if m == model)
        pairs += [((model, s1), (model, s2)) for s1, s2 in itertools.combinations(sufs, 2)]
    for suffix in sorted({s for _, s in keys}):
        models = sorted(m for m, s in keys if s == suffix)
        if "ensemble" in models:
            pairs += [(("ensemble", suffix), (m, suffix)) for m in models if m != "ensemble"]
    return pairs


def compare_models(df: pd.DataFrame, pairs=None, *, pred_col: str = "predicted_age",
                   age_col: str = "chronological_age", n_boot: int = 2000, seed: int | None = 0,
                   min_n: int = 2, analysis: str = "model_comparison") -> pd.DataFrame:
    """MAE differences between (model, suffix) pairs on control rows ``df`` (one row per
    participant and model). Each pair gives an unpaired row, and a paired row on the participants
    both models predicted when there are at least ``min_n`` of them. Raises ValueError when no
    pair could be compared."""
    pairs = default_pairs(df) if pairs is None else [tuple(map(tuple, p)) for p in pairs]
    d = df.copy()
    d["_err"] = (pd.to_numeric(d[pred_col], errors="coerce")
                 - pd.to_numeric(d[age_col], errors="coerce"))
    d = d.dropna(subset=["_err"])
    rows = []
    for (ka, kb) in pairs:
        ga = d[(d["model"] == ka[0]) & (d["suffix"] == ka[1])].set_index("participant_id")["_err"]
        gb = d[(d["model"] == kb[0]) & (d["suffix"] == kb[1])].set_index("participant_id")["_err"]
        ga = ga[~ga.index.duplicated()]
        gb = gb[~gb.index.duplicated()]
        if min(len(ga), len(gb)) < min_n:
            continue
        base = {"analysis": analysis, "term": f"mae[{_label(*ka)}] - mae[{_label(*kb)}]",
                "model_a": ka[0], "suffix_a": ka[1], "model_b": kb[0], "suffix_b": kb[1],
                "prediction": pred_col}
        common = ga.index.intersection(gb.index)
        tests = []
        if len(common) >= min_n:
            tests.append(bootstrap_mae_difference(ga[common].to_numpy(), gb[common].to_numpy(),
                                                  paired=True, n_boot=n_boot, seed=seed))
        tests.append(bootstrap_mae_difference(ga.to_numpy(), gb.to_numpy(), paired=False,
                                              n_boot=n_boot, seed=seed))
        for r in tests:
            n = r["n_a"] if r["test"] == "paired" else r["n_a"] + r["n_b"]
            rows.append({**base, "estimate": r["difference"], "ci_low": r["ci_low"],
                         "ci_high": r["ci_high"], "p_value": r["p_value"], "n": n,
                         **{k: r[k] for k in ("test", "mae_a", "mae_b", "se_a", "se_b", "se", "t",
                                              "df", "n_a", "n_b", "n_boot", "seed")}})
    if not rows:
        raise ValueError("no pair of models with predictions for the same kind of participants "
                         f"(at least {min_n} each)")
    return stats_frame(rows)
