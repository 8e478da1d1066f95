#!/usr/bin/env bash
# Run the participant level through Slurm (Nipype's SLURM plugin: one sbatch job per node) and
# locally, on the same participants, and compare: same files, ages equal to 1e-3 years.
# Needs a running Slurm whose nodes see this filesystem (scripts/slurm-single-node.sh start).
#
# Environment (defaults in brackets):
#   DATA    BIDS dataset [../shared/data/ixi-t1-2mm]     LABELS  participants [IXI014 IXI033]
#   WORK    scratch folder [/var/tmp/brainage-slurm-proof]  PARTITION  [debug]
#   SBATCH_ARGS  per-job sbatch options [-p $PARTITION -c 1 --mem=3G --time=30]
#   LOCAL_BIN    the console script [.venv/bin/brainage-bids]
#   SUMMARY      where the summary is written [$WORK/slurm_proof.txt]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=$(realpath "${DATA:-$REPO/../shared/data/ixi-t1-2mm}")
read -r -a LABELS <<< "${LABELS:-IXI014 IXI033}"
WORK=${WORK:-/var/tmp/brainage-slurm-proof}
PARTITION=${PARTITION:-debug}
SBATCH_ARGS=${SBATCH_ARGS:--p $PARTITION -c 1 --mem=3G --time=30}
LOCAL_BIN=${LOCAL_BIN:-$REPO/.venv/bin/brainage-bids}
PY=${PY:-$(dirname "$LOCAL_BIN")/python}
SUMMARY=${SUMMARY:-$WORK/slurm_proof.txt}
CTLD_LOG=${CTLD_LOG:-/var/tmp/slurm-single-node/log/slurmctld.log}
# Nipype's SLURM plugin names jobs after $LOGNAME (KeyError when unset, e.g. under cron or CI).
export LOGNAME=${LOGNAME:-$(id -un)}
# One thread everywhere: ITK registration is then deterministic and the runs comparable.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
COMMON=(participant --participant-label "${LABELS[@]}" --omp-nthreads 1)

log() { printf '[slurm-proof %(%H:%M:%S)T] %s\n' -1 "$*" | tee -a "$SUMMARY"; }
die() { log "FAIL: $*"; exit 1; }

command -v sbatch >/dev/null || die "sbatch not found (apt-get install slurm-wlm)"
sinfo -h -o '%a' 2>/dev/null | grep -q up || die "no Slurm partition is up (scripts/slurm-single-node.sh start)"
rm -rf "$WORK"; mkdir -p "$WORK"; : > "$SUMMARY"
S_OUT=$WORK/out-slurm L_OUT=$WORK/out-local
ctld_lines=$(wc -l < "$CTLD_LOG" 2>/dev/null || echo 0)

log "dataset $DATA, participants ${LABELS[*]}"
log "slurm: $(sinfo -V); nodes: $(sinfo -h -N -o '%N %c CPUs %m MB %T' | paste -sd ';')"
run() {  # run NAME CMD...
    local name=$1 t0 rc=0; shift
    t0=$(date +%s)
    "$@" > "$WORK/$name.log" 2>&1 || rc=$?
    log "$name: exit $rc in $(( $(date +%s) - t0 )) s: $(grep -h 'participant(s) completed' "$WORK/$name.log" | tail -1)"
    [[ $rc == 0 ]] || { tail -20 "$WORK/$name.log"; die "$name exited $rc"; }
}

run slurm "$LOCAL_BIN" "$DATA" "$S_OUT" "${COMMON[@]}" -w "$WORK/work-slurm" \
    --plugin SLURM --plugin-args "{\"sbatch_args\": \"$SBATCH_ARGS\"}"
run local "$LOCAL_BIN" "$DATA" "$L_OUT" "${COMMON[@]}" -w "$WORK/work-local" --nprocs 1

# What Slurm did: the batch jobs Nipype submitted and how they ended (controller log, no sacct).
# Nodes marked run_without_submitting (the sinks) run in the submitting process.
n_out=$(find "$WORK/work-slurm" -path '*/batch/slurm-*.out' | wc -l)
log "nodes submitted as jobs: $(find "$WORK/work-slurm" -path '*/batch/batchscript_*.sh' -printf '%f\n' \
    | sed 's/.*_T1w\.//; s/\.sh$//' | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}')"
if [[ -r $CTLD_LOG ]]; then
    new=$(tail -n +"$((ctld_lines + 1))" "$CTLD_LOG")
    submitted=$(grep -c '_slurm_rpc_submit_batch_job: JobId=' <<< "$new" || true)
    ok=$(grep -c '_job_complete: JobId=[0-9]* WEXITSTATUS 0$' <<< "$new" || true)
    failed=$(grep '_job_complete: JobId=[0-9]* WEXITSTATUS' <<< "$new" | grep -vc 'WEXITSTATUS 0$' || true)
    ids=$(grep -o '_slurm_rpc_submit_batch_job: JobId=[0-9]*' <<< "$new" | sed 's/.*=//' | sed -n '1p;$p' | paste -sd '-')
    log "slurm jobs: $submitted submitted (JobIds $ids), $ok completed with exit 0, $failed other; $n_out job logs"
    [[ $submitted -gt 0 && $failed == 0 ]] || die "slurm jobs failed or none ran"
else
    log "slurm jobs: $n_out job logs under $WORK/work-slurm (controller log not readable)"
    [[ $n_out -gt 0 ]] || die "no slurm job ran"
fi

(cd "$S_OUT" && find . -type f | sed 's|^\./||' | sort) > "$WORK/files-slurm.txt"
(cd "$L_OUT" && find . -type f | sed 's|^\./||' | sort) > "$WORK/files-local.txt"
diff -u "$WORK/files-local.txt" "$WORK/files-slurm.txt" || die "file lists differ"
log "file lists: identical ($(wc -l < "$WORK/files-local.txt") files)"
"$PY" - "$L_OUT" "$S_OUT" <<'EOF' | tee -a "$SUMMARY"
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

local, other = map(Path, sys.argv[1:])
worst = 0.0
tables = sorted(p.relative_to(local) for p in local.rglob("*_desc-brainage_*.tsv"))
for rel in tables:
    a = pd.read_csv(local / rel, sep="\t", na_values="n/a")
    b = pd.read_csv(other / rel, sep="\t", na_values="n/a")
    assert list(a.columns) == list(b.columns) and len(a) == len(b), f"{rel}: shape or columns differ"
    for col in ("predicted_age", "predicted_age_sd", "brain_age_gap"):
        assert a[col].isna().equals(b[col].isna()), f"{rel} {col}: n/a in different rows"
        worst = max(worst, float((a[col] - b[col]).abs().max()))
    print(f"  {rel}: predicted_age local {a.predicted_age.round(4).tolist()} slurm "
          f"{b.predicted_age.round(4).tolist()}")
same = [np.array_equal(np.asarray(nib.load(f).dataobj),
                       np.asarray(nib.load(other / f.relative_to(local)).dataobj))
        for f in sorted(local.rglob("*.nii.gz"))]
print(f"  NIfTI outputs with identical voxels: {sum(same)} of {len(same)}")
print(f"  max |age difference| = {worst:.2e} years over {len(tables)} table(s)")
sys.exit(0 if tables and worst <= 1e-3 else 1)
EOF

# The job-array recipe's label selection under a real array (dry run: no Apptainer here).
sbatch --wait --array=1-3 -p "$PARTITION" -c 1 --mem=200M -o "$WORK/array-%a.out" \
    "$REPO/scripts/slurm-array.sh" --dry-run "$DATA" "$WORK/out-array" > /dev/null \
    || die "array job failed"
for i in 1 2 3; do
    want=$(awk -F'\t' -v i="$i" 'NR == i + 1 {print $1}' "$DATA/participants.tsv")
    got=$(sed -n 's/^array task [0-9]*: //p' "$WORK/array-$i.out")
    [[ $got == "$want" ]] || die "array task $i selected '$got', participants.tsv row $i is '$want'"
done
log "job array (slurm-array.sh --dry-run, tasks 1-3): $(sed -n 's/^array task //p' "$WORK"/array-[123].out | paste -sd ';')"
log "PASS: participant level through Slurm matches the local run"
