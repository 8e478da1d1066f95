"""Contrast agreement (stats/contrast_agreement.py) on a synthetic cohort with a known answer."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from brainage_bids.stats import contrast_agreement as C


def cohort() -> pd.DataFrame:
    """8 sessions read in T1w and FLAIR (FLAIR = T1w + 2 + d, d alternating -1/+1), 3 of them
    in T2w too (T2w = T1w - 1); T1w read by two models plus their ensemble, FLAIR by one; a
    lesion-filled row and a row without a prediction that must be ignored."""
    rows = []
    for i in range(8):
        pid, ses, t1 = f"sub-{i:02d}", "01" if i % 2 else None, 40.0 + 3 * i
        src = f"{pid}/anat/{pid}"
        for model, age in (("a", t1 - 1), ("b", t1 + 1), ("ensemble", t1)):
            rows.append((pid, ses, f"{src}_T1w.nii.gz", "T1w", model, age, "false"))
        flair = t1 + 2 + (1 if i % 2 else -1)
        rows.append((pid, ses, f"{src}_FLAIR.nii.gz", "FLAIR", "synth", flair, "false"))
        rows.append((pid, ses, f"{src}_FLAIR.nii.gz", "FLAIR", "synth", flair + 30, "true"))
        if i < 3:
            rows.append((pid, ses, f"{src}_T2w.nii.gz", "T2w", "synth", t1 - 1, "false"))
    rows.append(("sub-99", None, "sub-99/anat/sub-99_FLAIR.nii.gz", "FLAIR", "synth", "n/a", "false"))
    return pd.DataFrame(rows, columns=["participant_id", "session_id", "source_file", "suffix",
                                       "model", "predicted_age", "lesion_filled"])


def test_pairs_use_the_headline_age_of_each_scan():
    pairs = C.contrast_pairs(cohort())
    counts = pairs.groupby(["suffix_a", "suffix_b"]).size().to_dict()
    assert counts == {("T1w", "FLAIR"): 8, ("T1w", "T2w"): 3, ("FLAIR", "T2w"): 3}
    t1f = pairs[pairs["suffix_b"] == "FLAIR"]
    assert set(t1f["model_a"]) == {"ensemble"} and set(t1f["model_b"]) == {"synth"}
    assert (t1f["age_b"] - t1f["age_a"]).tolist() == [1.0, 3.0] * 4


def test_table_has_the_known_bias_limits_and_mean_absolute_difference():
    subsets = dict(C.agreement_subsets(cohort()))
    assert set(subsets) == {("scan", "T1w/FLAIR"), ("scan", "T1w/T2w"), ("scan", "FLAIR/T2w")}
    table = C.contrast_agreement(subsets[("scan", "T1w/FLAIR")]).set_index("term")
    sd = np.std([1.0, 3.0] * 4, ddof=1)
    assert table.loc["mean_difference", "estimate"] == pytest.approx(2.0)
    assert table.loc["sd_difference", "estimate"] == pytest.approx(sd)
    assert table.loc["loa_upper", "estimate"] == pytest.approx(2.0 + 1.96 * sd)
    assert table.loc["loa_lower", "estimate"] == pytest.approx(2.0 - 1.96 * sd)
    assert table.loc["mean_absolute_difference", "estimate"] == pytest.approx(2.0)
    assert set(table["analysis"]) == {"contrast_agreement"}
    assert set(table["suffix_a"]) == {"T1w"} and set(table["suffix_b"]) == {"FLAIR"}
    assert set(table["models_a"]) == {"ensemble"} and set(table["models_b"]) == {"synth"}
    t2 = C.contrast_agreement(subsets[("scan", "T1w/T2w")]).set_index("term")
    assert t2.loc["mean_difference", "estimate"] == pytest.approx(-1.0)
    assert t2.loc["sd_difference", "estimate"] == pytest.approx(0.0)


def test_single_contrast_cohort_has_no_pairs():
    df = cohort()
    assert C.agreement_subsets(df[df["suffix"] == "T1w"]) == []
