"""SmoothGrad saliency: shape and sanity on small networks, exact gradients against closed forms and
finite differences, resampling to MNI, the tissue atlas and the group summary."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from brainage_bids.models.checkpoint import InputSpec, LoadedModel, mni_box_grid
from brainage_bids.models.saliency import (
    ATLAS_REGIONS,
    ensemble_saliency,
    group_saliency,
    model_grid_map,
    region_means,
    saliency_to_mni,
    scan_saliency,
    smoothgrad,
    tissue_atlas,
)
from brainage_bids.models.sfcn import SFCN, bin_centres

SHAPE = (32, 32, 32)


def brain_like(shape=SHAPE, seed=0) -> np.ndarray:
    """A smooth blob with texture, zero outside a sphere (like a masked, mean-normalised brain)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid ** 2).sum(0))
    x = (1.2 - r) * (r < 0.8) + 0.1 * rng.standard_normal(shape) * (r < 0.8)
    return (x / x[r < 0.8].mean()).astype(np.float32)


class Scalar(nn.Module):
    """A small CNN regressing one age, [B, 1]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean(dim=(2, 3, 4))
        return 50 + 10 * self.head(h)


class Linear(nn.Module):
    """age = sum(w * x): its gradient is w everywhere, whatever the noise."""

    def __init__(self, w: np.ndarray):
        super().__init__()
        self.w = nn.Parameter(torch.from_numpy(w)[None, None].double())

    def forward(self, x):
        return (x * self.w).sum(dim=(1, 2, 3, 4))[:, None]


class SoftBins(nn.Module):
    """log-softmax over 5 bins of a linear map of the voxels (float64, for finite differences)."""

    def __init__(self, n_vox: int, n_bins: int = 5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(n_bins, n_vox, generator=g, dtype=torch.float64) * 0.3)

    def forward(self, x):
        return torch.log_softmax(x.flatten(1) @ self.w.T, dim=1)


def tiny_sfcn(n_bins=20) -> SFCN:
    torch.manual_seed(0)
    net = SFCN(channels=(2, 4, 4, 8, 8, 4), n_bins=n_bins, dropout=0.5)
    # Non-trivial BatchNorm statistics so the eval-mode network is not a near-constant.
    net.train()
    with torch.no_grad():
        for seed in range(3):
            net(torch.from_numpy(np.stack([brain_like(seed=seed)] * 2)[:, None]))
    return net.eval()


def check_map(sal: np.ndarray, x: np.ndarray) -> None:
    assert sal.shape == x.shape
    assert sal.dtype == np.float32
    assert np.isfinite(sal).all()
    assert (sal >= 0).all()
    assert sal.std() > 0 and np.unique(sal).size > 100


def test_smoothgrad_sfcn_bins():
    net = tiny_sfcn()
    centres = bin_centres(20, 80, 3)
    x = brain_like()
    sal = smoothgrad(net, x, output="bins", centres=centres, n_samples=4)
    check_map(sal, x)
    again = smoothgrad(net, x, output="bins", centres=centres, n_samples=4)
    np.testing.assert_array_equal(sal, again)  # seeded noise: reproducible
    other = smoothgrad(net, x, output="bins", centres=centres, n_samples=4, seed=1)
    assert not np.array_equal(sal, other)


def test_smoothgrad_scalar_network_and_state_restored():
    torch.manual_seed(0)
    net = Scalar().train()
    flags = [p.requires_grad for p in net.parameters()]
    x = brain_like()
    sal = smoothgrad(net, x, output="scalar", n_samples=3, batch_size=2)
    check_map(sal, x)
    assert net.training  # left as found
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())


def test_smoothgrad_equals_weights_of_linear_network():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 7, 8))
    x = rng.standard_normal((6, 7, 8)).astype(np.float32)
    sal = smoothgrad(Linear(w), x, output="scalar", n_samples=5, noise_fraction=0.2)
    np.testing.assert_allclose(sal, np.abs(w), rtol=1e-6)


def test_plain_gradient_of_expected_age_matches_finite_differences():
    shape = (3, 4, 5)
    net = SoftBins(int(np.prod(shape)))
    centres = np.array([20.0, 35.0, 50.0, 65.0, 80.0])
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    sal = smoothgrad(net, x, output="bins", centres=centres, n_samples=1, noise_fraction=0.0)

    def age(v):
        with torch.no_grad():
            p = net(torch.from_numpy(v)[None, None].double()).exp()[0].numpy()
        return float((p * centres).sum())

    eps = 1e-5
    x64 = x.astype(np.float64)
    for idx in [(0, 0, 0), (1, 2, 3), (2, 3, 4), (0, 3, 1)]:
        up, down = x64.copy(), x64.copy()
        up[idx] += eps
        down[idx] -= eps
        fd = (age(up) - age(down)) / (2 * eps)
        assert sal[idx] == pytest.approx(abs(fd), rel=1e-4, abs=1e-8)


def test_noise_is_a_fraction_of_the_intensity_range():
    # With a network whose gradient is 2*x (age = sum x^2), SmoothGrad averages |2(x + e)|; for
    # x = 0 that is 2 * E|e| = 2 * sigma * sqrt(2/pi), sigma = fraction * range.
    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return (x ** 2).sum(dim=(1, 2, 3, 4))[:, None] + self.dummy

    x = np.zeros((20, 20, 20), dtype=np.float32)
    x[0, 0, 0], x[0, 0, 1] = 0.0, 4.0  # range 4
    sal = smoothgrad(Square(), x, output="scalar", n_samples=50, noise_fraction=0.1, seed=2)
    sigma = 0.1 * 4.0
    inner = sal[5:15, 5:15, 5:15]
    assert inner.mean() == pytest.approx(2 * sigma * np.sqrt(2 / np.pi), rel=0.03)


def test_ensemble_saliency_is_the_member_mean():
    nets = [tiny_sfcn(10), tiny_sfcn(10)]
    with torch.no_grad():  # make the members differ
        for p in nets[1].parameters():
            p.mul_(1.1)
    spec = InputSpec(*mni_box_grid(5.0))
    models = [LoadedModel(f"m{i}", "sfcn", n, spec, bin_centres(20, 80, 6), "", "")
              for i, n in enumerate(nets)]
    x = brain_like()
    mean = ensemble_saliency(models, x, n_samples=2)
    parts = [smoothgrad(n, x, output="bins", centres=bin_centres(20, 80, 6), n_samples=2)
             for n in nets]
    np.testing.assert_allclose(mean, (parts[0] + parts[1]) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="different grids"):
        ensemble_saliency(models, [x, x[:-1]], n_samples=1)


def test_saliency_to_mni_puts_a_point_at_its_world_position(tmp_path):
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-40, -48, -36]
    spec = InputSpec(tuple(map(tuple, affine)), (20, 24, 20))
    sal = np.zeros(spec.shape, dtype=np.float32)
    sal[10, 12, 10] = 1.0  # world (0, 0, 4)
    tpl = tmp_path / "tpl.nii.gz"
    tpl_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    tpl_aff[:3, 3] = [-40, -48, -36]
    nib.save(nib.Nifti1Image(np.zeros((40, 48, 40), np.float32), tpl_aff), tpl)
    out = saliency_to_mni(sal, spec, tpl, tmp_path / "sal.nii.gz")
    img = nib.load(out)
    assert img.shape == (40, 48, 40)
    np.testing.assert_allclose(img.affine, tpl_aff)
    data = img.get_fdata()
    assert np.unravel_index(np.argmax(data), data.shape) == (20, 24, 20)
    assert data.min() >= 0


def test_model_grid_map_undoes_the_flair_brain_age_crop():
    from brainage_bids.models.checkpoint import IRV2_CROP, IRV2_FLAIR_INPUT

    sal = np.ones(IRV2_CROP, dtype=np.float32)
    grid = model_grid_map(sal, IRV2_FLAIR_INPUT)
    assert grid.shape == IRV2_FLAIR_INPUT.shape
    centre = tuple(s // 2 for s in grid.shape)
    assert grid[centre] == pytest.approx(1.0)
    assert grid[0, 0, 0] == 0  # the cropped border stays empty
    with pytest.raises(ValueError):
        model_grid_map(np.ones((5, 5, 5)), IRV2_FLAIR_INPUT)


@pytest.fixture(scope="module")
def atlas():
    return tissue_atlas()


def test_tissue_atlas_regions(atlas):
    img, table = atlas
    labels = np.asarray(img.dataobj)
    assert set(np.unique(labels)) - {0} == set(table["index"])
    assert len(table) == 2 * len(ATLAS_REGIONS)
    assert (table["voxels"] > 0).all()
    inv = np.linalg.inv(img.affine)

    def label_at(x, y, z):
        i = np.round(inv @ np.array([x, y, z, 1.0])).astype(int)[:3]
        return int(labels[tuple(i)])
    assert label_at(11, -18, 7) == 11   # right thalamus
    assert label_at(-11, -18, 7) == 1   # left thalamus
    assert label_at(-13, 12, 10) == 2   # left caudate head -> basal ganglia
    assert label_at(40, -20, 50) == 14  # right precentral cortex
    # brain total ~ 1.4-1.9 L at 1 mm
    assert 1.2e6 < (labels > 0).sum() < 2.2e6


def test_region_means_relative_to_brain(atlas):
    img, table = atlas
    labels = np.asarray(img.dataobj)
    data = np.where(np.isin(labels, [1, 11]), 3.0, 1.0).astype(np.float32)
    reg = region_means(data, labels, table)
    thal = reg[reg["region"] == "thalamus"]
    assert (thal["mean_saliency"] == 3.0).all()
    brain = reg[reg["region"] == "brain"].iloc[0]
    assert brain["relative"] == 1.0
    assert (thal["relative"] > 1).all()
    assert (reg.loc[reg["region"] == "white_matter", "relative"] < 1).all()


def test_group_saliency_per_diagnosis(tmp_path, atlas):
    img, _ = atlas
    labels = np.asarray(img.dataobj)
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text(
        "participant_id\tdiagnosis\nsub-01\tHC\nsub-02\tMS\nsub-03\tMS\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "x", "SourceDatasets": [{"URL": bids.resolve().as_uri()}]}))
    for pid, hot in (("01", 1), ("02", 11), ("03", 11)):
        anat = out / f"sub-{pid}" / "anat"
        anat.mkdir(parents=True)
        data = np.where(labels == hot, 5.0, 1.0) * (labels > 0) * (1 + int(pid))
        nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine),
                 anat / f"sub-{pid}_space-MNI152NLin2009aSym_desc-saliency_T1w.nii.gz")
    res = group_saliency(out)
    names = sorted(p.split("/")[-1] for p in res["maps"])
    assert names == ["group-HC_space-MNI152NLin2009aSym_desc-saliency_T1w.nii.gz",
                     "group-MS_space-MNI152NLin2009aSym_desc-saliency_T1w.nii.gz"]
    reg = pd.read_csv(res["regions"], sep="\t")
    ms = reg[(reg["group"] == "MS")].set_index(["region", "hemisphere"])
    hc = reg[(reg["group"] == "HC")].set_index(["region", "hemisphere"])
    assert ms.loc[("thalamus", "right"), "n"] == 2
    # scaling per scan is removed: MS's right thalamus dominates, HC's left one does
    assert ms.loc[("thalamus", "right"), "relative"] > 3
    assert hc.loc[("thalamus", "left"), "relative"] > 3
    assert ms.loc[("thalamus", "left"), "relative"] < 1
    assert (out / "group" / "saliency" / "atlas-tissue_space-MNI152NLin2009aSym_dseg.tsv").is_file()


def test_scan_saliency_writes_mni_map(tmp_path):
    """End to end on a template-derived scan with a tiny SFCN on a 5 mm grid."""
    from brainage_bids.utils.templates import get_template

    tpl = get_template()
    spec = InputSpec(*mni_box_grid(5.0))
    net = tiny_sfcn(28)
    model = LoadedModel("tiny", "sfcn", net, spec, bin_centres(6, 90, 3), "", "")
    brain = nib.load(tpl.brain)
    data = np.asarray(brain.dataobj, dtype=np.float32)
    mask = np.asarray(nib.load(tpl.mask).dataobj) > 0
    pre = tmp_path / "sub-01_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.where(mask, data / data[mask].mean(), 0).astype(np.float32),
                             brain.affine), pre)
    out = scan_saliency([model], pre, tpl.mask, tmp_path / "sal.nii.gz",
                        template_file=tpl.brain, n_samples=2)
    img = nib.load(out)
    assert img.shape == brain.shape
    sal = img.get_fdata()
    assert np.isfinite(sal).all() and sal.min() >= 0
    assert sal[mask].std() > 0


def test_mni_saliency_averages_members_on_different_grids(tmp_path):
    from brainage_bids.models.saliency import mni_saliency

    tpl = tmp_path / "tpl.nii.gz"
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-80, -112, -60]
    nib.save(nib.Nifti1Image(np.zeros((80, 96, 80), np.float32), aff), tpl)
    specs = [InputSpec(*mni_box_grid(4.0)), InputSpec(*mni_box_grid(5.0))]
    models = [LoadedModel(f"m{i}", "sfcn", tiny_sfcn(10), s, bin_centres(20, 80, 6), "", "")
              for i, s in enumerate(specs)]
    rng = np.random.default_rng(0)
    inputs = {s: np.abs(rng.standard_normal(s.shape)).astype(np.float32) for s in specs}
    both = nib.load(mni_saliency(models, inputs, tpl, tmp_path / "both.nii.gz",
                                 n_samples=2)).get_fdata()
    one = [nib.load(mni_saliency([m], inputs, tpl, tmp_path / f"{m.name}.nii.gz",
                                 n_samples=2)).get_fdata() for m in models]
    np.testing.assert_allclose(both, (one[0] + one[1]) / 2, rtol=1e-5, atol=1e-9)
    assert both.shape == (80, 96, 80) and both.max() > 0


def test_model_grid_map_puts_the_published_sfcn_crop_back_on_the_fsl_grid():
    from brainage_bids.models.checkpoint import UKB_INPUT, network_grid

    affine, shape = network_grid(UKB_INPUT)
    sal = np.random.default_rng(0).random(shape, dtype=np.float32)
    grid = model_grid_map(sal, UKB_INPUT)
    assert grid.shape == UKB_INPUT.shape
    np.testing.assert_array_equal(grid[11:-11, 13:-13, 11:-11], sal)
    assert grid.sum() == pytest.approx(sal.sum(), rel=1e-6)  # zeros outside the crop
    # the crop's voxel (0, 0, 0) sits at the world position of FSL voxel (11, 13, 11)
    np.testing.assert_allclose(np.asarray(affine)[:3, 3],
                               (np.asarray(UKB_INPUT.affine) @ [11, 13, 11, 1])[:3])
