"""Tissue probability maps for synthesis (models/anatomy.py) on small synthetic volumes."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from brainage_bids.models import anatomy
from brainage_bids.models.checkpoint import InputSpec, mni_box_grid


def layered_ball(n: int = 24):
    """A ball: WM core (r < 5), GM shell (5-8), CSF shell (8-10 voxels); labels 1 CSF, 2 GM,
    3 WM, 0 outside, and exact priors (one-hot, smoothed a little)."""
    from scipy import ndimage

    c = (n - 1) / 2
    r = np.linalg.norm(np.indices((n, n, n)) - c, axis=0)
    labels = np.select([r < 5, r < 8, r < 10], [3, 2, 1], 0)
    priors = np.stack([ndimage.gaussian_filter((labels == k).astype(np.float32), 0.7)
                       for k in (1, 2, 3)])
    priors /= np.maximum(priors.sum(0), 1e-6)
    return labels, priors


@pytest.mark.parametrize("means", [(0.3, 0.6, 1.0), (0.1, 1.0, 0.7)], ids=["T1-like", "FLAIR-like"])
def test_segmentation_recovers_layers_and_sums_to_one(means):
    labels, priors = layered_ball()
    rng = np.random.default_rng(0)
    image = np.choose(labels, (0.0,) + means) + rng.normal(0, 0.03, labels.shape) * (labels > 0)
    image = np.where(labels > 0, np.maximum(image, 0.01), 0).astype(np.float32)
    post = anatomy.segment_tissues(image, labels > 0, priors, (2, 2, 2))
    inside = labels > 0
    np.testing.assert_allclose(post.sum(0)[inside], 1.0, atol=1e-5)
    assert np.all(post[:, ~inside] == 0)
    # the class of each layer is the prior's, whatever the order of intensities
    for k in (1, 2, 3):
        assert post[k - 1][labels == k].mean() > 0.8


def test_deep_grey_region_is_one_at_the_thalami_and_zero_in_the_cortex():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-40, -50, -20]
    shape = (41, 51, 41)
    w = anatomy.deep_grey_region(affine, shape)

    def at(x, y, z):
        i, j, k = np.rint((np.array([x, y, z]) - affine[:3, 3]) / 2).astype(int)
        return w[i, j, k]

    assert at(10, -18, 6) == 1.0       # left thalamus
    assert at(-24, 4, 2) == 1.0        # right putamen
    assert at(0, -6, 6 + 17 + 6) == 0.0  # 6 mm above the ellipsoid: cingulate/callosum
    assert 0 < at(0, -6, 6 + 17 + 2) < 1  # inside the taper
    assert w.min() == 0 and w.max() == 1


def test_tissue_maps_on_the_template_split_grey_matter_and_sum_to_one():
    affine, shape = mni_box_grid(5.0)
    priors = anatomy.template_priors(affine, shape)
    inside = priors[1:].sum(0) > 0.3  # the template's brain
    rng = np.random.default_rng(0)
    # a T1-like image of the template anatomy: CSF 0.3, GM 0.6, WM 1.0
    arr = np.tensordot([0.3, 0.6, 1.0], priors, axes=1) + rng.normal(0, 0.02, shape)
    arr = np.where(inside, np.maximum(arr, 0.01), 0).astype(np.float32)
    maps = anatomy.tissue_maps(arr, affine, priors)
    assert maps.shape == (4,) + tuple(shape) and maps.dtype == np.float32
    np.testing.assert_allclose(maps.sum(0)[inside], 1.0, atol=1e-5)
    assert np.all(maps[:, ~inside] == 0)
    csf, gm, wm, deep = maps.reshape(4, -1).sum(1) * 125 / 1000  # mL
    assert gm > deep > 5 and wm > 200 and csf > 20
    means = [(maps[k] * arr).sum() / maps[k].sum() for k in range(3)]
    assert means[0] < means[1] < means[2]


def test_load_anatomy_caches_per_scan(tmp_path, monkeypatch):
    labels, priors = layered_ball(32)
    affine, shape = mni_box_grid(5.0)
    spec = InputSpec(affine, (32, 32, 32), "mask_mean")
    img = tmp_path / "sub-01_space-X_desc-preproc_T1w.nii.gz"
    img.write_bytes(b"x")
    arr = np.choose(labels, (0.0, 0.3, 0.6, 1.0)).astype(np.float32)[None, None]
    calls = []

    def fake_maps(a, aff, pri, threads):
        calls.append(1)
        return np.concatenate([priors, np.zeros((1,) + a.shape, np.float32)])

    monkeypatch.setattr(anatomy, "tissue_maps", fake_maps)
    monkeypatch.setattr(anatomy, "template_priors", lambda a, s: priors)
    ex = [SimpleNamespace(path=str(img))]
    first = anatomy.load_anatomy(ex, arr, spec, tmp_path / "cache")
    second = anatomy.load_anatomy(ex, arr, spec, tmp_path / "cache")
    assert len(calls) == 1 and first.shape == (1, 4, 32, 32, 32) and first.dtype == np.float16
    np.testing.assert_array_equal(first, second)
