#!/usr/bin/env python
"""Combine cross-validation ensembles trained on the same folds into one ensemble.

    python scripts/combine_cv_ensembles.py --name NAME OUTPUT_DIR CARD_A CARD_B [CARD ...]

Each CARD is a ``<model>_card.json`` written by ``brainage-bids ... train --ensemble-mode cv``
(its member ``.pt`` files beside it); all must share the folds (same data and ``--split-seed``),
grid and output bins. Writes OUTPUT_DIR/models/NAME/: the members, the manifest NAME.json (usable
as ``--model``), the component cards, NAME_card.json/.md with the out-of-fold figures of the
combination and ``oof_predictions.tsv`` for the group level's bias correction.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from brainage_bids.models.combine import CombineError, combine_cv_ensembles


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="name of the combined ensemble")
    p.add_argument("output_dir", type=Path)
    p.add_argument("cards", type=Path, nargs="+", metavar="CARD")
    args = p.parse_args(argv)
    command = shlex.join(["python", "scripts/combine_cv_ensembles.py", *(argv or sys.argv[1:])])
    try:
        card = combine_cv_ensembles(args.cards, args.name, args.output_dir, command)
    except CombineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    v = card["validation"]
    for name, mae in v["components"].items():
        print(f"{name:32s} out-of-fold MAE {mae:.2f}")
    print(f"{args.name:32s} out-of-fold MAE {v['mae']:.2f} (R2 {v['r2']:.3f}, r "
          f"{v['pearson_r']:.3f}, n {v['n']}); card {card['weights'].replace('.json', '_card.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
