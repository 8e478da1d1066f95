#!/usr/bin/env python
"""Seconds per scan of the networks at each precision, and how much the ages move.

    python scripts/benchmark_inference.py [--threads 2] [--repeats 3] [--device cpu|cuda]
        [--images 'OUT/sub-*/anat/*desc-preproc_T1w.nii.gz']

Networks: the shipped SFCN (2 mm, trained), the full-size UK Biobank SFCN (160x192x160) and the
FLAIR-Brain-Age Inception-ResNet-V2 (118x142x118). Published weights cannot be had here, so the
last two run with random weights: their timings are real, their "age" differences are differences
of the network output (years only for the trained model). Batch timings divide by the batch size.
"""
from __future__ import annotations

import argparse
import glob
import time

import numpy as np
import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, oneDNN kernels)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    from brainage_bids.cli.run import DEFAULT_MODEL
    from brainage_bids.models.checkpoint import load_model
    from brainage_bids.models.inception_resnet import InceptionResNetV2
    from brainage_bids.models.inference import model_input, predict_network
    from brainage_bids.models.sfcn import SFCN, UKB_CHANNELS
    from brainage_bids.utils.templates import get_template

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", default="", help="glob of preprocessed images for the trained model")
    ap.add_argument("--max-images", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device

    shipped = load_model(DEFAULT_MODEL)
    files = sorted(glob.glob(args.images))[:args.max_images] if args.images else []
    if files:
        arrays = [model_input(f, f.replace("desc-preproc_T1w", "desc-brain_mask"), shipped.input)
                  for f in files]
    else:
        tpl = get_template()
        arrays = [model_input(str(tpl.brain), str(tpl.mask), shipped.input)]
    torch.manual_seed(0)
    nets = [
        ("SFCN shipped (2 mm 80x96x80)", shipped.network, shipped.centres, arrays),
        ("SFCN UK Biobank size (160x192x160)", SFCN(UKB_CHANNELS, n_bins=40), np.arange(42.5, 82, 1.0),
         [np.random.default_rng(1).random((160, 192, 160), dtype=np.float32)]),
        ("Inception-ResNet-V2 (118x142x118)", InceptionResNetV2(), None,
         [np.random.default_rng(2).random((118, 142, 118), dtype=np.float32)]),
    ]
    precisions = ["fp32", "fast", "bf16"]
    print(f"device {dev}, {args.threads} threads, torch {torch.__version__}, best of {args.repeats}")
    print(f"trained-model inputs: {len(arrays)} ({'real scans' if files else 'template brain'})\n")
    print("| network | precision | s/scan (batch 1) | s/scan (batch 4) | max |age - fp32| |")
    print("|---|---|---|---|---|")
    for label, net, centres, xs in nets:
        net.eval()
        ref, _, _ = predict_network(net, xs, centres, device=dev, precision="fp32", batch_size=1)
        for prec in precisions:
            one = timed(lambda: predict_network(net, xs[:1], centres, device=dev, precision=prec,
                                                batch_size=1), args.repeats)
            batch = [xs[i % len(xs)] for i in range(4)]
            four = timed(lambda: predict_network(net, batch, centres, device=dev, precision=prec,
                                                 batch_size=4), max(1, args.repeats - 1)) / 4
            ages, _, _ = predict_network(net, xs, centres, device=dev, precision=prec, batch_size=1)
            diff = float(np.max(np.abs(ages - ref)))
            print(f"| {label} | {prec} | {one:.2f} | {four:.2f} | {diff:.4f} |", flush=True)


if __name__ == "__main__":
    main()
