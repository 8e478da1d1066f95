"""Participant and group HTML reports: from a synthetic output folder (always) and from the real
datasets of ../shared/data with participant-level outputs written by the test (skipped when
absent). Every file a report references
must exist; flags, errors and partial outputs must show."""
from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import shared_dataset, template_image, write_participant_outputs

from brainage_bids.interfaces.predict import COLUMNS
from brainage_bids.reports import qc
from brainage_bids.reports.data import find_crash_files, find_scans
from brainage_bids.reports.group import write_group_report, write_reports
from brainage_bids.reports.participant import write_participant_report

SPACE = "space-MNI152NLin2009aSym"


# ---------------------------------------------------------------------------------------------
# helpers
class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.imgs: list[str] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v:
                self.refs.append(v)
                if tag == "img" and k == "src":
                    self.imgs.append(v)


def references(html_file: Path) -> tuple[list[str], list[str]]:
    """Local files referenced by src/href (anchors and URLs with a scheme left out), and the
    images among them."""
    p = _Refs()
    p.feed(html_file.read_text())
    keep = [r for r in p.refs if not r.startswith("#") and not urlparse(r).scheme]
    return keep, p.imgs


def assert_references_exist(html_file: Path, min_images: int = 1) -> list[Path]:
    refs, imgs = references(html_file)
    paths = [(html_file.parent / unquote(r.split("#")[0])).resolve() for r in refs]
    missing = [str(p) for p in paths if not p.is_file()]
    assert not missing, f"{html_file.name} references missing files: {missing}"
    assert len(imgs) >= min_images, f"{html_file.name}: only {len(imgs)} images"
    for img in imgs:
        assert Path(img).suffix in (".png", ".svg")
        assert (html_file.parent / img).stat().st_size > 500
    return paths


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(path, sep="\t", index=False, na_rep="n/a")


def row(pid, model, age, pred, sd, suffix="T1w", ses=None, filled=False, flags=None, src=None):
    return {"participant_id": pid, "session_id": ses, "source_file": src, "suffix": suffix,
            "model": model, "chronological_age": age, "predicted_age": pred,
            "predicted_age_sd": sd, "brain_age_gap": None if age is None else pred - age,
            "lesion_filled": "true" if filled else "false", "qc_flags": flags}


def sidecar(models, *, volume=1250.0, dice=0.95, corr=0.55, ensemble=False) -> dict:
    d = {"Models": [{"Name": m, "Architecture": "sfcn", "Output": "bins", "Modality": "T1w"}
                    for m in models],
         "RegistrationCorrelation": corr, "RegistrationMaskDice": dice,
         "BrainMaskVolume": {"Value": volume, "Units": "mL"},
         "QCThresholds": {"RegistrationCorrelationMin": 0.35,
                          "RegistrationCorrelationApplies": ["T1w"],
                          "RegistrationMaskDiceMin": 0.85}}
    if ensemble:
        d["Ensemble"] = {"Members": list(models)}
    return d


def save(img_data, affine, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(img_data, dtype=np.float32), affine), str(path))


def make_outputs(root: Path) -> Path:
    """A synthetic output folder and its BIDS dataset.

    sub-01: T1w with two models + ensemble, age distributions, lesion and saliency maps, a brain
    mask of implausible volume and a high SD; FLAIR with raw and lesion-filled rows that disagree.
    sub-02: a failed T1w (images only, no table) and a crash file. sub-03: two sessions.
    sub-04: nothing but a crash file. Group tables, figures, bias fit and a model card.
    """
    bids = root / "bids"
    out = root / "out"
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "s", "BIDSVersion": "1.9.0"}))
    (bids / "participants.tsv").write_text(
        "participant_id\tage\tsex\tdiagnosis\tsite\n"
        "sub-01\t45\tF\tMS\tA\nsub-02\t30\tM\tHC\tB\nsub-03\t60\tF\tHC\tA\nsub-04\t50\tM\tMS\tB\n")
    tpl = template_image(resolution=2, scale=1.0)
    data = np.asarray(tpl.dataobj, dtype=np.float32)
    mask = data > 0.05 * data.max()
    brain = np.where(mask, data / data[mask].mean(), 0)
    save(data * 1000, tpl.affine, bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    out.mkdir()
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "brainage-bids outputs", "DatasetType": "derivative",
        "SourceDatasets": [{"URL": bids.resolve().as_uri()}]}))

    # sub-01
    anat = out / "sub-01" / "anat"
    for suffix in ("T1w", "FLAIR"):
        save(brain, tpl.affine, anat / f"sub-01_{SPACE}_desc-preproc_{suffix}.nii.gz")
    save(mask, tpl.affine, anat / f"sub-01_{SPACE}_desc-brain_mask.nii.gz")
    save(mask, tpl.affine, anat / f"sub-01_{SPACE}_desc-flairbrain_mask.nii.gz")
    lesion = np.zeros_like(brain)
    c = np.array(brain.shape) // 2
    lesion[c[0] + 6:c[0] + 10, c[1]:c[1] + 5, c[2] + 4:c[2] + 8] = 1
    save(lesion, tpl.affine, anat / f"sub-01_{SPACE}_desc-lesion_mask.nii.gz")
    save(lesion, tpl.affine, anat / f"sub-01_{SPACE}_desc-flairlesion_mask.nii.gz")
    save(np.where(lesion > 0, 0.9, brain), tpl.affine,
         anat / f"sub-01_{SPACE}_desc-lesionfilled_FLAIR.nii.gz")
    ijk = np.indices(brain.shape)
    blob = np.exp(-((ijk - c[:, None, None, None]) ** 2).sum(0) / 60.0) * mask
    save(blob, tpl.affine, anat / f"sub-01_{SPACE}_desc-saliency_T1w.nii.gz")
    src = "sub-01/anat/sub-01_T1w.nii.gz"
    write_rows(anat / "sub-01_desc-brainage_T1w.tsv", [
        row("sub-01", "m-a", 45.0, 52.0, 30.0, src=src),
        row("sub-01", "m-b", 45.0, 50.0, 6.0, src=src, flags="age_outside_training_range"),
        row("sub-01", "ensemble", 45.0, 51.0, 22.0, src=src, flags="age_outside_training_range")])
    (anat / "sub-01_desc-brainage_T1w.json").write_text(json.dumps(
        sidecar(["m-a", "m-b"], volume=600.0, ensemble=True)))
    ages = np.arange(6.5, 90, 1.0)
    dist = [{"model": m, "age": a, "probability": p}
            for m, mu, s in (("m-a", 52.0, 9.0), ("m-b", 50.0, 6.0))
            for a, p in zip(ages, np.exp(-0.5 * ((ages - mu) / s) ** 2) / 10)]
    pd.DataFrame(dist).to_csv(anat / "sub-01_desc-agedist_T1w.tsv", sep="\t", index=False)
    fsrc = "sub-01/anat/sub-01_FLAIR.nii.gz"
    write_rows(anat / "sub-01_desc-brainage_FLAIR.tsv", [
        {**row("sub-01", "m-f", 45.0, 48.0, None, suffix="FLAIR", src=fsrc),
         "lesion_volume_ml": 0.64},
        {**row("sub-01", "m-f", 45.0, 55.0, None, suffix="FLAIR", filled=True, src=fsrc),
         "lesion_volume_ml": 0.64}])
    (anat / "sub-01_desc-brainage_FLAIR.json").write_text(json.dumps(sidecar(["m-f"])))
    log = out / "sub-01" / "log" / "20260101-000000_aaaa"
    log.mkdir(parents=True)
    (log / "crash-20260101-000000-root-ds_saliency.txt").write_text(
        "Node: brainage_wf.single_subject_01_wf.ds_saliency\nWorking directory: /w\n\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
        "OSError: disk quota exceeded while writing saliency\n")

    # sub-02: failed T1w
    anat2 = out / "sub-02" / "anat"
    save(brain, tpl.affine, anat2 / f"sub-02_{SPACE}_desc-preproc_T1w.nii.gz")
    save(mask, tpl.affine, anat2 / f"sub-02_{SPACE}_desc-brain_mask.nii.gz")
    log2 = out / "sub-02" / "log" / "20260102-000000_bbbb"
    log2.mkdir(parents=True)
    (log2 / "crash-20260102-000000-root-predict.txt").write_text(
        "Node: brainage_wf.single_subject_02_wf.predict\n\nTraceback (most recent call last):\n"
        "ValueError: brain mask is empty on the model grid\n")

    # sub-03: two sessions
    for ses, age, pred in (("ses-1", 60.0, 62.0), ("ses-2", 62.0, 65.5)):
        a3 = out / "sub-03" / ses / "anat"
        save(brain, tpl.affine, a3 / f"sub-03_{ses}_{SPACE}_desc-preproc_T1w.nii.gz")
        save(mask, tpl.affine, a3 / f"sub-03_{ses}_{SPACE}_desc-brain_mask.nii.gz")
        write_rows(a3 / f"sub-03_{ses}_desc-brainage_T1w.tsv",
                   [row("sub-03", "m-a", age, pred, 8.0, ses=ses,
                        src=f"sub-03/{ses}/anat/sub-03_{ses}_T1w.nii.gz")])
        (a3 / f"sub-03_{ses}_desc-brainage_T1w.json").write_text(json.dumps(sidecar(["m-a"])))

    # sub-04: nothing but a crash
    log4 = out / "sub-04" / "log" / "20260102-000000_bbbb"
    log4.mkdir(parents=True)
    (log4 / "crash-20260102-000000-root-skullstrip.txt").write_text(
        "Node: brainage_wf.single_subject_04_wf.skullstrip\n\nTraceback (most recent call last):\n"
        "brainage_bids.utils.images.InputImageError: sub-04_T1w.nii.gz: the image is constant\n")

    # model card, group outputs
    card_dir = out / "models" / "m-a"
    card_dir.mkdir(parents=True)
    (card_dir / "m-a_card.json").write_text(json.dumps({
        "name": "m-a", "architecture": "SFCN", "age_range": [20, 80],
        "training_data": {"dataset": "synthetic controls", "selection": "HC"},
        "splits": {"train": 80, "validation": 10, "test": 10},
        "test": {"n": 10, "mae": 4.2, "pearson_r": 0.9, "mean_sd": 8.0}}))
    tables = [pd.read_csv(p, sep="\t", dtype=str)
              for p in sorted(out.glob("sub-*/**/*_desc-brainage_*.tsv"))]
    group = pd.concat(tables, ignore_index=True)
    group["predicted_age_corrected"] = pd.to_numeric(group["predicted_age"]) - 1.0
    group["brain_age_gap_corrected"] = pd.to_numeric(group["brain_age_gap"], errors="coerce") - 1.0
    group["bias_method"] = "cole"
    gdir = out / "group"
    (gdir / "stats").mkdir(parents=True)
    group.to_csv(gdir / "brainage.tsv", sep="\t", index=False, na_rep="n/a")
    pd.DataFrame([{"analysis": "gap_summary", "term": "mean_gap[MS]", "estimate": 6.1,
                   "ci_low": 1.0, "ci_high": 11.2, "p_value": 0.00004, "n": 2, "model": "m-a",
                   "suffix": "T1w"}]).to_csv(gdir / "stats" / "gap_summary.tsv", sep="\t",
                                              index=False)
    pd.DataFrame([{"analysis": "psm", "term": "skipped", "estimate": None, "ci_low": None,
                   "ci_high": None, "p_value": None, "n": None,
                   "reason": "need two diagnoses with at least 10 participants each",
                   "model": "m-a", "suffix": "T1w"}]).to_csv(gdir / "stats" / "skipped.tsv",
                                                             sep="\t", index=False, na_rep="n/a")
    (gdir / "bias_correction.json").write_text(json.dumps({
        "method": "cole", "Formula": "predicted = slope * age + intercept",
        "ControlLabels": ["HC"], "fits": [{"model": "m-a", "suffix": "T1w", "status": "fitted",
                                           "n": 12, "slope": 0.8, "intercept": 9.5,
                                           "rows": ["sub-02"]}]}))
    from matplotlib.figure import Figure
    fig = Figure(figsize=(3, 2))
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    (gdir / "figures").mkdir()
    fig.savefig(gdir / "figures" / "roc_worsening_m-a_T1w_all.png")
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_outputs(tmp_path_factory.mktemp("reports"))


# ---------------------------------------------------------------------------------------------
# synthetic outputs
def test_find_scans_groups_files_per_scan(synthetic):
    scans = find_scans(synthetic, "sub-01")
    assert [(s.prefix, s.suffix) for s in scans] == [("sub-01", "T1w"), ("sub-01", "FLAIR")]
    t1 = scans[0]
    assert {"preproc", "mask", "lesion", "saliency", "brainage", "brainage_json",
            "agedist"} <= set(t1.files)
    # each modality has its own MNI brain mask: desc-brain (T1w), desc-flairbrain (FLAIR)
    assert t1.get("mask").name.endswith("_desc-brain_mask.nii.gz")
    assert scans[1].get("mask").name.endswith("_desc-flairbrain_mask.nii.gz")
    ses = find_scans(synthetic, "03")
    assert [s.session_id for s in ses] == ["ses-1", "ses-2"]
    crash = find_crash_files(synthetic, "sub-01")
    assert crash[0].node.endswith("ds_saliency")
    assert crash[0].lines[-1].startswith("OSError: disk quota")


def test_participant_report_synthetic(synthetic):
    report = write_participant_report(synthetic, "sub-01", run_id="20260101-000000_aaaa")
    assert report == synthetic / "sub-01.html"
    paths = assert_references_exist(report, min_images=9)
    figs = {p.name for p in (synthetic / "sub-01" / "figures").iterdir()}
    for name in ("sub-01_T1w_desc-registration.png", "sub-01_desc-template_mosaic.png",
                 "sub-01_T1w_desc-brainmask.png", "sub-01_T1w_desc-saliency.png",
                 "sub-01_T1w_desc-agedist.svg", "sub-01_T1w_desc-input.png",
                 "sub-01_FLAIR_desc-agedist.svg", "sub-01_FLAIR_desc-lesionfilled.png",
                 "sub-01_FLAIR_desc-lesionraw.png"):
        assert name in figs
        assert (synthetic / "sub-01" / "figures" / name).resolve() in paths
    html = report.read_text()
    assert "Lesion mask in magenta" in html
    assert "SmoothGrad saliency" in html
    # lesion filling: filled and raw on the same slices, and the lesion volume of the scan
    assert "Lesion filling" in html and "Lesion volume: <b>0.64 mL</b>" in html
    assert html.count("Lesion volume:") == 1  # only the FLAIR scan has a volume
    # flags from the table, and those the report evaluates from the same outputs
    for flag in ("age_outside_training_range", "mask_volume_implausible",
                 "predicted_age_sd_high", "lesion_filling_disagreement"):
        assert flag in html
        assert qc.FLAG_DESCRIPTIONS[flag][:30] in html
    assert "diagnosis: <b>MS</b>" in html
    assert "OSError: disk quota exceeded while writing saliency" in html
    assert "(this run)" in html
    # age distribution figure carries the curve of each soft-label model
    svg = (synthetic / "sub-01" / "figures" / "sub-01_T1w_desc-agedist.svg").read_text()
    assert "chronological age 45.0 y" in svg and "52.0 ± 30.0 y" in svg


def test_participant_report_of_failed_scans(synthetic):
    report = write_participant_report(synthetic, "02")
    assert_references_exist(report, min_images=2)
    html = report.read_text()
    assert "Missing outputs: brain-age table" in html
    assert "ValueError: brain mask is empty on the model grid" in html
    nothing = write_participant_report(synthetic, "sub-04")
    assert_references_exist(nothing, min_images=0)
    html = nothing.read_text()
    assert "No participant-level outputs were found" in html
    assert "the image is constant" in html


def test_stale_figures_are_removed(synthetic):
    stale = synthetic / "sub-03" / "figures" / "sub-03_ses-9_T1w_desc-registration.png"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"old")
    report = write_participant_report(synthetic, "sub-03")
    assert not stale.exists()
    html = report.read_text()
    assert "ses-1 T1w" in html and "ses-2 T1w" in html
    assert_references_exist(report, min_images=6)


def test_group_report_synthetic(synthetic):
    write_participant_report(synthetic, "sub-01")
    report = write_group_report(synthetic)
    assert report == synthetic / "group" / "report.html"
    paths = assert_references_exist(report, min_images=3)
    assert (synthetic / "group" / "figures" / "roc_worsening_m-a_T1w_all.png").resolve() in paths
    assert (synthetic / "sub-01.html").resolve() in paths
    html = report.read_text()
    assert "gap_summary" in html and "mean_gap[MS]" in html and "&lt; 0.0001" in html
    assert "need two diagnoses with at least 10 participants each" in html
    assert "synthetic controls; HC" in html and "4.20" in html  # model card
    for flag in ("lesion_filling_disagreement", "mask_volume_implausible",
                 "age_outside_training_range"):
        assert flag in html
    scatter = (synthetic / "group" / "report_figures" / "scatter_m-a_T1w.svg").read_text()
    assert "HC (n=2)" in scatter and "MS (n=1)" in scatter  # groups from participants.tsv
    gap = (synthetic / "group" / "report_figures" / "gap_m-a_T1w.svg").read_text()
    assert "by site" in gap


def test_write_reports_regenerates_everything(synthetic):
    written = write_reports(synthetic)
    names = sorted(p.name for p in written)
    assert names == ["report.html", "sub-01.html", "sub-02.html", "sub-03.html", "sub-04.html"]
    for p in written:
        assert_references_exist(p, min_images=0)
    only = write_reports(synthetic, ["03"])
    assert [p.name for p in only] == ["sub-03.html", "report.html"]


# ---------------------------------------------------------------------------------------------
# QC thresholds
def test_qc_thresholds():
    assert not qc.mask_volume_implausible(1100)
    assert qc.mask_volume_implausible(799) and qc.mask_volume_implausible(2001)
    assert not qc.mask_volume_implausible(None)
    assert qc.reference_sd({"test": {"mean_sd": 12.5}}) == 12.5
    assert qc.reference_sd({"validation": {"mean_sd": 4.0}}) == 4.0
    assert qc.reference_sd({}) is None
    assert qc.sd_threshold(12.5) == pytest.approx(18.75)
    assert qc.sd_threshold(None) == qc.SD_ABSOLUTE_MAX
    assert not qc.predicted_age_sd_high(18.0, 12.5)   # the highest IXI control SD
    assert qc.predicted_age_sd_high(19.0, 12.5)
    assert qc.predicted_age_sd_high(11.0, None) and not qc.predicted_age_sd_high(float("nan"))
    assert qc.scan_flags(predicted_age_sd=30, reference_sd=8, mask_volume_ml=500) == [
        "mask_volume_implausible", "predicted_age_sd_high"]
    rows = [{"model": "a", "predicted_age": 50.0, "lesion_filled": "false"},
            {"model": "a", "predicted_age": 54.5, "lesion_filled": "true"},
            {"model": "b", "predicted_age": 50.0, "lesion_filled": "false"},
            {"model": "b", "predicted_age": 54.3, "lesion_filled": "true"},
            {"model": "c", "predicted_age": 50.0, "lesion_filled": "false"}]
    assert qc.lesion_filling_flags(rows) == [["lesion_filling_disagreement"]] * 2 + [[]] * 3
    assert qc.split_flags("a;b") == ["a", "b"] and qc.split_flags(float("nan")) == []
    assert set(qc.QC_THRESHOLDS) == {"BrainMaskVolumeRange", "PredictedAgeSDFactor",
                                     "PredictedAgeSDMax", "EnsembleMemberSpreadMax",
                                     "LesionFillingMaxDifference"}


def test_ensemble_sd_has_its_own_threshold():
    """An ensemble of scalar members (SD = spread of their ages, ddof 0) is flagged when the
    members' spread exceeds 5 years, though it stays under the single-model 10-year cut."""
    def table(ages):
        sd = float(np.std(ages))  # the ensemble SD of scalar members: their population SD
        rows = [{"model": f"m{i}", "predicted_age": a, "predicted_age_sd": np.nan,
                 "lesion_filled": "false"} for i, a in enumerate(ages)]
        rows.append({"model": "ensemble", "predicted_age": float(np.mean(ages)),
                     "predicted_age_sd": sd, "lesion_filled": "false"})
        return pd.DataFrame(rows), sd

    members = {"ensemble": ["m0", "m1", "m2", "m3", "m4"]}
    wide, sd = table([40.0, 44.0, 50.0, 56.0, 60.0])
    assert 5.0 < sd < qc.SD_ABSOLUTE_MAX == 10.0
    flags = qc.evaluate_rows(wide, members=members)
    assert flags[-1] == ["predicted_age_sd_high"] and flags[:-1] == [[]] * 5
    narrow, sd = table([48.0, 49.0, 50.0, 51.0, 52.0])
    assert qc.evaluate_rows(narrow, members=members)[-1] == []
    # members with a reference SD: 1.5 x their mean reference
    assert qc.ensemble_sd_high(13.0, [50.0, 51.0], reference=8.0)
    assert not qc.ensemble_sd_high(11.0, [50.0, 51.0], reference=8.0)


def test_ensemble_sd_is_documented_as_ddof_0():
    from types import SimpleNamespace

    from brainage_bids.interfaces.predict import brainage_sidecar
    from brainage_bids.models.inference import ensemble

    spec = SimpleNamespace(shape=(2, 2, 2), voxel_size=2.0, image="brain",
                           normalisation="mask_mean")
    models = [SimpleNamespace(name=n, arch="irv2", sha256="0", modality="FLAIR", output="scalar",
                              input=spec, centres=None, card=None) for n in ("a", "b")]
    assert "ddof 0" in brainage_sidecar(models)["Ensemble"]["SD"]
    # the SD is the mixture SD: members without SD, ages 40 and 50 -> population SD 5
    assert ensemble([40.0, 50.0], [np.nan, np.nan])[1] == pytest.approx(5.0)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "ddof 0" in readme


# ---------------------------------------------------------------------------------------------
# the real datasets of ../shared/data with participant-level outputs written by the test
def test_reports_from_ms_dataset(tmp_path):
    """The 3 MS patients of ms-lesjak2018-mni (T1w and FLAIR rows, the FLAIR ones flagged
    low_registration; outputs written by the test): participant reports with the scans as
    acquired, and after the group level the group report."""
    bids = shared_dataset("ms-lesjak2018-mni")
    out = tmp_path / "out"
    write_participant_outputs(bids, out, {"T1w": ["ixi-sfcn-2mm"],
                                          "FLAIR": ["flair-brain-age-flair-e3"]},
                              images=True, flags={"FLAIR": "low_registration"})
    report = write_participant_report(out, "sub-patient07")
    paths = assert_references_exist(report, min_images=7)
    for name in ("sub-patient07_T1w_desc-input.png", "sub-patient07_FLAIR_desc-input.png",
                 "sub-patient07_T1w_desc-registration.png",
                 "sub-patient07_FLAIR_desc-brainmask.png", "sub-patient07_T1w_desc-agedist.svg"):
        assert (out / "sub-patient07" / "figures" / name).resolve() in paths, name
    html = report.read_text()
    assert "flair-brain-age-flair-e3" in html and "ixi-sfcn-2mm" in html
    assert "low_registration" in html
    assert "diagnosis: <b>MS</b>" in html  # participants.tsv of the real dataset
    from brainage_bids.stats.group import run_group_analyses
    from brainage_bids.stats.spec import load_spec

    run_group_analyses(bids, out, load_spec(None))
    written = write_reports(out)
    assert sorted(p.name for p in written) == ["report.html", "sub-patient07.html",
                                               "sub-patient19.html", "sub-patient26.html"]
    group = out / "group" / "report.html"
    assert_references_exist(group, min_images=2)
    html = group.read_text()
    assert "MS (n=3)" in (out / "group" / "report_figures" / "scatter_ixi-sfcn-2mm_T1w.svg"
                          ).read_text()
    assert "Analyses skipped" in html
    assert "IXI Hammersmith T1w" in html  # the default model's packaged card


def test_reports_from_longitudinal_dataset(tmp_path):
    """Two-session T1w outputs of ms-lesjak2016-longitudinal with an existing
    group/brainage.tsv (no stats)."""
    bids = shared_dataset("ms-lesjak2016-longitudinal")
    out = tmp_path / "out"
    rows = write_participant_outputs(bids, out, {"T1w": ["ixi-sfcn-2mm"]}, images=True,
                                     participants=["sub-patient01", "sub-patient12"])
    (out / "group").mkdir()
    rows.to_csv(out / "group" / "brainage.tsv", sep="\t", index=False, na_rep="n/a")
    written = write_reports(out, ["patient01"])
    assert [p.name for p in written] == ["sub-patient01.html", "report.html"]
    html = written[0].read_text()
    assert "ses-1 T1w" in html and "ses-2 T1w" in html
    assert_references_exist(written[0], min_images=6)
    assert_references_exist(written[1], min_images=1)


def test_lesion_slices_go_through_the_lesions():
    from brainage_bids.reports.figures import lesion_slices

    lesion = np.zeros((40, 50, 30), bool)
    lesion[10:13, 20:22, 5:7] = True  # 12 voxels
    lesion[30, 40, 25] = True  # 1 voxel
    pos = lesion_slices(lesion, n=3)
    for axis, chosen in enumerate(pos):
        assert chosen == sorted(chosen) and len(chosen) == 3
        for i in chosen:
            assert np.take(lesion, i, axis=axis).any(), (axis, i)
    assert 30 in pos[0] and 40 in pos[1] and 25 in pos[2]  # the small lesion is shown too
    # the largest lesion's slices are at least 2 apart
    assert pos[0][:2] == [10, 12]
    assert lesion_slices(np.zeros((8, 8, 8)), n=3) == [[4], [4], [4]]


def test_participant_report_shows_the_mae_next_to_every_age(tmp_path):
    """Each age row carries its model's MAE: the sidecar's (publisher's) for a published model,
    the model card's held-out test MAE for a model whose sidecar predates the MAE, n/a for an
    ensemble without a published one."""
    import re

    out = tmp_path / "out"
    anat = out / "sub-01" / "anat"
    src = "sub-01/anat/sub-01_FLAIR.nii.gz"
    write_rows(anat / "sub-01_desc-brainage_FLAIR.tsv", [
        row("sub-01", "flair-brain-age-densenet-flair", 45.0, 51.25, None, "FLAIR", src=src),
        row("sub-01", "m-a", 45.0, 47.5, 6.0, "FLAIR", src=src),
        row("sub-01", "ensemble", 45.0, 49.375, 3.0, "FLAIR", src=src)])
    meta = sidecar(["flair-brain-age-densenet-flair", "m-a"], ensemble=True)
    meta["MAE"] = {"flair-brain-age-densenet-flair": {
        "Value": 3.74, "Units": "year", "Source": "publisher",
        "TestSet": "FLAIR-Brain-Age held-out test set (n=174)"}, "m-a": None, "ensemble": None}
    (anat / "sub-01_desc-brainage_FLAIR.json").write_text(json.dumps(meta))
    card = out / "models" / "m-a" / "m-a_card.json"
    card.parent.mkdir(parents=True)
    card.write_text(json.dumps({"name": "m-a", "test": {"n": 10, "mae": 4.2}}))
    html = write_participant_report(out, "sub-01").read_text()

    def cells(model):  # every table row of this model: the cells after its name
        return [re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)
                for r in re.findall(r"<tr>(.*?)</tr>", html, re.S)
                if re.search(rf"<td>{re.escape(model)}</td>", r)]

    for model, age, mae, source in (
            ("flair-brain-age-densenet-flair", "51.25", "3.74", "publisher: FLAIR-Brain-Age"),
            ("m-a", "47.50", "4.20", "model card (held-out test): n=10"),
            ("ensemble", "49.38", "n/a", None)):
        rows = [c for c in cells(model) if f"<b>{age}</b>" in "".join(c)]
        assert len(rows) == 2, model  # the summary table and the scan's table
        for c in rows:
            i = next(k for k, v in enumerate(c) if f"<b>{age}</b>" in v)
            assert re.sub(r"<[^>]+>", "", c[i + 1]).strip() == mae, (model, c)
            if source:
                assert f'title="{source}' in c[i + 1]
    # the models table: the same MAE in its test MAE column
    listed = [c for c in cells("flair-brain-age-densenet-flair") if "sfcn" in c]
    assert len(listed) == 1 and "3.74" in listed[0]
