#!/usr/bin/env bash
# Prove the Dockerfile on a host without a Docker engine, with podman:
#   1. make the Dockerfile's base image with debootstrap + `podman import` (unless present);
#   2. build the CPU variant (TORCH_VARIANT=cpu) from a local torch wheel served on 127.0.0.1;
#   3. run participant then group in the image (no network, an arbitrary UID) on one dataset;
#   4. run the same with the local install and compare: same files, ages equal to 1e-3 years.
# Prints the build time and the image size.
#
# Usage: scripts/container-test.sh            (as root; needs podman, debootstrap, .venv)
# Environment (defaults in brackets):
#   DATA        BIDS dataset [../shared/data/mprage-1mm]
#   WORK        scratch folder, outside the repository [/var/tmp/brainage-container-test]
#   IMAGE       tag of the built image [localhost/brainage-bids:cpu-test]
#   TORCH_WHEEL_DIR  folder holding the torch CPU wheel pinned in constraints.txt [/opt/wheels]
#   HOST_CA     CA bundle for pip inside the build (TLS-intercepting proxies) [/etc/ssl/certs/ca-certificates.crt]
#   LOCAL_BIN   the local console script [.venv/bin/brainage-bids]
#   TORCH_INDEX_PORT  port of that local index [38765]
#   SKIP_BUILD=1  reuse IMAGE;  EXTRA_ARGS  more participant options for both runs
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
# podman on this kind of host: runc with cgroupfs, and ulimits under the host's hard limits
# (podman's default nofile, 1048576, is refused where the hard limit is lower).
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
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
    nice "${PODMAN[@]}" build --format docker --network=host --pull=never "${ULIMITS[@]}" \
        -v "$HOST_CA:/host-ca.crt:ro" \
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
fi
SIZE_BYTES=$(podman image inspect --format '{{.Size}}' "$IMAGE")
log "image $IMAGE: $(numfmt --to=iec --suffix=B "$SIZE_BYTES") ($SIZE_BYTES bytes)"
podman image inspect --format '{{range $k, $v := .Labels}}{{$k}}={{$v}}{{"\n"}}{{end}}' "$IMAGE" \
    | grep opencontainers || true

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
(cd "$C_OUT" && find . -type f | sed 's|^\./||' | sort) > "$WORK/files-container.txt"
(cd "$L_OUT" && find . -type f | sed 's|^\./||' | sort) > "$WORK/files-local.txt"
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
