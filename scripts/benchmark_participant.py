#!/usr/bin/env python
"""Per-stage seconds and peak memory of the participant level for one scan, then the whole CLI run.

    python scripts/benchmark_participant.py [--scan FILE] [--model FILE] [--threads N]

Default scan: ../shared/data/mprage-1mm (1 mm whole-head MPRAGE). Prints a table; writes nothing
outside a temporary folder.
"""
from __future__ import annotations

import argparse
import os
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
        rc = subprocess.run(cmd, capture_output=True, text=True).returncode
        cli_s = time.perf_counter() - t
        cli_mb = peak_mb(resource.RUSAGE_CHILDREN)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"scan: {scan}\nmodel: {model_file}\nthreads: {args.threads}\n")
    print(f"{'stage':32s} {'seconds':>8s} {'peak RSS MB':>12s}")
    for name, secs, mb in rows:
        print(f"{name:32s} {secs:8.2f} {mb:12.0f}")
    print(f"{'sum of stages':32s} {total:8.2f}")
    print(f"\npredicted age {mean[0]:.2f} +/- {sd[0]:.2f} years")
    print(f"whole participant level (CLI, Nipype, exit {rc}): {cli_s:.1f} s, peak RSS of a "
          f"process {cli_mb:.0f} MB")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
