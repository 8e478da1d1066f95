#!/usr/bin/env python
"""Does test-time left-right flip averaging help a cross-validated model? Out-of-fold MAE with and
without it, each control predicted by the member that did not train on it.

    python scripts/flip_tta_check.py CARD_JSON OUTPUT_DIR [--json F]

CARD_JSON is a train-level card of a cv ensemble (member files beside it); OUTPUT_DIR holds the
participant-level outputs of its training scans. Prints the two MAEs and the paired difference.
"""
from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np
import torch

from brainage_bids.models.checkpoint import load_model
from brainage_bids.models.inference import model_input, predict_arrays


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("card", type=Path)
    p.add_argument("output_dir", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    card = json.loads(args.card.read_text())
    ages = {(r["participant_id"], r["model"]): r["chronological_age"]
            for r in card["validation"]["predictions"]}
    rows = []
    for member in card["members"]:
        model = load_model(args.card.parent / f"{member['name']}.pt")
        pids = [pid for pid, m in ages if m == member["name"]]
        arrays = []
        for pid in pids:
            pre = glob.glob(str(args.output_dir / pid / "**" / "*desc-preproc_T1w.nii.gz"),
                            recursive=True)[0]
            mask = pre.replace("desc-preproc_T1w", "desc-brain_mask")
            arrays.append(model_input(pre, mask, model.input))
        plain, _, _ = predict_arrays(model, arrays)
        flipped, _, _ = predict_arrays(model, [np.ascontiguousarray(a[::-1]) for a in arrays])
        for pid, a, b in zip(pids, plain, flipped):
            rows.append((ages[(pid, member["name"])], float(a), (float(a) + float(b)) / 2))
    y, a, b = (np.array(c) for c in zip(*rows))
    err_a, err_b = np.abs(a - y), np.abs(b - y)
    d = err_b - err_a
    summary = {"n": len(y), "mae": float(err_a.mean()), "mae_flip_average": float(err_b.mean()),
               "paired_difference": float(d.mean()),
               "paired_difference_se": float(d.std(ddof=1) / np.sqrt(len(d)))}
    print(f"out-of-fold MAE {summary['mae']:.3f}; with flip averaging {summary['mae_flip_average']:.3f} "
          f"(difference {summary['paired_difference']:+.3f} +- {summary['paired_difference_se']:.3f} SE, n={len(y)})")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
