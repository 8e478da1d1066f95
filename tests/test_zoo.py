"""The model zoo: entries, cache, install (digest and layout checks), resolution, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from brainage_bids.cli.run import main
from brainage_bids.models import zoo
from brainage_bids.models.inception_resnet import InceptionResNetV2
from brainage_bids.models.sfcn import SFCN, UKB_CHANNELS


@pytest.fixture(scope="module")
def irv2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("irv2") / "best_MSE_model_inception_flair_r2_e3.pth"
    torch.save(InceptionResNetV2().state_dict(), path)
    return path


def test_every_entry_is_described():
    for entry in zoo.REGISTRY.values():
        assert entry.arch in ("sfcn", "irv2", "densenet169", "ensemble")
        assert entry.contrasts and set(entry.contrasts) <= {"T1w", "FLAIR", "T2w"}
        assert entry.recipe and entry.licence and entry.citation
        assert entry.output in ("bins", "scalar", "ensemble")
        if entry.members:
            assert all(m in zoo.REGISTRY for m in entry.members)
        elif not entry.bundled:
            assert entry.url.startswith("https://") and entry.filename
        json.dumps(entry.summary())
    for modality, name in zoo.DEFAULT_MODELS.items():
        assert modality in zoo.get_entry(name).contrasts


def test_cache_dir_from_environment(cache, monkeypatch):
    assert zoo.cache_dir() == cache
    monkeypatch.delenv(zoo.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert str(zoo.cache_dir()) == "/somewhere/brainage-bids/models"


def test_missing_model_names_url_and_install_command(cache):
    with pytest.raises(zoo.ModelNotInstalled) as err:
        zoo.resolve("flair-brain-age-flair")
    msg = str(err.value)
    assert zoo.FLAIR_BRAIN_AGE_URL in msg
    assert "brainage-bids models install flair-brain-age-flair-e3 --from" in msg
    assert "best_MSE_model_inception_flair_r2_e10.pth" in msg and str(cache) in msg
    with pytest.raises(zoo.ModelNotInstalled, match="models install ukb-sfcn --from"):
        zoo.resolve("ukb-sfcn")


def test_install_checks_layout_and_digest(cache, irv2_file, tmp_path, capsys):
    sfcn = tmp_path / "sfcn.p"
    torch.save(SFCN(UKB_CHANNELS, n_bins=40).state_dict(), sfcn)
    assert main(["models", "install", "flair-brain-age-flair-e3", "--from", str(sfcn)]) == 65
    assert "holds a sfcn network" in capsys.readouterr().err
    assert not (cache / "flair-brain-age-flair-e3.pt").exists()
    assert main(["models", "install", "flair-brain-age-flair-e3", "--from", str(irv2_file),
                 "--sha256", "0" * 64]) == 65
    assert "does not match" in capsys.readouterr().err
    assert main(["models", "install", "no-such-model", "--from", str(irv2_file)]) == 64
    assert main(["models", "install", "flair-brain-age-flair-e3", "--from", str(tmp_path / "x")]) == 66
    assert main(["models", "install", "flair-brain-age-flair-e3", "--from", str(irv2_file)]) == 0
    installed = cache / "flair-brain-age-flair-e3.pt"
    assert installed.read_bytes() == irv2_file.read_bytes()
    record = json.loads((cache / "flair-brain-age-flair-e3.json").read_text())
    assert record["verified_sha256"] is False and len(record["sha256"]) == 64
    rows = {r["name"]: r for r in zoo.listing()}
    assert rows["flair-brain-age-flair-e3"]["state"] == "installed"
    assert rows["flair-brain-age-flair"]["state"] == "missing"  # 4 members still missing
    assert rows["ixi-sfcn-2mm"]["state"] == "bundled"
    assert main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in listed} == set(zoo.REGISTRY)


def test_bundled_digest_is_enforced(cache, irv2_file):
    with pytest.raises(ValueError, match="does not match"):
        zoo.install("ixi-sfcn-2mm", irv2_file)


def test_ensemble_entry_resolves_members(cache, monkeypatch, random_model):
    small = [zoo.ZooEntry(name=f"tiny-{i}", arch="sfcn", modality="T1w", output="bins", recipe="r",
                          input=None, licence="MIT", citation="c", url="https://x", filename="f")
             for i in (1, 2)]
    ens = zoo.ZooEntry(name="tiny", arch="ensemble", modality="T1w", output="ensemble", recipe="r",
                       input=None, licence="MIT", citation="c", members=("tiny-1", "tiny-2"))
    registry = dict(zoo.REGISTRY, **{e.name: e for e in [*small, ens]})
    monkeypatch.setattr(zoo, "REGISTRY", registry)
    for e in small:
        zoo.install(e.name, random_model)
    request = zoo.resolve_request("tiny")
    assert request.ensemble and request.modality == "T1w"
    assert [m[0] for m in request.members] == ["tiny-1", "tiny-2"]
    assert zoo.resolve_request("tiny:FLAIR").modality == "FLAIR"


def test_resolve_request_for_files(random_model, tmp_path, irv2_file):
    r = zoo.resolve_request(str(random_model))
    assert r.name == "random-sfcn" and r.modality == "T1w" and not r.ensemble
    published = zoo.resolve_request(str(irv2_file))
    assert published.modality is None  # the published files do not say; runs on every modality
    assert zoo.resolve_request(f"{irv2_file}:FLAIR").modality == "FLAIR"
    manifest = tmp_path / "ens.json"
    zoo.write_ensemble_manifest(manifest, "ens", "FLAIR", [random_model, random_model])
    ens = zoo.resolve_request(str(manifest))
    assert ens.ensemble and ens.modality == "FLAIR" and len(ens.members) == 2
    with pytest.raises(FileNotFoundError, match="neither a zoo model"):
        zoo.resolve_request(str(tmp_path / "absent.pt"))


def test_participant_level_refuses_missing_flair_model(cache, synthetic_bids, tmp_path, caplog):
    # (without --model, FLAIR gets the bundled contrast-agnostic model: tests/test_synth_model.py)
    code = main([str(synthetic_bids), str(tmp_path / "out"), "participant", "--modalities", "T1w",
                 "FLAIR", "--model", "flair-brain-age-flair", "-w", str(tmp_path / "w")])
    assert code == 66
    assert "brainage-bids models install flair-brain-age-flair-e3" in caplog.text
    assert zoo.FLAIR_BRAIN_AGE_URL in caplog.text
    assert not (tmp_path / "out" / "sub-01").exists()
