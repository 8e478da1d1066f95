"""3D Inception-ResNet-V2: the published FLAIR-Brain-Age layout, loading, and its input recipe."""
from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from brainage_bids.models.checkpoint import (
    FSL_MNI_1MM_AFFINE,
    IRV2_FLAIR_INPUT,
    load_model,
    save_checkpoint,
)
from brainage_bids.models.inception_resnet import InceptionResNetV2
from brainage_bids.models.inference import flair_brain_age_normalise, model_input, predict_arrays

from conftest import REFERENCE, TESTS_DATA

N_PARAMETERS = 49_429_747


def _layout(folder):
    path = folder / "irv2_flair_state_dict.json"
    if not path.exists():
        pytest.skip(f"{path} missing (../shared/reference absent)")
    return [(k, list(s), d) for k, s, d in json.loads(path.read_text())]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A random network saved as the published files are: a plain state_dict (.pth)."""
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    net = InceptionResNetV2(dropout=0.0)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    with torch.no_grad():
        net.linear[1].bias.fill_(40.0)
    net.eval()
    path = tmp_path_factory.mktemp("irv2") / "best_MSE_model_inception_flair_r2_e3.pth"
    torch.save(net.state_dict(), path)
    return net, path


@pytest.mark.parametrize("folder", [TESTS_DATA, REFERENCE], ids=["tests", "shared"])
def test_state_dict_matches_published_layout(folder):
    expected = _layout(folder)
    ours = [(k, list(v.shape), str(v.dtype).replace("torch.", ""))
            for k, v in InceptionResNetV2().state_dict().items()]
    assert len(ours) == 947
    assert ours == expected
    assert sum(p.numel() for p in InceptionResNetV2().parameters()) == N_PARAMETERS
    bns = [m for m in InceptionResNetV2().modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert bns and all(m.eps == 1e-3 for m in bns)


def test_published_checkpoint_loads_and_reproduces(published):
    net, path = published
    model = load_model(path, modality="FLAIR")
    assert model.arch == "irv2" and model.output == "scalar" and model.centres is None
    assert model.input == IRV2_FLAIR_INPUT and model.input.image == "head"
    assert model.modality == "FLAIR"
    assert model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.from_numpy(np.random.default_rng(0).random((1, 1, 118, 142, 118), dtype=np.float32))
    with torch.no_grad():
        ref = net(x)
        out = model.network(x)
    assert out.shape == (1, 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    ages, sds, probs = predict_arrays(model, list(x[:, 0].numpy()), precision="fp32")
    np.testing.assert_allclose(ages, ref[:, 0].numpy(), rtol=0, atol=1e-5)
    assert np.isnan(sds).all() and probs is None


def test_module_prefix_and_our_format(published, tmp_path):
    net, path = published
    prefixed = tmp_path / "dp.pth"
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, prefixed)
    assert load_model(prefixed).arch == "irv2"
    ours = tmp_path / "ours.pt"
    save_checkpoint(ours, net, "irv2-test", {}, IRV2_FLAIR_INPUT, arch="irv2", modality="FLAIR")
    loaded = load_model(ours)
    assert loaded.arch == "irv2" and loaded.modality == "FLAIR" and loaded.name == "irv2-test"
    x = torch.ones(1, 1, 118, 142, 118)
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(x), net(x), rtol=0, atol=0)


def test_flair_brain_age_recipe():
    """z-score over non-zero voxels, resize 182x218x182 -> 121x145x121, min-max, crop 118x142x118."""
    rng = np.random.default_rng(0)
    data = np.zeros((182, 218, 182), np.float32)
    data[40:140, 40:180, 40:140] = rng.normal(500, 50, (100, 140, 100))
    data[88:92, 106:110, 88:92] = 5000  # a bright block at the centre
    out = flair_brain_age_normalise(data)
    assert out.shape == (118, 142, 118) and out.dtype == np.float32
    assert out.min() == pytest.approx(0.0) and out.max() == pytest.approx(1.0)
    # intensity scale does not matter (z-score); zeros stay zero through the z-score, so the
    # background is one value above the minimum (tissue below the mean z-scores negative)
    np.testing.assert_allclose(flair_brain_age_normalise(data * 3.7), out, atol=1e-5)
    assert out[0, 0, 0] == out[-1, -1, -1] > 0
    # the bright block lands where resize (x 121/182) and crop (-1) put it
    peak = np.unravel_index(np.argmax(out), out.shape)
    expected = [(c + 0.5) * m / n - 0.5 - 1
                for c, m, n in zip((89.5, 107.5, 89.5), (121, 145, 121), (182, 218, 182))]
    np.testing.assert_allclose(peak, expected, atol=1.0)
    with pytest.raises(ValueError, match="non-zero"):
        flair_brain_age_normalise(np.zeros((182, 218, 182), np.float32))


def test_head_image_is_read_on_the_fsl_grid(tmp_path):
    """Models with image="head" read the head file, resampled onto the FSL 1 mm grid."""
    aff = np.array(FSL_MNI_1MM_AFFINE)
    head = np.zeros((182, 218, 182), np.float32)
    head[30:150, 30:190, 30:150] = 100.0
    nib.save(nib.Nifti1Image(head, aff), tmp_path / "head.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / "brain.nii.gz")
    x = model_input(str(tmp_path / "brain.nii.gz"), str(tmp_path / "brain.nii.gz"), IRV2_FLAIR_INPUT,
                    head_file=str(tmp_path / "head.nii.gz"))
    np.testing.assert_allclose(x, flair_brain_age_normalise(head), atol=1e-5)
    with pytest.raises(ValueError, match="whole head"):
        model_input(str(tmp_path / "brain.nii.gz"), str(tmp_path / "brain.nii.gz"), IRV2_FLAIR_INPUT)
