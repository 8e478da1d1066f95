#!/usr/bin/env python
"""What each part of the T1w training recipe is worth: validation MAE on one fixed fold.

    python scripts/benchmark_training.py BIDS_DIR OUTPUT_DIR -w WORK_DIR [--epochs 24]
        [--configs old new-none new-affine ... new-all] [--fold 1] [--threads 2]

Reads the participant-level outputs in OUTPUT_DIR (``participant --preproc-only``), splits the
healthy controls into the same 5 age-stratified folds as ``train --ensemble-size 5`` (seed 0), and
trains every configuration on folds 2-5 with the same epoch budget, scoring fold ``--fold``. It
prints one row per configuration: the best validation MAE among the second half of training
(as the train level selects), the last-epoch MAE (no selection), and seconds per epoch. Runs are
checkpointed in WORK_DIR and results kept in WORK_DIR/benchmark_training.json, so an interrupted
benchmark resumes where it stopped.

Configurations: ``old`` is the recipe of ixi-sfcn-2mm 0.1 (channels 16-32-64-128-128-32, dropout
0.5, lr 1e-3, shifts and flips); ``new-<family>`` is the new recipe (see RECIPE) with one
augmentation family (``none``: without augmentation, ``all``: every family).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from brainage_bids.models import train as T
from brainage_bids.models.augment import FAMILIES
from brainage_bids.models.checkpoint import InputSpec, mni_box_grid
from brainage_bids.models.sfcn import bin_centres

# the shipped recipe, except augmentation (see scripts/train_default_model.sh)
RECIPE = {"channels": [8, 16, 32, 64, 64, 32], "dropout": 0.0, "learning_rate": 5e-3,
          "weight_decay": 1e-3, "batch_size": 8}
OLD = {"channels": [16, 32, 64, 128, 128, 32], "dropout": 0.5, "learning_rate": 1e-3,
       "weight_decay": 1e-3, "batch_size": 8, "augment": ("legacy",)}


def configurations() -> dict:
    out = {"old": OLD, "new-none": dict(RECIPE, augment=())}
    out.update({f"new-{f}": dict(RECIPE, augment=(f,)) for f in FAMILIES})
    out["new-all"] = dict(RECIPE, augment=FAMILIES)
    # screening variants of the shipped recipe
    out["new-all-l1"] = dict(RECIPE, augment=FAMILIES, loss="kl+l1")
    out["new-none-l1"] = dict(RECIPE, augment=(), loss="kl+l1")
    out["new-all-l1-wide"] = dict(RECIPE, augment=FAMILIES, loss="kl+l1",
                                  channels=[16, 32, 64, 128, 128, 32])
    out["new-all-l1-p03"] = dict(RECIPE, augment=FAMILIES, loss="kl+l1", augment_probability=0.3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bids_dir", type=Path)
    p.add_argument("output_dir", type=Path)
    p.add_argument("-w", "--work-dir", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--fold", type=int, default=1)
    p.add_argument("--configs", nargs="+", default=list(configurations()))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = configurations()
    unknown = set(args.configs) - set(configs)
    if unknown:
        p.error(f"unknown configurations {sorted(unknown)}; known: {', '.join(configs)}")

    opts = SimpleNamespace(participant_label=None, session_label=None, bids_filter_file=None,
                           skip_bids_validation=True, modalities=["T1w"])
    examples = T.find_examples(args.bids_dir, args.output_dir, opts)
    by_pid: dict = {}
    for e in examples:
        by_pid.setdefault(e.participant_id, []).append(e)
    pids = sorted(by_pid)
    ages = [float(np.mean([e.age for e in by_pid[q]])) for q in pids]
    folds = T.kfold_split(pids, ages, 5, args.seed + 1)  # as train --ensemble-size 5 (cv)
    val_ids = folds[args.fold - 1]
    train_ids = sorted(set(pids) - set(val_ids))
    affine, shape = mni_box_grid(2.0)
    spec = InputSpec(affine, shape, "mask_mean")
    cache = args.work_dir / "train_cache"
    tr = [e for q in train_ids for e in by_pid[q]]
    va = [e for q in val_ids for e in by_pid[q]]
    x_tr, x_va = T.load_arrays(tr, spec, cache), T.load_arrays(va, spec, cache)
    y_tr = np.array([e.age for e in tr], np.float32)
    y_va = np.array([e.age for e in va], np.float32)
    centres = torch.as_tensor(bin_centres(6, 90, 1), dtype=torch.float32)

    results_file = args.work_dir / "benchmark_training.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name in args.configs:
        key = f"{name}|epochs={args.epochs}|fold={args.fold}"
        if key not in results:
            c = configs[name]
            run_opts = SimpleNamespace(**{"epochs": args.epochs, "voxel_size": 2.0,
                                          "augment_probability": 0.5, "loss": "kl",
                                          **{k: v for k, v in c.items() if k != "channels"}})
            t0 = time.time()
            _, best_epoch, history, (last, _) = T.fit_member(
                "sfcn", {"channels": c["channels"], "bins": [6.0, 90.0, 1.0]}, x_tr, y_tr, x_va,
                y_va, opts=run_opts, seed=args.seed, run_dir=args.work_dir / f"bench_{key}",
                device="cpu", centres=centres, label=name)
            done = [h for h in history if h["val_mae"] is not None]
            results[key] = {"config": name, "epochs": args.epochs, "fold": args.fold,
                            "n_train": len(y_tr), "n_validation": len(y_va),
                            "best_mae": min(h["val_mae"] for h in done), "best_epoch": best_epoch,
                            "last_mae": float(np.abs(last - y_va).mean()),
                            "seconds_per_epoch": (time.time() - t0) / max(1, args.epochs),
                            "settings": {k: list(v) if isinstance(v, tuple) else v
                                         for k, v in c.items()}}
            results_file.write_text(json.dumps(results, indent=2) + "\n")
        r = results[key]
        print(f"{name:16s} best {r['best_mae']:6.2f} (epoch {r['best_epoch']:3d})  "
              f"last {r['last_mae']:6.2f}  {r['seconds_per_epoch']:6.1f} s/epoch", flush=True)
    print(f"fold {args.fold} of 5: {len(y_tr)} training and {len(y_va)} validation scans, "
          f"{args.epochs} epochs each; seconds per epoch on {torch.get_num_threads()} CPU threads "
          "(resumed runs count only the time after resuming)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
