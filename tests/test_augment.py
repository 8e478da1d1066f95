"""Training augmentation: every transform keeps the shape and the background, is finite and
reproducible with a seed, and changes the statistic it is meant to change."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from brainage_bids.models import augment as A


def phantom(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A textured ellipsoid 'brain' (values 0.5-1.5, zero outside) on a 40x48x40 grid."""
    rng = np.random.default_rng(seed)
    shape = (40, 48, 40)
    ijk = np.indices(shape).astype(float)
    centre = np.array(shape)[:, None, None, None] / 2
    inside = (((ijk - centre) / np.array([15, 19, 15])[:, None, None, None]) ** 2).sum(0) <= 1
    x = np.zeros((batch, 1) + shape, np.float32)
    for b in range(batch):
        tex = 1 + 0.5 * np.sin(ijk[0] / 2.0 + b) * np.cos(ijk[1] / 3.0) + 0.05 * rng.normal(size=shape)
        x[b, 0] = np.where(inside, tex.clip(0.5, 1.5), 0)
    return torch.from_numpy(x)


CALLS = {
    "affine": lambda x, r: A.random_affine(x, r, voxel_mm=2.0),
    "gamma": A.random_gamma,
    "bias": A.random_bias_field,
    "noise": A.gaussian_noise,
    "blur": A.random_blur,
    "slices": lambda x, r: A.random_slices(x, r, voxel_mm=2.0),
    "histogram": A.random_histogram_shift,
}


@pytest.mark.parametrize("name", A.FAMILIES)
def test_transform_keeps_shape_is_finite_reproducible_and_changes_the_image(name):
    x = phantom()
    y1 = CALLS[name](x, np.random.default_rng(7))
    y2 = CALLS[name](x, np.random.default_rng(7))
    y3 = CALLS[name](x, np.random.default_rng(8))
    assert y1.shape == x.shape and y1.dtype == x.dtype
    assert torch.isfinite(y1).all() and (y1 >= 0).all()
    assert torch.equal(y1, y2)  # same seed, same result
    assert not torch.equal(y1, y3)  # another seed, another draw
    assert not torch.allclose(y1, x)
    if name != "affine":  # the brain stays where it is and the background stays zero
        assert torch.equal(y1 > 0, x > 0)


def test_augment_batch_normalises_to_the_brain_mean_and_rejects_unknown_families():
    x = phantom(4) * 300.0
    y = A.augment_batch(x, np.random.default_rng(0), probability=1.0)
    for b in range(4):
        inside = y[b][y[b] > 0]
        assert float(inside.mean()) == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(A.augment_batch(x, np.random.default_rng(3)),
                       A.augment_batch(x, np.random.default_rng(3)))
    with pytest.raises(ValueError, match="unknown augmentation family: warp"):
        A.augment_batch(x, np.random.default_rng(0), families=("affine", "warp"))


def test_gamma_and_histogram_shift_keep_the_order_of_intensities():
    x = phantom(1)
    inside = x[0, 0] > 0
    order = torch.argsort(x[0, 0][inside])
    for fn in (A.random_gamma, A.random_histogram_shift):
        y = fn(x, np.random.default_rng(11))[0, 0][inside]
        assert (torch.diff(y[order]) >= -1e-6).all(), fn.__name__
        # the spread of intensities is not a mere rescaling of the original
        ratio = y / x[0, 0][inside]
        assert float(ratio.std() / ratio.mean()) > 1e-3, fn.__name__


def test_gamma_above_one_darkens_mid_intensities():
    x = torch.zeros(1, 1, 4, 4, 4)
    x[0, 0, 1:3, 1:3, 1:3] = torch.linspace(0.2, 1.0, 8).reshape(2, 2, 2)

    class Fixed:
        """A generator stand-in that always draws the upper bound: log-gamma +0.4, contrast 1."""
        def uniform(self, lo, hi, n=None):
            return np.full(n, hi)

    y = A.random_gamma(x, Fixed(), log_gamma=0.4, contrast=(1.0, 1.0))
    mid = x[0, 0, 1, 1, 2]
    assert float(y[0, 0, 1, 1, 2]) == pytest.approx(float(mid ** np.exp(0.4)), rel=1e-5)


def high_frequency_share(x: torch.Tensor, axis: int) -> float:
    """Share of the power in the upper half of frequencies along one spatial axis (0-2)."""
    spec = torch.fft.rfft(x[0, 0] - x.mean(), dim=axis).abs() ** 2
    n = spec.shape[axis]
    return float(spec.narrow(axis, n // 2, n - n // 2).sum() / spec.sum())


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_downsampling_removes_high_frequencies_along_its_axis_only(axis):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(1, 1, 32, 36, 40)).astype(np.float32))
    y = A.slice_downsample(x, axis, factor=2.5)
    assert y.shape == x.shape
    for a in range(3):
        ratio = high_frequency_share(y, a) / high_frequency_share(x, a)
        if a == axis:
            assert ratio < 0.05
        else:
            assert ratio > 0.9


def test_blur_axis_conserves_the_mean_and_smooths():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(5.0, 1.0, size=(1, 1, 20, 20, 20)).astype(np.float32))
    y = A.blur_axis(x, 1.0, 1)
    assert float(y.mean()) == pytest.approx(float(x.mean()), abs=0.02)
    assert float(y.std()) < 0.7 * float(x.std())


def test_affine_moves_a_block_by_the_drawn_shift_and_mirrors_left_right():
    x = torch.zeros(1, 1, 20, 20, 20)
    x[0, 0, 3:7, 8:12, 8:12] = 1.0  # a block on the left (low x)

    class Draws:
        """No rotation, unit scale, mirror, no shift."""
        def uniform(self, lo, hi, n=None):
            return np.zeros(n) if lo < 0 else np.ones(n)

        def random(self):
            return 0.0  # < 0.5: mirror

    y = A.random_affine(x, Draws(), voxel_mm=2.0)
    com = lambda v: (torch.nonzero(v[0, 0] > 0.5).float().mean(0))  # noqa: E731
    assert com(y)[0] == pytest.approx(19 - float(com(x)[0]), abs=0.01)  # mirrored in x
    assert torch.allclose(com(y)[1:], com(x)[1:])


def test_bias_field_is_smooth_and_multiplicative():
    x = torch.ones(1, 1, 24, 24, 24)
    y = A.random_bias_field(x, np.random.default_rng(5), max_sd=0.3)
    field = y[0, 0]
    assert float(field.std()) > 0.01
    # smooth: neighbouring voxels differ far less than the field varies overall
    assert float((field[1:] - field[:-1]).abs().max()) < 0.2 * float(field.max() - field.min())


def test_noise_scales_with_the_brain_mean():
    x = phantom(1) * 100.0
    y = A.gaussian_noise(x, np.random.default_rng(2), max_fraction=0.08)
    diff = (y - x)[x > 0]
    assert 0 < float(diff.std()) <= 0.08 * float(x[x > 0].mean()) * 1.05
