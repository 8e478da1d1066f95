"""Prior-guided three-class Atropos (CSF, GM, WM), shared by the lesion filling and the tissue
maps of the synthetic-image model."""
from __future__ import annotations

import os

import numpy as np

#: Atropos prior weight (``-w``): the template priors guide, the image decides.
PRIOR_WEIGHT = 0.25


def prior_guided_atropos(data: np.ndarray, zooms, region: np.ndarray, priors, threads: int = 1):
    """Atropos inside ``region`` seeded by three prior maps, on the image clipped to its 1st-99th
    percentiles in the region; returns (clipped image, Atropos result dict).

    Atropos runs with a constant seed (its ``-r 0``; by default it seeds from the clock), so
    reruns give identical results whatever the thread count.
    """
    import ants

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(threads)))
    region = np.asarray(region) > 0
    lo, hi = np.percentile(data[region], [1, 99])
    clipped = np.clip(data, lo, hi).astype(np.float32)
    spacing = tuple(float(z) for z in np.asarray(zooms, dtype=float)[:3])

    def ants_img(a):
        return ants.from_numpy(np.ascontiguousarray(a, dtype=np.float32), spacing=spacing)

    seg = ants.atropos(a=ants_img(clipped), x=ants_img(region.astype(np.float32)),
                       i=[ants_img(p) for p in priors], m="[0.1,1x1x1]", c="[5,0]",
                       priorweight=PRIOR_WEIGHT, r=0)
    return clipped, seg
