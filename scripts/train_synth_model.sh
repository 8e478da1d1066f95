#!/usr/bin/env bash
# Train the contrast-agnostic model ixi-synth-sfcn-2mm (issue 13) from ../shared/data/ixi-t1-2mm.
# 1) participant-level preprocessing of the IXI T1w scans (skip when RUNS/ixi already holds it),
# 2) train --synth: the tissue maps of every training scan are computed once and cached in
#    WORK/train_cache (~25-30 s per scan on one CPU thread, models/anatomy.py), then 5
#    cross-validation members train on images synthesised on the fly (~0.3 s per sample on one
#    thread, scripts/benchmark_synthesis.py) and are scored on the real T1w images,
# 3) copy the members, the ensemble manifest and the card into the package (the zoo entry's
#    bundled files ixi-synth-sfcn-2mm-m1..m5.pt).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
data="${1:-$here/../shared/data/ixi-t1-2mm}"
runs="${2:-$here/../runs}"
device="${DEVICE:-auto}"
name=ixi-synth-sfcn-2mm
if ! ls "$runs"/ixi/sub-*/anat/*desc-preproc_T1w.nii.gz > /dev/null 2>&1; then
  brainage-bids "$data" "$runs/ixi" participant --preproc-only -w "$runs/work_ixi" --nprocs 2 --omp-nthreads 1
fi
brainage-bids "$data" "$runs/ixi" train --synth -w "$runs/work_ixi" --model-name "$name" \
    --ensemble-size 5 --ensemble-mode cv --voxel-size 2 --channels 16 32 64 128 128 32 \
    --epochs 60 --batch-size 8 --learning-rate 1e-3 --weight-decay 1e-3 --seed 0 \
    --device "$device" --nprocs "${NPROCS:-8}" --omp-nthreads "${NPROCS:-8}"
cp "$runs/ixi/models/$name/$name"-m[1-5].pt "$runs/ixi/models/$name/${name}_card.json" \
   "$runs/ixi/models/$name/${name}_card.md" "$here/brainage_bids/data/models/"
