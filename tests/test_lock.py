"""The locks in requirements/ (scripts/lock.py) cover pyproject.toml's dependencies, so the two
cannot drift apart silently, and keep the torch CPU/CUDA split. Text only: nothing is installed."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
CUDA_ONLY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock(name: str) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of requirements/NAME."""
    out: dict[str, tuple[str, int]] = {}
    current = None
    for line in (REQ / name).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            current = norm(m.group(1))
            assert current not in out, f"{name}: {current} pinned twice"
            out[current] = (m.group(2), 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            version, n = out[current]
            out[current] = (version, n + 1)
    return out


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def constraints() -> dict[str, str]:
    return {norm(r.name): str(r.specifier) for r in (
        Requirement(ln.split("#")[0]) for ln in (ROOT / "constraints.txt").read_text().splitlines()
        if ln.split("#")[0].strip())}


def _check(reqs: list[str], pinned: dict[str, tuple[str, int]], name: str) -> None:
    for text in reqs:
        req = Requirement(text)
        key = norm(req.name)
        if key == "torch":  # pinned in constraints.txt, locked in lock-cuda.txt
            assert key not in pinned
            assert constraints()["torch"].startswith("=="), "constraints.txt must pin torch"
            continue
        assert key in pinned, f"{req.name} ({text}) is in pyproject.toml but not in {name}: " \
                              "run python scripts/lock.py"
        assert Version(pinned[key][0]) in req.specifier, \
            f"{name} pins {key}=={pinned[key][0]}, outside pyproject.toml's {text}"


def test_lock_covers_runtime_and_test():
    p = project()
    _check(p["dependencies"] + p["optional-dependencies"]["test"], lock("lock.txt"), "lock.txt")


def test_hdbet_lock_covers_all_extras_with_the_same_versions():
    p = project()
    full = lock("lock-hdbet.txt")
    _check(p["dependencies"] + [r for extra in p["optional-dependencies"].values() for r in extra],
           full, "lock-hdbet.txt")
    base = lock("lock.txt")
    assert {k: v[0] for k, v in base.items()} == {k: full[k][0] for k in base if k in full}, \
        "lock.txt and lock-hdbet.txt pin different versions"
    assert set(base) <= set(full)


def test_torch_split():
    for name in ("lock.txt", "lock-hdbet.txt"):
        cuda = sorted(n for n in lock(name) if CUDA_ONLY.match(n))
        assert not cuda, f"{name} would install CUDA packages: {cuda}"
    cuda = lock("lock-cuda.txt")
    assert set(cuda) and all(CUDA_ONLY.match(n) for n in cuda)
    assert "==" + cuda["torch"][0] == constraints()["torch"], \
        "lock-cuda.txt and constraints.txt pin different torch versions"


@pytest.mark.parametrize("name", ["lock.txt", "lock-hdbet.txt", "lock-cuda.txt"])
def test_every_pin_has_hashes(name):
    missing = [n for n, (_, hashes) in lock(name).items() if hashes == 0]
    assert not missing, f"{name}: no hash for {missing}"


def test_installs_read_the_locks():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "--require-hashes --no-deps -r requirements/lock-hdbet.txt" in ci
    assert re.search(r"pip install -q --no-deps --no-build-isolation -e \.", ci)
    assert "pip check" in ci
    docker = (ROOT / "Dockerfile").read_text()
    for name in ("lock.txt", "lock-hdbet.txt", "lock-cuda.txt"):
        assert f"requirements/{name}" in docker
    assert "!requirements/" in (ROOT / ".dockerignore").read_text().split()
