"""Training augmentation that teaches invariance to scanner, protocol and resolution.

Every transform is a plain function of a batch ``x`` [B, 1, X, Y, Z] of brain-extracted,
model-grid images (zero outside the brain) and a ``numpy.random.Generator``, so a seed fixes the
result. Transforms keep the background at zero; :func:`augment_batch` applies each family with a
probability and finishes with the model's own normalisation (divide by the mean inside the brain).

Families (``FAMILIES``):

- ``affine``: left-right mirror, rotation (up to 10 degrees about each axis), scale (0.9-1.1) and
  translation (up to 4 mm), trilinear;
- ``gamma``: intensity gamma (log-gamma uniform in +-0.4) and contrast around the brain mean
  (0.75-1.25), both monotone, so the order of intensities is kept;
- ``bias``: a smooth multiplicative bias field (exp of a 4x4x4 random grid, trilinear);
- ``noise``: Gaussian noise inside the brain, SD up to 8 % of the brain mean;
- ``blur``: Gaussian blur, sigma 0.2-1.0 voxel per axis;
- ``slices``: a 2D acquisition: one random axis blurred and resampled to 3-6 mm slices, then
  brought back to the grid (high frequencies removed along that axis only);
- ``histogram``: a random monotone piecewise-linear remapping of intensities (histogram shift).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

FAMILIES = ("affine", "gamma", "bias", "noise", "blur", "slices", "histogram")


def _torch_generator(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2 ** 62)))


def brain_mask(x: torch.Tensor) -> torch.Tensor:
    """Voxels inside the brain (non-zero), as a float tensor of x's shape."""
    return (x > 0).to(x.dtype)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean inside the mask, shaped [B, 1, 1, 1, 1]."""
    dims = tuple(range(1, x.ndim))
    return ((x * mask).sum(dims) / mask.sum(dims).clamp_min(1))[(...,) + (None,) * (x.ndim - 1)]


def normalise_mask_mean(x: torch.Tensor) -> torch.Tensor:
    """Divide each image by its mean inside the brain (the ``mask_mean`` normalisation)."""
    mask = brain_mask(x)
    return x / _masked_mean(x, mask).clamp_min(1e-6) * mask


def _rotation(angles) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_affine(x: torch.Tensor, rng: np.random.Generator, voxel_mm: float = 2.0,
                  max_degrees: float = 10.0, scale: tuple = (0.9, 1.1), max_shift_mm: float = 4.0,
                  flip: bool = True) -> torch.Tensor:
    """Mirror (axis 0, left-right, with probability 0.5), rotate, scale and shift each image about
    the grid centre in millimetres; trilinear for the image, the brain mask resampled with it."""
    b, _, *size = x.shape
    half = np.array(size, dtype=float) * voxel_mm / 2  # half extents, mm
    thetas = []
    for _ in range(b):
        m = _rotation(np.deg2rad(rng.uniform(-max_degrees, max_degrees, 3)))
        m = m @ np.diag(rng.uniform(*scale, 3))
        if flip and rng.random() < 0.5:
            m = m @ np.diag([-1.0, 1.0, 1.0])
        t = rng.uniform(-max_shift_mm, max_shift_mm, 3)
        # output point p (mm, centred) samples the input at m @ p + t; in normalised coordinates:
        mn = np.diag(1 / half) @ m @ np.diag(half)
        tn = t / half
        # affine_grid orders coordinates (W, H, D) = (Z, Y, X): reverse both axes
        theta = np.concatenate([mn[::-1, ::-1], tn[::-1, None]], axis=1)
        thetas.append(theta)
    theta = torch.as_tensor(np.stack(thetas), dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    both = F.grid_sample(torch.cat([x, brain_mask(x)], 1), grid, mode="bilinear",
                         padding_mode="zeros", align_corners=False)
    return (both[:, :1] * (both[:, 1:] > 0.5)).clamp_min(0)


def random_gamma(x: torch.Tensor, rng: np.random.Generator, log_gamma: float = 0.4,
                 contrast: tuple = (0.75, 1.25)) -> torch.Tensor:
    """Gamma on intensities scaled to the brain maximum, then contrast about the brain mean.

    Both maps are increasing, so the order of intensities inside the brain is kept.
    """
    mask = brain_mask(x)
    dims = tuple(range(1, x.ndim))
    top = x.amax(dims, keepdim=True).clamp_min(1e-6)
    b = x.shape[0]
    gamma = torch.as_tensor(np.exp(rng.uniform(-log_gamma, log_gamma, b)), dtype=x.dtype)
    c = torch.as_tensor(rng.uniform(*contrast, b), dtype=x.dtype)
    shape = (b,) + (1,) * (x.ndim - 1)
    y = (x / top).clamp_min(0) ** gamma.view(shape) * top
    mean = _masked_mean(y, mask)
    y = mean + c.view(shape) * (y - mean)
    # keep the darkest brain voxels above zero (zero marks the background)
    floor = 1e-3 * mean
    return torch.maximum(y, floor) * mask


def random_bias_field(x: torch.Tensor, rng: np.random.Generator, max_sd: float = 0.3,
                      points: int = 4) -> torch.Tensor:
    """Multiply by exp of a smooth field: a ``points``^3 grid of N(0, sd) values (sd drawn up to
    ``max_sd`` per image), trilinearly interpolated over the volume."""
    b = x.shape[0]
    sd = rng.uniform(0, max_sd, b)[:, None, None, None, None]
    coarse = torch.as_tensor(rng.normal(size=(b, 1, points, points, points)) * sd, dtype=x.dtype)
    # one thread: with two, torch 2.13's CPU trilinear upsampling of this small grid gave results
    # that differed by up to 3e-4 between identical calls (tests/test_augment.py)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        field = F.interpolate(coarse, size=x.shape[2:], mode="trilinear", align_corners=True)
    finally:
        torch.set_num_threads(threads)
    return x * field.exp()


def gaussian_noise(x: torch.Tensor, rng: np.random.Generator, max_fraction: float = 0.08) -> torch.Tensor:
    """Add N(0, s) inside the brain, s drawn up to ``max_fraction`` of the brain mean per image."""
    mask = brain_mask(x)
    b = x.shape[0]
    s = torch.as_tensor(rng.uniform(0, max_fraction, b), dtype=x.dtype).view((b,) + (1,) * (x.ndim - 1))
    noise = torch.randn(x.shape, generator=_torch_generator(rng), dtype=x.dtype)
    y = x + noise * s * _masked_mean(x, mask)
    return y.clamp_min(1e-3 * _masked_mean(x, mask)) * mask


def _gauss_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def blur_axis(x: torch.Tensor, sigma: float, axis: int) -> torch.Tensor:
    """Gaussian blur of [B, 1, X, Y, Z] along spatial ``axis`` (0, 1 or 2) with sigma in voxels."""
    if sigma <= 0:
        return x
    k = _gauss_kernel(sigma).to(x.dtype)
    shape = [1, 1, 1, 1, 1]
    shape[2 + axis] = len(k)
    pad = [0] * 6
    r = len(k) // 2
    pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r  # F.pad lists the last axis first
    b, c = x.shape[:2]
    y = F.pad(x.reshape(b * c, 1, *x.shape[2:]), pad, mode="replicate")
    return F.conv3d(y, k.view(shape)).reshape(x.shape)


def random_blur(x: torch.Tensor, rng: np.random.Generator, sigma: tuple = (0.2, 1.0)) -> torch.Tensor:
    """Gaussian blur with a sigma (voxels) drawn per axis; the brain mask is kept."""
    mask = brain_mask(x)
    out = []
    for i in range(x.shape[0]):
        y = x[i:i + 1]
        for axis, s in enumerate(rng.uniform(*sigma, 3)):
            y = blur_axis(y, float(s), axis)
        out.append(y)
    return torch.cat(out) * mask


def slice_downsample(x: torch.Tensor, axis: int, factor: float) -> torch.Tensor:
    """Simulate thick slices along ``axis``: blur with a Gaussian of FWHM ``factor`` voxels,
    resample to ``size / factor`` slices, interpolate back (linear) to the grid."""
    size = list(x.shape[2:])
    n_low = max(2, int(round(size[axis] / factor)))
    y = blur_axis(x, factor / 2.3548, axis)
    low = list(size)
    low[axis] = n_low
    y = F.interpolate(y, size=low, mode="trilinear", align_corners=False)
    return F.interpolate(y, size=size, mode="trilinear", align_corners=False)


def random_slices(x: torch.Tensor, rng: np.random.Generator, voxel_mm: float = 2.0,
                  thickness_mm: tuple = (3.0, 6.0)) -> torch.Tensor:
    """A 2D acquisition: slices 3-6 mm thick along a random axis of each image."""
    mask = brain_mask(x)
    out = []
    for i in range(x.shape[0]):
        axis = int(rng.integers(3))
        factor = float(rng.uniform(*thickness_mm)) / voxel_mm
        out.append(slice_downsample(x[i:i + 1], axis, factor))
    return torch.cat(out).clamp_min(0) * mask


def random_histogram_shift(x: torch.Tensor, rng: np.random.Generator, points: int = 6,
                           jitter: float = 0.4) -> torch.Tensor:
    """Map intensities through a random increasing piecewise-linear curve.

    Control points are evenly spaced between 0 and the brain's maximum; the interior ones move by
    up to ``jitter`` of the spacing, so the curve stays increasing.
    """
    mask = brain_mask(x)
    b = x.shape[0]
    shape = (b,) + (1,) * (x.ndim - 1)
    top = x.amax(tuple(range(1, x.ndim))).clamp_min(1e-6).view(shape)
    u = (x / top).clamp(0, 1)  # intensities on [0, 1]
    step = 1.0 / (points - 1)
    knots = np.linspace(0, 1, points)
    moved = np.tile(knots, (b, 1))
    moved[:, 1:-1] += rng.uniform(-jitter, jitter, (b, points - 2)) * step
    slopes = torch.as_tensor(np.diff(moved, axis=1) / step, dtype=x.dtype)  # [B, points - 1]
    y = torch.zeros_like(u)
    for k in range(points - 1):  # sum of ramps: slope_k on [knot_k, knot_k+1]
        y = y + slopes[:, k].view(shape) * (u - knots[k]).clamp(0, step)
    return (y * top).clamp_min(1e-3 * top) * mask


TRANSFORMS = {
    "affine": random_affine,
    "gamma": random_gamma,
    "bias": random_bias_field,
    "noise": gaussian_noise,
    "blur": random_blur,
    "slices": random_slices,
    "histogram": random_histogram_shift,
}
# intensity transforms first, then resolution, then geometry last: a 2D acquisition is blurred
# in scanner space, but our grids are near enough aligned to the head that the order barely matters
ORDER = ("bias", "gamma", "histogram", "blur", "slices", "noise", "affine")


def augment_batch(x: torch.Tensor, rng: np.random.Generator, families=FAMILIES,
                  probability: float = 0.5, voxel_mm: float = 2.0) -> torch.Tensor:
    """Apply each family in ``families`` to each image with ``probability``, then renormalise
    each image by its brain mean. Deterministic for a given generator state."""
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown augmentation famil{'y' if len(unknown) == 1 else 'ies'}: "
                         f"{', '.join(sorted(unknown))} (known: {', '.join(FAMILIES)})")
    x = x.clone()
    for name in ORDER:
        if name not in families:
            continue
        pick = torch.as_tensor(rng.random(x.shape[0]) < probability)
        if not pick.any():
            continue
        fn = TRANSFORMS[name]
        kwargs = {"voxel_mm": voxel_mm} if name in ("affine", "slices") else {}
        x[pick] = fn(x[pick], rng, **kwargs)
    return normalise_mask_mean(x)
