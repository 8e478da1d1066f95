#!/usr/bin/env bash
# Train the contrast-agnostic model ixi-synth-sfcn-2mm (issue 13) from ../shared/data/ixi-t1-2mm.
# 1) participant-level preprocessing of the IXI T1w scans (skipped when RUNS/ixi holds it),
# 2) train --synth, each of the 5 cross-validation members starting from the same member of the
#    default T1w ensemble (--init-from its card; that member held out the same fold, so the
#    out-of-fold figures stay honest): the tissue maps of every training scan are computed once
#    and cached in the work dir (~5-15 s per 2 mm scan on one CPU thread, models/anatomy.py), then
#    each member fine-tunes on images synthesised on the fly (~0.3 s per sample,
#    scripts/benchmark_synthesis.py; real T1w mixed in with probability 0.2) and is scored on the
#    real T1w images,
# 3) copy the members, the manifest and the card into the package (the zoo entry's bundled files
#    ixi-synth-sfcn-2mm-m1..m5.pt); record their sha256 in models/zoo.py.
# The first run trained from scratch costs ~10x more (60 epochs; a GPU: DEVICE=cuda).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
data="${1:-$here/../shared/data/ixi-t1-2mm}"
runs="${2:-$here/../runs}"
device="${DEVICE:-auto}"
name=ixi-synth-sfcn-2mm
if ! ls "$runs"/ixi/sub-*/anat/*desc-preproc_T1w.nii.gz > /dev/null 2>&1; then
  brainage-bids "$data" "$runs/ixi" participant --preproc-only -w "$runs/work_ixi" --nprocs 2 --omp-nthreads 1
fi
brainage-bids "$data" "$runs/ixi" train --synth -w "$runs/work_synth" --model-name "$name" \
    --init-from "$here/brainage_bids/data/models/ixi-sfcn-2mm-ens_card.json" \
    --ensemble-size 5 --ensemble-mode cv --voxel-size 2 --channels 8 16 32 64 64 32 --dropout 0 \
    --epochs 10 --batch-size 8 --learning-rate 1e-3 --weight-decay 1e-3 --seed 0 --loss kl+l1 \
    --synth-real-probability 0.2 --device "$device" --nprocs 1 --omp-nthreads "${THREADS:-1}"
cp "$runs/ixi/models/$name/$name"-m[1-5].pt "$runs/ixi/models/$name/$name.json" \
   "$runs/ixi/models/$name/${name}_card.json" "$runs/ixi/models/$name/${name}_card.md" \
   "$here/brainage_bids/data/models/"
