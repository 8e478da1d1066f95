#!/usr/bin/env bash
# Reproduce the default T1w model shipped in brainage_bids/data/models/ (ixi-sfcn-2mm-ens, 5
# cross-validation members) from ../shared/data/ixi-t1-2mm, then the off-site check of its card.
# 1) participant-level preprocessing of all 148 IXI scans (about 32 min on 2 CPU cores),
# 2) the train level: 5 CV folds of the 144 controls with an age, each member selecting its epoch
#    on its own fold (50 epochs, about 20-45 s each on one CPU thread); with JOBS=2 two runs train
#    members side by side (--members, own work dirs) and a last run writes the ensemble,
# 3) copy the members, the manifest and the card into the package; the old single model
#    ixi-sfcn-2mm is kept there (installable by name).
# Resume after an interruption by running it again (checkpoints in the work dirs).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
data="${1:-$here/../shared/data/ixi-t1-2mm}"
runs="${2:-$here/../runs}"
name=ixi-sfcn-2mm-ens
recipe=(--model-name "$name" --ensemble-size 5 --ensemble-mode cv --voxel-size 2
        --channels 8 16 32 64 64 32 --dropout 0 --epochs 50 --batch-size 8 --learning-rate 5e-3
        --weight-decay 1e-3 --seed 0 --augment all --augment-probability 0.3 --loss kl+l1
        --nprocs 1 --omp-nthreads 1)
if ! ls "$runs"/ixi/sub-*/anat/*desc-preproc_T1w.nii.gz > /dev/null 2>&1; then
  brainage-bids "$data" "$runs/ixi" participant --preproc-only -w "$runs/work_ixi" --nprocs 2 --omp-nthreads 1
fi
if [ "${JOBS:-1}" = 2 ]; then
  # a second output folder of links to the same participant outputs (each run locks its folders)
  mkdir -p "$runs/ixi_b" && cp "$runs/ixi/dataset_description.json" "$runs/ixi_b/"
  for d in "$runs"/ixi/sub-*; do ln -sfn "$d" "$runs/ixi_b/"; done
  brainage-bids "$data" "$runs/ixi" train -w "$runs/train_a" "${recipe[@]}" --members 1 2 3 &
  brainage-bids "$data" "$runs/ixi_b" train -w "$runs/train_b" "${recipe[@]}" --members 4 5
  wait
  cp -r "$runs"/train_b/train_"$name"-m[45] "$runs/train_a/"
fi
brainage-bids "$data" "$runs/ixi" train -w "$runs/train_a" "${recipe[@]}"
cp "$runs/ixi/models/$name/$name"-m[1-5].pt "$runs/ixi/models/$name/$name.json" \
   "$runs/ixi/models/$name/${name}_card.json" "$runs/ixi/models/$name/${name}_card.md" \
   "$here/brainage_bids/data/models/"
echo "then: the participant runs of scripts/out_of_site_check.py's docstring, and" \
     "python scripts/out_of_site_check.py --model ensemble OUT_MPRAGE OUT_MS2018 OUT_MS2016" \
     "--card brainage_bids/data/models/${name}_card.json"
