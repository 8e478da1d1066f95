"""The train level on synthetic participant-level outputs: selection, splits, card, resumption."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainage_bids.cli.run import main
from brainage_bids.models import train as train_mod
from brainage_bids.models.checkpoint import load_model
from brainage_bids.models.train import augment, metrics, stratified_split
from brainage_bids.utils.templates import TEMPLATE, get_template

N_HC = 14


def age_sphere(shape, affine, age: float) -> np.ndarray:
    """A ball (like the ventricles, centred at MNI 0, -10, 15 mm) whose radius grows with age,
    6 mm at 20 to 32 mm at 72 years: a signal that survives division by the brain mean."""
    ijk = np.indices(shape).reshape(3, -1)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:4]).T
    dist = np.linalg.norm(xyz - np.array([0.0, -10.0, 15.0]), axis=1).reshape(shape)
    return dist <= 6.0 + 0.5 * (age - 20.0)


@pytest.fixture(scope="module")
def trained_inputs(tmp_path_factory):
    """A BIDS dataset of 14 HC and 2 MS participants plus their MNI-space outputs (2 mm).

    Each image is the template with a dark ball whose size grows with age (:func:`age_sphere`)
    and a random overall brightness, so only the anatomy tells the age.
    """
    root = tmp_path_factory.mktemp("train")
    bids, out = root / "bids", root / "out"
    tpl = get_template()
    brain = nib.load(str(tpl.brain))
    mask = nib.load(str(tpl.mask))
    affine = brain.affine.copy()
    affine[:3, :3] *= 2  # every other voxel: the template at 2 mm
    data = brain.get_fdata(dtype=np.float32)[::2, ::2, ::2]
    inside = mask.get_fdata()[::2, ::2, ::2] > 0
    mask2 = nib.Nifti1Image(inside.astype(np.uint8), affine)
    rows = ["participant_id\tage\tsex\tdiagnosis"]
    rng = np.random.default_rng(1)
    (bids).mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "synthetic", "BIDSVersion": "1.9.0"}))
    for i in range(N_HC + 2):
        sub = f"s{i:02d}"
        age = 20.0 + 4 * i
        diag = "HC" if i < N_HC else "MS"
        rows.append(f"sub-{sub}\t{age}\tF\t{diag}")
        anat = bids / f"sub-{sub}" / "anat"
        anat.mkdir(parents=True)
        raw = nib.Nifti1Image(rng.random((8, 8, 8)).astype(np.float32), np.eye(4))
        nib.save(raw, anat / f"sub-{sub}_T1w.nii.gz")
        nib.save(raw, anat / f"sub-{sub}_FLAIR.nii.gz")
        dst = out / f"sub-{sub}" / "anat"
        dst.mkdir(parents=True)
        ball = age_sphere(data.shape, affine, age)
        gain = rng.uniform(0.5, 2.0)
        img = np.where(ball, 0.2 * data, data) * gain + rng.normal(0, 1, data.shape)
        nib.save(nib.Nifti1Image(np.where(inside, img, 0).astype(np.float32), affine),
                 dst / f"sub-{sub}_space-{TEMPLATE}_desc-preproc_T1w.nii.gz")
        flair = (data.max() - np.where(ball, 0.2 * data, data)) * gain + rng.normal(0, 1, data.shape)
        nib.save(nib.Nifti1Image(np.where(inside, flair, 0).astype(np.float32), affine),
                 dst / f"sub-{sub}_space-{TEMPLATE}_desc-preproc_FLAIR.nii.gz")
        nib.save(mask2, dst / f"sub-{sub}_space-{TEMPLATE}_desc-brain_mask.nii.gz")
        nib.save(mask2, dst / f"sub-{sub}_space-{TEMPLATE}_desc-flairbrain_mask.nii.gz")
    (bids / "participants.tsv").write_text("\n".join(rows) + "\n")
    return bids, out, root / "work"


ARGS = ["--channels", "2", "4", "4", "8", "8", "4", "--voxel-size", "4", "--batch-size", "4",
        "--nprocs", "1", "--omp-nthreads", "1", "--test-fraction", "0.2", "--val-fraction", "0.34"]


def test_train_writes_weights_and_card(trained_inputs):
    bids, out, work = trained_inputs
    rc = main([str(bids), str(out), "train", "--model-name", "tiny", "--epochs", "2",
               "-w", str(work), *ARGS])
    assert rc == 0
    folder = out / "models" / "tiny"
    card = json.loads((folder / "tiny_card.json").read_text())
    splits = card["split_participants"]
    used = set(splits["train"]) | set(splits["validation"]) | set(splits["test"])
    # healthy controls only, each in exactly one split
    assert used == {f"sub-s{i:02d}" for i in range(N_HC)}
    assert sum(card["splits"].values()) == N_HC
    assert not set(splits["train"]) & set(splits["test"])
    assert card["splits"]["validation"] >= 3 and card["splits"]["test"] >= 3
    for key in ("mae", "r2"):
        assert np.isfinite(card["test"][key]) and np.isfinite(card["validation"][key])
    preds = card["test"]["predictions"]
    assert len(preds) == card["splits"]["test"]
    recomputed = metrics([p["age"] for p in preds], [p["predicted_age"] for p in preds])
    assert recomputed["mae"] == pytest.approx(card["test"]["mae"])
    md = (folder / "tiny_card.md").read_text()
    assert "test (held out" in md and f"{card['test']['mae']:.2f}" in md
    model = load_model(folder / "tiny.pt")
    assert model.sha256 == card["sha256"]
    assert model.input.shape == (40, 48, 40)
    assert model.card["age_range"] == card["age_range"]
    assert card["test"]["mean_sd"] > 0
    assert model.card["test"]["mean_sd"] == pytest.approx(card["test"]["mean_sd"])


def test_train_resumes_after_interruption(trained_inputs, monkeypatch):
    bids, out, work = trained_inputs
    cmd = [str(bids), str(out), "train", "--model-name", "resume", "--epochs", "3", "-w", str(work),
           *ARGS]
    real_loss = train_mod.soft_label_loss
    calls = {"n": 0}
    n_batches = None

    def interrupting_loss(*a, **k):
        """Interrupt at the first batch of the second epoch."""
        calls["n"] += 1
        if calls["n"] == n_batches + 1:
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    card_probe = main([str(bids), str(out), "train", "--model-name", "probe", "--epochs", "1",
                       "-w", str(work), *ARGS])
    assert card_probe == 0
    probe = json.loads((out / "models" / "probe" / "probe_card.json").read_text())
    n_batches = probe["splits"]["train"] // 4  # incomplete batches are dropped
    monkeypatch.setattr(train_mod, "soft_label_loss", interrupting_loss)
    with pytest.raises(KeyboardInterrupt):
        main(cmd)
    state = train_mod.torch.load(work / "train_resume" / "last.pt", weights_only=False)
    assert state["epoch"] == 0  # first epoch completed and checkpointed
    first_epoch = state["history"][0]
    monkeypatch.setattr(train_mod, "soft_label_loss", real_loss)
    calls["n"] = 0
    assert main(cmd) == 0
    card = json.loads((out / "models" / "resume" / "resume_card.json").read_text())
    assert [h["epoch"] for h in card["history"]] == [0, 1, 2]
    assert card["history"][0] == first_epoch


def test_stratified_split_is_deterministic_and_spans_ages():
    ids = [f"p{i}" for i in range(50)]
    ages = list(np.linspace(20, 80, 50))
    a, rest = stratified_split(ids, ages, 0.2, seed=3)
    b, _ = stratified_split(ids, ages, 0.2, seed=3)
    assert a == b and len(a) == 10 and not set(a) & set(rest)
    picked_ages = sorted(ages[ids.index(p)] for p in a)
    assert picked_ages[0] < 30 and picked_ages[-1] > 70


def test_augment_shifts_and_flips_preserve_content():
    rng = np.random.default_rng(0)
    import torch

    x = torch.zeros(4, 1, 10, 10, 10)
    x[:, :, 4:6, 4:6, 4:6] = 1.0
    y = augment(x, rng, max_shift=2)
    assert y.shape == x.shape
    assert torch.all(y.sum(dim=(1, 2, 3, 4)) == 8)  # the cube stays whole inside the volume


def test_metrics_against_numpy():
    y = np.array([20.0, 30.0, 40.0, 50.0])
    p = np.array([22.0, 29.0, 43.0, 48.0])
    m = metrics(y, p)
    assert m["mae"] == pytest.approx(2.0)
    assert m["r2"] == pytest.approx(1 - (4 + 1 + 9 + 4) / 500)
    assert m["pearson_r"] == pytest.approx(np.corrcoef(y, p)[0, 1])


def test_recompute_batchnorm_gives_exact_population_statistics():
    import torch

    from brainage_bids.models.train import recompute_batchnorm

    net = torch.nn.Sequential(torch.nn.BatchNorm3d(1, momentum=0.5))
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(16, 1, 4, 4, 4)).astype(np.float32)
    net.train()
    net(torch.from_numpy(x[:2] * 10))  # a skewed batch the running averages would remember
    recompute_batchnorm(net, x, "cpu", batch=8)
    bn = net[0]
    assert float(bn.running_mean[0]) == pytest.approx(float(x.mean()), rel=1e-5)
    # BatchNorm keeps the unbiased variance of each batch; equal batches average to:
    var = np.mean([x[i:i + 8].var(ddof=1) for i in (0, 8)])
    assert float(bn.running_var[0]) == pytest.approx(float(var), rel=1e-4)
    assert bn.momentum == 0.5 and not net.training


def test_flair_cv_ensemble_writes_members_oof_and_rows(trained_inputs, tmp_path):
    """A 3-fold FLAIR ensemble: member weights, a manifest, out-of-fold predictions for every
    training participant exactly once, and participant rows per member plus model=ensemble."""
    import pandas as pd

    from brainage_bids.interfaces.predict import PredictAge
    from brainage_bids.models.zoo import resolve_request

    bids, out, work = trained_inputs
    rc = main([str(bids), str(out), "train", "--model-name", "fl", "--modalities", "FLAIR",
               "--ensemble-size", "3", "--ensemble-mode", "cv", "--epochs", "1", "-w", str(work),
               *ARGS])
    assert rc == 0
    folder = out / "models" / "fl"
    card = json.loads((folder / "fl_card.json").read_text())
    assert card["modality"] == "FLAIR" and card["ensemble"] == {"size": 3, "mode": "cv"}
    test_ids = set(card["split_participants"]["test"])
    oof = pd.read_csv(folder / "oof_predictions.tsv", sep="\t")
    pool = {f"sub-s{i:02d}" for i in range(N_HC)} - test_ids
    assert sorted(oof["participant_id"]) == sorted(pool)  # each exactly once, no test scans
    assert set(oof["fold"]) == {1, 2, 3} and set(oof["suffix"]) == {"FLAIR"}
    assert all(oof["model"] == [f"fl-m{f}" for f in oof["fold"]])
    for member in card["split_participants"]["members"]:
        assert not set(member["train"]) & set(member["validation"])
        assert not set(member["train"]) & test_ids
    for p in card["test"]["predictions"]:
        assert p["predicted_age"] == pytest.approx(np.mean(p["members"]), abs=1e-3)

    request = resolve_request(str(folder / "fl.json"))
    assert request.modality == "FLAIR" and request.ensemble and len(request.members) == 3
    anat = out / "sub-s00" / "anat"
    node = PredictAge(model_files=[m[1] for m in request.members],
                      model_names=[m[0] for m in request.members],
                      model_modalities=[m[2] for m in request.members],
                      preproc_file=str(anat / f"sub-s00_space-{TEMPLATE}_desc-preproc_FLAIR.nii.gz"),
                      mask_file=str(anat / f"sub-s00_space-{TEMPLATE}_desc-flairbrain_mask.nii.gz"),
                      participant_id="sub-s00", source_file="sub-s00/anat/sub-s00_FLAIR.nii.gz",
                      suffix="FLAIR", chronological_age=20.0, precision="fp32")
    res = node.run(cwd=str(tmp_path))
    rows = pd.read_csv(res.outputs.out_tsv, sep="\t")
    assert list(rows["model"]) == ["fl-m1", "fl-m2", "fl-m3", "ensemble"]
    members, ens = rows.iloc[:3], rows.iloc[3]
    assert ens["predicted_age"] == pytest.approx(members["predicted_age"].mean(), abs=1e-3)
    expected_sd = np.sqrt((members["predicted_age_sd"] ** 2).mean()
                          + members["predicted_age"].var(ddof=0))
    assert ens["predicted_age_sd"] == pytest.approx(expected_sd, abs=1e-3)
    assert ens["brain_age_gap"] == pytest.approx(ens["predicted_age"] - 20.0, abs=1e-3)
    meta = json.loads(open(res.outputs.out_json).read())
    assert meta["Ensemble"]["Members"] == ["fl-m1", "fl-m2", "fl-m3"]
    assert all(m["Modality"] == "FLAIR" for m in meta["Models"])


def test_train_irv2_one_epoch(trained_inputs):
    """The Inception-ResNet-V2 trains (MSE, scalar output) and its checkpoint loads."""
    bids, out, work = trained_inputs
    rc = main([str(bids), str(out), "train", "--model-name", "irv", "--arch", "irv2",
               "--epochs", "1", "-w", str(work), *ARGS])
    assert rc == 0
    folder = out / "models" / "irv"
    card = json.loads((folder / "irv_card.json").read_text())
    model = load_model(folder / "irv.pt")
    assert model.arch == "irv2" and model.output == "scalar" and model.centres is None
    assert card["parameters"] == 49_429_747
    assert np.isfinite(card["test"]["mae"])
    assert "Inception-ResNet-V2" in (folder / "irv_card.md").read_text()


def test_train_learns_an_age_signal_that_survives_normalisation(trained_inputs):
    """A 3-fold CV ensemble on the synthetic cohort: the out-of-fold predictions must follow the
    ball's size far better than the mean training age does, so a trainer that learns nothing fails."""
    import pandas as pd

    bids, out, work = trained_inputs
    rc = main([str(bids), str(out), "train", "--model-name", "learn", "--ensemble-size", "3",
               "--epochs", "60", "--augment", "none", "--learning-rate", "1e-2", "--dropout", "0",
               "--channels", "4", "8", "8", "16", "16", "8", "--voxel-size", "4",
               "--batch-size", "4", "--nprocs", "1", "--omp-nthreads", "1", "-w", str(work)])
    assert rc == 0
    folder = out / "models" / "learn"
    card = json.loads((folder / "learn_card.json").read_text())
    oof = pd.read_csv(folder / "oof_predictions.tsv", sep="\t")
    assert len(oof) == N_HC and card["splits"]["test"] == 0  # cv: every control out-of-fold once
    ages = dict(zip(oof["participant_id"], oof["chronological_age"]))
    # what a network that learned nothing would score: each fold's mean training age
    baseline = np.mean([abs(ages[p] - np.mean([ages[q] for q in m["train"]]))
                        for m in card["split_participants"]["members"] for p in m["validation"]])
    assert card["validation"]["mae"] < 0.5 * baseline
    assert card["validation"]["pearson_r"] > 0.8
    # the card's figures are those of its own out-of-fold predictions (and of the TSV)
    preds = card["validation"]["predictions"]
    again = metrics([p["chronological_age"] for p in preds], [p["predicted_age"] for p in preds])
    for key in ("mae", "r2", "pearson_r", "mean_error", "slope"):
        assert again[key] == pytest.approx(card["validation"][key], rel=1e-12)
    tsv = metrics(oof["chronological_age"], oof["predicted_age"])
    assert tsv["mae"] == pytest.approx(card["validation"]["mae"], abs=1e-3)
    last = metrics([p["chronological_age"] for p in preds],
                   [p["last_epoch_predicted_age"] for p in preds])
    assert last["mae"] == pytest.approx(card["validation"]["last_epoch"]["mae"], rel=1e-12)
    unc = card["validation"]["uncertainty"]
    assert unc["mean_sd"] == pytest.approx(np.mean([p["predicted_age_sd"] for p in preds]))
    assert -1 <= unc["spearman_sd_abs_error"] <= 1


def test_kfold_split_puts_every_participant_in_exactly_one_fold_across_ages():
    from brainage_bids.models.train import kfold_split

    ids = [f"p{i:03d}" for i in range(144)]
    ages = list(np.random.default_rng(0).uniform(20, 86, 144))
    folds = kfold_split(ids, ages, 5, seed=1)
    assert sorted(p for f in folds for p in f) == ids
    assert sorted(len(f) for f in folds) == [28, 29, 29, 29, 29]
    assert folds == kfold_split(ids, ages, 5, seed=1)
    by_id = dict(zip(ids, ages))
    means = [np.mean([by_id[p] for p in f]) for f in folds]
    assert max(means) - min(means) < 3.0  # stratified: every fold spans the ages
    for f in folds:
        fa = [by_id[p] for p in f]
        assert min(fa) < 30 and max(fa) > 75


def test_train_and_group_share_one_definition_of_a_control(tmp_path):
    """train picks the controls the group level counts: the stats spec's labels in its diagnosis
    column, compared stripped and case-insensitively."""
    import pandas as pd

    from brainage_bids.models.train import healthy_controls
    from brainage_bids.stats.collect import is_control
    from brainage_bids.stats.spec import validate_spec

    participants = pd.DataFrame({"group": ["HC", " hc", "Control", "MS", None]},
                                index=[f"sub-{i}" for i in range(5)])
    assert healthy_controls(participants) is None  # no `diagnosis` column: everyone
    spec = validate_spec({"columns": {"diagnosis": "group"}, "controls": ["control", "HC"]})
    assert healthy_controls(participants, spec) == {"sub-0", "sub-1", "sub-2"}
    assert list(is_control(participants["group"], spec["controls"])) == [True, True, True, False,
                                                                        False]
    default = healthy_controls(participants.rename(columns={"group": "diagnosis"}))
    assert default == {"sub-0", "sub-1"}  # the default controls label is HC


class _TouchOnUnpickle:
    """An object whose unpickling creates a file: what a tampered checkpoint could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_resume_never_unpickles_code_from_a_tampered_checkpoint(trained_inputs, tmp_path):
    bids, out, work = trained_inputs
    cmd = [str(bids), str(out), "train", "--model-name", "tampered", "--epochs", "1", "-w",
           str(work), *ARGS]
    assert main(cmd) == 0
    last = work / "train_tampered" / "last.pt"
    state = train_mod.torch.load(last, weights_only=False)
    marker = tmp_path / "code-ran"
    state["history"].append({"payload": _TouchOnUnpickle(marker)})
    train_mod.torch.save(state, last)
    try:
        main(cmd)
    except Exception as exc:  # refusing the file is acceptable; running its code is not
        assert "weights" in str(exc).lower() or "unpickl" in str(exc).lower(), exc
    assert not marker.exists()


def test_members_trained_in_separate_runs_assemble_into_the_same_ensemble(trained_inputs,
                                                                            tmp_path, caplog):
    """--members: members trained by separate runs (own work dirs, as cluster jobs), then one
    run without it, give the ensemble of a single run, without training them again."""
    import shutil

    bids, out, work = trained_inputs
    cv = ["--ensemble-size", "2", "--ensemble-mode", "cv", "--epochs", "2", *ARGS]
    assert main([str(bids), str(out), "train", "--model-name", "whole",
                 "-w", str(tmp_path / "w_one"), *cv]) == 0
    w_a, w_b = tmp_path / "w_a", tmp_path / "w_b"
    assert main([str(bids), str(out), "train", "--model-name", "split", "--members",
                 "2", "-w", str(w_a), *cv]) == 0
    assert not (out / "models" / "split").exists()  # no ensemble from a part
    assert (w_a / "train_split-m2" / "best.pt").exists() and not (w_a / "train_split-m1").exists()
    assert main([str(bids), str(out), "train", "--model-name", "split", "--members",
                 "1", "-w", str(w_b), *cv]) == 0
    shutil.copytree(w_b / "train_split-m1", w_a / "train_split-m1")
    caplog.clear()
    assert main([str(bids), str(out), "train", "--model-name", "split",
                 "-w", str(w_a), *cv]) == 0
    assert "epoch 1/2" not in caplog.text  # nothing trained again
    one = json.loads((out / "models" / "whole" / "whole_card.json").read_text())
    parts = json.loads((out / "models" / "split" / "split_card.json").read_text())
    key = lambda p: (p["participant_id"], p["session_id"] or "")  # noqa: E731
    a = sorted(one["validation"]["predictions"], key=key)
    b = sorted(parts["validation"]["predictions"], key=key)
    assert [key(p) for p in a] == [key(p) for p in b]
    assert np.allclose([p["predicted_age"] for p in a], [p["predicted_age"] for p in b], atol=1e-4)
    assert main([str(bids), str(out), "train", "--model-name", "split", "--members",
                 "3", "-w", str(tmp_path / "w_c"), *cv]) == 64


def test_split_seed_keeps_the_folds_while_the_member_seeds_change():
    """--split-seed fixes the folds, so another --seed trains new members on the same folds (more
    members per fold, each still out-of-fold on its own fold); without it the folds follow --seed."""
    from types import SimpleNamespace

    from brainage_bids.models.train import _member_plan

    ids = [f"p{i:03d}" for i in range(60)]
    ages = list(np.random.default_rng(1).uniform(20, 86, 60))
    opts = lambda **kw: SimpleNamespace(ensemble_mode="cv", ensemble_size=5, val_fraction=0.2,  # noqa: E731
                                        **kw)
    first = _member_plan(ids, ages, opts(seed=0))
    assert first == _member_plan(ids, ages, opts(seed=0, split_seed=0))  # the default
    again = _member_plan(ids, ages, opts(seed=5, split_seed=0))
    assert [m["validation"] for m in again] == [m["validation"] for m in first]
    assert [m["seed"] for m in again] == [5, 6, 7, 8, 9]
    moved = _member_plan(ids, ages, opts(seed=5))
    assert [m["validation"] for m in moved] != [m["validation"] for m in first]
