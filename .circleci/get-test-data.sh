#!/usr/bin/env bash
# The BIDS dataset of the CI smoke run, into DEST (default ~/ci-data/bids); prints its kind.
#   mprage-1mm: one real whole-head 3D MPRAGE at 1 mm (Siemens Trio 3T sample of dcm2nii/dcm2niix,
#     C. Rorden; 12 MB), from a .tar.gz at $CI_DATA_URL (a project environment variable, e.g. a
#     release asset of this repository), checked against .circleci/mprage-1mm.sha256 and kept in
#     the CircleCI cache. Expected outputs: .circleci/expected_outputs.txt.
#   example: without $CI_DATA_URL (forks), the one-subject dataset that
#     scripts/make_example_dataset.py makes from nilearn's MNI152 template inside the image (run
#     with --skull-strip none). Expected outputs: .circleci/expected_outputs_example.txt.
# Usage: get-test-data.sh IMAGE [DEST]
set -euo pipefail
IMAGE=$1
DEST=${2:-$HOME/ci-data/bids}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ -f $DEST/sub-01/anat/sub-01_T1w.nii.gz ]] && (cd "$DEST" && sha256sum -c --quiet "$HERE/mprage-1mm.sha256") 2>/dev/null; then
    echo mprage-1mm   # restored from the cache
elif [[ -n ${CI_DATA_URL:-} ]]; then
    rm -rf "$DEST"; mkdir -p "$DEST"
    curl -fsSL --retry 3 "$CI_DATA_URL" | tar -xz -C "$DEST" --strip-components=1
    (cd "$DEST" && sha256sum -c --quiet "$HERE/mprage-1mm.sha256") >&2
    echo mprage-1mm
else
    rm -rf "$DEST"; mkdir -p "$(dirname "$DEST")"
    docker run --rm -u "$(id -u):$(id -g)" -v "$(dirname "$DEST"):/ci" -v "$HERE/..:/src:ro" \
        --entrypoint python "$IMAGE" /src/scripts/make_example_dataset.py "/ci/$(basename "$DEST")" >&2
    echo example
fi
