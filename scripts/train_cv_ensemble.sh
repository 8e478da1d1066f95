#!/usr/bin/env bash
# Train one cross-validation ensemble with the train level and copy it into the package:
#     scripts/train_cv_ensemble.sh NAME DATA RUNS TRAIN_OPTION...
# 1) participant-level preprocessing of DATA into RUNS/ixi (skipped when it is there; about
#    32 min for the 148 IXI scans on 2 CPU cores),
# 2) brainage-bids DATA RUNS/ixi train --model-name NAME TRAIN_OPTION... (5 folds unless the
#    options say otherwise); with JOBS=2 two runs train members 1-3 and 4-5 side by side
#    (--members; own work dirs and a second output folder of links, as each run locks its
#    folders), then a last run writes the ensemble from their checkpoints,
# 3) copy the members, the manifest and the card into brainage_bids/data/models/.
# Run it again to resume after an interruption (checkpoints in RUNS/train_NAME_a and _b).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
name="$1" data="$2" runs="$3"
shift 3
recipe=(--model-name "$name" "$@")
work="$runs/train_${name}"
if ! ls "$runs"/ixi/sub-*/anat/*desc-preproc_T1w.nii.gz > /dev/null 2>&1; then
  brainage-bids "$data" "$runs/ixi" participant --preproc-only -w "$runs/work_ixi" --nprocs 2 --omp-nthreads 1
fi
if [ "${JOBS:-1}" = 2 ]; then
  mkdir -p "$runs/ixi_b" && cp "$runs/ixi/dataset_description.json" "$runs/ixi_b/"
  for d in "$runs"/ixi/sub-*; do ln -sfn "$d" "$runs/ixi_b/"; done
  brainage-bids "$data" "$runs/ixi" train -w "${work}_a" "${recipe[@]}" --members 1 2 3 &
  brainage-bids "$data" "$runs/ixi_b" train -w "${work}_b" "${recipe[@]}" --members 4 5
  wait
  mkdir -p "${work}_a" && cp -r "${work}_b"/train_"$name"-m[45] "${work}_a/"
fi
brainage-bids "$data" "$runs/ixi" train -w "${work}_a" "${recipe[@]}"
out="$runs/ixi/models/$name"
cp "$out/$name"-m*.pt "$out/$name.json" "$out/${name}_card.json" "$out/${name}_card.md" \
   "$here/brainage_bids/data/models/"
