"""Synthetic training images of random contrast and resolution from tissue maps (domain
randomisation, after SynthSeg, Billot et al. 2023, and SynthBA, Puglisi et al. 2024): a network
trained on them learns anatomy, not contrast, and can read T1w, T2w and FLAIR images.

One image from the tissue maps of a scan (:mod:`~brainage_bids.models.anatomy`, classes CSF,
GM, WM, deep GM), each step drawn with a seeded ``numpy.random.Generator``:

1. Contrast: a family (:data:`CONTRASTS`) and one mean intensity per tissue in its order (units
   are arbitrary; the last step divides by the brain mean):

   - ``T1w``: CSF 0.05-0.35 < GM 0.45-0.65 < WM 0.75-1.0, deep GM between GM and WM;
   - ``T2w``: WM 0.2-0.4 < GM 0.45-0.65 < CSF 0.8-1.0, deep GM between WM and GM;
   - ``FLAIR``: CSF 0.02-0.2 < WM 0.4-0.6 < GM 0.65-0.9 (CSF suppressed, WM darker than GM),
     deep GM between WM and GM;
   - ``random``: every tissue 0.02-1.0 in any order (SynthSeg's fully random contrast).

2. Partial volume: each voxel is the probability-weighted sum of the tissue means plus
   Gaussian texture whose SD (0-0.05 per tissue) is mixed the same way.
3. Resolution (probability ``resolution_probability``): slices 1-6 mm thick along one random
   axis: blurred along it and resampled to the slice spacing, then back to the grid
   (:func:`~brainage_bids.models.augment.slice_downsample`); thicknesses under the grid's voxel
   leave the image as it is.
4. Bias field, noise and a small affine (mirror, +-10 degrees, 0.9-1.1 scale, +-4 mm), each
   with its probability: :mod:`~brainage_bids.models.augment`'s ``random_bias_field``,
   ``gaussian_noise`` and ``random_affine``.
5. The model's own normalisation: division by the mean inside the brain (``mask_mean``, as the
   T1w model's :class:`~brainage_bids.models.checkpoint.InputSpec`), zero outside.

With ``real_probability`` a training sample is the scan's real T1w image (already normalised)
instead, through steps 3-5.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import augment
from .anatomy import CLASSES

CONTRASTS = ("T1w", "T2w", "FLAIR", "random")
#: Applies-to list of a model trained on these images (the zoo's and cards' ``modalities``).
APPLIES_TO = ("T1w", "FLAIR", "T2w")
CSF, GM, WM, DEEP = (CLASSES.index(c) for c in ("csf", "gm", "wm", "deep_gm"))
RANGES = {  # (low, high) of the mean intensity of CSF, GM, WM; deep GM is placed between two
    "T1w": {"csf": (0.05, 0.35), "gm": (0.45, 0.65), "wm": (0.75, 1.0), "deep": ("gm", "wm")},
    "T2w": {"csf": (0.8, 1.0), "gm": (0.45, 0.65), "wm": (0.2, 0.4), "deep": ("wm", "gm")},
    "FLAIR": {"csf": (0.02, 0.2), "gm": (0.65, 0.9), "wm": (0.4, 0.6), "deep": ("wm", "gm")},
}


@dataclass(frozen=True)
class SynthOptions:
    """How synthetic samples are drawn (module docstring); recorded in the model card."""

    contrasts: tuple = CONTRASTS
    contrast_weights: tuple = (0.25, 0.25, 0.25, 0.25)
    texture_sd: tuple = (0.0, 0.05)
    resolution_probability: float = 0.5
    thickness_mm: tuple = (1.0, 6.0)
    bias_probability: float = 0.5
    noise_probability: float = 0.5
    affine_probability: float = 0.5
    real_probability: float = 0.0

    def __post_init__(self):
        bad = set(self.contrasts) - set(CONTRASTS)
        if bad:
            raise ValueError(f"unknown contrast famil{'y' if len(bad) == 1 else 'ies'} "
                             f"{', '.join(sorted(bad))} (known: {', '.join(CONTRASTS)})")
        if len(self.contrast_weights) != len(self.contrasts) or min(self.contrast_weights) < 0 \
                or sum(self.contrast_weights) <= 0:
            raise ValueError("contrast_weights: one non-negative weight per contrast, not all 0")
        for name in ("resolution_probability", "bias_probability", "noise_probability",
                     "affine_probability", "real_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1]")

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Draw:
    """The random choices of one sample (what :func:`render` makes an image of)."""

    real: bool
    contrast: str | None
    means: np.ndarray | None          # per tissue (CLASSES order)
    sds: np.ndarray | None
    resolution: tuple | None          # (axis, thickness_mm) or None
    bias: bool
    noise: bool
    affine: bool
    extra: dict = field(default_factory=dict)


def draw_intensities(rng: np.random.Generator, contrast: str) -> np.ndarray:
    """Mean intensity of each tissue (CLASSES order) for a contrast family (module docstring)."""
    if contrast == "random":
        return rng.uniform(0.02, 1.0, len(CLASSES))
    r = RANGES[contrast]
    means = np.zeros(len(CLASSES))
    for name, idx in (("csf", CSF), ("gm", GM), ("wm", WM)):
        means[idx] = rng.uniform(*r[name])
    lo, hi = (means[CLASSES.index(n)] for n in r["deep"])
    means[DEEP] = lo + rng.uniform(0.2, 0.8) * (hi - lo)
    return means


def draw(rng: np.random.Generator, options: SynthOptions, voxel_mm: float = 2.0) -> Draw:
    """Draw the choices of one sample."""
    real = bool(rng.random() < options.real_probability)
    contrast = means = sds = None
    if not real:
        w = np.asarray(options.contrast_weights, dtype=float)
        contrast = str(options.contrasts[int(rng.choice(len(w), p=w / w.sum()))])
        means = draw_intensities(rng, contrast)
        sds = rng.uniform(*options.texture_sd, len(CLASSES))
    resolution = None
    if rng.random() < options.resolution_probability:
        resolution = (int(rng.integers(3)), float(rng.uniform(*options.thickness_mm)))
    return Draw(real=real, contrast=contrast, means=means, sds=sds, resolution=resolution,
                bias=bool(rng.random() < options.bias_probability),
                noise=bool(rng.random() < options.noise_probability),
                affine=bool(rng.random() < options.affine_probability))


def mix(probs, means, sds, rng: np.random.Generator) -> torch.Tensor:
    """Partial-volume image [1, 1, X, Y, Z] of tissue maps ``probs`` (K, X, Y, Z): the
    probability-weighted means plus texture N(0, probability-weighted SD); positive inside the
    brain (the maps' sum > 0.5), zero outside."""
    p = torch.as_tensor(np.asarray(probs), dtype=torch.float32)
    mu = torch.as_tensor(np.asarray(means), dtype=torch.float32)
    sd = torch.as_tensor(np.asarray(sds), dtype=torch.float32)
    mask = p.sum(0) > 0.5
    img = torch.einsum("k,kxyz->xyz", mu, p)
    if float(sd.max()) > 0:
        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        img = img + torch.einsum("k,kxyz->xyz", sd, p) * torch.randn(img.shape, generator=g)
    img = img.clamp_min(1e-3) * mask
    return img[None, None]


def degrade_resolution(x: torch.Tensor, axis: int, thickness_mm: float,
                       voxel_mm: float = 2.0) -> torch.Tensor:
    """Slices ``thickness_mm`` thick along ``axis`` (step 3); the brain mask is kept."""
    factor = thickness_mm / voxel_mm
    if factor <= 1.0:
        return x
    mask = augment.brain_mask(x)
    y = augment.slice_downsample(x, axis, factor)
    return y.clamp_min(1e-3) * mask


def render(probs, d: Draw, rng: np.random.Generator, voxel_mm: float = 2.0,
           real: np.ndarray | None = None) -> torch.Tensor:
    """The image [1, 1, X, Y, Z] of a :class:`Draw`: synthesised from ``probs``, or ``real``
    (a model-grid array) when ``d.real``; normalised by the brain mean."""
    if d.real:
        if real is None:
            raise ValueError("a real-image sample needs the scan's real image")
        x = torch.as_tensor(np.asarray(real, dtype=np.float32)).reshape((1, 1) + np.shape(real)[-3:])
    else:
        x = mix(probs, d.means, d.sds, rng)
    if d.resolution is not None:
        x = degrade_resolution(x, *d.resolution, voxel_mm=voxel_mm)
    if d.bias:
        x = augment.random_bias_field(x, rng)
    if d.noise:
        x = augment.gaussian_noise(x, rng)
    if d.affine:
        x = augment.random_affine(x, rng, voxel_mm=voxel_mm)
    return augment.normalise_mask_mean(x)


def synthesise(probs, rng: np.random.Generator, options: SynthOptions | None = None,
               voxel_mm: float = 2.0, real: np.ndarray | None = None):
    """One training sample from one scan's tissue maps: (image [1, 1, X, Y, Z], its Draw)."""
    d = draw(rng, options or SynthOptions(), voxel_mm)
    return render(probs, d, rng, voxel_mm, real), d


def synth_batch(probs, rng: np.random.Generator, options: SynthOptions | None = None,
                voxel_mm: float = 2.0, real: np.ndarray | None = None) -> torch.Tensor:
    """A training batch [B, 1, X, Y, Z] from tissue maps [B, K, X, Y, Z] (and, for
    ``options.real_probability``, the real images [B, 1, X, Y, Z])."""
    options = options or SynthOptions()
    out = [synthesise(probs[i], rng, options, voxel_mm,
                      None if real is None else real[i])[0] for i in range(len(probs))]
    return torch.cat(out)
