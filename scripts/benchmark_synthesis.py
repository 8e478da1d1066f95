#!/usr/bin/env python
"""Seconds to synthesise one training sample of ``train --synth`` (models/synth.py).

    python scripts/benchmark_synthesis.py [--maps MAPS.npy] [--t1 T1.npy] [--voxel-size 2]
        [--samples 32] [--threads 1] [--real-probability 0]

``--maps`` is a cached tissue-map file of the train level (``WORK_DIR/train_cache/
*_tissues_*.npy``, 4 x X x Y x Z); without it the maps are the MNI152NLin2009aSym priors on the
model grid (CSF, GM, WM; no deep grey), which cost the same to synthesise. ``--t1`` is the real
model-grid image for ``--real-probability``. Prints the mean seconds per sample with the default
options (every artefact with probability 0.5) and with every artefact on.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from brainage_bids.models import synth
from brainage_bids.models.checkpoint import mni_box_grid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--maps", help="tissue maps .npy (4 x X x Y x Z)")
    p.add_argument("--t1", help="model-grid T1w .npy for --real-probability")
    p.add_argument("--voxel-size", type=float, default=2.0)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--real-probability", type=float, default=0.0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.maps:
        maps = np.load(a.maps)
    else:
        from brainage_bids.models.anatomy import template_priors

        affine, shape = mni_box_grid(a.voxel_size)
        pri = template_priors(affine, shape)
        inside = pri[1:].sum(0) > 0.3
        maps = np.concatenate([pri, np.zeros_like(pri[:1])]) * inside
    real = np.load(a.t1)[None] if a.t1 else None
    rng = np.random.default_rng(0)
    print(f"grid {'x'.join(map(str, maps.shape[1:]))}, {a.threads} thread(s), {a.samples} samples")
    for label, opts in (
            ("default options", synth.SynthOptions(real_probability=a.real_probability)),
            ("every artefact on", synth.SynthOptions(
                resolution_probability=1, bias_probability=1, noise_probability=1,
                affine_probability=1, real_probability=a.real_probability))):
        synth.synthesise(maps, rng, opts, a.voxel_size, real)  # warm-up
        t0 = time.perf_counter()
        for _ in range(a.samples):
            synth.synthesise(maps, rng, opts, a.voxel_size, real)
        per = (time.perf_counter() - t0) / a.samples
        print(f"synthesis ({label}): {per:.3f} s per training sample")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
