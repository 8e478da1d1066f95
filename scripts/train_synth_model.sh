#!/usr/bin/env bash
# Train the contrast-agnostic model ixi-synth-sfcn-2mm (issue 13) from ../shared/data/ixi-t1-2mm
# with scripts/train_cv_ensemble.sh: train --synth, each of the 5 cross-validation members
# starting from the same member of ixi-sfcn-2mm-ens (--init-from its card; that member held out
# the same fold, so the out-of-fold figures stay honest). The tissue maps of every training scan
# are computed once and cached in the work dir (~5-15 s per 2 mm scan on one CPU thread,
# models/anatomy.py), then each member fine-tunes on images synthesised on the fly (~0.3 s per
# sample, scripts/benchmark_synthesis.py; real T1w mixed in with probability 0.2) and is scored on
# the real T1w images. Then record the members' sha256 in models/zoo.py. Trained from scratch it
# costs ~10x more (60 epochs; a GPU: DEVICE=cuda).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
"$here/scripts/train_cv_ensemble.sh" ixi-synth-sfcn-2mm "${1:-$here/../shared/data/ixi-t1-2mm}" \
    "${2:-$here/../runs}" --synth \
    --init-from "$here/brainage_bids/data/models/ixi-sfcn-2mm-ens_card.json" \
    --ensemble-size 5 --ensemble-mode cv --voxel-size 2 --channels 8 16 32 64 64 32 --dropout 0 \
    --epochs 10 --batch-size 8 --learning-rate 1e-3 --weight-decay 1e-3 --seed 0 --loss kl+l1 \
    --synth-real-probability 0.2 --device "${DEVICE:-auto}" --nprocs 1 \
    --omp-nthreads "${THREADS:-1}"
