"""One real run of the participant level (and the group level after it).

The dataset mixes two usable scans (real IXI scans from ../shared/data when present, else
template-derived ones) with a corrupt file and a 4D series, so the run must finish the good
participants, leave crash files for the bad ones and exit 1. The model is a small random SFCN: the
predicted ages are meaningless, their presence, form and provenance are what is checked.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainage_bids import __version__
from brainage_bids.cli.run import main
from brainage_bids.interfaces.predict import COLUMNS
from brainage_bids.models.checkpoint import sha256sum
from brainage_bids.utils.templates import TEMPLATE

from conftest import SHARED, listing, make_bids, template_image

DESIGN_COLUMNS = ["participant_id", "session_id", "source_file", "suffix", "model",
                  "chronological_age", "predicted_age", "predicted_age_sd", "brain_age_gap",
                  "lesion_filled", "qc_flags"]
YEAR_COLUMNS = ["chronological_age", "predicted_age", "predicted_age_sd", "brain_age_gap"]
GOOD = ("good", "noage")

pytestmark = pytest.mark.integration  # real participant runs (deepbet on four scans): minutes
BAD = ("corrupt", "fourd")


def _ixi_scans():
    """Two IXI scans and the age of the first, or None when ../shared/data is absent."""
    ixi = SHARED / "ixi-t1-2mm"
    if not ixi.is_dir():
        return None
    with open(ixi / "participants.tsv", newline="") as fh:
        ages = {r["participant_id"]: r["age"] for r in csv.DictReader(fh, delimiter="\t")}
    found = [(pid, ixi / pid / "anat" / f"{pid}_T1w.nii.gz") for pid in sorted(ages)]
    found = [(pid, p) for pid, p in found if p.exists()]
    with_age = [(pid, p) for pid, p in found if ages[pid] not in ("n/a", "")]
    if len(with_age) < 2:
        return None
    (pid1, p1), (_, p2) = with_age[0], with_age[1]
    return p1, p2, float(ages[pid1])


def _anat(bids: Path, label: str) -> Path:
    return bids / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"


@pytest.fixture(scope="module")
def run(tmp_path_factory, random_model):
    root = tmp_path_factory.mktemp("participant")
    bids, out, work = root / "bids", root / "out", root / "work"
    ixi = _ixi_scans()
    good_age = ixi[2] if ixi else 42.0
    make_bids(bids, {"good": {"age": good_age, "sex": "M"}, "noage": {"age": None, "sex": "F"},
                     "corrupt": {"age": 40.0, "sex": "F"}, "fourd": {"age": 50.0, "sex": "M"}})
    if ixi:
        shutil.copyfile(ixi[0], _anat(bids, "good"))
        shutil.copyfile(ixi[1], _anat(bids, "noage"))
    _anat(bids, "corrupt").write_bytes(np.random.default_rng(0).bytes(64 * 1024))
    tpl = template_image(2)
    four = np.stack([tpl.get_fdata(dtype=np.float32)] * 3, axis=-1)
    nib.save(nib.Nifti1Image(four, tpl.affine), str(_anat(bids, "fourd")))
    before = listing(bids)
    code = main([str(bids), str(out), "participant", "--model", str(random_model),
                 "--nprocs", "2", "--omp-nthreads", "1", "--skull-strip", "deepbet",
                 "--saliency", "-w", str(work)])
    after = listing(bids)
    return SimpleNamespace(bids=bids.resolve(), out=out, work=work, code=code, before=before,
                           after=after, good_age=good_age, model=random_model, real=bool(ixi))


def _brainage(run, label):
    anat = run.out / f"sub-{label}" / "anat"
    return anat / f"sub-{label}_desc-brainage_T1w.tsv", anat / f"sub-{label}_desc-brainage_T1w.json"


def test_exit_code_is_partial_failure(run):
    assert run.code == 1


def test_bids_dir_untouched(run):
    assert run.after == run.before


def test_contract_files(run):
    desc = json.loads((run.out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0] == {**desc["GeneratedBy"][0], "Name": "brainage-bids",
                                      "Version": __version__}
    for label in GOOD:
        anat = run.out / f"sub-{label}" / "anat"
        preproc = anat / f"sub-{label}_space-{TEMPLATE}_desc-preproc_T1w.nii.gz"
        mask = anat / f"sub-{label}_space-{TEMPLATE}_desc-brain_mask.nii.gz"
        tsv, js = _brainage(run, label)
        for f in (preproc, mask, tsv, js, preproc.with_name(preproc.name.replace(".nii.gz", ".json"))):
            assert f.exists(), f
        img, m = nib.load(str(preproc)), nib.load(str(mask))
        assert img.shape == m.shape
        np.testing.assert_allclose(img.affine, m.affine)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert np.allclose(img.header.get_zooms()[:3], 1.0)
        data, inside = img.get_fdata(), np.asarray(m.dataobj) > 0
        assert 900 < inside.sum() / 1000 < 2500  # a brain-sized mask, in mL
        assert data[inside].mean() == pytest.approx(1.0, abs=1e-3)  # mean 1 inside the mask
        assert np.all(data[~inside] == 0)
        sidecar = json.loads(preproc.with_name(preproc.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["SkullStripping"] == "deepbet"
        assert -1 <= sidecar["RegistrationCorrelation"] <= 1
    for label in BAD:
        assert not (run.out / f"sub-{label}" / "anat").exists()
    # nothing half-written: no temporary files anywhere in the outputs
    assert not [p for p in run.out.rglob("*.tmp")]


def test_brainage_tables(run):
    for label in GOOD:
        tsv, js = _brainage(run, label)
        with open(tsv, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
            header = rows[0].keys() if rows else []
        assert list(header) == list(COLUMNS)
        assert list(header)[:len(DESIGN_COLUMNS)] == DESIGN_COLUMNS  # added columns come last
        assert len(rows) == 1
        row = rows[0]
        assert row["participant_id"] == f"sub-{label}"
        assert row["session_id"] == "n/a"
        assert row["source_file"] == f"sub-{label}/anat/sub-{label}_T1w.nii.gz"
        assert row["suffix"] == "T1w"
        assert row["model"] == "random-sfcn"
        assert row["lesion_filled"] == "false"
        assert row["lesion_volume_ml"] == "n/a"  # no --lesion-masks
        predicted, sd = float(row["predicted_age"]), float(row["predicted_age_sd"])
        # the age and SD are the mean and SD of the distribution written beside them
        dist = pd.read_csv(tsv.parent / f"sub-{label}_desc-agedist_T1w.tsv", sep="\t")
        dist = dist[dist["model"] == "random-sfcn"]
        p = dist["probability"].to_numpy(float)
        ages = dist["age"].to_numpy(float)
        mean = float((p * ages).sum() / p.sum())
        assert predicted == pytest.approx(mean, abs=2e-3)
        assert sd == pytest.approx(float(np.sqrt((p * (ages - mean) ** 2).sum() / p.sum())),
                                   abs=2e-3)
        if label == "good":
            assert float(row["chronological_age"]) == pytest.approx(run.good_age)
            assert float(row["brain_age_gap"]) == pytest.approx(predicted - run.good_age, abs=1e-3)
        else:
            assert row["chronological_age"] == "n/a"
            assert row["brain_age_gap"] == "n/a"
            assert math.isfinite(predicted)
        flags = [] if row["qc_flags"] == "n/a" else row["qc_flags"].split(";")
        assert set(flags) <= {"low_registration", "age_outside_training_range",
                              "predicted_age_sd_high"}
        # the random model's distribution is nearly flat; its card gives no reference SD, so
        # the absolute 10-year threshold applies
        assert ("predicted_age_sd_high" in flags) == (sd > 10)
        assert ("age_outside_training_range" in flags) == (
            label == "good" and not 20 <= run.good_age <= 80)


def test_brainage_sidecars(run):
    sha = sha256sum(run.model)
    for label in GOOD:
        _, js = _brainage(run, label)
        meta = json.loads(js.read_text())
        for col in DESIGN_COLUMNS:
            assert col in meta and meta[col].get("Description"), col
        for col in YEAR_COLUMNS:
            assert meta[col]["Units"] == "year", col
        assert meta["Model"]["Name"] == "random-sfcn"
        assert meta["Model"]["SHA256"] == sha
        assert meta["SoftwareVersion"] == __version__


def test_failed_participants_have_crash_files(run):
    for label in BAD:
        logs = sorted((run.out / f"sub-{label}" / "log").rglob("crash-*"))
        assert logs, f"no crash file for sub-{label}"
        text = "\n".join(p.read_text(errors="replace") for p in logs)
        assert str(_anat(run.bids, label)) in text
    four = "\n".join(p.read_text() for p in (run.out / "sub-fourd" / "log").rglob("crash-*"))
    assert "3 volumes" in four
    for label in GOOD:
        assert not list((run.out / f"sub-{label}").rglob("crash-*"))


def test_group_level(run):
    code = main([str(run.bids), str(run.out), "group", "-w", str(run.work)])
    assert code == 0
    group = pd.read_csv(run.out / "group" / "brainage.tsv", sep="\t", na_values=["n/a"],
                        keep_default_na=False)
    assert list(group.columns[:len(DESIGN_COLUMNS)]) == DESIGN_COLUMNS
    assert sorted(group["participant_id"]) == [f"sub-{label}" for label in sorted(GOOD)]
    # the participant-level values come through unchanged, as text too (n/a, true/false levels)
    with open(run.out / "group" / "brainage.tsv", newline="") as fh:
        group_rows = {r["participant_id"]: r for r in csv.DictReader(fh, delimiter="\t")}
    for label in GOOD:
        tsv, _ = _brainage(run, label)
        with open(tsv, newline="") as fh:
            (single,) = list(csv.DictReader(fh, delimiter="\t"))
        grow = group_rows[f"sub-{label}"]
        for col in DESIGN_COLUMNS:
            if col in ("chronological_age", "predicted_age", "predicted_age_sd", "brain_age_gap") \
                    and single[col] != "n/a":
                assert float(grow[col]) == pytest.approx(float(single[col])), col
            else:
                assert grow[col] == single[col], col
    assert run.after == listing(run.bids)
    # the group report renders from these real outputs and every file it references exists
    import re

    report = run.out / "group" / "report.html"
    refs = re.findall(r'(?:src|href)="([^"#:]+)"', report.read_text())
    assert refs and all((report.parent / r).exists() for r in refs), \
        [r for r in refs if not (report.parent / r).exists()]


def test_example_dataset(tmp_path, random_model):
    """scripts/make_example_dataset.py builds a valid dataset that runs end to end (exit 0)."""
    import subprocess
    import sys

    from brainage_bids.utils.templates import get_template

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_example_dataset.py"
    bids, out = tmp_path / "example", tmp_path / "out"
    done = subprocess.run([sys.executable, str(script), str(bids)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (bids / "README").exists()
    with open(bids / "participants.tsv", newline="") as fh:
        (participant,) = list(csv.DictReader(fh, delimiter="\t"))
    assert participant["participant_id"] == "sub-01" and float(participant["age"]) == 30
    src = nib.load(str(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"))
    assert np.allclose(src.header.get_zooms()[:3], 1.0)
    assert not np.allclose(src.affine[:3, :3], np.diag(np.diag(src.affine[:3, :3])))  # rotated
    # a second call refuses to overwrite
    again = subprocess.run([sys.executable, str(script), str(bids)], capture_output=True, text=True)
    assert again.returncode != 0

    before = listing(bids)
    code = main([str(bids), str(out), "participant", "--skull-strip", "none", "--model",
                 str(random_model), "--nprocs", "2", "--omp-nthreads", "1", "-w", str(tmp_path / "w")])
    assert code == 0
    assert listing(bids) == before
    anat = out / "sub-01" / "anat"
    with open(anat / "sub-01_desc-brainage_T1w.tsv", newline="") as fh:
        (row,) = list(csv.DictReader(fh, delimiter="\t"))
    assert float(row["chronological_age"]) == 30
    assert float(row["brain_age_gap"]) == pytest.approx(float(row["predicted_age"]) - 30, abs=1e-3)
    # the moved template is registered back onto itself
    sidecar = json.loads((anat / f"sub-01_space-{TEMPLATE}_desc-preproc_T1w.json").read_text())
    assert sidecar["RegistrationCorrelation"] > 0.9
    tpl_mask = np.asarray(nib.load(str(get_template().mask)).dataobj) > 0
    mask = np.asarray(nib.load(str(anat / f"sub-01_space-{TEMPLATE}_desc-brain_mask.nii.gz"))
                      .dataobj) > 0
    assert mask.shape == tpl_mask.shape
    dice = 2 * (mask & tpl_mask).sum() / (mask.sum() + tpl_mask.sum())
    assert dice > 0.95


def test_saliency_distribution_and_reports(run):
    """--saliency writes an MNI SmoothGrad map; every participant, failed or not, gets a report
    whose figures exist; --reports-only rewrites them from the outputs."""
    import re

    for label in GOOD:
        anat = run.out / f"sub-{label}" / "anat"
        sal = nib.load(str(anat / f"sub-{label}_space-MNI152NLin2009aSym_desc-saliency_T1w.nii.gz"))
        data = np.asarray(sal.dataobj)
        from brainage_bids.utils.templates import get_template

        assert data.shape == nib.load(str(get_template().brain)).shape
        assert np.isfinite(data).all() and data.max() > 0
        dist = pd.read_csv(anat / f"sub-{label}_desc-agedist_T1w.tsv", sep="\t")
        assert list(dist.columns) == ["model", "age", "probability"]
        assert dist["probability"].sum() == pytest.approx(1.0, abs=1e-3)
    for label in ("good", "noage", "corrupt", "fourd"):
        html = run.out / f"sub-{label}.html"
        text = html.read_text()
        refs = re.findall(r'(?:src|href)="([^"#:]+)"', text)
        assert all((run.out / r).exists() for r in refs), [r for r in refs if not (run.out / r).exists()]
    assert "sub-corrupt" in (run.out / "sub-corrupt.html").read_text()
    (run.out / "sub-good.html").unlink()
    assert main([str(run.bids), str(run.out), "participant", "--reports-only",
                 "--participant-label", "good", "-w", str(run.work)]) == 0
    assert (run.out / "sub-good.html").exists() and not (run.out / "sub-noage.html").stat().st_size == 0
