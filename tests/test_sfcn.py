"""SFCN network, soft labels, and checkpoints (ours and the published UK Biobank layout)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from scipy import stats

from brainage_bids.models.checkpoint import (
    FSL_MNI_1MM_SHAPE,
    UKB_INPUT,
    InputSpec,
    build_sfcn,
    load_model,
    mni_box_grid,
    network_grid,
    save_checkpoint,
    sha256sum,
)
from brainage_bids.models.sfcn import (
    SFCN,
    UKB_CHANNELS,
    bin_centres,
    expected_age,
    soft_label_loss,
    soft_labels,
)

from conftest import REFERENCE, TESTS_DATA


def _reference_layout(source: str):
    path = (REFERENCE if source == "shared" else TESTS_DATA) / "sfcn_ukb_state_dict.json"
    if not path.exists():
        pytest.skip(f"../shared/data not present ({path} missing)" if source == "shared"
                    else f"{path} missing")
    return [(k, list(shape), dtype) for k, shape, dtype in json.loads(path.read_text())]


@pytest.mark.parametrize("source", ["shared", "tests"])
def test_ukb_state_dict_layout(source):
    expected = _reference_layout(source)
    net = SFCN(channels=UKB_CHANNELS, n_bins=40)
    ours = [("module." + k, list(v.shape), str(v.dtype).replace("torch.", ""))
            for k, v in net.state_dict().items()]
    assert ours == expected
    n_params = sum(int(np.prod(s)) for k, s, _ in expected
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert sum(p.numel() for p in net.parameters()) == n_params


def test_local_copy_matches_shared_reference():
    shared = REFERENCE / "sfcn_ukb_state_dict.json"
    if not shared.exists():
        pytest.skip("../shared/data not present (reference folder missing)")
    assert json.loads((TESTS_DATA / "sfcn_ukb_state_dict.json").read_text()) == json.loads(
        shared.read_text())


def _randomise_batchnorm(net, gen):
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def ukb_checkpoint(tmp_path_factory):
    """A random SFCN saved as the published file is: a DataParallel state_dict ('module.')."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    net = SFCN(channels=UKB_CHANNELS, n_bins=40)
    _randomise_batchnorm(net, gen)
    net.eval()
    path = tmp_path_factory.mktemp("ukb") / "run_20190719_00_epoch_best_mae.p"
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, path)
    return net, path


def test_load_ukb_checkpoint(ukb_checkpoint):
    net, path = ukb_checkpoint
    model = load_model(path, entry="ukb-sfcn")
    assert model.arch == "sfcn" and model.name == "ukb-sfcn" and model.modality == "T1w"
    assert len(model.centres) == 40
    np.testing.assert_allclose(model.centres, np.arange(42.5, 82.0, 1.0))
    assert model.centres[0] == 42.5 and model.centres[-1] == 81.5
    assert model.input == UKB_INPUT
    assert model.input.shape == FSL_MNI_1MM_SHAPE  # the whole grid: its mean scales the input
    assert network_grid(model.input)[1] == (160, 192, 160)
    assert model.input.normalisation == "ukb_sfcn"
    assert model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not model.network.training

    x = torch.from_numpy(np.random.default_rng(0).random((1, 1, 160, 192, 160), dtype=np.float32))
    with torch.no_grad():
        ref = net(x)
        out = model.network(x)
    assert out.shape == (1, 40)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.exp(out).sum().item() == pytest.approx(1.0, abs=1e-5)

    mean, sd = expected_age(out, torch.as_tensor(model.centres, dtype=torch.float32))
    p = np.exp(out.numpy()[0].astype(np.float64))
    manual = float((p * model.centres).sum())
    assert mean.item() == pytest.approx(manual, rel=1e-5)
    assert sd.item() == pytest.approx(float(np.sqrt((p * (model.centres - manual) ** 2).sum())),
                                      rel=1e-4)


def test_ukb_layout_without_prefix_and_wrong_bins(tmp_path):
    net = SFCN(channels=UKB_CHANNELS, n_bins=40)
    plain = tmp_path / "plain.p"
    torch.save(net.state_dict(), plain)
    # the layout is shared by the UK Biobank and FLAIR-Brain-Age SFCNs: a bare file says which
    with pytest.raises(ValueError, match="ukb-sfcn, flair-brain-age-sfcn-t1w, "
                                         "flair-brain-age-sfcn-flair") as err:
        load_model(plain)
    assert str(plain) in str(err.value) and "models install NAME --from" in str(err.value)
    assert len(load_model(plain, entry="ukb-sfcn").centres) == 40
    with pytest.raises(ValueError, match="holds a sfcn network, but flair-brain-age-flair-e3"):
        load_model(plain, entry="flair-brain-age-flair-e3")
    other = tmp_path / "other.p"
    torch.save({"module." + k: v for k, v in SFCN(UKB_CHANNELS, n_bins=30).state_dict().items()},
               other)
    with pytest.raises(ValueError, match="30 bins"):
        load_model(other, entry="ukb-sfcn")
    junk = tmp_path / "junk.p"
    torch.save({"weight": torch.zeros(3)}, junk)
    with pytest.raises(ValueError, match="not a brainage-bids checkpoint"):
        load_model(junk)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent.pt")


def test_bin_centres():
    c = bin_centres(6, 90)
    assert len(c) == 84 and c[0] == 6.5 and c[-1] == 89.5
    np.testing.assert_allclose(np.diff(c), 1.0)
    c2 = bin_centres(40, 80, 2)
    assert len(c2) == 20 and c2[0] == 41 and c2[-1] == 79


def test_soft_labels_against_normal_cdf():
    centres = torch.as_tensor(bin_centres(6, 90), dtype=torch.float64)
    ages = torch.tensor([30.2, 55.7, 6.1, 89.9], dtype=torch.float64)
    p = soft_labels(ages, centres, sigma=1.0)
    assert p.shape == (4, 84)
    torch.testing.assert_close(p.sum(1), torch.ones(4, dtype=torch.float64))
    # peak in the bin holding the age (bins are [6, 7), [7, 8), ...)
    assert p.argmax(1).tolist() == [int(np.floor(a - 6)) for a in ages.tolist()]
    # independent reference: normal CDF at bin edges, renormalised
    edges = np.arange(6, 91, 1.0)
    for i, age in enumerate(ages.tolist()):
        ref = np.diff(stats.norm.cdf(edges, loc=age, scale=1.0))
        np.testing.assert_allclose(p[i].numpy(), ref / ref.sum(), atol=1e-10)


def test_soft_label_loss():
    centres = torch.as_tensor(bin_centres(6, 90), dtype=torch.float32)
    ages = torch.tensor([25.0, 47.3, 70.8])
    target = soft_labels(ages, centres)
    # a prediction equal to the soft labels (floored so log stays finite, renormalised)
    logp = torch.log(target.clamp_min(1e-20))
    logp = logp - torch.logsumexp(logp, dim=1, keepdim=True)
    assert soft_label_loss(logp, ages, centres).item() == pytest.approx(0.0, abs=1e-5)
    # predicting 5 years off costs more, and more still 10 years off
    off5 = torch.log(soft_labels(ages + 5, centres).clamp_min(1e-20))
    off10 = torch.log(soft_labels(ages + 10, centres).clamp_min(1e-20))
    l5 = soft_label_loss(off5, ages, centres).item()
    l10 = soft_label_loss(off10, ages, centres).item()
    assert 0 < l5 < l10
    # it is differentiable (training uses it)
    logits = torch.zeros(3, 84, requires_grad=True)
    soft_label_loss(torch.log_softmax(logits, 1), ages, centres).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_expected_age_of_known_distribution():
    centres = torch.tensor([10.0, 20.0, 30.0])
    p = torch.tensor([[0.2, 0.5, 0.3], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    mean, sd = expected_age(torch.log(p), centres)
    # mean 0.2*10 + 0.5*20 + 0.3*30 = 21; var 0.2*121 + 0.5*1 + 0.3*81 = 49
    torch.testing.assert_close(mean, torch.tensor([21.0, 20.0, 20.0]))
    torch.testing.assert_close(sd, torch.tensor([7.0, 0.0, 10.0]))


def test_sfcn_small_input_and_bad_channels():
    net = SFCN(channels=(4, 8, 8, 16, 16, 8), n_bins=84).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, 40, 48, 40))
    assert out.shape == (2, 84)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2))
    with pytest.raises(ValueError):
        SFCN(channels=(4, 8, 16))


def test_own_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    config = {"channels": [4, 8, 8, 16, 16, 8], "bins": [6, 90, 1]}
    net = build_sfcn(config)
    _randomise_batchnorm(net, torch.Generator().manual_seed(3))
    net.eval()
    affine, shape = mni_box_grid(4.0)
    spec = InputSpec(affine, shape, "mask_mean")
    path = tmp_path / "model.pt"
    card = {"age_range": [20, 80], "training_set": "synthetic"}
    digest = save_checkpoint(path, net, "tiny-sfcn", config, spec, card=card)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == sha256sum(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # atomic: no temp file left

    model = load_model(path)
    assert model.name == "tiny-sfcn"
    assert model.sha256 == digest
    assert model.card == card
    assert model.input == spec
    assert model.input.shape == (40, 48, 40)
    assert model.input.voxel_size == pytest.approx(4.0)
    np.testing.assert_allclose(model.centres, bin_centres(6, 90))
    assert not model.network.training
    assert load_model(path, name="renamed").name == "renamed"

    x = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.network(x), net(x), rtol=0, atol=0)


def _world_box(affine, shape):
    """Voxel-edge bounding box (min, max) of a grid in world mm."""
    a = np.asarray(affine, dtype=float)
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    world = (a @ corners.T).T[:, :3]
    half = np.abs(a[:3, :3]).sum(1) / 2
    return world.min(0) - half, world.max(0) + half


def test_mni_box_grid_covers_ukb_field_of_view():
    ukb_lo, ukb_hi = _world_box(*network_grid(UKB_INPUT))
    for v in (1.0, 2.0, 4.0):
        affine, shape = mni_box_grid(v)
        lo, hi = _world_box(affine, shape)
        np.testing.assert_allclose(lo, ukb_lo)
        np.testing.assert_allclose(hi, ukb_hi)
    # at 1 mm the voxel centres sit on integer mm, as on the template grid
    affine, _ = mni_box_grid(1.0)
    np.testing.assert_allclose(np.asarray(affine)[:3, 3] % 1, 0)


def test_ukb_input_is_cropped_fsl_grid():
    # FSL MNI152_T1_1mm: 182x218x182, sform x = 90 - i, y = j - 126, z = k - 72 (stored LAS order);
    # the network reads the crop [11:-11, 13:-13, 11:-11] of that array, normalised before it
    fsl = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])
    np.testing.assert_allclose(np.asarray(UKB_INPUT.affine), fsl)
    assert UKB_INPUT.shape == (182, 218, 182)
    crop = np.eye(4)
    crop[:3, 3] = [11, 13, 11]
    affine, shape = network_grid(UKB_INPUT)
    np.testing.assert_allclose(np.asarray(affine), fsl @ crop)
    assert shape == (182 - 22, 218 - 26, 182 - 22)
    assert UKB_INPUT.voxel_size == 1.0


def test_input_spec_round_trip_and_unknown_normalisation():
    affine, shape = mni_box_grid(2.0)
    spec = InputSpec(affine, shape, "volume_mean")
    assert InputSpec.from_dict(json.loads(json.dumps(spec.as_dict()))) == spec
    bad = spec.as_dict()
    bad["normalisation"] = "zscore"
    with pytest.raises(ValueError):
        InputSpec.from_dict(bad)
