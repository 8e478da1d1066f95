"""The FLAIR study's SFCN and DenseNet169 files and the SFCN layout shared by several entries."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from brainage_bids.models import zoo
from brainage_bids.models.checkpoint import (
    FLAIR_BRAIN_AGE_SFCN_INPUT,
    IRV2_FLAIR_INPUT,
    UKB_INPUT,
    load_model,
)
from brainage_bids.models.densenet import build_densenet169
from brainage_bids.models.sfcn import SFCN, UKB_CHANNELS

from conftest import REFERENCE, TESTS_DATA

SFCN_NAMES = ("ukb-sfcn", "flair-brain-age-sfcn-t1w", "flair-brain-age-sfcn-flair")


@pytest.fixture(scope="module")
def sfcn_file(tmp_path_factory):
    """A random SFCN saved as the FLAIR study's files are (DataParallel, ``module.`` keys)."""
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("sfcn") / "best_SFCN_model_flair.pth"
    torch.save({"module." + k: v for k, v in SFCN(UKB_CHANNELS, n_bins=40).state_dict().items()},
               path)
    return path


@pytest.fixture(scope="module")
def densenet_file(tmp_path_factory):
    torch.manual_seed(6)
    path = tmp_path_factory.mktemp("densenet") / "best_model_densenet_t1.pth"
    torch.save(build_densenet169().state_dict(), path)
    return path


@pytest.mark.parametrize("folder", [TESTS_DATA, REFERENCE], ids=["tests", "shared"])
def test_densenet_state_dict_matches_published_layout(folder):
    path = folder / "densenet169_flair_brain_age_state_dict.json"
    if not path.exists():
        pytest.skip(f"{path} missing (../shared/reference absent)")
    ref = json.loads(path.read_text())
    ours = [[k, list(v.shape), str(v.dtype).replace("torch.", "")]
            for k, v in build_densenet169().state_dict().items()]
    assert len(ours) == ref["n_keys"] == 1017
    assert ours == ref["state_dict"]
    # the reference counts the tensors of the state_dict except the num_batches_tracked scalars
    assert sum(v.numel() for k, v in build_densenet169().state_dict().items()
               if not k.endswith("num_batches_tracked")) == ref["n_params"]


def test_flair_study_entries():
    sfcn_t1, sfcn_flair = (zoo.get_entry(f"flair-brain-age-sfcn-{m}") for m in ("t1w", "flair"))
    for e, modality in ((sfcn_t1, "T1w"), (sfcn_flair, "FLAIR")):
        assert e.arch == "sfcn" and e.modality == modality and e.output == "bins"
        assert e.bins == (15.0, 95.0, 2.0) and e.input == FLAIR_BRAIN_AGE_SFCN_INPUT
        assert e.input.image == "brain" and e.input.shape == (182, 218, 182)
    for m, filename, mae in (("t1w", "best_model_densenet_t1.pth", 3.43),
                             ("flair", "best_model_densenet_flair.pth", 3.74)):
        e = zoo.get_entry(f"flair-brain-age-densenet-{m}")
        assert e.arch == "densenet169" and e.output == "scalar" and e.input == IRV2_FLAIR_INPUT
        assert e.filename == filename and e.mae == mae and e.url == zoo.FLAIR_BRAIN_AGE_URL
    assert sfcn_t1.mae == 3.45 and sfcn_flair.mae == 4.12
    assert zoo.get_entry("ukb-sfcn").bins == (42.0, 82.0, 1.0)


def test_shared_sfcn_layout_is_installed_and_run_by_name(cache, sfcn_file):
    with pytest.raises(ValueError, match="shared by " + ", ".join(SFCN_NAMES)):
        load_model(sfcn_file)
    with pytest.raises(ValueError, match="shared by"):
        zoo.resolve_request(str(sfcn_file))
    for name in ("flair-brain-age-sfcn-flair", "ukb-sfcn"):
        zoo.install(name, sfcn_file)
    flair = load_model(cache / "flair-brain-age-sfcn-flair.pt")
    assert flair.name == "flair-brain-age-sfcn-flair" and flair.modality == "FLAIR"
    np.testing.assert_allclose(flair.centres, np.arange(16.0, 95.0, 2.0))
    assert flair.input == FLAIR_BRAIN_AGE_SFCN_INPUT
    assert flair.card["publisher_mae"]["value"] == 4.12
    ukb = load_model(cache / "ukb-sfcn.pt")  # the same bytes, another recipe
    assert ukb.name == "ukb-sfcn" and ukb.input == UKB_INPUT
    np.testing.assert_allclose(ukb.centres, np.arange(42.5, 82.0, 1.0))
    request = zoo.resolve_request("flair-brain-age-sfcn-flair")
    assert request.modality == "FLAIR" and request.members[0][0] == "flair-brain-age-sfcn-flair"
    # the cached file, given as a path, still runs with the recipe it was installed under
    by_path = zoo.resolve_request(str(cache / "flair-brain-age-sfcn-flair.pt"))
    assert by_path.name == "flair-brain-age-sfcn-flair" and by_path.modality == "FLAIR"


def test_densenet_install_load_and_predict(cache, densenet_file, sfcn_file):
    with pytest.raises(ValueError, match="holds a sfcn network"):
        zoo.install("flair-brain-age-densenet-t1w", sfcn_file)
    zoo.install("flair-brain-age-densenet-t1w", densenet_file)
    model = load_model(cache / "flair-brain-age-densenet-t1w.pt")
    assert model.arch == "densenet169" and model.output == "scalar" and model.modality == "T1w"
    assert model.input == IRV2_FLAIR_INPUT and model.centres is None
    bare = load_model(densenet_file)  # both DenseNet entries share one recipe: a bare file runs
    assert bare.modality is None and bare.input == IRV2_FLAIR_INPUT
    x = torch.rand(1, 1, 118, 142, 118, generator=torch.Generator().manual_seed(0))
    ref = build_densenet169()
    ref.load_state_dict(torch.load(densenet_file, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(model.network(x), ref.eval()(x))
    assert model.network(x).shape == (1, 1)


def test_sidecar_carries_the_mae_of_every_row(cache, sfcn_file):
    from brainage_bids.cli.run import DEFAULT_MODEL
    from brainage_bids.interfaces.predict import brainage_sidecar
    from brainage_bids.models.checkpoint import IRV2_FLAIR_INPUT, LoadedModel

    zoo.install("ukb-sfcn", sfcn_file)
    ukb = load_model(cache / "ukb-sfcn.pt")
    ours = load_model(DEFAULT_MODEL)
    meta = brainage_sidecar([ukb, ours])
    assert meta["MAE"]["ukb-sfcn"] == {"Value": 2.14, "Units": "year", "Source": "publisher",
                                       "TestSet": "UK Biobank test set (Peng et al. 2021)"}
    card = json.loads((DEFAULT_MODEL.parent / "ixi-sfcn-2mm_card.json").read_text())
    assert meta["MAE"]["ixi-sfcn-2mm"]["Value"] == pytest.approx(card["test"]["mae"], abs=1e-4)
    assert meta["Models"][0]["MAE"]["Value"] == 2.14
    assert meta["MAE"]["ensemble"] is None  # no published figure for this pair
    # a bare file of unknown provenance (not run by a zoo name) gets no publisher MAE
    assert "publisher_mae" not in load_card("flair-brain-age-densenet-t1w", named=False)
    # the published FLAIR ensemble: each member's MAE and the ensemble's
    members = [LoadedModel(name=n, arch="irv2", network=None, input=IRV2_FLAIR_INPUT,
                           centres=None, sha256="0", path="x",
                           card=load_card(n), modality="FLAIR")
               for n in zoo.get_entry("flair-brain-age-flair").members]
    meta = brainage_sidecar(members)
    assert {v["Value"] for k, v in meta["MAE"].items() if k != "ensemble"} == {3.31}
    assert meta["MAE"]["ensemble"]["Value"] == 2.81 == meta["Ensemble"]["MAE"]["Value"]


def load_card(name, named=True):
    from brainage_bids.models.checkpoint import published_card

    return published_card(zoo.get_entry(name), named=named)
