#!/usr/bin/env python
"""The necessary parts of the participant level called directly (deepbet, N4 in the mask,
AffineFast to the 1 mm template, ...), then the whole CLI run on the same scan, and the ratio.

    python scripts/benchmark_participant.py [--bids-dir DIR] [--model FILE] [--threads N]

Default data: ../shared/data/mprage-1mm (1 mm whole-head MPRAGE). The whole run is broken down
from its log (OUTPUT_DIR/logs/<run-id>/nipype.log): start-up before the first node, each node's
own time, the gaps between nodes and what follows the last node (the report). Prints tables;
writes nothing outside a temporary folder.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mprage-1mm"


def peak_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bids-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    bids = Path(args.bids_dir)
    scans = sorted(bids.glob("sub-*/**/anat/*_T1w.nii*"))
    if not scans:
        print(f"no T1w under {bids}", file=sys.stderr)
        return 66
    scan = str(scans[0])
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import nibabel as nib
    import torch

    from brainage_bids.cli.run import DEFAULT_MODEL
    from brainage_bids.interfaces.ants import n4_in_mask, register_to_template
    from brainage_bids.interfaces.skullstrip import skull_strip
    from brainage_bids.models.checkpoint import load_model
    from brainage_bids.models.inference import model_input, predict_arrays
    from brainage_bids.utils.images import load_image, reorient_ras
    from brainage_bids.utils.templates import get_template

    torch.set_num_threads(args.threads)
    model_file = args.model or str(DEFAULT_MODEL)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="brainage-bench-"))
    try:
        def stage(name, fn):
            t = time.perf_counter()
            out = fn()
            rows.append((name, time.perf_counter() - t, peak_mb()))
            return out

        tpl = stage("template lookup", get_template)
        img = stage("load + reorient RAS", lambda: reorient_ras(load_image(scan)))
        nib.save(img, tmp / "ras.nii.gz")
        stage("skull strip (deepbet)", lambda: skull_strip(str(tmp / "ras.nii.gz"), str(tmp / "b.nii.gz"),
                                                           str(tmp / "m.nii.gz"), "deepbet", "cpu"))
        stage("N4 in mask", lambda: n4_in_mask(str(tmp / "b.nii.gz"), str(tmp / "m.nii.gz"),
                                               str(tmp / "n4.nii.gz"), args.threads))
        stage("affine to MNI (AffineFast)", lambda: register_to_template(
            str(tmp / "n4.nii.gz"), str(tmp / "m.nii.gz"), str(tpl.brain), str(tpl.mask),
            str(tmp / "mni.nii.gz"), str(tmp / "mnimask.nii.gz"), str(tmp / "x.mat"),
            threads=args.threads))
        model = stage("load model", lambda: load_model(model_file))
        x = stage("resample to model grid", lambda: model_input(str(tmp / "mni.nii.gz"),
                                                                str(tmp / "mnimask.nii.gz"), model.input))
        mean, sd, _ = stage("predict", lambda: predict_arrays(model, [x]))
        total = sum(r[1] for r in rows)

        out = tmp / "out"
        cmd = [sys.executable, "-m", "brainage_bids.cli.run", str(bids), str(out), "participant",
               "--model", model_file, "--nprocs", "1", "--omp-nthreads", str(args.threads),
               "-w", str(tmp / "work"), "--skull-strip", "deepbet"]
        t = time.perf_counter()
        started = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        rc = proc.returncode
        cli_s = time.perf_counter() - t
        cli_mb = peak_mb(resource.RUSAGE_CHILDREN)
        breakdown = log_breakdown(out, started, started + cli_s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"scan: {scan}\nmodel: {model_file}\nthreads: {args.threads}\n")
    print(f"{'stage':32s} {'seconds':>8s} {'peak RSS MB':>12s}")
    for name, secs, mb in rows:
        print(f"{name:32s} {secs:8.2f} {mb:12.0f}")
    print(f"{'sum of stages':32s} {total:8.2f}")
    parts = sum(r[1] for r in rows if r[0] in PARTS)
    print(f"{'parts (deepbet + N4 + AffineFast)':32s} {parts:8.2f}")
    print(f"\npredicted age {mean[0]:.2f} +/- {sd[0]:.2f} years")
    print(f"whole participant level (CLI, Nipype, exit {rc}): {cli_s:.1f} s, peak RSS of a "
          f"process {cli_mb:.0f} MB")
    if rc:
        print(proc.stderr[-3000:])
    for name, secs in breakdown:
        print(f"  {name:40s} {secs:8.2f}")
    print(f"\nratio whole / parts: {cli_s / parts:.2f} (whole / sum of stages: "
          f"{cli_s / total:.2f})")
    return 0 if rc == 0 else 1


PARTS = ("skull strip (deepbet)", "N4 in mask", "affine to MNI (AffineFast)")
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) (\S+) \w+: (.*)$")


def log_breakdown(out: Path, t_start: float, t_end: float) -> list[tuple[str, float]]:
    """Where the whole run's time went, from its log: start-up, each node, gaps, the end."""
    from datetime import datetime

    logs = sorted(out.glob("logs/*/nipype.log"))
    if not logs:
        return [("(no run log)", 0.0)]
    events = []
    for line in logs[-1].read_text().splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        when = datetime.strptime(m.group(1)[:23], "%Y-%m-%d %H:%M:%S.%f" if "." in m.group(1)
                                 else "%Y-%m-%d %H:%M:%S").timestamp()
        msg = m.group(3)
        setup = re.match(r'\[Node\] Setting-up "([^"]+)"', msg)
        done = re.match(r'\[Node\] Finished "([^"]+)", elapsed time ([\d.]+)s', msg)
        if setup:
            events.append(("start", setup.group(1).rsplit(".", 1)[-1], when, 0.0))
        elif done:
            events.append(("end", done.group(1), when, float(done.group(2))))
    starts = [e for e in events if e[0] == "start"]
    ends = [e for e in events if e[0] == "end"]
    if not starts or not ends:
        return [("(no node in the log)", 0.0)]
    rows = [("start-up before the first node", starts[0][2] - t_start)]
    rows += [(f"node {e[1]}", e[3]) for e in ends]
    busy = sum(e[3] for e in ends)
    span = ends[-1][2] - starts[0][2]
    rows.append(("between/around nodes (span - nodes)", span - busy))
    rows.append(("after the last node (reports, exit)", t_end - ends[-1][2]))
    return rows


if __name__ == "__main__":
    sys.exit(main())
