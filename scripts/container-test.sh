#!/usr/bin/env bash
# Prove the Dockerfile on a host without a Docker engine, with podman:
#   1. make the Dockerfile's base image with debootstrap + `podman import` (unless present);
#   2. build the CPU variant (TORCH_VARIANT=cpu) from a local torch wheel served on 127.0.0.1;
#   3. run participant then group in the image (no network, an arbitrary UID) on one dataset;
#   4. run the same with the local install and compare: same files, ages equal to 1e-3 years.
# Prints the build time and the image size.
#
# Usage: scripts/container-test.sh            (as root; needs podman, runc (crun where cgroups are
#                                            not in hybrid mode), debootstrap, .venv)
# Environment (defaults in brackets):
#   DATA        BIDS dataset [../shared/data/mprage-1mm]
#   WORK        scratch folder, outside the repository [/var/tmp/brainage-container-test]
#   IMAGE       tag of the built image [localhost/brainage-bids:cpu-test]
#   TORCH_WHEEL_DIR  folder holding the torch CPU wheel pinned in constraints.txt [/opt/wheels]
#   HOST_CA     CA bundle for pip inside the build (TLS-intercepting proxies) [/etc/ssl/certs/ca-certificates.crt]
#   LOCAL_BIN   the local console script [.venv/bin/brainage-bids]
#   TORCH_INDEX_PORT  port of that local index [38765]
#   OCI_RUNTIME  podman's OCI runtime [runc, else crun: the first installed]
#   SKIP_BUILD=1  reuse IMAGE;  EXTRA_ARGS  more participant options for both runs
#   TEMPLATEFLOW_SEED_DIR  templates in TemplateFlow's layout, mounted into the build as the
#               Dockerfile's TEMPLATEFLOW_SEED (nothing is then downloaded from TemplateFlow): a
#               folder that holds files is used as it is; a missing or empty one gets the test's
#               stand-in seed written into it (below). Unset: the stand-in seed in
#               $WORK/templateflow-seed when TemplateFlow's S3 is unreachable, else no seed (the
#               build downloads both templates).
# The stand-in seed: tpl-MNI152NLin2009aSym from nilearn's bundled copy of that template (the
# same arrays the local install falls back to) and tpl-MNI152NLin6Asym from
# tests/conftest.py::write_fsl_template_stand_in, which is NOT FSL's MNI152_T1_1mm: an image built
# with it is for this test only (the default T1w model uses MNI152NLin2009aSym; the published
# models, which use MNI152NLin6Asym, would give wrong ages in it).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=$(realpath "${DATA:-$REPO/../shared/data/mprage-1mm}")
WORK=${WORK:-/var/tmp/brainage-container-test}
IMAGE=${IMAGE:-localhost/brainage-bids:cpu-test}
TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
LOCAL_BIN=${LOCAL_BIN:-$REPO/.venv/bin/brainage-bids}
PY=${PY:-$REPO/.venv/bin/python}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
# One process, one thread: ITK registration is then deterministic and runs are comparable.
RUN_ARGS=(--nprocs 1 --omp-nthreads 1 "${EXTRA[@]}")
# podman on this kind of host: runc (else crun, whichever is installed) with cgroupfs, and
# ulimits under the host's hard limits (podman's default nofile, 1048576, is refused where the
# hard limit is lower).
OCI_RUNTIME=${OCI_RUNTIME:-$(basename "$(command -v runc || command -v crun || echo runc)")}
PODMAN=(podman --runtime "$OCI_RUNTIME" --cgroup-manager=cgroupfs)
ULIMITS=(--ulimit nofile=16384:16384 --ulimit nproc=8192:8192)
RUN_OPTS=(--rm --network=none "${ULIMITS[@]}")
# The image's thread defaults, applied to the local run too so both see the same environment.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

log() { printf '[container-test %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "FAIL: $*"; exit 1; }

[[ -d $DATA ]] || die "dataset not found: $DATA"
[[ -x $LOCAL_BIN ]] || die "local install not found: $LOCAL_BIN (see README: Quick start)"
case $WORK/ in "$REPO"/*|"$DATA"/*) die "WORK must lie outside the repository and the dataset";; esac
mkdir -p "$WORK"

BASE=$(awk 'toupper($1) == "FROM" {print $2; exit}' "$REPO/Dockerfile")
VERSION=$("$PY" -c 'import brainage_bids; print(brainage_bids.__version__)')

vcs_ref() {  # the checked-out commit, read from .git without running git
    local git=$REPO/.git head ref
    [[ -f $git/HEAD ]] || { echo unknown; return; }
    head=$(<"$git/HEAD")
    if [[ $head == ref:* ]]; then
        ref=${head#ref: }
        if [[ -f $git/$ref ]]; then cat "$git/$ref"
        else awk -v r="$ref" '$2 == r {print $1}' "$git/packed-refs" 2>/dev/null || echo unknown
        fi
    else echo "$head"
    fi
}

# ---- 1. base image -------------------------------------------------------------------------
make_base() {
    local want=${BASE#*:}; want=${want%%-*}   # debian:12.15-slim -> 12.15
    local root=$WORK/rootfs
    log "making base image $BASE with debootstrap (minbase bookworm)"
    rm -rf "$root"
    nice debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian \
        > "$WORK/debootstrap.log" 2>&1 || die "debootstrap failed (see $WORK/debootstrap.log)"
    local got; got=$(<"$root/etc/debian_version")
    [[ $got == "$want" ]] || log "WARNING: debootstrap gave Debian $got, the Dockerfile pins $want"
    # Like the slim images: no package caches or lists.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
    tar -C "$root" -c . | podman import --change 'CMD ["bash"]' - "docker.io/library/$BASE" >/dev/null
    rm -rf "$root"
}
if podman image exists "docker.io/library/$BASE"; then
    log "base image $BASE present"
else
    make_base
fi

# ---- 2. build --------------------------------------------------------------------------------
TF_PROBE=https://templateflow.s3.amazonaws.com/tpl-MNI152NLin6Asym/template_description.json
templateflow_reachable() {
    "$PY" - "$TF_PROBE" <<'EOF' 2>/dev/null
import sys

import requests

try:
    sys.exit(0 if requests.head(sys.argv[1], timeout=10).ok else 1)
except requests.RequestException:
    sys.exit(1)
EOF
}

write_standin_seed() {  # write_standin_seed DIR: the stand-in seed (see the header) in DIR
    "$PY" - "$REPO" "$1" <<'EOF'
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
from scipy import ndimage

repo, seed = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(repo / "tests"))
from conftest import write_fsl_template_stand_in  # noqa: E402

# MNI152NLin2009aSym res-1, TemplateFlow's names: nilearn's bundled copy of the template as the
# head (its bytes), and its brain mask as brainage_bids.utils.templates._nilearn_copy derives it
# (data > 0, holes filled); the app's brain (head x mask) is then nilearn's brain, voxel for voxel.
src = (Path(nilearn.__file__).parent / "datasets" / "data"
       / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
tpl = seed / "tpl-MNI152NLin2009aSym"
tpl.mkdir(parents=True, exist_ok=True)
shutil.copyfile(src, tpl / "tpl-MNI152NLin2009aSym_res-1_T1w.nii.gz")
img = nib.load(str(src))
mask = ndimage.binary_fill_holes(np.asarray(img.dataobj, dtype=np.float32) > 0)
nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine),
         str(tpl / "tpl-MNI152NLin2009aSym_res-1_desc-brain_mask.nii.gz"))
# MNI152NLin6Asym res-01: the tests' stand-in head and mask, and the brain (head x mask) that the
# Dockerfile fetches too.
write_fsl_template_stand_in(seed)
fsl = seed / "tpl-MNI152NLin6Asym"
head = nib.load(str(fsl / "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz"))
inside = np.asarray(nib.load(str(fsl / "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz"))
                    .dataobj) > 0
brain = np.where(inside, np.asarray(head.dataobj, dtype=np.float32), 0).astype(np.float32)
nib.save(nib.Nifti1Image(brain, head.affine),
         str(fsl / "tpl-MNI152NLin6Asym_res-01_desc-brain_T1w.nii.gz"))
# The marker: the image's /opt/templateflow/dataset_description.json says what it holds.
(seed / "dataset_description.json").write_text(json.dumps({
    "Name": "TemplateFlow seed of scripts/container-test.sh: tpl-MNI152NLin6Asym is a STAND-IN "
            "(not FSL's MNI152_T1_1mm), for the container test only",
    "BIDSVersion": "1.1.0"}, indent=2) + "\n")
for p in sorted(seed.rglob("*")):
    if p.is_file():
        print(f"  {p.relative_to(seed)} ({p.stat().st_size} bytes)")
EOF
}

standin_warning() {
    log "WARNING: ***************************************************************************"
    log "WARNING: $IMAGE holds a STAND-IN MNI152NLin6Asym (tests/conftest.py), NOT FSL's"
    log "WARNING: MNI152_T1_1mm (TemplateFlow was not used): the image is for this test only;"
    log "WARNING: never push or use it (the published models would give wrong ages in it)."
    log "WARNING: ***************************************************************************"
}

SEED=${TEMPLATEFLOW_SEED_DIR:-}
STANDIN=0
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    if [[ -z $SEED ]]; then
        if templateflow_reachable; then
            log "TemplateFlow reachable ($TF_PROBE): the build downloads the templates"
        else
            SEED=$WORK/templateflow-seed
            log "TemplateFlow unreachable ($TF_PROBE): the build is seeded from $SEED"
            rm -rf "$SEED"
        fi
    fi
    if [[ -n $SEED ]]; then
        SEED=$(realpath -m "$SEED")
        case $SEED/ in "$REPO"/*) die "TEMPLATEFLOW_SEED_DIR must lie outside the repository";; esac
        if [[ ! -d $SEED || -z $(ls -A "$SEED") ]]; then
            log "writing the stand-in TemplateFlow seed into $SEED"
            mkdir -p "$SEED"
            write_standin_seed "$SEED" || die "could not write the seed in $SEED"
        fi
        if grep -qs STAND-IN "$SEED/dataset_description.json"; then STANDIN=1; standin_warning; fi
    fi
fi
serve_torch_wheel() {  # a PEP 503 index with the pinned torch CPU wheel, on 127.0.0.1
    local pin wheel index=$WORK/pyindex
    pin=$(sed -n 's/^torch==//p' "$REPO/constraints.txt")
    wheel=$(compgen -G "$TORCH_WHEEL_DIR/torch-${pin}+cpu-*.whl" | head -n1) \
        || die "no torch ${pin}+cpu wheel in $TORCH_WHEEL_DIR"
    rm -rf "$index"; mkdir -p "$index/simple/torch"
    ln -s "$wheel" "$index/simple/torch/"
    # A fixed port keeps TORCH_INDEX_URL, and so the build cache, the same from run to run.
    PORT=$("$PY" -c '
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:  # taken: any free port
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' "${TORCH_INDEX_PORT:-38765}")
    "$PY" -m http.server --bind 127.0.0.1 --directory "$index" "$PORT" > "$WORK/pyindex.log" 2>&1 &
    SERVER_PID=$!
    trap 'kill "$SERVER_PID" 2>/dev/null || true' EXIT
    sleep 1
}

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    serve_torch_wheel
    log "building $IMAGE (TORCH_VARIANT=cpu, torch from http://127.0.0.1:$PORT/simple)"
    t0=$(date +%s)
    SEED_ARGS=()
    [[ -z $SEED ]] || SEED_ARGS=(-v "$SEED:/templateflow-seed:ro"
                                 --build-arg TEMPLATEFLOW_SEED=/templateflow-seed)
    nice "${PODMAN[@]}" build --format docker --network=host --pull=never "${ULIMITS[@]}" \
        -v "$HOST_CA:/host-ca.crt:ro" "${SEED_ARGS[@]}" \
        --build-arg PIP_CA_BUNDLE=/host-ca.crt \
        --build-arg TORCH_VARIANT=cpu \
        --build-arg TORCH_INDEX_URL="http://127.0.0.1:$PORT/simple" \
        --build-arg VERSION="$VERSION" \
        --build-arg VCS_REF="$(vcs_ref)" \
        --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        -t "$IMAGE" "$REPO" > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; die "build failed"; }
    BUILD_S=$(( $(date +%s) - t0 ))
    kill "$SERVER_PID" 2>/dev/null || true
    log "built in ${BUILD_S} s (log: $WORK/build.log)"
    # The proof that the build installs from the lock: the command the Dockerfile echoes before
    # running it, and pip collecting every package the lock pins, in that step.
    grep -x 'pip install --require-hashes --no-deps -r requirements/lock.txt' "$WORK/build.log" \
        || die "the build did not install from requirements/lock.txt (see $WORK/build.log)"
    n_pins=$(grep -cE '^[A-Za-z0-9._-]+==' "$REPO/requirements/lock.txt")
    n_got=$(awk '/^pip install --require-hashes --no-deps -r requirements\/lock.txt$/ {f = 1}
                 f && /STEP [0-9]+\/[0-9]+:/ {f = 0}
                 f && /^Collecting / {n++} END {print n + 0}' "$WORK/build.log")
    [[ $n_got == "$n_pins" ]] \
        || die "pip collected $n_got packages from requirements/lock.txt, which pins $n_pins"
    log "installed from the lock: all $n_pins pins of requirements/lock.txt, with --require-hashes"
    if [[ -n $SEED ]]; then
        if grep -n 'Downloading https://templateflow' "$WORK/build.log"; then
            die "the seeded build downloaded from TemplateFlow"
        fi
        log "templates from the seed $SEED: nothing downloaded from TemplateFlow"
    fi
fi
SIZE_BYTES=$(podman image inspect --format '{{.Size}}' "$IMAGE")
log "image $IMAGE: $(numfmt --to=iec --suffix=B "$SIZE_BYTES") ($SIZE_BYTES bytes)"
podman image inspect --format '{{range $k, $v := .Labels}}{{$k}}={{$v}}{{"\n"}}{{end}}' "$IMAGE" \
    | grep opencontainers || true
# The image itself says whether it holds the stand-in (also with SKIP_BUILD=1).
if "${PODMAN[@]}" run --rm --network=none "${ULIMITS[@]}" --entrypoint cat "$IMAGE" \
        /opt/templateflow/dataset_description.json 2>/dev/null | grep -q STAND-IN; then
    STANDIN=1
    standin_warning
fi

# ---- 3. runs -----------------------------------------------------------------------------
C_OUT=$WORK/out-container L_OUT=$WORK/out-local
rm -rf "$C_OUT" "$L_OUT" "$WORK/work-container" "$WORK/work-local"
mkdir -p "$C_OUT" "$WORK/work-container"
chmod 777 "$C_OUT" "$WORK/work-container"   # written by an arbitrary UID below
UID_IN=4242:4242

in_image() {
    "${PODMAN[@]}" run "${RUN_OPTS[@]}" --user "$UID_IN" \
        -v "$DATA:/data:ro" -v "$C_OUT:/out" -v "$WORK/work-container:/work" \
        "$IMAGE" /data /out "$@" -w /work
}
timed() {  # timed NAME CMD...: run, log the seconds, fail on a non-zero exit
    local name=$1 t0 rc=0; shift
    t0=$(date +%s)
    "$@" > "$WORK/$name.log" 2>&1 || rc=$?
    log "$name: exit $rc in $(( $(date +%s) - t0 )) s (log: $WORK/$name.log)"
    [[ $rc == 0 ]] || { tail -20 "$WORK/$name.log"; die "$name exited $rc"; }
}

"${PODMAN[@]}" run "${RUN_OPTS[@]}" --user "$UID_IN" "$IMAGE" --version
timed container-participant in_image participant "${RUN_ARGS[@]}"
timed container-group in_image group
timed local-participant "$LOCAL_BIN" "$DATA" "$L_OUT" participant "${RUN_ARGS[@]}" -w "$WORK/work-local"
timed local-group "$LOCAL_BIN" "$DATA" "$L_OUT" group -w "$WORK/work-local"

# ---- 4. compare ----------------------------------------------------------------------------
# Each run writes its provenance to logs/<run id>/ (a time and a random part): the run ids are
# replaced by their rank (run-1 participant, run-2 group) before the lists are compared.
list_files() {
    (cd "$1" && find . -type f | sed 's|^\./||' | sort) | awk '
        match($0, /^logs\/[^\/]+\//) {
            id = substr($0, 6, RLENGTH - 6)
            if (!(id in rank)) rank[id] = ++n
            $0 = "logs/run-" rank[id] "/" substr($0, RLENGTH + 1)
        }
        {print}' | sort
}
list_files "$C_OUT" > "$WORK/files-container.txt"
list_files "$L_OUT" > "$WORK/files-local.txt"
if diff -u "$WORK/files-local.txt" "$WORK/files-container.txt"; then
    log "file lists: identical ($(wc -l < "$WORK/files-local.txt") files)"
else
    die "file lists differ"
fi
"$PY" - "$L_OUT" "$C_OUT" <<'EOF'
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

local, cont = map(Path, sys.argv[1:])
tables = sorted(p.relative_to(local) for p in local.rglob("*.tsv")
                if p.name.endswith("brainage_T1w.tsv") or p.name.endswith("brainage_FLAIR.tsv")
                or p.as_posix().endswith("group/brainage.tsv"))
worst = 0.0
for rel in tables:
    a = pd.read_csv(local / rel, sep="\t", na_values="n/a")
    b = pd.read_csv(cont / rel, sep="\t", na_values="n/a")
    assert list(a.columns) == list(b.columns) and len(a) == len(b), f"{rel}: shape or columns differ"
    for col in [c for c in a.columns if c.endswith("age") or c.startswith(("brain_age", "predicted"))]:
        if pd.api.types.is_numeric_dtype(a[col]):
            assert a[col].isna().equals(b[col].isna()), f"{rel} {col}: n/a in different rows"
            d = float((a[col] - b[col]).abs().max())
            worst = max(worst, d)
            print(f"  {rel} {col}: local {a[col].round(4).tolist()} image {b[col].round(4).tolist()}")
same = [np.array_equal(np.asarray(nib.load(f).dataobj),
                       np.asarray(nib.load(cont / f.relative_to(local)).dataobj))
        for f in sorted(local.rglob("*.nii.gz"))]
print(f"NIfTI outputs with identical voxels: {sum(same)} of {len(same)}")
print(f"max |age difference| = {worst:.2e} years over {len(tables)} table(s)")
sys.exit(0 if worst <= 1e-3 else 1)
EOF
log "PASS: same files, ages equal to 1e-3 years; image size $(numfmt --to=iec --suffix=B "$SIZE_BYTES")"
if [[ $STANDIN == 1 ]]; then standin_warning; fi
