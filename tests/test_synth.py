"""The synthesiser (models/synth.py) on a phantom of nested tissue shells with a known answer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from brainage_bids.models import synth as S

OFF = dict(resolution_probability=0.0, bias_probability=0.0, noise_probability=0.0,
           affine_probability=0.0)


def phantom_maps(shape=(32, 40, 32)) -> np.ndarray:
    """Tissue maps (CSF, GM, WM, deep GM) of nested shells, 1-voxel partial-volume ramps: deep
    GM ball (r < 4), WM (4-9), GM (9-12), CSF (12-14.5 voxels), zero outside."""
    c = (np.array(shape) - 1) / 2
    r = np.linalg.norm(np.indices(shape) - c[:, None, None, None], axis=0)

    def inside(radius):  # 1 inside, 0 outside, linear over one voxel
        return np.clip(radius + 0.5 - r, 0, 1)

    deep, wm, gm, brain = inside(4), inside(9), inside(12), inside(14.5)
    maps = np.stack([brain - gm, gm - wm, wm - deep, deep]).astype(np.float32)
    return maps


def pure(maps, k):
    return maps[k] > 0.999


def tissue_means(x, maps):
    img = x[0, 0].numpy()
    return np.array([img[pure(maps, k)].mean() for k in range(4)])


def test_sample_keeps_shape_is_finite_normalised_and_reproducible():
    maps = phantom_maps()
    x1, d1 = S.synthesise(maps, np.random.default_rng(3), S.SynthOptions(
        resolution_probability=1, bias_probability=1, noise_probability=1, affine_probability=1))
    x2, _ = S.synthesise(maps, np.random.default_rng(3), S.SynthOptions(
        resolution_probability=1, bias_probability=1, noise_probability=1, affine_probability=1))
    x3, _ = S.synthesise(maps, np.random.default_rng(4))
    assert x1.shape == (1, 1) + maps.shape[1:] and x1.dtype == torch.float32
    assert torch.isfinite(x1).all()
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    inside = x1[0, 0] > 0
    assert float(x1[0, 0][inside].mean()) == pytest.approx(1.0, rel=1e-4)
    assert d1.resolution is not None and d1.bias and d1.noise and d1.affine


def test_drawn_intensities_are_recovered_per_tissue():
    maps = phantom_maps()
    for seed in range(5):
        x, d = S.synthesise(maps, np.random.default_rng(seed), S.SynthOptions(**OFF))
        got = tissue_means(x, maps)
        # the normalisation divides every tissue by the same brain mean
        np.testing.assert_allclose(got / got[2], d.means / d.means[2], rtol=0.02)


@pytest.mark.parametrize("contrast,order", [
    ("FLAIR", ("csf", "wm", "deep_gm", "gm")),   # CSF dark, WM darker than GM
    ("T1w", ("csf", "gm", "deep_gm", "wm")),
    ("T2w", ("wm", "deep_gm", "gm", "csf")),
])
def test_contrast_families_keep_their_tissue_order_with_texture_and_noise(contrast, order):
    maps = phantom_maps()
    # (blur and bias mix the phantom's thin shells with their neighbours; see their own tests)
    opts = S.SynthOptions(contrasts=(contrast,), contrast_weights=(1.0,), **{
        **OFF, "noise_probability": 1.0})
    for seed in range(5):
        x, d = S.synthesise(maps, np.random.default_rng(seed), opts)
        assert d.contrast == contrast
        means = dict(zip(S.CLASSES, tissue_means(x, maps)))
        assert [means[t] for t in order] == sorted(means.values()), (seed, means)


def test_contrast_mix_draws_every_family():
    rng = np.random.default_rng(0)
    seen = {S.draw(rng, S.SynthOptions()).contrast for _ in range(60)}
    assert seen == set(S.CONTRASTS)


def _high_frequency_share(img: np.ndarray, axis: int) -> float:
    """Share of the spectral energy along ``axis`` (DC left out) above half the Nyquist
    frequency."""
    spec = np.abs(np.fft.rfft(img, axis=axis)) ** 2
    n = spec.shape[axis]
    hi = np.take(spec, np.arange(n // 2, n), axis=axis).sum()
    return float(hi / np.take(spec, np.arange(1, n), axis=axis).sum())


def test_resolution_change_removes_high_frequencies_along_its_axis_only():
    # a separable image A(x) B(y) C(z) of white-noise profiles: slices along y change B only,
    # so the spectra along x and z keep their shape exactly
    rng = np.random.default_rng(0)
    profiles = [1 + 0.5 * rng.random(n) for n in (32, 40, 32)]
    img = np.einsum("i,j,k->ijk", *profiles).astype(np.float32)
    x = torch.from_numpy(img)[None, None]
    y = S.degrade_resolution(x, axis=1, thickness_mm=6.0, voxel_mm=2.0)[0, 0].numpy()
    before = [_high_frequency_share(img, ax) for ax in range(3)]
    after = [_high_frequency_share(y, ax) for ax in range(3)]
    assert after[1] < 0.1 * before[1]
    for ax in (0, 2):
        assert after[ax] == pytest.approx(before[ax], rel=0.02)
    # slices no thicker than the grid's voxels leave the image alone
    assert torch.equal(S.degrade_resolution(x, 1, 1.5, 2.0), x)


def test_render_applies_the_drawn_resolution():
    maps = phantom_maps()
    base = S.Draw(real=False, contrast="T1w", means=np.array([0.2, 0.55, 0.9, 0.7]),
                  sds=np.zeros(4), resolution=None, bias=False, noise=False, affine=False)
    a = S.render(maps, base, np.random.default_rng(0))[0, 0].numpy()
    b = S.render(maps, S.Draw(**{**base.__dict__, "resolution": (1, 6.0)}),
                 np.random.default_rng(0))[0, 0].numpy()
    assert _high_frequency_share(b, 1) < 0.5 * _high_frequency_share(a, 1)
    assert (b > 0).sum() == (a > 0).sum()  # the brain mask is kept


def test_real_images_are_mixed_in_with_their_probability():
    maps = phantom_maps()
    real = np.where(maps.sum(0) > 0.5, 2.0 + maps[2], 0).astype(np.float32)[None]
    x, d = S.synthesise(maps, np.random.default_rng(0), S.SynthOptions(real_probability=1.0, **OFF),
                        real=real)
    assert d.real and d.contrast is None
    expected = real[0] / real[0][real[0] > 0].mean()
    np.testing.assert_allclose(x[0, 0].numpy(), expected, rtol=1e-5)
    batch = S.synth_batch(np.stack([maps] * 24), np.random.default_rng(1),
                          S.SynthOptions(real_probability=0.5, **OFF), real=np.stack([real] * 24))
    n_real = sum(torch.allclose(b[0], torch.from_numpy(expected), rtol=1e-5) for b in batch)
    assert 6 <= n_real <= 18
    with pytest.raises(ValueError, match="real image"):
        S.synthesise(maps, np.random.default_rng(0), S.SynthOptions(real_probability=1.0))


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown contrast"):
        S.SynthOptions(contrasts=("PD",), contrast_weights=(1.0,))
    with pytest.raises(ValueError, match="one non-negative weight"):
        S.SynthOptions(contrast_weights=(1.0,))
    with pytest.raises(ValueError, match="real_probability"):
        S.SynthOptions(real_probability=2)
