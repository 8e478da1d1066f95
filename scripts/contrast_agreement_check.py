#!/usr/bin/env python
"""Brain ages of the same session from different contrasts, pooled over datasets: every pair,
then per pair of contrasts the Bland-Altman summary (the group level's contrast_agreement table,
on all datasets together).

    python scripts/contrast_agreement_check.py OUT [OUT ...] [--json F]

Each OUT is a participant- and group-level output folder (OUT/group/brainage.tsv), e.g. made by

    D=../shared/data
    brainage-bids $D/ms-lesjak2018-mni out/ms2018 participant --skull-strip none --modalities T1w FLAIR
    brainage-bids $D/ms-lesjak2018-mni out/ms2018 group
    brainage-bids $D/ms-lesjak2016-longitudinal out/ms2016 participant --modalities T1w FLAIR T2w
    brainage-bids $D/ms-lesjak2016-longitudinal out/ms2016 group
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from brainage_bids.stats.contrast_agreement import contrast_agreement, contrast_pairs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outputs", type=Path, nargs="+")
    p.add_argument("--json", type=Path)
    p.add_argument("--card", type=Path, help="record the summary in this model card (its "
                   "_card.json gets `contrast_agreement` and a note; its _card.md is rewritten)")
    args = p.parse_args(argv)
    pairs = []
    for out in args.outputs:
        table = pd.read_csv(out / "group" / "brainage.tsv", sep="\t", na_values="n/a",
                            keep_default_na=False, dtype={"session_id": str})
        pairs.append(contrast_pairs(table).assign(dataset=out.name))
    pairs = pd.concat(pairs, ignore_index=True)
    pairs["difference"] = pairs["age_b"] - pairs["age_a"]
    print(pairs[["dataset", "participant_id", "session_id", "suffix_a", "suffix_b", "model_a",
                 "model_b", "age_a", "age_b", "difference"]].to_string(
        index=False, float_format=lambda v: f"{v:.1f}"))
    summary = {}
    for (a, b), g in pairs.groupby(["suffix_a", "suffix_b"], sort=False):
        t = contrast_agreement(g).set_index("term")["estimate"]
        summary[f"{a}/{b}"] = {"n": int(len(g)), **{k: float(t[k]) for k in (
            "mean_difference", "mean_absolute_difference", "sd_difference", "loa_lower",
            "loa_upper", "pearson_r")}}
        s = summary[f"{a}/{b}"]
        print(f"\n{b} - {a}: n={s['n']} sessions, mean difference {s['mean_difference']:+.2f} y, "
              f"mean absolute difference {s['mean_absolute_difference']:.2f} y, limits of agreement "
              f"{s['loa_lower']:+.1f} to {s['loa_upper']:+.1f} y, r {s['pearson_r']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.card:
        from brainage_bids.models.train import rewrite_card

        card = json.loads(args.card.read_text())
        card["contrast_agreement"] = dict(summary, datasets=[str(o) for o in args.outputs])
        notes = [n for n in card.get("notes") or [] if not n.startswith("Contrast agreement")]
        notes.append("Contrast agreement on the MS sets (" + ", ".join(o.name for o in args.outputs)
                     + "; scripts/contrast_agreement_check.py): " + "; ".join(
                         f"{k.split('/')[1]} - {k.split('/')[0]} mean difference "
                         f"{v['mean_difference']:+.2f} y, mean absolute difference "
                         f"{v['mean_absolute_difference']:.2f} y, limits of agreement "
                         f"{v['loa_lower']:+.1f} to {v['loa_upper']:+.1f} y (n={v['n']} sessions)"
                         for k, v in summary.items()) + ".")
        card["notes"] = notes
        rewrite_card(args.card, card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
