"""Tissue probability maps of a training scan on the model grid: the anatomy images are
synthesised from (``models/synth.py``, ``train --synth``).

Classes (:data:`CLASSES`, axis 0 of every map): CSF, cortical and other grey matter (GM), white
matter (WM) and deep grey matter (``deep_gm``: caudate, putamen, pallidum, thalamus).

Method, per scan, on the model's grid (the 2 mm MNI152NLin2009aSym box of our T1w model,
:func:`~brainage_bids.models.checkpoint.mni_box_grid`), on the array the T1w model reads (the
preprocessed brain divided by its mean in the brain mask, zero outside it):

1. Priors: nilearn's MNI152NLin2009aSym GM and WM probability maps (the lesion filling's
   priors, CSF = 1 - GM - WM), resampled to the grid (linear; the grid is in template space,
   so no registration is needed).
2. Atropos (antspyx; Avants et al. 2011) three-class mixture model seeded by those priors, as
   the lesion filling does (prior weight 0.25, MRF smoothing 0.1 with radius 1 voxel, 5
   iterations, constant seed ``-r 0``), inside the brain mask, on intensities clipped to their
   1st-99th percentiles there. The posteriors are the partial-volume weights.
3. Deep grey matter: the template priors at hand have no deep grey map, and on T1w the thalami
   and putamen fall mostly in the WM class. Inside a fixed region of MNI space around the basal
   ganglia and thalami (:func:`deep_grey_region`, an ellipsoid centred at x 0, y -6, z 6 mm
   with semi-axes 32, 32 and 17 mm, tapered over 4 mm) the scan's tissue (GM + WM posterior) is
   split by the template's grey share there: ``f = region x GMprior / (GMprior + WMprior)``,
   ``deep_gm = f (GM + WM)``, ``gm = (1 - f) GM``, ``wm = (1 - f) WM``. It lets a synthetic
   contrast give the deep nuclei their own intensity (between GM and WM on T1w; on FLAIR and
   T2w too) without an atlas the app does not ship.

Inside the brain mask the four maps sum to 1; outside they are 0.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from ..utils.atropos import prior_guided_atropos
from ..utils.images import atomic_save_npy

LOG = logging.getLogger("brainage_bids.anatomy")

CLASSES = ("csf", "gm", "wm", "deep_gm")
#: Bump when the method changes: cached maps of another version are recomputed.
VERSION = "anat1"
DEEP_CENTRE_MM = (0.0, -6.0, 6.0)
DEEP_SEMI_AXES_MM = (32.0, 32.0, 17.0)
DEEP_TAPER_MM = 4.0


def template_priors(affine, shape) -> np.ndarray:
    """CSF, GM and WM prior probabilities (3, X, Y, Z) of MNI152NLin2009aSym on the grid
    (``affine``, ``shape``) of template space; CSF = 1 - GM - WM, clipped to [0, 1]."""
    import nibabel as nib

    from ..interfaces.lesion_filling import prior_files
    from ..utils.images import resample_to_grid

    out = []
    for f in prior_files():
        img = nib.load(f)
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.max() > 1.5:  # stored as 0-255
            data = data / 255.0
        out.append(np.clip(resample_to_grid(nib.Nifti1Image(data, img.affine),
                                            np.asarray(affine, dtype=float), tuple(shape)), 0, 1))
    gm, wm = out
    return np.stack([np.clip(1.0 - gm - wm, 0, 1), gm, wm]).astype(np.float32)


def deep_grey_region(affine, shape) -> np.ndarray:
    """Weight in [0, 1] of the deep grey region (module docstring, step 3) on a grid of MNI
    space: 1 inside the ellipsoid, falling linearly to 0 over :data:`DEEP_TAPER_MM` outside."""
    affine = np.asarray(affine, dtype=float)
    ijk = np.indices(tuple(shape)).reshape(3, -1).astype(float)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    rel = (xyz - np.asarray(DEEP_CENTRE_MM)[:, None]) / np.asarray(DEEP_SEMI_AXES_MM)[:, None]
    r = np.sqrt((rel ** 2).sum(0))  # 1 on the ellipsoid's surface
    # distance outside the surface, in mm along the ray (approximately)
    outside_mm = (r - 1.0) * np.linalg.norm((xyz - np.asarray(DEEP_CENTRE_MM)[:, None]), axis=0) \
        / np.maximum(r, 1e-6)
    w = np.clip(1.0 - outside_mm / DEEP_TAPER_MM, 0.0, 1.0)
    return w.reshape(tuple(shape)).astype(np.float32)


def segment_tissues(data: np.ndarray, mask: np.ndarray, priors: np.ndarray, zooms,
                    threads: int = 1) -> np.ndarray:
    """Prior-guided three-class Atropos inside ``mask``: CSF, GM and WM posteriors (3, X, Y, Z),
    summing to 1 inside the mask and 0 outside (module docstring, step 2)."""
    mask = np.asarray(mask) > 0
    if mask.sum() < 100:
        raise ValueError(f"brain mask of {int(mask.sum())} voxels: too small to segment")
    if priors.shape != (3,) + mask.shape:
        raise ValueError(f"priors of shape {priors.shape} do not match the image {mask.shape}")
    _, seg = prior_guided_atropos(data, zooms, mask, priors, threads)
    post = np.stack([p.numpy() for p in seg["probabilityimages"]]).astype(np.float32)
    post = np.clip(post, 0, None) * mask
    total = post.sum(0)
    # a voxel of the mask without posterior mass takes the prior's class mix
    empty = mask & (total <= 1e-6)
    post[:, empty] = priors[:, empty] + 1e-6
    return post / np.maximum(post.sum(0), 1e-12) * mask


def tissue_maps(image: np.ndarray, affine, priors: np.ndarray | None = None,
                threads: int = 1) -> np.ndarray:
    """The four tissue maps (:data:`CLASSES`, 4 x X x Y x Z, float32) of a model-grid array
    (the brain, zero outside the mask) on the MNI grid ``affine``; see the module docstring.

    ``priors`` (3 x X x Y x Z, from :func:`template_priors`) may be passed to save their
    resampling when many scans share the grid.
    """
    image = np.asarray(image, dtype=np.float32)
    affine = np.asarray(affine, dtype=float)
    mask = image > 0
    if priors is None:
        priors = template_priors(affine, image.shape)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    csf, gm, wm = segment_tissues(image, mask, priors, zooms, threads)
    share = priors[1] / np.maximum(priors[1] + priors[2], 1e-6)
    f = deep_grey_region(affine, image.shape) * np.clip(share, 0, 1)
    return np.stack([csf, gm * (1 - f), wm * (1 - f), (gm + wm) * f]).astype(np.float32)


def anatomy_cache_file(cache_dir: Path, image_path: str, spec) -> Path:
    """Cache file of one scan's tissue maps (named after the preprocessed image, the grid, the
    method version and the image's modification time)."""
    key = f"{spec.voxel_size:g}mm_{'x'.join(map(str, spec.shape))}_{VERSION}"
    stamp = int(os.path.getmtime(image_path))
    return Path(cache_dir) / f"{Path(image_path).name[:-7]}_tissues_{key}_{stamp}.npy"


def load_anatomy(examples, arrays: np.ndarray, spec, cache_dir: Path, threads: int = 1) -> np.ndarray:
    """Tissue maps of every example (N x 4 x X x Y x Z, float16), computed from its model-grid
    array (``arrays[i, 0]``, as :func:`~brainage_bids.models.train.load_arrays` returns them)
    and cached as .npy under ``cache_dir``."""
    from tqdm import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    priors = None
    out = []
    for ex, arr in tqdm(list(zip(examples, arrays)), desc="tissue maps", unit="scan",
                        disable=None):
        f = anatomy_cache_file(cache_dir, ex.path, spec)
        if f.exists():
            out.append(np.load(f))
            continue
        if priors is None:
            priors = template_priors(spec.affine, spec.shape)
        t0 = time.time()
        maps = tissue_maps(arr[0], spec.affine, priors, threads).astype(np.float16)
        LOG.info("tissue maps of %s: %.1f s", ex.path, time.time() - t0)
        atomic_save_npy(f, maps)
        out.append(maps)
    return np.stack(out)
