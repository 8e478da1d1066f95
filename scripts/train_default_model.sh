#!/usr/bin/env bash
# Reproduce the T1w models shipped in brainage_bids/data/models/ (the default ixi-sfcn-2mm-ens, and
# ixi-sfcn-2mm-ens-light and their combination ixi-sfcn-2mm-ens10, selectable by name) from
# ../shared/data/ixi-t1-2mm:
# 1) ixi-sfcn-2mm-ens: 5 CV folds of the 144 controls, all augmentation families at p 0.3,
#    50 epochs (about 20-45 s each on one CPU thread),
# 2) ixi-sfcn-2mm-ens-light: the same folds, only the slice and histogram families (the two that
#    cost nothing on IXI in benchmarks/training_ablation_fold1.json), 25 epochs,
#    each by scripts/train_cv_ensemble.sh (JOBS=2: two members side by side; resumable),
# 3) ixi-sfcn-2mm-ens10: the two combined, each control predicted by the 2 members that held out
#    its fold (scripts/combine_cv_ensembles.py), copied into the package. The old single model
#    ixi-sfcn-2mm is kept there (installable by name).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
data="${1:-$here/../shared/data/ixi-t1-2mm}"
runs="${2:-$here/../runs}"
common=(--ensemble-size 5 --ensemble-mode cv --voxel-size 2 --channels 8 16 32 64 64 32
        --dropout 0 --batch-size 8 --learning-rate 5e-3 --weight-decay 1e-3 --seed 0
        --augment-probability 0.3 --loss kl+l1 --nprocs 1 --omp-nthreads 1)
"$here/scripts/train_cv_ensemble.sh" ixi-sfcn-2mm-ens "$data" "$runs" "${common[@]}" \
    --epochs 50 --augment all
"$here/scripts/train_cv_ensemble.sh" ixi-sfcn-2mm-ens-light "$data" "$runs" "${common[@]}" \
    --epochs 25 --augment slices histogram
name=ixi-sfcn-2mm-ens10
models="$runs/ixi/models"
python "$here/scripts/combine_cv_ensembles.py" --name "$name" "$runs/ixi" \
    "$models/ixi-sfcn-2mm-ens/ixi-sfcn-2mm-ens_card.json" \
    "$models/ixi-sfcn-2mm-ens-light/ixi-sfcn-2mm-ens-light_card.json"
cp "$models/$name/$name.json" "$models/$name/${name}_card.json" "$models/$name/${name}_card.md" \
   "$here/brainage_bids/data/models/"
echo "then: the participant runs of scripts/out_of_site_check.py's docstring, and" \
     "python scripts/out_of_site_check.py --model $name OUT_MPRAGE OUT_MS2018 OUT_MS2016" \
     "--card brainage_bids/data/models/${name}_card.json"
