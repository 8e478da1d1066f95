#!/usr/bin/env python
"""T1w brain age on the scans from other sites at hand: the healthy 39-year-old MPRAGE and the MS
patients of the two MS sets. Prints one row per scan and the summary the model card reports.

    python scripts/out_of_site_check.py --model NAME OUT_MPRAGE OUT_MS2018 OUT_MS2016 [--json F]

Each OUT is a participant-level output folder, e.g. made by (2 CPU cores, about 6 min in all):

    D=../shared/data
    brainage-bids $D/mprage-1mm out/mprage participant
    brainage-bids $D/ms-lesjak2018-mni out/ms2018 participant --skull-strip none
    brainage-bids $D/ms-lesjak2016-longitudinal out/ms2016 participant

The MS summary uses every T1w session; r is Pearson's between chronological and predicted age.
"""
from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats


def rows(out_dir: Path, model: str) -> pd.DataFrame:
    files = sorted(glob.glob(str(out_dir / "sub-*" / "**" / "*desc-brainage_T1w.tsv"), recursive=True))
    if not files:
        raise SystemExit(f"{out_dir}: no *desc-brainage_T1w.tsv (run the participant level first)")
    table = pd.concat([pd.read_csv(f, sep="\t", na_values="n/a") for f in files], ignore_index=True)
    table = table[(table["model"] == model) & (table["lesion_filled"].astype(str) != "True")]
    if table.empty:
        raise SystemExit(f"{out_dir}: no rows of model {model!r}")
    return table.assign(dataset=out_dir.name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model name in the tables (e.g. ensemble)")
    p.add_argument("mprage", type=Path)
    p.add_argument("ms", type=Path, nargs="+")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--card", type=Path, help="record the figures in this model card (its "
                   "_card.json gets `out_of_site`, its _card.md is written again beside it)")
    args = p.parse_args(argv)
    hc = rows(args.mprage, args.model)
    ms = pd.concat([rows(d, args.model) for d in args.ms], ignore_index=True)
    cols = ["dataset", "participant_id", "session_id", "chronological_age", "predicted_age",
            "predicted_age_sd", "brain_age_gap"]
    print(pd.concat([hc, ms])[cols].to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    ms = ms.dropna(subset=["chronological_age"])
    r = stats.pearsonr(ms["chronological_age"], ms["predicted_age"])
    summary = {
        "model": args.model,
        "mprage_age": float(hc["chronological_age"].iloc[0]),
        "mprage_predicted": float(hc["predicted_age"].iloc[0]),
        "mprage_gap": float(hc["brain_age_gap"].iloc[0]),
        "ms_scans": int(len(ms)), "ms_participants": int(ms["participant_id"].nunique()),
        "ms_mean_gap": float(ms["brain_age_gap"].mean()),
        "ms_mean_gap_baseline": float(ms.sort_values("session_id").groupby(
            ["dataset", "participant_id"])["brain_age_gap"].first().mean()),
        "ms_pearson_r": float(r.statistic), "ms_pearson_p": float(r.pvalue),
        "ms_mean_sd": float(np.nanmean(ms["predicted_age_sd"])),
    }
    print(f"\nMPRAGE (healthy, {summary['mprage_age']:.0f} y): predicted "
          f"{summary['mprage_predicted']:.1f}, gap {summary['mprage_gap']:+.1f}")
    print(f"MS: {summary['ms_scans']} scans of {summary['ms_participants']} patients, mean gap "
          f"{summary['ms_mean_gap']:+.1f} (first session per patient {summary['ms_mean_gap_baseline']:+.1f}), "
          f"r(age, predicted) = {summary['ms_pearson_r']:.2f} (p = {summary['ms_pearson_p']:.2g}), "
          f"mean SD {summary['ms_mean_sd']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.card:
        from brainage_bids.models.train import rewrite_card

        card = json.loads(args.card.read_text())
        card["out_of_site"] = dict(summary, datasets=[str(d) for d in [args.mprage, *args.ms]])
        rewrite_card(args.card, card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
