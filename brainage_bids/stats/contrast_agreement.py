"""Agreement of brain ages of the same session from different contrasts (group level,
``contrast_agreement``; the FLAIR study's test of whether FLAIR reads the same age as T1w).

Rows: the raw (not lesion-filled) rows with a finite prediction. Each scan contributes its
headline age: the ``ensemble`` row when several models read it, else its single model's row
(the model that read it is kept in ``model_a``/``model_b``). Pairs: the scans of two contrasts of
the same participant and session (every session; the first source file of a contrast when a
session has several runs), for each pair of contrasts in T1w, FLAIR, T2w order.

Per pair of contrasts, ``stats/contrast_agreement.tsv`` holds the Bland-Altman statistics of
:func:`brainage_bids.stats.agreement.agreement` (Pearson r, R2, mean difference b - a with its
t CI, SD of the differences, 95 % limits of agreement with their CIs, proportional bias) and the
mean absolute difference, with columns ``suffix_a`` and ``suffix_b``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .collect import is_lesion_filled

ANALYSIS = "contrast_agreement"
ORDER = ("T1w", "FLAIR", "T2w")
SCAN_KEYS = ["participant_id", "session_id", "source_file", "suffix"]


def headline_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per scan: its ``ensemble`` row when there is one, else its first model row."""
    d = df.copy()
    d["predicted_age"] = pd.to_numeric(d["predicted_age"], errors="coerce")
    d = d[np.isfinite(d["predicted_age"])]
    if "lesion_filled" in d:
        d = d[~is_lesion_filled(d)]
    d["session_id"] = d["session_id"].astype(object).where(d["session_id"].notna(), "")
    d["_ens"] = (d["model"].astype(str) != "ensemble").astype(int)  # ensemble first
    d = d.sort_values(SCAN_KEYS + ["_ens"], kind="mergesort")
    return d.drop_duplicates(SCAN_KEYS).drop(columns="_ens")


def contrast_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Sessions read in two contrasts: participant_id, session_id, suffix_a, suffix_b, age_a,
    age_b, model_a, model_b (a before b in T1w, FLAIR, T2w order)."""
    cols = ["participant_id", "session_id", "suffix_a", "suffix_b", "age_a", "age_b", "model_a",
            "model_b"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    h = headline_rows(df)
    h = h.sort_values(SCAN_KEYS, kind="mergesort").drop_duplicates(
        ["participant_id", "session_id", "suffix"])
    out = []
    suffixes = [s for s in ORDER if s in set(h["suffix"])]
    for i, a in enumerate(suffixes):
        for b in suffixes[i + 1:]:
            left = h[h["suffix"] == a][["participant_id", "session_id", "predicted_age", "model"]]
            right = h[h["suffix"] == b][["participant_id", "session_id", "predicted_age", "model"]]
            m = left.merge(right, on=["participant_id", "session_id"], suffixes=("_a", "_b"))
            out.append(pd.DataFrame({
                "participant_id": m["participant_id"], "session_id": m["session_id"],
                "suffix_a": a, "suffix_b": b, "age_a": m["predicted_age_a"],
                "age_b": m["predicted_age_b"], "model_a": m["model_a"], "model_b": m["model_b"]}))
    if not out:
        return pd.DataFrame(columns=cols)
    pairs = pd.concat(out, ignore_index=True)
    pairs["session_id"] = pairs["session_id"].astype(object).where(pairs["session_id"] != "", np.nan)
    return pairs[cols]


def contrast_agreement(pairs: pd.DataFrame) -> pd.DataFrame:
    """The table of one pair of contrasts (module docstring); ValueError under 2 sessions."""
    from .agreement import agreement

    a, b = pairs["suffix_a"].iloc[0], pairs["suffix_b"].iloc[0]
    table = agreement(pairs["age_a"], pairs["age_b"])
    diff = pairs["age_b"].to_numpy(float) - pairs["age_a"].to_numpy(float)
    mad = pd.DataFrame([{"term": "mean_absolute_difference", "estimate": float(np.abs(diff).mean()),
                         "n": int(len(diff))}])
    table = pd.concat([table, mad], ignore_index=True)
    table["analysis"] = ANALYSIS
    table["suffix_a"], table["suffix_b"] = a, b
    table["models_a"] = ";".join(sorted(set(pairs["model_a"].astype(str))))
    table["models_b"] = ";".join(sorted(set(pairs["model_b"].astype(str))))
    return table


def agreement_subsets(df: pd.DataFrame) -> list:
    """(("scan", "<a>/<b>"), pairs) for every pair of contrasts a, b read in the same sessions
    (the group level's (model, suffix) tags: the headline age of each scan, the two suffixes);
    ``pairs.attrs["suffixes"]`` is (a, b)."""
    pairs = contrast_pairs(df)
    out = []
    for (a, b), sub in pairs.groupby(["suffix_a", "suffix_b"], sort=False):
        sub = sub.reset_index(drop=True)
        sub.attrs["suffixes"] = (a, b)
        out.append((("scan", f"{a}/{b}"), sub))
    return out
