"""Golden numbers: what the publishers' own code gives (../shared/reference/golden/golden.json).

Model inputs are compared by their summaries (shape, mean, SD, min, max, sum of squares, six
probe voxels) and the random-weight networks by their log-probabilities and ages, all to 1e-4
relative. A normalisation that differs from the publisher's (the mean taken after the crop) must
fail the same comparison.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from brainage_bids.cli.run import main
from brainage_bids.models.checkpoint import (
    FLAIR_BRAIN_AGE_SFCN_INPUT,
    IRV2_FLAIR_INPUT,
    SFCN_CROP,
    UKB_INPUT,
    centre_crop_slices,
    load_model,
)
from brainage_bids.models.inference import model_input, predict_arrays

from conftest import REFERENCE

GOLDEN = REFERENCE / "golden"
IMAGE = GOLDEN / "input_fsl_mni152_1mm.nii.gz"
RTOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    path = GOLDEN / "golden.json"
    if not path.is_file():
        pytest.skip(f"../shared/reference/golden not present ({path} missing)")
    return json.loads(path.read_text())


def mismatches(x: np.ndarray, ref: dict) -> list[str]:
    """What of ``x`` differs from a golden summary by more than 1e-4 relative (empty: agrees)."""
    x = np.asarray(x, dtype=np.float64)
    if list(x.shape) != ref["shape"]:
        return [f"shape {list(x.shape)} != {ref['shape']}"]
    out = []
    got = {"mean": x.mean(), "std": x.std(), "min": x.min(), "max": x.max(),
           "sum_sq": float((x ** 2).sum())}
    for key, value in got.items():
        if not np.isclose(value, ref[key], rtol=RTOL, atol=1e-7):
            out.append(f"{key} {value:.7g} != {ref[key]:.7g}")
    for probe in ref["probes"]:
        v = x[tuple(probe["index"])]
        if not np.isclose(v, probe["value"], rtol=RTOL, atol=1e-7):
            out.append(f"voxel {probe['index']} {v:.7g} != {probe['value']:.7g}")
    return out


def _input(spec):
    return model_input(str(IMAGE), None, spec, head_file=str(IMAGE))


@pytest.mark.parametrize("key,spec", [
    ("ukb_sfcn_input", UKB_INPUT),
    ("flair_brain_age_sfcn_input", FLAIR_BRAIN_AGE_SFCN_INPUT),
    ("flair_brain_age_irv2_densenet_input", IRV2_FLAIR_INPUT),
], ids=["ukb-sfcn", "flair-brain-age-sfcn", "flair-brain-age-irv2-densenet"])
def test_model_input_matches_publisher(golden, key, spec):
    assert mismatches(_input(spec), golden[key]) == []


def _mean_after_crop() -> np.ndarray:
    """The old, wrong UK Biobank normalisation: crop first, then divide by the box's mean."""
    data = nib.load(str(IMAGE)).get_fdata(dtype=np.float32)
    box = data[centre_crop_slices(data.shape, SFCN_CROP)]
    return (box / box.mean(dtype=np.float64)).astype(np.float32)


def test_mean_after_crop_fails_the_golden_input(golden):
    wrong = _mean_after_crop()
    failed = mismatches(wrong, golden["ukb_sfcn_input"])
    assert any(f.startswith("mean") for f in failed) and len(failed) >= 6
    assert wrong.mean() == pytest.approx(1.0, rel=1e-4)  # the box mean, not the publisher's 1.466


def _load(name, checkpoint):
    return load_model(GOLDEN / checkpoint, entry=name)


@pytest.mark.parametrize("name,key,spec", [
    ("ukb-sfcn", "ukb_sfcn_random_seed0", UKB_INPUT),
    ("flair-brain-age-sfcn-flair", "flair_brain_age_sfcn_random_seed1", FLAIR_BRAIN_AGE_SFCN_INPUT),
], ids=["ukb-sfcn", "flair-brain-age-sfcn"])
def test_random_network_matches_publisher(golden, name, key, spec):
    ref = golden[key]
    model = _load(name, ref["checkpoint"])
    lo, hi, width = ref["bins"]
    np.testing.assert_allclose(model.centres, np.arange(lo, hi, width) + width / 2)
    age, _, prob = predict_arrays(model, [_input(spec)], precision="fp32")
    np.testing.assert_allclose(np.log(prob[0]), ref["log_probs"], rtol=RTOL, atol=1e-4)
    assert float(age[0]) == pytest.approx(ref["age"], rel=RTOL)


def test_mean_after_crop_gives_the_other_age(golden):
    ref = golden["ukb_sfcn_random_seed0"]
    model = _load("ukb-sfcn", ref["checkpoint"])
    age, _, _ = predict_arrays(model, [_mean_after_crop()], precision="fp32")
    assert float(age[0]) != pytest.approx(ref["age"], rel=RTOL)
    assert float(age[0]) == pytest.approx(ref["age_if_mean_taken_after_crop"], rel=RTOL)


@pytest.mark.parametrize("name,key", [
    ("ukb-sfcn", "ukb_sfcn_random_seed0"),
    ("flair-brain-age-sfcn-flair", "flair_brain_age_sfcn_random_seed1"),
], ids=["ukb-sfcn", "flair-brain-age-sfcn-flair"])
def test_cli_install_then_predict(golden, cache, capsys, name, key):
    ref = golden[key]
    assert main(["models", "install", name, "--from", str(GOLDEN / ref["checkpoint"])]) == 0
    assert main(["models", "predict", name, str(IMAGE), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["model"] == name and row["image"] == str(IMAGE)
    assert row["predicted_age"] == pytest.approx(ref["age"], abs=1e-3)
    assert row["predicted_age_sd"] > 0
