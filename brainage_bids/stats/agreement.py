"""Agreement of raw and lesion-filled brain age (group level, ``lesion_filling_agreement``).

Pairs: the raw and lesion-filled rows of the same scan and model (same participant, session,
source file, suffix and model); one pair per participant, the baseline (first) session, as for
the clinical statistics. Predicted ages are the uncorrected ones: the age-bias correction is one
linear map applied to both rows of a pair, so it rescales the differences by the same factor.

Per (model, suffix), in ``stats/lesion_filling_agreement.tsv`` (STATS_COLUMNS, terms):

- ``pearson_r``: Pearson correlation of filled on raw brain age, Fisher-z 95 % CI, p of r = 0;
- ``r_squared``: its square (the NMOSD study's R2 = 0.984 is this squared correlation), CI the
  squared bounds of r's CI when r's CI excludes 0;
- ``mean_difference``: mean of filled - raw (Bland-Altman bias), t 95 % CI, paired t-test p;
- ``sd_difference``: SD of the differences (n - 1), chi-square 95 % CI;
- ``loa_lower`` / ``loa_upper``: 95 % limits of agreement, mean +/- 1.96 SD, with the 95 % CI of
  each limit from its standard error sqrt(3 s^2 / n) and t with n - 1 df (Bland & Altman 1986,
  Lancet i:307-310; 1999, Stat Methods Med Res 8:135-160);
- ``proportional_bias``: slope of the differences on the pair means (Bland & Altman 1999), t CI
  and p.

A Bland-Altman figure per (model, suffix) goes to ``group/figures/``
(:func:`brainage_bids.reports.group_figures.bland_altman_figure`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from .collect import is_lesion_filled

ANALYSIS = "lesion_filling_agreement"
PAIR_KEYS = ["participant_id", "session_id", "source_file", "suffix", "model"]
LOA_Z = 1.96


def paired_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per scan and model with both kinds of prediction: the keys, ``raw``, ``filled``,
    ``session_order`` (when in ``df``). Rows without a finite prediction are dropped."""
    d = df.copy()
    for k in PAIR_KEYS:
        d[k] = d[k].astype(object).where(d[k].notna(), "")
    d["predicted_age"] = pd.to_numeric(d["predicted_age"], errors="coerce")
    d = d[np.isfinite(d["predicted_age"])]
    filled = is_lesion_filled(d)
    extra = ["session_order"] if "session_order" in d else []
    raw = d[~filled].drop_duplicates(PAIR_KEYS)[PAIR_KEYS + extra + ["predicted_age"]]
    fil = d[filled].drop_duplicates(PAIR_KEYS)[PAIR_KEYS + ["predicted_age"]]
    pairs = raw.rename(columns={"predicted_age": "raw"}).merge(
        fil.rename(columns={"predicted_age": "filled"}), on=PAIR_KEYS, how="inner")
    pairs["session_id"] = pairs["session_id"].replace("", np.nan)
    return pairs


def baseline_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """The first session of each participant (``session_order``, else the session label), and
    the first source file within it, per (model, suffix)."""
    from .bias import session_rank

    if pairs.empty:
        return pairs
    d = pairs.assign(_rank=session_rank(pairs))
    d = d.sort_values(["model", "suffix", "participant_id", "_rank", "source_file"],
                      kind="mergesort")
    return d.drop_duplicates(["model", "suffix", "participant_id"]).drop(columns="_rank")


def agreement(raw, filled) -> pd.DataFrame:
    """Agreement statistics of paired predictions (module docstring), as STATS_COLUMNS rows.

    Raises ValueError with fewer than 2 pairs.
    """
    raw = np.asarray(raw, dtype=float)
    filled = np.asarray(filled, dtype=float)
    ok = np.isfinite(raw) & np.isfinite(filled)
    raw, filled = raw[ok], filled[ok]
    n = int(raw.size)
    if n < 2:
        raise ValueError(f"{n} raw/lesion-filled pair(s): at least 2 are needed")
    diff = filled - raw
    mean_d = float(diff.mean())
    sd = float(diff.std(ddof=1))
    t = float(stats.t.ppf(0.975, n - 1))
    se_mean = sd / np.sqrt(n)
    se_loa = np.sqrt(3.0 * sd ** 2 / n)
    rows = []

    def add(term, est, lo=np.nan, hi=np.nan, p=np.nan, **extra):
        rows.append({"analysis": ANALYSIS, "term": term, "estimate": float(est),
                     "ci_low": float(lo), "ci_high": float(hi), "p_value": float(p), "n": n,
                     **extra})

    r = lo_r = hi_r = p_r = np.nan
    if n >= 3 and np.ptp(raw) > 0 and np.ptp(filled) > 0:
        r, p_r = stats.pearsonr(raw, filled)
        r = float(np.clip(r, -1.0, 1.0))
        if n > 3 and abs(r) < 1:
            z, se_z = np.arctanh(r), 1.0 / np.sqrt(n - 3)
            lo_r, hi_r = np.tanh(z - 1.96 * se_z), np.tanh(z + 1.96 * se_z)
        elif abs(r) == 1:
            lo_r = hi_r = r
    add("pearson_r", r, lo_r, hi_r, p_r)
    r2_lo, r2_hi = np.nan, np.nan
    if np.isfinite(lo_r) and (lo_r > 0 or hi_r < 0):
        r2_lo, r2_hi = sorted([lo_r ** 2, hi_r ** 2])
    add("r_squared", r ** 2 if np.isfinite(r) else np.nan, r2_lo, r2_hi, p_r)
    p_t = float(stats.ttest_1samp(diff, 0.0).pvalue) if sd > 0 else (
        1.0 if mean_d == 0 else 0.0)
    add("mean_difference", mean_d, mean_d - t * se_mean, mean_d + t * se_mean, p_t)
    if n > 1 and sd > 0:
        sd_lo = sd * np.sqrt((n - 1) / stats.chi2.ppf(0.975, n - 1))
        sd_hi = sd * np.sqrt((n - 1) / stats.chi2.ppf(0.025, n - 1))
    else:
        sd_lo = sd_hi = sd
    add("sd_difference", sd, sd_lo, sd_hi)
    for term, sign in (("loa_lower", -1.0), ("loa_upper", 1.0)):
        limit = mean_d + sign * LOA_Z * sd
        add(term, limit, limit - t * se_loa, limit + t * se_loa)
    means = (raw + filled) / 2.0
    if n >= 3 and np.ptp(means) > 0:
        res = stats.linregress(means, diff)
        tt = float(stats.t.ppf(0.975, n - 2))
        add("proportional_bias", res.slope, res.slope - tt * res.stderr,
            res.slope + tt * res.stderr, res.pvalue)
    else:
        add("proportional_bias", np.nan)
    from .table import stats_frame

    return stats_frame(rows)


def agreement_subsets(df: pd.DataFrame) -> list:
    """((model, suffix), baseline pairs) for every (model, suffix) with lesion-filled rows."""
    if df.empty or "lesion_filled" not in df or not is_lesion_filled(df).any():
        return []
    pairs = baseline_pairs(paired_rows(df))
    out = []
    filled_keys = sorted(set(zip(df.loc[is_lesion_filled(df), "model"].astype(str),
                                 df.loc[is_lesion_filled(df), "suffix"].astype(str))))
    for model, suffix in filled_keys:
        sub = pairs[(pairs["model"].astype(str) == model) & (pairs["suffix"].astype(str) == suffix)]
        sub = sub.reset_index(drop=True)
        sub.attrs["key"] = (model, suffix)
        out.append(((model, suffix), sub))
    return out


def __getattr__(name):
    if name == "bland_altman_figure":  # moved to the reports
        from ..reports.group_figures import bland_altman_figure
        return bland_altman_figure
    raise AttributeError(name)
