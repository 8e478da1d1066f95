"""``brainage-bids models predict``: models run on images already on their template grid."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from brainage_bids.cli.run import main
from brainage_bids.models import zoo
from brainage_bids.models.checkpoint import FSL_MNI_1MM_AFFINE, FSL_MNI_1MM_SHAPE, load_model
from brainage_bids.models.densenet import build_densenet169
from brainage_bids.models.inference import normalise, predict_arrays
from brainage_bids.models.sfcn import SFCN, UKB_CHANNELS
from brainage_bids.utils.images import resample_to_grid

from conftest import template_image


def _fsl_image(path, seed=0):
    """A smooth positive blob on the FSL MNI152 1 mm grid (zeros outside)."""
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in FSL_MNI_1MM_SHAPE],
                          indexing="ij")
    r2 = i ** 2 + j ** 2 + k ** 2
    data = np.where(r2 < 0.6, 100 + 50 * np.sin(3 * i + seed) * np.cos(2 * j) + 20 * k, 0)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.asarray(FSL_MNI_1MM_AFFINE)), path)
    return str(path)


def _json_rows(capsys):
    return json.loads(capsys.readouterr().out)


def test_own_model_json_rows_match_direct_inference(random_model, tmp_path, capsys):
    img = template_image(2)
    brain = tmp_path / "brain.nii.gz"
    nib.save(img, brain)
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image((img.get_fdata() > 0).astype(np.uint8), img.affine), mask)
    assert main(["models", "predict", str(random_model), str(brain), str(brain), "--json"]) == 0
    rows = _json_rows(capsys)
    assert [set(r) for r in rows] == [{"image", "model", "predicted_age", "predicted_age_sd"}] * 2
    assert rows[0]["image"] == str(brain) and rows[0]["model"] == "random-sfcn"
    model = load_model(random_model)
    spec = model.input
    data = resample_to_grid(img, np.asarray(spec.affine), spec.shape)
    ref_mask = resample_to_grid(nib.load(mask), np.asarray(spec.affine), spec.shape) > 0.5
    age, sd, _ = predict_arrays(model, [normalise(data, spec, ref_mask)])
    assert rows[0]["predicted_age"] == pytest.approx(float(age[0]), rel=1e-5)
    assert rows[0]["predicted_age_sd"] == pytest.approx(float(sd[0]), rel=1e-5)
    assert rows[1] == {**rows[0], "image": str(brain)}
    # an explicit mask equal to the non-zero voxels gives the same age; the text table too
    assert main(["models", "predict", str(random_model), str(brain), "--mask", str(mask)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == ["image", "model", "predicted_age", "predicted_age_sd"]
    assert float(lines[1].split("\t")[2]) == pytest.approx(float(age[0]), abs=1e-4)


def test_ensemble_manifest_gives_one_row_per_image(random_model, tmp_path, capsys):
    manifest = tmp_path / "ens.json"
    zoo.write_ensemble_manifest(manifest, "pair", "T1w", [random_model, random_model])
    brain = tmp_path / "brain.nii.gz"
    nib.save(template_image(2), brain)
    assert main(["models", "predict", str(random_model), str(brain), "--json"]) == 0
    single = _json_rows(capsys)[0]
    assert main(["models", "predict", str(manifest), str(brain), "--json"]) == 0
    (row,) = _json_rows(capsys)
    assert row["model"] == "pair"
    # identical members: the same age, and the SD of the law of total variance equals theirs
    assert row["predicted_age"] == pytest.approx(single["predicted_age"], rel=1e-6)
    assert row["predicted_age_sd"] == pytest.approx(single["predicted_age_sd"], rel=1e-6)


def test_published_model_refuses_an_image_off_the_fsl_grid(cache, tmp_path, capsys):
    sfcn = tmp_path / "sfcn.pth"
    torch.save({"module." + k: v for k, v in SFCN(UKB_CHANNELS, n_bins=40).state_dict().items()},
               sfcn)
    zoo.install("flair-brain-age-sfcn-flair", sfcn)
    other = tmp_path / "mni2009.nii.gz"
    nib.save(template_image(2), other)  # MNI152NLin2009aSym 2 mm: not the FSL grid
    assert main(["models", "predict", "flair-brain-age-sfcn-flair", str(other)]) == 65
    err = capsys.readouterr().err
    assert str(other) in err and "FSL MNI152 1 mm grid (182x218x182" in err
    # the bare file cannot say which SFCN it is
    assert main(["models", "predict", str(sfcn), str(other)]) == 65
    assert "ukb-sfcn, flair-brain-age-sfcn-t1w, flair-brain-age-sfcn-flair" in capsys.readouterr().err


def test_missing_inputs_and_models(cache, random_model, tmp_path, capsys):
    assert main(["models", "predict", str(random_model), str(tmp_path / "absent.nii.gz")]) == 66
    assert "image not found" in capsys.readouterr().err
    image = _fsl_image(tmp_path / "img.nii.gz")
    assert main(["models", "predict", "ukb-sfcn", image]) == 66
    assert "brainage-bids models install ukb-sfcn --from" in capsys.readouterr().err
    assert main(["models", "predict", "no-such-model", image]) == 66
    assert "neither a zoo model" in capsys.readouterr().err
    assert main(["models", "predict", str(random_model), image, "--mask", image, image]) == 65
    assert "one mask per image" in capsys.readouterr().err


def test_scalar_model_has_no_sd(cache, tmp_path, capsys):
    torch.manual_seed(0)
    dn = tmp_path / "best_model_densenet_flair.pth"
    torch.save(build_densenet169().state_dict(), dn)
    zoo.install("flair-brain-age-densenet-flair", dn)
    image = _fsl_image(tmp_path / "head.nii.gz")
    assert main(["models", "predict", "flair-brain-age-densenet-flair", image, "--json"]) == 0
    (row,) = _json_rows(capsys)
    assert row["model"] == "flair-brain-age-densenet-flair" and row["predicted_age_sd"] is None
    model = load_model(zoo.cache_dir() / "flair-brain-age-densenet-flair.pt")
    age, _, _ = predict_arrays(model, [normalise(nib.load(image).get_fdata(dtype=np.float32),
                                                 model.input)])
    assert row["predicted_age"] == pytest.approx(float(age[0]), rel=1e-5)
