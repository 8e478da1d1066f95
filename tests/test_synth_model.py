"""The contrast-agnostic model (issue 13): ``train --synth`` on the learnable fixture of
test_train.py, and the shipping plumbing (zoo entry, default model per contrast, T2w, sidecars)
against the placeholder model it trains. No weights are committed: the zoo entry's files are
installed from the placeholder into a temporary cache."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from test_train import ARGS, trained_inputs  # noqa: F401 - the fixture

from brainage_bids.cli.run import main
from brainage_bids.models import zoo
from brainage_bids.models.checkpoint import load_model, sha256sum
from brainage_bids.models.inference import model_input, predict_arrays
from brainage_bids.models.train import metrics


@pytest.fixture(scope="module")
def synth_model(trained_inputs):  # noqa: F811
    """A 2-fold CV ensemble trained with --synth for 2 epochs: (model folder, card)."""
    bids, out, work = trained_inputs
    rc = main([str(bids), str(out), "train", "--model-name", "tinysynth", "--synth",
               "--ensemble-size", "2", "--ensemble-mode", "cv", "--epochs", "2",
               "--synth-real-probability", "0.2", "-w", str(work), *ARGS])
    assert rc == 0
    folder = out / "models" / "tinysynth"
    return folder, json.loads((folder / "tinysynth_card.json").read_text())


def test_synth_trains_a_contrast_agnostic_ensemble_scored_on_real_images(synth_model,
                                                                        trained_inputs):  # noqa: F811
    bids, out, work = trained_inputs
    folder, card = synth_model
    assert card["modalities"] == ["T1w", "FLAIR", "T2w"] and card["trained_on"] == "synthetic"
    assert card["modality"] == "T1w+FLAIR+T2w"
    assert card["synthesis"]["real_probability"] == 0.2
    assert card["synthesis"]["evaluated_on"] == "real T1w images (no synthesis)"
    assert card["ensemble"] == {"size": 2, "mode": "cv"}
    md = (folder / "tinysynth_card.md").read_text()
    assert "Trained on synthetic images" in md and "Applies to: T1w, FLAIR, T2w" in md
    # tissue maps cached once per training scan
    assert len(list((work / "train_cache").glob("*_tissues_*.npy"))) == card["splits"][
        "train_validation_pool"]
    # out-of-fold figures are the members' predictions of the REAL T1w images
    preds = card["validation"]["predictions"]
    assert metrics([p["chronological_age"] for p in preds],
                   [p["predicted_age"] for p in preds])["mae"] == pytest.approx(
        card["validation"]["mae"])
    p = preds[0]
    member = load_model(folder / f"{p['model']}.pt")
    assert member.modality == "T1w+FLAIR+T2w" and member.contrasts == ("T1w", "FLAIR", "T2w")
    anat = out / p["participant_id"] / "anat"
    pre = next(anat.glob("*desc-preproc_T1w.nii.gz"))
    arr = model_input(str(pre), str(next(anat.glob("*desc-brain_mask.nii.gz"))), member.input)
    age, _, _ = predict_arrays(member, [arr])
    assert age[0] == pytest.approx(p["predicted_age"], abs=1e-3)
    manifest = json.loads((folder / "tinysynth.json").read_text())
    assert manifest["modality"] == "T1w+FLAIR+T2w" and len(manifest["members"]) == 2


def test_init_from_starts_each_member_from_the_same_fold_of_a_trained_model(
        synth_model, trained_inputs, caplog):  # noqa: F811
    """--init-from: with a learning rate of 0 the members keep the weights of the model they
    start from (a random start would not); a model whose folds differ is refused."""
    import torch

    bids, out, work = trained_inputs
    folder, card = synth_model
    rc = main([str(bids), str(out), "train", "--model-name", "tinyinit", "--synth",
               "--init-from", str(folder / "tinysynth_card.json"), "--learning-rate", "0",
               "--ensemble-size", "2", "--ensemble-mode", "cv", "--epochs", "2",
               "-w", str(work), *ARGS])
    assert rc == 0
    new_folder = out / "models" / "tinyinit"
    new_card = json.loads((new_folder / "tinyinit_card.json").read_text())
    assert new_card["initialised_from"] == str(folder / "tinysynth_card.json")
    for k in (1, 2):
        start = torch.load(folder / f"tinysynth-m{k}.pt", weights_only=True)["state_dict"]
        end = torch.load(new_folder / f"tinyinit-m{k}.pt", weights_only=True)["state_dict"]
        convs = [n for n in start if n.endswith("weight") and start[n].ndim == 5]
        assert convs and all(torch.equal(start[n], end[n]) for n in convs)
        assert new_card["members"][k - 1]["initialised_from"]["file"] == f"tinysynth-m{k}.pt"
    md = (new_folder / "tinyinit_card.md").read_text()
    assert "started from the weights of the same member" in md
    # other folds (another seed) or another member count: refused before any training
    rc = main([str(bids), str(out), "train", "--model-name", "tinybad", "--synth", "--seed", "5",
               "--init-from", str(folder / "tinysynth_card.json"), "--ensemble-size", "2",
               "--ensemble-mode", "cv", "--epochs", "1", "-w", str(work), *ARGS])
    assert rc == 64 and "held out other participants" in caplog.text
    rc = main([str(bids), str(out), "train", "--model-name", "tinybad", "--synth",
               "--init-from", str(folder / "tinysynth_card.json"), "--ensemble-size", "3",
               "--ensemble-mode", "cv", "--epochs", "1", "-w", str(work), *ARGS])
    assert rc == 64 and "2 member(s), this run trains 3" in caplog.text
    assert not (out / "models" / "tinybad").exists()


def test_synth_refuses_other_training_contrasts(trained_inputs, caplog):  # noqa: F811
    bids, out, work = trained_inputs
    rc = main([str(bids), str(out), "train", "--model-name", "x", "--synth", "--modalities",
               "FLAIR", "--epochs", "1", "-w", str(work), *ARGS])
    assert rc == 64 and "--synth reads the T1w scans" in caplog.text


@pytest.fixture
def installed_synth(cache):
    """The bundled ixi-synth-sfcn-2mm (an empty cache: nothing else installed)."""
    assert zoo.is_installed(zoo.SYNTH_MODEL)
    return cache


def _without_bundled_synth(monkeypatch):
    real = zoo.installed_path

    def hidden(entry):
        return None if entry.name.startswith(zoo.SYNTH_MODEL) else real(entry)

    monkeypatch.setattr(zoo, "installed_path", hidden)


def _with_published_flair(monkeypatch):
    real = zoo.installed_path

    def fake(entry):
        if entry.name.startswith("flair-brain-age-flair-e"):
            return Path("/published") / f"{entry.name}.pt"
        return real(entry)

    monkeypatch.setattr(zoo, "installed_path", fake)


def test_default_model_per_contrast(cache, monkeypatch):
    # as shipped: ours is bundled and, without the published FLAIR ensemble, the FLAIR default
    assert zoo.is_installed(zoo.SYNTH_MODEL)
    for k, entry in enumerate(zoo.members(zoo.SYNTH_MODEL), start=1):
        assert sha256sum(zoo.installed_path(entry)) == zoo.SYNTH_MEMBER_SHA256[k]
    assert zoo.default_model("FLAIR") == zoo.SYNTH_MODEL
    assert zoo.default_model("T2w") == zoo.SYNTH_MODEL
    assert zoo.default_model("T1w") == zoo.T1W_MODEL
    request = zoo.default_request("FLAIR")
    assert request.modality == "FLAIR" and request.ensemble and len(request.members) == 5
    # the installed published ensemble stays the FLAIR default
    with monkeypatch.context() as m:
        _with_published_flair(m)
        assert zoo.default_model("FLAIR") == "flair-brain-age-flair"
        assert zoo.default_model("T2w") == zoo.SYNTH_MODEL
    # neither installed: the published ensemble is the default, its error names ours too
    _without_bundled_synth(monkeypatch)
    assert zoo.default_model("FLAIR") == "flair-brain-age-flair"
    with pytest.raises(zoo.ModelNotInstalled, match=zoo.SYNTH_MODEL):
        zoo.default_request("FLAIR")


def _opts(**kw):
    return SimpleNamespace(**{"model": None, "modalities": ["T1w"], **kw})


def _scan(suffix):
    return SimpleNamespace(suffix=suffix)


def test_requests_per_scan_with_the_synthetic_model(installed_synth):
    from brainage_bids.cli.run import resolve_models
    from brainage_bids.workflows.participant import models_for

    # defaults: ours reads the FLAIR and T2w scans only, the T1w model the T1w scans
    reqs = resolve_models(_opts(modalities=["T1w", "FLAIR", "T2w"]))
    names = {s: [r.name for r in models_for(_scan(s), reqs)] for s in ("T1w", "FLAIR", "T2w")}
    assert names == {"T1w": [zoo.T1W_MODEL], "FLAIR": [zoo.SYNTH_MODEL],
                     "T2w": [zoo.SYNTH_MODEL]}
    # added to the T1w ensemble by name: it reads every selected contrast
    reqs = resolve_models(_opts(modalities=["T1w", "FLAIR"],
                                model=[zoo.T1W_MODEL, zoo.SYNTH_MODEL]))
    assert [r.name for r in models_for(_scan("T1w"), reqs)] == [zoo.T1W_MODEL, zoo.SYNTH_MODEL]
    assert [r.name for r in models_for(_scan("FLAIR"), reqs)] == [zoo.SYNTH_MODEL]
    only_t1 = resolve_models(_opts(model=[f"{zoo.SYNTH_MODEL}:T1w"]))
    assert [r.modality for r in only_t1] == ["T1w"]


def test_zoo_entry_applies_to_three_contrasts():
    entry = zoo.get_entry(zoo.SYNTH_MODEL)
    assert entry.contrasts == ("T1w", "FLAIR", "T2w")
    assert all(zoo.get_entry(m).bundled and zoo.get_entry(m).contrasts == entry.contrasts
               for m in entry.members)
    assert entry.summary()["contrasts"] == ["T1w", "FLAIR", "T2w"]
    files = [zoo.PACKAGE_MODELS / zoo.get_entry(m).bundled for m in entry.members]
    assert sum(f.stat().st_size for f in files) < 30 * 1024 * 1024
    for f in files:
        assert load_model(f).contrasts == ("T1w", "FLAIR", "T2w")
    card = json.loads((zoo.PACKAGE_MODELS / f"{zoo.SYNTH_MODEL}_card.json").read_text())
    assert card["trained_on"] == "synthetic" and card["validation"]["n"] >= 140
    preds = card["validation"]["predictions"]
    assert metrics([p["chronological_age"] for p in preds],
                   [p["predicted_age"] for p in preds])["mae"] == pytest.approx(
        card["validation"]["mae"])
    assert zoo.get_entry(zoo.SYNTH_MODEL).mae == pytest.approx(card["validation"]["mae"], abs=0.005)


def test_predictor_on_a_t2w_scan_says_which_model_read_it(synth_model, tmp_path):
    from brainage_bids.interfaces.predict import PredictAge
    from brainage_bids.utils.templates import get_template

    folder, _ = synth_model
    tpl = get_template()
    node = PredictAge(model_files=[str(folder / "tinysynth-m1.pt")], model_names=["tinysynth-m1"],
                      preproc_file=str(tpl.brain), mask_file=str(tpl.mask),
                      participant_id="sub-01", source_file="sub-01/anat/sub-01_T2w.nii.gz",
                      suffix="T2w", chronological_age=50.0, precision="fp32")
    res = node.run(cwd=str(tmp_path))
    rows = pd.read_csv(res.outputs.out_tsv, sep="\t", dtype=str, keep_default_na=False)
    assert list(rows["suffix"]) == ["T2w"]
    assert "model_modality_mismatch" not in rows["qc_flags"][0]
    meta = json.loads(Path(res.outputs.out_json).read_text())
    (model,) = meta["Models"]
    assert model["Contrasts"] == ["T1w", "FLAIR", "T2w"] and model["TrainedOn"] == "synthetic"


def test_participant_level_collects_t2w_scans(tmp_path):
    from brainage_bids.cli.parser import parse_args
    from brainage_bids.utils.bids import collect_scans

    bids = tmp_path / "bids"
    anat = bids / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    (bids / "participants.tsv").write_text("participant_id\tage\nsub-01\t40\n")
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    for suffix in ("T1w", "FLAIR", "T2w"):
        nib.save(img, anat / f"sub-01_{suffix}.nii.gz")
    opts = parse_args([str(bids), str(tmp_path / "out"), "participant", "--modalities", "T1w",
                       "FLAIR", "T2w"])
    scans = collect_scans(bids, modalities=opts.modalities, validate=False)
    assert sorted(s.suffix for s in scans) == ["FLAIR", "T1w", "T2w"]
