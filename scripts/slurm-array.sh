#!/usr/bin/env bash
#SBATCH --job-name=brainage
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=01:00:00
#SBATCH --output=brainage-%A_%a.out
# One participant per Slurm array task, with the Apptainer image. Task i takes the i-th
# participant_id of BIDS_DIR/participants.tsv (1-based, header excluded).
#
#   n=$(( $(grep -c . /data/bids/participants.tsv) - 1 ))
#   sbatch --array=1-"$n"%20 scripts/slurm-array.sh /data/bids /data/derivatives/brainage
#   # when every task is done, the group level (one job, a minute):
#   apptainer run --cleanenv -B /data brainage-bids.sif /data/bids /data/derivatives/brainage group
#   # rerun the failed tasks only: sbatch --array=3,17 scripts/slurm-array.sh ...
#
# Usage: slurm-array.sh [--dry-run] BIDS_DIR OUTPUT_DIR [more brainage-bids options]
#   --dry-run  print the selected label and the command instead of running it
# Environment:
#   SIF         the image [brainage-bids.sif]; build it with `apptainer build` (see Singularity.def)
#   GPU=1       pass the host's NVIDIA driver (--nv) and use --device cuda (also ask Slurm for a
#               GPU: sbatch --gres=gpu:1)
#   MODELS_DIR  host folder of models installed with `brainage-bids models install`, bound to
#               the image's $BRAINAGE_BIDS_MODELS
#   WORK_ROOT   node-local scratch for the work directory [${TMPDIR:-/tmp}]; removed on success
#   KEEP_WORK=1 keep it
set -euo pipefail

dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
if [[ $# -lt 2 ]]; then
    sed -n '/^# Usage:/,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 64
fi
bids_dir=$(realpath "$1"); out_dir=$(realpath -m "$2"); shift 2

# The participant of array task $1 in participants.tsv $2 (label without sub-), or nothing.
label_for_task() {
    awk -F'\t' -v i="$1" '
        { sub(/\r$/, "") }
        NR == 1 { for (c = 1; c <= NF; c++) if ($c == "participant_id") col = c; next }
        !col { exit 2 }
        /^[[:space:]]*$/ { next }
        ++n == i { label = $col; sub(/^sub-/, "", label); print label; exit }
    ' "$2"
}

task=${SLURM_ARRAY_TASK_ID:?not an array task: submit with sbatch --array=1-N}
tsv=$bids_dir/participants.tsv
[[ -f $tsv ]] || { echo "no participants.tsv in $bids_dir" >&2; exit 66; }
label=$(label_for_task "$task" "$tsv") || { echo "$tsv has no participant_id column" >&2; exit 65; }
[[ -n $label ]] || { echo "array task $task: $tsv has fewer participants" >&2; exit 66; }

cpus=${SLURM_CPUS_PER_TASK:-1}
work=${WORK_ROOT:-${TMPDIR:-/tmp}}/brainage-work-${SLURM_ARRAY_JOB_ID:-0}-$task
apptainer=(apptainer run --cleanenv -B "$bids_dir:/data:ro" -B "$out_dir:/out" -B "$work:/work")
app_args=(/data /out participant --participant-label "$label" --nprocs "$cpus"
          --omp-nthreads "$cpus" -w /work)
if [[ ${GPU:-0} == 1 ]]; then apptainer+=(--nv); app_args+=(--device cuda); fi
if [[ -n ${MODELS_DIR:-} ]]; then apptainer+=(-B "$MODELS_DIR:/opt/brainage-bids/models"); fi
cmd=("${apptainer[@]}" "${SIF:-brainage-bids.sif}" "${app_args[@]}" "$@")

echo "array task $task: sub-$label"
if [[ $dry_run == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
mkdir -p "$out_dir" "$work"
rc=0
"${cmd[@]}" || rc=$?
if [[ $rc == 0 && ${KEEP_WORK:-0} != 1 ]]; then rm -rf "$work"; fi
exit "$rc"
