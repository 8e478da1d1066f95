"""Clinical statistics of the group level: group comparisons, rank tests, linear models and
propensity-score matching.

Every function takes a frame plus column names, drops the rows with a missing value in the columns
it uses, and returns a :func:`~brainage_bids.stats.table.stats_frame` table (``analysis``, ``term``,
``estimate``, ``ci_low``, ``ci_high``, ``p_value``, ``n``, then extra columns). The tests follow the
defaults of R (``t.test``, ``aov``/``TukeyHSD``, ``chisq.test``, ``wilcox.test``, ``lm``,
``MatchIt::matchit``), as in the studies this package reproduces; ``tests/test_stats_vs_r.py`` checks
them against R.

Group levels are taken in sorted order (``sorted(unique values)``); differences are always
"second level minus first level" and the ``term`` says which, e.g. ``"RRMS - NMOSD"``.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy import stats

from .table import complete as _complete
from .table import stats_frame
from .table import t_interval as _t_interval

LOG = logging.getLogger("brainage_bids.stats.clinical")

#: R's wilcox.test uses the exact null distribution below this many observations per sample.
EXACT_RANK_LIMIT = 50


# ---------------------------------------------------------------------------------------------
# helpers
def _levels(values: pd.Series) -> list:
    """Distinct values in sorted order."""
    return sorted(pd.unique(values))


def _mean_rows(analysis: str, d: pd.DataFrame, value: str, group: str, levels: list) -> list[dict]:
    rows = []
    for lvl in levels:
        x = d.loc[d[group] == lvl, value].to_numpy(dtype=float)
        lo, hi = _t_interval(x)
        rows.append({"analysis": analysis, "term": f"mean:{lvl}", "estimate": float(np.mean(x)),
                     "ci_low": lo, "ci_high": hi, "n": len(x),
                     "sd": float(np.std(x, ddof=1)) if len(x) > 1 else float("nan"),
                     "method": "mean (t interval)", "group1": str(lvl)})
    return rows


def _design(d: pd.DataFrame, covariates: list[str], *, all_levels: bool = False) -> pd.DataFrame:
    """Numeric design matrix of ``covariates`` (no intercept).

    Numeric columns stay as they are, booleans become 0/1, other columns (strings, categoricals)
    are dummy-coded: with ``all_levels`` one column per level (as MatchIt's balance tables),
    otherwise one per level but the first sorted one, the reference (R's treatment contrasts).
    Dummy columns are named ``"col[T.level]"`` (``"col[level]"`` with ``all_levels``).
    """
    out = {}
    for col in covariates:
        s = d[col]
        if pd.api.types.is_bool_dtype(s):
            out[col] = s.astype(float)
        elif pd.api.types.is_numeric_dtype(s):
            out[col] = s.astype(float)
        else:
            levels = _levels(s)
            for lvl in (levels if all_levels else levels[1:]):
                name = f"{col}[{lvl}]" if all_levels else f"{col}[T.{lvl}]"
                out[name] = (s == lvl).astype(float)
    return pd.DataFrame(out, index=d.index)


# ---------------------------------------------------------------------------------------------
# group comparisons
def compare_groups(df: pd.DataFrame, value: str, group: str, *,
                   analysis: str = "gap_by_group") -> pd.DataFrame:
    """Compare ``value`` between the levels of ``group``.

    Two levels: Student's t-test (equal variances, as R's ``t.test(var.equal=TRUE)``) and Welch's
    t-test, one row each (column ``method``); ``estimate`` is the mean difference second level minus
    first (sorted order), with its 95 % CI, ``statistic`` t, ``df``, ``se``.
    Three or more levels: a one-way ANOVA row (``term`` = the group column, ``statistic`` F, ``df``
    and ``df_resid``, ``estimate`` NaN) and Tukey HSD rows for every pair (statsmodels
    ``pairwise_tukeyhsd``; ``estimate`` = difference, family-wise 95 % CI, adjusted p in
    ``p_value``, ``se`` = sqrt(MSE (1/n_i + 1/n_j))), equal to R's ``aov`` + ``TukeyHSD``.
    Both cases add one ``"mean:<level>"`` row per level (mean, t interval, ``sd``, ``n``).
    """
    d = _complete(df, [value, group])
    levels = _levels(d[group])
    if len(levels) < 2:
        raise ValueError(f"{group!r} has fewer than two levels ({levels}); nothing to compare")
    rows = _mean_rows(analysis, d, value, group, levels)
    samples = [d.loc[d[group] == lvl, value].to_numpy(dtype=float) for lvl in levels]
    if len(levels) == 2:
        first, second = samples
        for equal_var, method in ((True, "Student t-test"), (False, "Welch t-test")):
            res = stats.ttest_ind(second, first, equal_var=equal_var)
            ci = res.confidence_interval(0.95)
            diff = float(np.mean(second) - np.mean(first))
            rows.append({"analysis": analysis, "term": f"{levels[1]} - {levels[0]}",
                         "estimate": diff, "ci_low": float(ci.low), "ci_high": float(ci.high),
                         "p_value": float(res.pvalue), "n": len(first) + len(second),
                         "statistic": float(res.statistic), "df": float(res.df),
                         "se": diff / float(res.statistic) if res.statistic else float("nan"),
                         "method": method, "group1": str(levels[0]), "group2": str(levels[1])})
        return stats_frame(rows)

    from statsmodels.stats.multicomp import pairwise_tukeyhsd

    f = stats.f_oneway(*samples)
    n = len(d)
    rows.append({"analysis": analysis, "term": group, "p_value": float(f.pvalue), "n": n,
                 "statistic": float(f.statistic), "df": float(len(levels) - 1),
                 "df_resid": float(n - len(levels)), "method": "one-way ANOVA"})
    labels = d[group].map({lvl: i for i, lvl in enumerate(levels)}).to_numpy()
    tk = pairwise_tukeyhsd(d[value].to_numpy(dtype=float), labels, alpha=0.05)
    pairs = [(i, j) for i in range(len(levels)) for j in range(i + 1, len(levels))]
    for k, (i, j) in enumerate(pairs):  # statsmodels lists pairs (i, j), i < j, in this order
        rows.append({"analysis": analysis, "term": f"{levels[j]} - {levels[i]}",
                     "estimate": float(tk.meandiffs[k]), "ci_low": float(tk.confint[k, 0]),
                     "ci_high": float(tk.confint[k, 1]), "p_value": float(tk.pvalues[k]),
                     "n": len(samples[i]) + len(samples[j]),
                     # statsmodels' std_pairs is on the studentized-range scale (SE / sqrt 2)
                     "se": float(tk.std_pairs[k]) * np.sqrt(2.0),
                     "method": "Tukey HSD", "group1": str(levels[i]), "group2": str(levels[j])})
    return stats_frame(rows)


def chi_square(df: pd.DataFrame, a: str, b: str, *, analysis: str = "sex_by_group") -> pd.DataFrame:
    """Pearson chi-square test of independence of ``a`` and ``b`` (scipy ``chi2_contingency``).

    As R's ``chisq.test`` default, Yates' continuity correction is applied to 2x2 tables only
    (``method`` says which). First row: the test (``term`` ``"<a> x <b>"``, ``statistic`` chi2,
    ``df``, ``p_value``, ``estimate`` NaN, ``min_expected``). Then one row per cell,
    ``term`` ``"<a>=<x> | <b>=<y>"``: ``estimate`` the count, ``percent`` within the level of
    ``b``, ``expected`` the count expected under independence.
    """
    d = _complete(df, [a, b])
    table = pd.crosstab(d[a], d[b])
    if table.shape[0] < 2 or table.shape[1] < 2:
        raise ValueError(f"chi-square needs at least two levels in {a!r} and {b!r}; "
                         f"got table {table.shape}")
    res = stats.chi2_contingency(table.to_numpy(), correction=True)
    yates = res.dof == 1
    rows = [{"analysis": analysis, "term": f"{a} x {b}", "p_value": float(res.pvalue),
             "n": int(table.to_numpy().sum()), "statistic": float(res.statistic),
             "df": float(res.dof), "min_expected": float(res.expected_freq.min()),
             "method": "Pearson chi-square" + (" with Yates continuity correction" if yates else "")}]
    col_tot = table.sum(axis=0)
    for i, x in enumerate(table.index):
        for j, y in enumerate(table.columns):
            rows.append({"analysis": analysis, "term": f"{a}={x} | {b}={y}",
                         "estimate": float(table.iloc[i, j]), "n": int(col_tot[y]),
                         "percent": 100.0 * table.iloc[i, j] / col_tot[y],
                         "expected": float(res.expected_freq[i, j]), "method": "count"})
    return stats_frame(rows)


def _has_ties(x: np.ndarray) -> bool:
    return len(np.unique(x)) < len(x)


def rank_test(df: pd.DataFrame, value: str, group: str | None = None, *,
              paired_with: str | None = None, analysis: str = "edss_by_group") -> pd.DataFrame:
    """Rank tests as R's ``wilcox.test`` (two-sided, default settings).

    Two independent groups (``group`` with two levels): Mann-Whitney U / Wilcoxon rank-sum test.
    ``statistic`` is R's W (the U of the first sorted level); the p-value is exact when both
    samples have fewer than 50 values and there are no ties, otherwise from the normal
    approximation with tie and continuity correction (``method`` says which). ``estimate`` is the
    difference of medians, second level minus first (no CI); ``"median:<level>"`` rows give each
    median with ``q1``/``q3`` (R's quantile type 7).

    Paired (``paired_with`` names a second column, ``group`` unused): Wilcoxon signed-rank test of
    ``value - paired_with``. Zero differences are dropped (R's rule); exact p when fewer than 50
    non-zero differences and no ties or zeros, else normal approximation with continuity
    correction. ``statistic`` is R's V (sum of the ranks of the positive differences),
    ``estimate`` the median difference.
    """
    if paired_with is not None:
        d = _complete(df, [value, paired_with])
        diff = (d[value].astype(float) - d[paired_with].astype(float)).to_numpy()
        nz = diff[diff != 0]
        if len(nz) == 0:
            raise ValueError("all paired differences are zero; the signed-rank test is undefined")
        exact = len(nz) < EXACT_RANK_LIMIT and not _has_ties(np.abs(nz)) and len(nz) == len(diff)
        res = stats.wilcoxon(nz, zero_method="wilcox", correction=not exact,
                             method="exact" if exact else "asymptotic")
        ranks = stats.rankdata(np.abs(nz))
        v = float(ranks[nz > 0].sum())
        method = "Wilcoxon signed-rank " + (
            "(exact)" if exact else "(normal approximation, continuity correction)")
        return stats_frame([{"analysis": analysis, "term": f"{value} - {paired_with}",
                             "estimate": float(np.median(diff)), "p_value": float(res.pvalue),
                             "n": len(diff), "statistic": v, "n_nonzero": len(nz),
                             "method": method}])
    if group is None:
        raise ValueError("rank_test needs either group (two independent samples) or paired_with")
    d = _complete(df, [value, group])
    levels = _levels(d[group])
    if len(levels) != 2:
        raise ValueError(f"rank_test compares two groups; {group!r} has levels {levels}")
    x = d.loc[d[group] == levels[0], value].to_numpy(dtype=float)
    y = d.loc[d[group] == levels[1], value].to_numpy(dtype=float)
    exact = (len(x) < EXACT_RANK_LIMIT and len(y) < EXACT_RANK_LIMIT
             and not _has_ties(np.concatenate([x, y])))
    res = stats.mannwhitneyu(x, y, alternative="two-sided", use_continuity=True,
                             method="exact" if exact else "asymptotic")
    rows = []
    for lvl, s in zip(levels, (x, y)):
        q1, med, q3 = np.percentile(s, [25, 50, 75])
        rows.append({"analysis": analysis, "term": f"median:{lvl}", "estimate": float(med),
                     "n": len(s), "q1": float(q1), "q3": float(q3), "method": "median (IQR)",
                     "group1": str(lvl)})
    method = "Mann-Whitney U / Wilcoxon rank-sum " + (
        "(exact)" if exact else "(normal approximation, continuity correction)")
    rows.append({"analysis": analysis, "term": f"{levels[1]} - {levels[0]}",
                 "estimate": float(np.median(y) - np.median(x)), "p_value": float(res.pvalue),
                 "n": len(x) + len(y), "statistic": float(res.statistic), "method": method,
                 "group1": str(levels[0]), "group2": str(levels[1])})
    return stats_frame(rows)


def linear_model(df: pd.DataFrame, formula: str, *, analysis: str) -> pd.DataFrame:
    """Ordinary least squares from a formula (statsmodels/patsy syntax, e.g.
    ``"gap ~ C(diagnosis) + age + C(sex)"``), as R's ``lm``/``summary``/``confint``.

    One row per coefficient: ``term`` (patsy's name, e.g. ``"C(diagnosis)[T.RRMS]"``), ``estimate``,
    95 % CI, ``p_value``, ``n`` (complete rows used), ``se``, ``t``, ``df`` (residual), plus the
    model's ``r_squared`` and ``adj_r_squared`` on every row. Categorical terms use the first sorted
    level as reference, as R does for character columns.
    """
    import statsmodels.formula.api as smf

    fit = smf.ols(formula, data=df, missing="drop").fit()
    ci = fit.conf_int(alpha=0.05)
    rows = [{"analysis": analysis, "term": term, "estimate": float(fit.params[term]),
             "ci_low": float(ci.loc[term, 0]), "ci_high": float(ci.loc[term, 1]),
             "p_value": float(fit.pvalues[term]), "n": int(fit.nobs),
             "se": float(fit.bse[term]), "t": float(fit.tvalues[term]), "df": float(fit.df_resid),
             "r_squared": float(fit.rsquared), "adj_r_squared": float(fit.rsquared_adj),
             "method": "OLS"} for term in fit.params.index]
    return stats_frame(rows)


# ---------------------------------------------------------------------------------------------
# propensity-score matching
def _binarize(s: pd.Series, treated_level=None) -> tuple[np.ndarray, object]:
    """0/1 treatment and the level taken as treated (1)."""
    levels = _levels(s)
    if len(levels) != 2:
        raise ValueError(f"treatment {s.name!r} must have exactly two levels, has {levels}")
    if treated_level is None:
        # MatchIt's rule: 1/True when the levels are 0/1, else the second sorted level.
        treated_level = levels[1]
    if treated_level not in levels:
        raise ValueError(f"treated level {treated_level!r} is not a level of {s.name!r} ({levels})")
    return (s == treated_level).to_numpy(dtype=int), treated_level


def _match_order(ps1: np.ndarray, m_order: str, seed) -> np.ndarray:
    """Order in which treated units are matched (indices into the treated units); ties keep the
    data order, as R's ``order()``."""
    if m_order == "largest":
        return np.argsort(-ps1, kind="stable")
    if m_order == "smallest":
        return np.argsort(ps1, kind="stable")
    if m_order == "data":
        return np.arange(len(ps1))
    if m_order == "random":
        return np.random.default_rng(seed).permutation(len(ps1))
    raise ValueError(f"m_order must be largest, smallest, data or random; got {m_order!r}")


def nearest_neighbour(treat: np.ndarray, distance: np.ndarray, *, order: np.ndarray | None = None,
                      ratio: int = 1, caliper: float | None = None) -> np.ndarray:
    """Greedy nearest-neighbour matching without replacement on a scalar ``distance`` (the
    propensity score), the algorithm of MatchIt's ``method="nearest"`` for a vector distance.

    All units are sorted by ``distance`` (stable: ties keep the data order). Treated units are
    taken in ``order`` (indices into the treated units; default: decreasing distance, MatchIt's
    ``m.order="largest"``). For each one, the nearest still unmatched control below and above it
    in the sorted order are found; the closer one is taken, the one below on equal distance. With
    a ``caliper`` (raw units), a side whose nearest control is farther than the caliper offers
    none. With ``ratio`` k, k rounds are run, each giving every treated unit one more control.

    Returns an array (n_treated, ratio) of control positions (indices into ``treat``), -1 where
    no match was found; rows follow the data order of the treated units.
    """
    treat = np.asarray(treat, dtype=int)
    distance = np.asarray(distance, dtype=float)
    treated = np.flatnonzero(treat == 1)
    if order is None:
        order = _match_order(distance[treated], "largest", None)
    mm = np.full((len(treated), ratio), -1, dtype=int)
    d_ord = np.argsort(distance, kind="stable")        # sorted position -> unit
    pos = np.empty_like(d_ord)
    pos[d_ord] = np.arange(len(d_ord))                  # unit -> sorted position
    dist = distance[d_ord]
    available = treat[d_ord] == 0                        # controls not yet used
    n_avail = int(available.sum())
    for r in range(ratio):
        for t in order:
            if n_avail == 0:
                return mm
            ii = pos[treated[t]]
            left = ii - 1
            while left >= 0 and not available[left]:
                left -= 1
            if left >= 0 and caliper is not None and abs(dist[ii] - dist[left]) > caliper:
                left = -1
            right = ii + 1
            while right < len(dist) and not available[right]:
                right += 1
            if right >= len(dist) or (caliper is not None and abs(dist[ii] - dist[right]) > caliper):
                right = -1
            if left >= 0 and right >= 0:
                k = left if abs(dist[left] - dist[ii]) <= abs(dist[right] - dist[ii]) else right
            elif left >= 0:
                k = left
            elif right >= 0:
                k = right
            else:
                continue
            mm[t, r] = d_ord[k]
            available[k] = False
            n_avail -= 1
    return mm


def _smd(x: np.ndarray, treat: np.ndarray, w: np.ndarray, sd_treated: float) -> tuple:
    """Weighted means of treated/control and their standardised difference (MatchIt's
    ``summary.matchit``: divided by the SD of the treated units in the full sample)."""
    t, c = treat == 1, treat == 0
    mt = float(np.sum(w[t] * x[t]) / np.sum(w[t]))
    mc = float(np.sum(w[c] * x[c]) / np.sum(w[c]))
    diff = mt - mc
    if abs(diff) <= np.sqrt(np.finfo(float).eps):
        return mt, mc, diff
    return mt, mc, diff / sd_treated


def _sd_treated(x: np.ndarray, treat: np.ndarray) -> float:
    """MatchIt's denominator: SD in the treated units (p(1-p) for a 0/1 variable); pooled SD of
    both groups when that is zero."""
    def var(v):
        if np.all((v == 0) | (v == 1)):
            p = v.mean()
            return p * (1 - p)
        return v.var(ddof=1) if len(v) > 1 else float("nan")
    sd = np.sqrt(var(x[treat == 1]))
    if not np.isfinite(sd) or sd < np.sqrt(np.finfo(float).eps):
        sd = np.sqrt((var(x[treat == 1]) + var(x[treat == 0])) / 2)
    return float(sd)


def propensity_match(df: pd.DataFrame, treatment: str, covariates: list[str], *,
                     caliper: float | None = None, ratio: int = 1, seed: int | None = None,
                     m_order: str = "largest", std_caliper: bool = True,
                     treated_level=None, id_col: str | None = None) -> dict:
    """Propensity-score matching as ``MatchIt::matchit(treat ~ covariates, method="nearest",
    distance="glm")`` with its defaults.

    The propensity score is the fitted probability of a logistic regression (logit link) of the
    treatment on ``covariates`` (strings/categoricals dummy-coded against their first sorted level).
    Treated units are matched in decreasing order of the score (``m_order="largest"``, MatchIt's
    default for a propensity score) to their nearest control, without replacement, ``ratio``
    controls each (see :func:`nearest_neighbour` for the tie rules). ``caliper`` is in standard
    deviations of the propensity score over all units (``std_caliper=True``, as MatchIt) or in raw
    score units. ``seed`` only matters for ``m_order="random"``.

    The treated group is ``treated_level``; by default 1/True for 0/1 or boolean columns, else the
    second sorted level (MatchIt's rule for a factor).

    Returns a dict:
      ``"pairs"``: one row per matched control: ``treated_index``, ``control_index`` (index labels
      of ``df``), ``treated_id``/``control_id`` when ``id_col`` is given, ``distance`` (absolute
      difference of the scores), ``treated_ps``, ``control_ps``, ``subclass`` (1.. in the data
      order of the treated units), ``match`` (1..ratio);
      ``"balance"``: stats_frame, analysis ``"psm_balance"``, one row per covariate column (dummies
      for every level, ``term`` ``"col[level]"``) and the score (``"distance"``): ``estimate`` the
      standardised mean difference after matching, ``smd_before``, ``smd_after``, treated/control
      means before and after, ``n`` matched units, ``n_before``; computed as MatchIt's
      ``summary()`` (denominator: SD of the treated units before matching);
      ``"data"``: the matched rows of ``df`` in their original order, with ``propensity_score``,
      ``subclass`` and ``weights`` (MatchIt's matching weights) added;
      ``"propensity_score"``: the score of every complete row (Series indexed as ``df``);
      ``"treated_level"``: the level taken as treated.
    """
    import statsmodels.api as sm

    if ratio < 1:
        raise ValueError("ratio must be at least 1")
    d = _complete(df, [treatment, *covariates])
    treat, treated_level = _binarize(d[treatment], treated_level)
    X = _design(d, covariates)
    exog = np.column_stack([np.ones(len(d)), X.to_numpy(dtype=float)])
    fit = sm.GLM(treat, exog, family=sm.families.Binomial()).fit()
    ps = np.asarray(fit.fittedvalues, dtype=float)

    cal = None
    if caliper is not None:
        cal = abs(caliper) * (float(np.std(ps, ddof=1)) if std_caliper else 1.0)
    treated = np.flatnonzero(treat == 1)
    n0 = int((treat == 0).sum())
    if n0 * 1 < len(treated) * ratio:
        LOG.warning("fewer control units (%d) than needed for %d:%d matching of %d treated units; "
                    "not all treated units will get %d match(es)", n0, 1, ratio, len(treated), ratio)
    order = _match_order(ps[treated], m_order, seed)
    mm = nearest_neighbour(treat, ps, order=order, ratio=ratio, caliper=cal)

    labels = d.index.to_numpy()
    pair_rows = []
    weights = np.zeros(len(d))
    subclass = np.full(len(d), np.nan)
    sub = 0
    for t_row, t in enumerate(treated):
        got = [c for c in mm[t_row] if c >= 0]
        if not got:
            continue
        sub += 1
        weights[t] = 1.0
        subclass[t] = sub
        for j, c in enumerate(got, start=1):
            weights[c] += 1.0 / len(got)
            subclass[c] = sub
            row = {"treated_index": labels[t], "control_index": labels[c],
                   "distance": abs(ps[t] - ps[c]), "treated_ps": ps[t], "control_ps": ps[c],
                   "subclass": sub, "match": j}
            if id_col is not None:
                row = {"treated_id": d[id_col].iloc[t], "control_id": d[id_col].iloc[c], **row}
            pair_rows.append(row)
    unmatched = len(treated) - sub
    if unmatched:
        LOG.info("propensity matching: %d of %d treated units found no control", unmatched,
                 len(treated))
    # MatchIt scales control weights to sum to the number of matched controls
    c_matched = (treat == 0) & (weights > 0)
    if c_matched.any():
        weights[c_matched] *= c_matched.sum() / weights[c_matched].sum()
    pairs = pd.DataFrame(pair_rows, columns=(["treated_id", "control_id"] if id_col else [])
                         + ["treated_index", "control_index", "distance", "treated_ps",
                            "control_ps", "subclass", "match"])

    Xall = _design(d, covariates, all_levels=True)
    Xall["distance"] = ps
    keep = weights > 0
    bal_rows = []
    for term in Xall.columns:
        x = Xall[term].to_numpy(dtype=float)
        sd_t = _sd_treated(x, treat)
        mt0, mc0, smd0 = _smd(x, treat, np.ones(len(d)), sd_t)
        if keep.any() and (treat[keep] == 0).any():
            mt1, mc1, smd1 = _smd(x[keep], treat[keep], weights[keep], sd_t)
        else:
            mt1 = mc1 = smd1 = float("nan")
        bal_rows.append({"analysis": "psm_balance", "term": term, "estimate": smd1,
                         "n": int(keep.sum()), "smd_before": smd0, "smd_after": smd1,
                         "mean_treated_before": mt0, "mean_control_before": mc0,
                         "mean_treated_after": mt1, "mean_control_after": mc1,
                         "n_before": len(d), "method": "standardised mean difference"})
    data = d.loc[keep].copy()
    data["propensity_score"] = ps[keep]
    data["subclass"] = subclass[keep].astype(int)
    data["weights"] = weights[keep]
    return {"pairs": pairs, "balance": stats_frame(bal_rows), "data": data,
            "propensity_score": pd.Series(ps, index=d.index, name="propensity_score"),
            "treated_level": treated_level}


def matched_comparison(matched_df: pd.DataFrame, value: str, treatment: str, *,
                       analysis: str = "gap_after_matching") -> pd.DataFrame:
    """Compare ``value`` between the treatment groups of a matched sample
    (``propensity_match(...)["data"]``): the rows of :func:`compare_groups` (Student and Welch
    t-tests, group means), plus, when the sample has a ``subclass`` column with one control per
    treated unit, a paired t-test over the matched pairs (``method`` "paired t-test (matched
    pairs)", estimate = mean within-pair difference second level minus first)."""
    out = compare_groups(matched_df, value, treatment, analysis=analysis)
    d = _complete(matched_df, [value, treatment])
    if "subclass" in d.columns:
        levels = _levels(d[treatment])
        sizes = d.groupby("subclass")[treatment].agg(["size", "nunique"])
        if len(levels) == 2 and (sizes["size"] == 2).all() and (sizes["nunique"] == 2).all():
            wide = d.pivot(index="subclass", columns=treatment, values=value)
            diff = (wide[levels[1]] - wide[levels[0]]).to_numpy(dtype=float)
            res = stats.ttest_1samp(diff, 0.0)
            ci = res.confidence_interval(0.95)
            extra = stats_frame([{
                "analysis": analysis, "term": f"{levels[1]} - {levels[0]}",
                "estimate": float(diff.mean()), "ci_low": float(ci.low), "ci_high": float(ci.high),
                "p_value": float(res.pvalue), "n": 2 * len(diff), "statistic": float(res.statistic),
                "df": float(res.df), "se": float(diff.std(ddof=1) / np.sqrt(len(diff))),
                "method": "paired t-test (matched pairs)", "group1": str(levels[0]),
                "group2": str(levels[1])}])
            out = pd.concat([out, extra], ignore_index=True)
    return out
