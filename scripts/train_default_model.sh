#!/usr/bin/env bash
# Reproduce the default model shipped in brainage_bids/data/models/ from ../shared/data/ixi-t1-2mm.
# 1) participant-level preprocessing of all 148 IXI scans (about 35 min on 2 CPU cores),
# 2) the train level (held-out test split scored once, at the end),
# 3) copy weights and model card into the package.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
data="${1:-$here/../shared/data/ixi-t1-2mm}"
runs="${2:-$here/../runs}"
name=ixi-sfcn-2mm
brainage-bids "$data" "$runs/ixi" participant --preproc-only -w "$runs/work_ixi" --nprocs 2 --omp-nthreads 1
brainage-bids "$data" "$runs/ixi" train -w "$runs/work_ixi" --model-name "$name" \
    --voxel-size 2 --channels 16 32 64 128 128 32 --epochs 60 --batch-size 8 \
    --learning-rate 1e-3 --weight-decay 1e-3 --seed 0 --test-fraction 0.2 --val-fraction 0.15 \
    --nprocs 2 --omp-nthreads 2
cp "$runs/ixi/models/$name/$name.pt" "$runs/ixi/models/$name/${name}_card.json" \
   "$runs/ixi/models/$name/${name}_card.md" "$here/brainage_bids/data/models/"
