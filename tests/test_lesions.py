"""Lesion masks, lesion filling, raw and lesion-filled rows, and their agreement at group level.

Real data: the three RRMS patients of ../shared/data/ms-lesjak2018-mni (FLAIR and T1w on the FSL
MNI152 1 mm grid, expert lesion masks in derivatives/lesions); skipped when absent.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import SHARED, template_image
from scipy import ndimage, stats

from brainage_bids.interfaces.lesion_filling import LesionMaskOnGrid, fill_image, fill_lesions, nawm_mask
from brainage_bids.interfaces.predict import COLUMNS, CONTRACT_COLUMNS
from brainage_bids.utils.bids import BIDSInputError, Scan, collect_scans
from brainage_bids.utils.lesion_masks import (
    find_lesion_masks,
    mask_on_grid,
    match_lesion_masks,
    parse_mask_name,
)

MS = SHARED / "ms-lesjak2018-mni"
PATIENTS = ("patient07", "patient19", "patient26")
SPACE = "space-MNI152NLin2009aSym"


def _save(data, affine, path: Path, dtype=np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine), str(path))
    return path


def _identity_transform(path: Path) -> str:
    """An ANTs affine file of the identity (native grid already in MNI coordinates)."""
    import ants

    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    ants.write_transform(tx, str(path))
    return str(path)


def _scan(subject, suffix, session=None, **ents) -> Scan:
    pairs = (("sub", subject),) + ((("ses", session),) if session else ()) + tuple(ents.items())
    rel = f"sub-{subject}/anat/{'_'.join(f'{k}-{v}' for k, v in pairs)}_{suffix}.nii.gz"
    return Scan(path=f"/data/{rel}", relpath=rel, subject=subject, session=session,
                suffix=suffix, entities=pairs, age=40.0, sex="F")


# ---------------------------------------------------------------------------------------------
# discovery and matching
def test_parse_mask_name():
    assert parse_mask_name("sub-01_ses-A_label-lesion_mask.nii.gz") == {
        "sub": "01", "ses": "A", "label": "lesion"}
    assert parse_mask_name("sub-01_mod-FLAIR_space-orig_label-lesion_desc-manual_mask.nii")[
        "mod"] == "FLAIR"
    assert parse_mask_name("sub-01_desc-lesion_mask.nii.gz") == {"sub": "01", "desc": "lesion"}
    for other in ("sub-01_desc-brain_mask.nii.gz", "sub-01_label-WM_mask.nii.gz",
                  "sub-01_label-lesion_probseg.nii.gz", "sub-01_T1w.nii.gz"):
        assert parse_mask_name(other) is None, other


def test_match_masks_by_entities(tmp_path, caplog):
    aff = np.eye(4)
    full = np.zeros((8, 8, 8))
    full[2:4, 2:4, 2:4] = 1
    root = tmp_path / "lesions"
    (root / "dataset_description.json").parent.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "l", "DatasetType": "derivative"}')
    a = _save(full, aff, root / "sub-01/anat/sub-01_label-lesion_mask.nii.gz")
    b = _save(full, aff, root / "sub-02/ses-A/anat/sub-02_ses-A_mod-FLAIR_label-lesion_mask.nii.gz")
    c = _save(full, aff, root / "sub-02/ses-A/anat/sub-02_ses-A_label-lesion_mask.nii.gz")
    empty = _save(np.zeros((8, 8, 8)), aff,
                  root / "sub-02/ses-B/anat/sub-02_ses-B_desc-lesion_mask.nii.gz", np.uint8)
    acq = _save(full, aff, root / "sub-03/anat/sub-03_acq-3d_label-lesion_mask.nii.gz")
    orphan = _save(full, aff, root / "sub-09/anat/sub-09_label-lesion_mask.nii.gz")
    mni = _save(full, aff, root / "sub-01/anat/sub-01_space-MNI152NLin2009aSym_label-lesion_"
                               "mask.nii.gz")
    scans = [_scan("01", "T1w"), _scan("01", "FLAIR"),
             _scan("02", "T1w", "A"), _scan("02", "FLAIR", "A"), _scan("02", "T1w", "B"),
             _scan("03", "T1w", acq="3d"), _scan("03", "T1w", acq="2d")]
    with caplog.at_level(logging.INFO, logger="brainage_bids.lesions"):
        m = match_lesion_masks(root, scans)
    got = {s.relpath: Path(m.by_scan[s.path].path).name for s in scans if s.path in m.by_scan}
    assert got == {
        "sub-01/anat/sub-01_T1w.nii.gz": a.name,          # no modality entity: every modality
        "sub-01/anat/sub-01_FLAIR.nii.gz": a.name,
        "sub-02/anat/sub-02_ses-A_T1w.nii.gz": c.name,    # session mask for the T1w
        "sub-02/anat/sub-02_ses-A_FLAIR.nii.gz": b.name,  # the mod-FLAIR mask is more specific
        "sub-03/anat/sub-03_acq-3d_T1w.nii.gz": acq.name,  # acq-2d gets none
    }
    assert [Path(x.path).name for x in m.empty.values()] == [empty.name]
    assert m.by_scan[scans[0].path].volume_ml == pytest.approx(8 / 1000)
    assert [Path(x.path).name for x in m.unmatched] == [orphan.name]
    assert [Path(p).name for p, _ in m.rejected] == [mni.name]
    text = caplog.text
    assert empty.name in text and "no voxels" in text
    assert orphan.name in text and "matches no selected image" in text
    assert mni.name in text and "template space" in text
    # two masks equally specific for one image: those scans carry an error naming both (their
    # lesion node fails with it); the other scans are matched as before
    dup = _save(full, aff, root / "sub-01/anat/sub-01_desc-lesion_mask.nii.gz")
    caplog.clear()
    m2 = match_lesion_masks(root, scans)
    sub01 = {scans[0].path, scans[1].path}
    assert set(m2.ambiguous) == sub01
    for path in sub01:
        assert a.name in m2.by_scan[path].error and dup.name in m2.by_scan[path].error
    assert all(not m2.by_scan[s.path].error for s in scans[2:] if s.path in m2.by_scan)
    assert len(m2.by_scan) == len(m.by_scan)
    assert dup.name in caplog.text and "will fail" in caplog.text
    node = LesionMaskOnGrid(mask_file=str(a), reference=str(a),
                            error=m2.by_scan[scans[0].path].error)
    with pytest.raises(ValueError, match="several lesion masks apply equally"):
        node.run(cwd=str(tmp_path))
    with pytest.raises(BIDSInputError):
        find_lesion_masks(tmp_path / "missing")


def test_real_masks_match_every_scan(shared_data):
    bids = shared_data("ms-lesjak2018-mni")
    scans = collect_scans(bids, modalities=("T1w", "FLAIR"))
    m = match_lesion_masks(bids / "derivatives" / "lesions", scans)
    assert len(scans) == 6 and set(m.by_scan) == {s.path for s in scans}
    assert not m.unmatched and not m.empty and not m.rejected
    vols = {s.subject: round(m.by_scan[s.path].volume_ml, 3) for s in scans}
    assert vols == {"patient07": 1.3, "patient19": 49.769, "patient26": 8.227}


def test_mask_on_grid(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.zeros((20, 22, 18), np.uint8)
    mask[5:9, 6:12, 4:7] = 1
    mask[rng.random(mask.shape) > 0.995] = 1
    aff = np.array([[-1.0, 0, 0, 10], [0, 1, 0, -11], [0, 0, 1, -9], [0, 0, 0, 1]])  # LAS
    src = _save(mask, aff, tmp_path / "mask.nii.gz", np.uint8)
    # same grid: thresholded only
    ref = _save(rng.random(mask.shape), aff, tmp_path / "ref.nii.gz")
    info = mask_on_grid(str(src), str(ref), str(tmp_path / "a.nii.gz"))
    assert not info["resampled"]
    assert np.array_equal(np.asarray(nib.load(tmp_path / "a.nii.gz").dataobj), mask)
    # the same voxels reoriented to RAS (as the participant level validates inputs): exact
    ras = nib.as_closest_canonical(nib.Nifti1Image(rng.random(mask.shape).astype(np.float32),
                                                   aff))
    nib.save(ras, str(tmp_path / "ras.nii.gz"))
    mask_on_grid(str(src), str(tmp_path / "ras.nii.gz"), str(tmp_path / "b.nii.gz"))
    out = nib.load(tmp_path / "b.nii.gz")
    back = nib.as_closest_canonical(nib.Nifti1Image(mask, aff))
    assert np.array_equal(np.asarray(out.dataobj), np.asarray(back.dataobj))
    # a coarser grid over the same field of view: the volume is kept approximately
    coarse = aff.copy()
    coarse[:3, :3] *= 2
    _save(np.ones((10, 11, 9)), coarse, tmp_path / "coarse.nii.gz")
    info = mask_on_grid(str(src), str(tmp_path / "coarse.nii.gz"), str(tmp_path / "c.nii.gz"))
    assert info["resampled"] and 0.5 < info["fraction_kept"] < 1.5
    # elsewhere in the world: a clear error
    far = aff.copy()
    far[:3, 3] += 500
    _save(np.ones(mask.shape), far, tmp_path / "far.nii.gz")
    with pytest.raises(ValueError, match="does not overlap"):
        mask_on_grid(str(src), str(tmp_path / "far.nii.gz"), str(tmp_path / "d.nii.gz"),
                     source="sub-x_T1w.nii.gz")
    # only partly inside the image
    part = aff.copy()
    part[0, 3] -= 8
    _save(np.ones(mask.shape), part, tmp_path / "part.nii.gz")
    with pytest.raises(ValueError, match="falls inside"):
        mask_on_grid(str(src), str(tmp_path / "part.nii.gz"), str(tmp_path / "e.nii.gz"))


# ---------------------------------------------------------------------------------------------
# filling on synthetic images
def test_fill_lesions_draws_local_nawm_and_touches_nothing_else():
    """Two white-matter regions of different intensity; a bright lesion in the left one is
    filled with intensities of the left one's NAWM only, and no other voxel changes."""
    rng = np.random.default_rng(3)
    shape = (60, 40, 40)
    data = rng.normal(40.0, 3.0, shape).astype(np.float32)     # background "grey matter"
    wm = np.zeros(shape, bool)
    wm[5:25, 5:35, 5:35] = True                                 # left WM, mean 100
    wm[35:55, 5:35, 5:35] = True                                # right WM, mean 200
    data[5:25, 5:35, 5:35] = rng.normal(100.0, 5.0, (20, 30, 30))
    data[35:55, 5:35, 5:35] = rng.normal(200.0, 5.0, (20, 30, 30))
    ijk = np.indices(shape)
    lesion = ((ijk - np.array([15, 20, 20])[:, None, None, None]) ** 2).sum(0) <= 16
    data[lesion] = 400.0 + rng.normal(0, 10, lesion.sum())     # bright blob
    nawm = nawm_mask(wm.astype(np.float32), np.ones(shape), lesion)
    assert not (nawm & ndimage.binary_dilation(lesion, np.ones((3, 3, 3)))).any()
    filled, info = fill_lesions(data, lesion, nawm, (1, 1, 1), seed=7)
    assert np.array_equal(filled[~lesion], data[~lesion])       # bit-identical elsewhere
    assert filled.dtype == data.dtype
    vals = filled[lesion]
    assert np.isin(vals, data[nawm]).all()                      # drawn from NAWM voxels
    left = data[nawm & (ijk[0] < 30)]
    assert vals.min() >= left.min() and vals.max() <= left.max()
    assert abs(vals.mean() - left.mean()) < left.std()
    assert info["LesionComponents"] == 1 and info["FilledVoxels"] == int(lesion.sum())
    again, _ = fill_lesions(data, lesion, nawm, (1, 1, 1), seed=7)
    other, _ = fill_lesions(data, lesion, nawm, (1, 1, 1), seed=8)
    assert np.array_equal(again, filled) and not np.array_equal(other, filled)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """The 2 mm MNI template as a T1w 'patient' (already in MNI coordinates: identity
    transform) with a bright 6 mm blob in deep white matter, filled by :func:`fill_image`."""
    from brainage_bids.interfaces.lesion_filling import prior_files

    tmp = tmp_path_factory.mktemp("phantom")
    img = template_image(2, scale=1000.0)
    data = img.get_fdata(dtype=np.float32)
    brain = ndimage.binary_fill_holes(data > 0.05 * data.max())
    from brainage_bids.utils.images import resample_to_grid

    wm_prior = resample_to_grid(nib.load(prior_files()[1]), img.affine, data.shape) / 255.0
    deep = ndimage.distance_transform_edt(wm_prior > 0.9)
    centre = np.unravel_index(np.argmax(deep), deep.shape)
    ijk = np.indices(data.shape)
    lesion = ((ijk - np.array(centre)[:, None, None, None]) ** 2).sum(0) <= 9
    assert deep[centre] >= 4 and wm_prior[lesion].min() > 0.5
    data = np.where(brain, data, 0).astype(np.float32)
    data[lesion] = 3.0 * data.max()
    paths = {k: tmp / f"{k}.nii.gz" for k in ("in", "mask", "lesion", "out", "nawm", "again")}
    _save(data, img.affine, paths["in"])
    _save(brain, img.affine, paths["mask"], np.uint8)
    _save(lesion, img.affine, paths["lesion"], np.uint8)
    xfm = _identity_transform(tmp / "identity.mat")
    report = fill_image(str(paths["in"]), str(paths["mask"]), str(paths["lesion"]), xfm,
                        str(paths["out"]), out_nawm=str(paths["nawm"]))
    return dict(data=data, lesion=lesion, brain=brain, paths=paths, report=report, xfm=xfm)


def test_fill_image_synthetic_lesion(phantom):
    data, lesion = phantom["data"], phantom["lesion"]
    filled = nib.load(phantom["paths"]["out"]).get_fdata(dtype=np.float32)
    nawm = np.asarray(nib.load(phantom["paths"]["nawm"]).dataobj) > 0
    assert np.array_equal(filled[~lesion], data[~lesion])       # exact equality outside
    vals = filled[lesion]
    assert vals.max() < data[lesion].min()                      # no lesion intensity is left
    assert np.isin(vals, data[nawm]).all()                      # every value a NAWM voxel's
    p1, p99 = np.percentile(data[nawm], [1, 99])
    assert np.mean((vals >= p1) & (vals <= p99)) >= 0.9
    assert abs(vals.mean() - data[nawm].mean()) < data[nawm].std()
    rep = phantom["report"]["LesionFilling"]
    means = rep["WhiteMatter"]["ClassMeans"]
    assert means["WM"] > means["GM"] > means["CSF"]             # T1w: WM is the bright class
    assert rep["FilledVoxels"] == int(lesion.sum())
    assert rep["NativeIntensities"]["LesionFilled"]["Mean"] == pytest.approx(float(vals.mean()))


def test_fill_image_is_reproducible(phantom):
    p = phantom["paths"]
    fill_image(str(p["in"]), str(p["mask"]), str(p["lesion"]), phantom["xfm"], str(p["again"]))
    assert np.array_equal(nib.load(p["again"]).get_fdata(), nib.load(p["out"]).get_fdata())


# ---------------------------------------------------------------------------------------------
# filling on the real patients
@pytest.fixture(scope="module")
def real_fills(tmp_path_factory):
    """Each patient's T1w filled with its expert mask (the images are brain-extracted,
    N4-corrected and on the MNI grid: brain mask = filled non-zero voxels, identity transform
    for the tissue priors)."""
    if not MS.is_dir():
        pytest.skip(f"../shared/data not present ({MS} missing)")
    tmp = tmp_path_factory.mktemp("real_fill")
    xfm = _identity_transform(tmp / "identity.mat")
    out = {}
    for pid in PATIENTS:
        src = MS / f"sub-{pid}" / "anat" / f"sub-{pid}_T1w.nii.gz"
        img = nib.load(str(src))
        data = img.get_fdata(dtype=np.float32)
        brain = ndimage.binary_fill_holes(data > 0)
        mask = _save(brain, img.affine, tmp / f"{pid}_mask.nii.gz", np.uint8)
        lesion = tmp / f"{pid}_lesion.nii.gz"
        mask_on_grid(str(MS / "derivatives" / "lesions" / f"sub-{pid}" / "anat"
                         / f"sub-{pid}_label-lesion_mask.nii.gz"), str(src), str(lesion))
        filled, nawm = tmp / f"{pid}_filled.nii.gz", tmp / f"{pid}_nawm.nii.gz"
        report = fill_image(str(src), str(mask), str(lesion), xfm, str(filled),
                            out_nawm=str(nawm), threads=2)
        out[pid] = dict(raw=data, filled=nib.load(str(filled)).get_fdata(dtype=np.float32),
                        lesion=np.asarray(nib.load(str(lesion)).dataobj) > 0, brain=brain,
                        nawm=np.asarray(nib.load(str(nawm)).dataobj) > 0, report=report)
    return out


@pytest.mark.parametrize("pid", PATIENTS)
def test_real_filling_changes_lesion_voxels_only(real_fills, pid):
    r = real_fills[pid]
    changed = r["raw"] != r["filled"]
    assert not (changed & ~r["lesion"]).any()
    inside = r["lesion"] & r["brain"]
    assert changed[inside].mean() > 0.95      # (a draw can equal the voxel's own value)


@pytest.mark.parametrize("pid", PATIENTS)
def test_real_filled_intensities_within_nawm(real_fills, pid):
    r = real_fills[pid]
    inside = r["lesion"] & r["brain"]
    vals = r["filled"][inside]
    ref = r["raw"][r["nawm"]]
    assert ref.size > 20000                   # >= 20 mL of NAWM
    p1, p99 = np.percentile(ref, [1, 99])
    assert np.mean((vals >= p1) & (vals <= p99)) >= 0.95
    assert abs(vals.mean() - ref.mean()) < ref.std()
    assert np.isin(vals, ref).all()
    # T1w lesions are darker than NAWM; filling lifts them to NAWM intensities
    assert r["raw"][inside].mean() < vals.mean()
    stats_ = r["report"]["LesionFilling"]["NativeIntensities"]
    assert stats_["NAWM"]["N"] == ref.size


# ---------------------------------------------------------------------------------------------
# one real participant through the command line
@pytest.fixture(scope="module")
def participant_run(tmp_path_factory):
    if not MS.is_dir():
        pytest.skip(f"../shared/data not present ({MS} missing)")
    from brainage_bids.cli.run import main

    root = tmp_path_factory.mktemp("ms_run")
    out, work = root / "out", root / "work"
    code = main([str(MS), str(out), "participant", "--participant-label", "patient07",
                 "--skull-strip", "none", "--modalities", "T1w", "--lesion-masks",
                 str(MS / "derivatives" / "lesions"), "--nprocs", "2", "--omp-nthreads", "2",
                 "--device", "cpu", "-w", str(work)])
    return code, out


def test_participant_raw_and_filled_rows(participant_run):
    code, out = participant_run
    assert code == 0
    anat = out / "sub-patient07" / "anat"
    table = pd.read_csv(anat / "sub-patient07_desc-brainage_T1w.tsv", sep="\t", dtype=str)
    assert list(table.columns) == list(COLUMNS)
    assert list(table.columns[:len(CONTRACT_COLUMNS)]) == list(CONTRACT_COLUMNS)
    # one raw and one lesion-filled row per model (the default T1w ensemble's members and
    # its ensemble row)
    per_model = table.groupby("model")["lesion_filled"].apply(sorted)
    assert per_model.map(lambda v: v == ["false", "true"]).all() and "ensemble" in per_model
    assert (table["lesion_volume_ml"].astype(float) == 1.3).all()
    ens = table[table["model"] == "ensemble"].set_index("lesion_filled")["predicted_age"].astype(float)
    assert np.isfinite(table["predicted_age"].astype(float)).all()
    assert abs(ens["true"] - ens["false"]) < 4.4  # small lesion load
    assert not table["qc_flags"].str.contains("lesion_filling_disagreement").any()
    meta = json.loads((anat / "sub-patient07_desc-brainage_T1w.json").read_text())
    assert meta["lesion_volume_ml"]["Units"] == "mL" and "LesionFilling" in meta


def test_participant_filled_image_and_lesion_mask(participant_run):
    _, out = participant_run
    anat = out / "sub-patient07" / "anat"
    pre = nib.load(anat / f"sub-patient07_{SPACE}_desc-preproc_T1w.nii.gz").get_fdata()
    fil = nib.load(anat / f"sub-patient07_{SPACE}_desc-lesionfilled_T1w.nii.gz").get_fdata()
    les = np.asarray(nib.load(anat / f"sub-patient07_{SPACE}_desc-lesion_mask.nii.gz").dataobj)
    brain = np.asarray(nib.load(anat / f"sub-patient07_{SPACE}_desc-brain_mask.nii.gz").dataobj)
    assert pre.shape == fil.shape == les.shape
    # the affine scales lesions as it scales the brain (1.3 mL natively)
    meta = json.loads((anat / "sub-patient07_desc-brainage_T1w.json").read_text())
    scale = (brain > 0).sum() / 1000 / meta["BrainMaskVolume"]["Value"]
    assert 0.7 * scale < les.sum() / 1000 / 1.3 < 1.2 * scale
    assert fil[brain > 0].mean() == pytest.approx(1.0, abs=1e-3)
    # same transform and mask: outside the (interpolation-widened) lesions the two images differ
    # only by the normalisation factor
    near = ndimage.binary_dilation(les > 0, np.ones((3, 3, 3)), iterations=3)
    far = (brain > 0) & ~near
    ratio = np.median(fil[far & (pre > 0)] / pre[far & (pre > 0)])
    np.testing.assert_allclose(fil[far], ratio * pre[far], rtol=1e-4, atol=1e-6)
    assert abs(ratio - 1) < 0.01
    assert np.abs(fil[les > 0] - pre[les > 0]).mean() > 0.05
    side = json.loads((anat / f"sub-patient07_{SPACE}_desc-lesionfilled_T1w.json").read_text())
    stats_ = side["LesionFilling"]["NativeIntensities"]
    assert stats_["LesionFilled"]["N"] == 1300
    assert abs(stats_["LesionFilled"]["Mean"] - stats_["NAWM"]["Mean"]) < stats_["NAWM"]["SD"]


def test_participant_report_shows_lesion_overlay(participant_run):
    from brainage_bids.cli.run import main

    _, out = participant_run
    html = out / "sub-patient07.html"
    assert "Lesion mask in magenta" in html.read_text()
    html.unlink()
    assert main([str(MS), str(out), "participant", "--reports-only", "--participant-label",
                 "patient07"]) == 0
    text = html.read_text()
    assert "Lesion mask in magenta" in text and "lesion-filled" in text.lower()


# ---------------------------------------------------------------------------------------------
# group level: agreement of raw and filled brain age
def _cohort(root: Path, n: int, mean_diff: float, sd_diff: float, filled: bool = True):
    """Participant tables of n MS patients, T1w raw rows and (``filled``) lesion-filled rows
    whose differences have exactly ``mean_diff`` and ``sd_diff``."""
    rng = np.random.default_rng(11)
    bids, out = root / "bids", root / "out"
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "s", "BIDSVersion": "1.9.0"}')
    z = rng.normal(size=n)
    z = (z - z.mean()) / z.std(ddof=1)
    diffs = mean_diff + sd_diff * z
    raw = rng.uniform(30, 70, n)
    lines = ["participant_id\tage\tsex\tdiagnosis"]
    for i in range(n):
        pid = f"sub-ms{i:02d}"
        age = 40.0
        lines.append(f"{pid}\t{age}\tF\tMS")
        anat = out / pid / "anat"
        anat.mkdir(parents=True)
        rows = []
        for f, pred in ((False, raw[i]), (True, raw[i] + diffs[i]))[:2 if filled else 1]:
            rows.append({"participant_id": pid, "session_id": None,
                         "source_file": f"{pid}/anat/{pid}_T1w.nii.gz", "suffix": "T1w",
                         "model": "m1", "chronological_age": age, "predicted_age": pred,
                         "predicted_age_sd": 3.0, "brain_age_gap": pred - age,
                         "lesion_filled": "true" if f else "false", "qc_flags": None,
                         "lesion_volume_ml": 5.0})
        pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(
            anat / f"{pid}_desc-brainage_T1w.tsv", sep="\t", index=False, na_rep="n/a")
    (bids / "participants.tsv").write_text("\n".join(lines) + "\n")
    return bids, out, raw, raw + diffs


def test_group_bland_altman(tmp_path):
    from brainage_bids.stats.group import run_group_analyses
    from brainage_bids.stats.spec import validate_spec

    n = 40
    bids, out, raw, filled = _cohort(tmp_path, n, 0.28, 2.11)
    summary = run_group_analyses(bids, out, validate_spec({}))
    tab = pd.read_csv(out / "group" / "stats" / "lesion_filling_agreement.tsv", sep="\t",
                      na_values=["n/a"], keep_default_na=False).set_index("term")
    assert set(tab["model"]) == {"m1"} and set(tab["suffix"]) == {"T1w"}
    assert (tab["n"] == n).all()
    t = stats.t.ppf(0.975, n - 1)
    se_loa = np.sqrt(3 * 2.11 ** 2 / n)
    assert tab.loc["mean_difference", "estimate"] == pytest.approx(0.28, abs=1e-3)
    assert tab.loc["mean_difference", "ci_low"] == pytest.approx(0.28 - t * 2.11 / np.sqrt(n),
                                                                 abs=1e-3)
    assert tab.loc["sd_difference", "estimate"] == pytest.approx(2.11, abs=1e-3)
    for term, limit in (("loa_lower", 0.28 - 1.96 * 2.11), ("loa_upper", 0.28 + 1.96 * 2.11)):
        assert tab.loc[term, "estimate"] == pytest.approx(limit, abs=1e-3)
        assert tab.loc[term, "ci_low"] == pytest.approx(limit - t * se_loa, abs=1e-3)
        assert tab.loc[term, "ci_high"] == pytest.approx(limit + t * se_loa, abs=1e-3)
    r = np.corrcoef(raw, filled)[0, 1]
    assert tab.loc["pearson_r", "estimate"] == pytest.approx(r, abs=1e-4)
    assert tab.loc["r_squared", "estimate"] == pytest.approx(r ** 2, abs=1e-4)
    assert tab.loc["pearson_r", "ci_low"] < r < tab.loc["pearson_r", "ci_high"]
    assert tab.loc["mean_difference", "p_value"] == pytest.approx(
        stats.ttest_rel(filled, raw).pvalue, rel=1e-3)
    fig = out / "group" / "figures" / "lesion_agreement_m1_T1w.png"
    assert fig.exists() and fig.stat().st_size > 5000 and str(fig) in summary["figures"]
    assert "lesion_filling_agreement" not in {s["analysis"] for s in summary["skipped"]}
    group = pd.read_csv(out / "group" / "brainage.tsv", sep="\t")
    assert (group["lesion_volume_ml"] == 5.0).all()


def test_group_agreement_skipped_without_filled_rows(tmp_path):
    from brainage_bids.stats.group import run_group_analyses
    from brainage_bids.stats.spec import validate_spec

    bids, out, _, _ = _cohort(tmp_path, 5, 0.0, 1.0, filled=False)
    summary = run_group_analyses(bids, out, validate_spec({}))
    skipped = {s["analysis"]: s["reason"] for s in summary["skipped"]}
    assert "no lesion-filled rows" in skipped["lesion_filling_agreement"]
    assert not (out / "group" / "stats" / "lesion_filling_agreement.tsv").exists()
    table = pd.read_csv(out / "group" / "stats" / "skipped.tsv", sep="\t")
    assert "lesion_filling_agreement" in set(table["analysis"])


# ---------------------------------------------------------------------------------------------
# workflow graph and command line
def test_graph_with_lesion_masks(synthetic_bids, tmp_path, random_model):
    from brainage_bids.models.zoo import resolve_request
    from brainage_bids.utils.lesion_masks import LesionMask
    from brainage_bids.utils.templates import get_template
    from brainage_bids.workflows.outputs import derivative_paths
    from brainage_bids.workflows.participant import init_brainage_wf

    tpl = get_template()
    scans = collect_scans(synthetic_bids, participant_labels=["01", "02", "03"])
    files = [_save(np.zeros((4, 4, 4)), np.eye(4), tmp_path / f"sub-0{i}_label-lesion_mask.nii.gz")
             for i in (1, 2)]
    lesions = {scans[0].path: LesionMask(str(files[0]), (), "01", None, 10, 0.08),
               scans[1].path: LesionMask(str(files[1]), (), "02", None, 0, 0.0)}
    # sub-03: an ambiguous match; its scan's lesion node carries the error and fails with it
    lesions[scans[2].path] = LesionMask(str(files[1]), (), "03", None, 10, 0.08,
                                        error="two masks apply")
    wf = init_brainage_wf(scans=scans, output_dir=str(tmp_path / "out"),
                          work_dir=str(tmp_path / "w"), run_id="20240101-120000_abcdef12",
                          template=str(tpl.brain), template_mask=str(tpl.mask),
                          models=[resolve_request(str(random_model))], skull_strip="none",
                          lesion_masks=lesions)
    graph = wf._create_flat_graph()
    nodes = {n.fullname: n for n in graph.nodes()}
    filled = "brainage_wf.single_subject_01_wf.scan_sub_01_T1w"
    empty = "brainage_wf.single_subject_02_wf.scan_sub_02_T1w"
    for n in ("preproc_wf.lesion_on_grid", "preproc_wf.fill_lesions", "preproc_wf.lesion_to_mni",
              "ds_lesion_wf.ds_filled", "ds_lesion_wf.ds_lesion"):
        assert f"{filled}.{n}" in nodes and f"{empty}.{n}" not in nodes
    paths = derivative_paths(scans[0], str(tmp_path / "out"))
    assert nodes[f"{filled}.ds_lesion_wf.ds_filled"].inputs.out_path == paths["filled"]
    assert paths["filled"].endswith("sub-01_space-MNI152NLin2009aSym_desc-lesionfilled_T1w.nii.gz")
    assert paths["lesion"].endswith("sub-01_space-MNI152NLin2009aSym_desc-lesion_mask.nii.gz")
    edges = {(u.fullname, v.fullname): d["connect"] for u, v, d in graph.edges(data=True)}
    for src, dst, conn in [
            ("preproc_wf.validate", "preproc_wf.lesion_on_grid", ("out_file", "reference")),
            ("preproc_wf.n4", "preproc_wf.fill_lesions", ("out_file", "in_file")),
            ("preproc_wf.register", "preproc_wf.fill_lesions", ("out_transform", "transform")),
            ("preproc_wf.register", "preproc_wf.lesion_to_mni", ("out_mask", "mni_mask")),
            ("preproc_wf.lesion_to_mni", "preproc_wf.outputnode", ("filled", "filled")),
            ("preproc_wf.outputnode", "predict_wf.inputnode", ("filled", "filled")),
            ("predict_wf.inputnode", "predict_wf.predict", ("filled", "filled_file")),
            ("preproc_wf.outputnode", "ds_lesion_wf.inputnode", ("lesion", "lesion"))]:
        assert conn in edges[(f"{filled}.{src}", f"{filled}.{dst}")], (src, dst, conn)
    assert nodes[f"{filled}.predict_wf.predict"].inputs.lesion_volume_ml == 0.08
    assert not nodes[f"{filled}.preproc_wf.lesion_on_grid"].inputs.error
    errors = [n.inputs.error for name, n in nodes.items() if name.endswith("lesion_on_grid")
              and n.inputs.error]
    assert [s.subject for s in scans] == ["01", "02", "03"] and errors == ["two masks apply"]
    assert nodes[f"{empty}.predict_wf.predict"].inputs.lesion_volume_ml == 0.0
    flair = Scan(**{**scans[0].__dict__, "suffix": "FLAIR"})
    fp = derivative_paths(flair, str(tmp_path / "out"))
    assert fp["lesion"].endswith("desc-flairlesion_mask.nii.gz")


def test_report_kinds_of_lesion_masks():
    from brainage_bids.reports.data import _kind

    assert _kind("lesion", "mask", "nii.gz") == ("lesion", "T1w")
    assert _kind("flairlesion", "mask", "nii.gz") == ("lesion", "FLAIR")
    assert _kind("lesionfilled", "FLAIR", "nii.gz") == ("filled", "FLAIR")


def test_cli_missing_lesion_folder(synthetic_bids, tmp_path, random_model):
    from brainage_bids.cli.run import main

    code = main([str(synthetic_bids), str(tmp_path / "out"), "participant", "--model",
                 str(random_model), "--lesion-masks", str(tmp_path / "nowhere"),
                 "-w", str(tmp_path / "w")])
    assert code == 66


def test_predict_age_raw_and_filled_rows(tmp_path, random_model):
    """Two models on a raw and a 'filled' MNI image: members and ensemble per condition, the
    lesion volume on every row, and lesion_filling_disagreement exactly where the rule says."""
    from brainage_bids.interfaces.predict import PredictAge
    from brainage_bids.reports.qc import LESION_FILLING_MAX_DIFF
    from brainage_bids.utils.templates import get_template

    tpl = get_template()
    img = nib.load(str(tpl.brain))
    data = img.get_fdata(dtype=np.float32)
    altered = data.copy()
    altered[: data.shape[0] // 2] *= 4.0          # a large change, so the ages move
    filled = _save(altered, img.affine, tmp_path / "filled.nii.gz")
    second = tmp_path / "second.pt"
    second.write_bytes(Path(random_model).read_bytes())
    node = PredictAge(model_files=[str(random_model), str(second)], model_names=["a", "b"],
                      preproc_file=str(tpl.brain), mask_file=str(tpl.mask),
                      filled_file=str(filled), lesion_volume_ml=12.5, participant_id="sub-01",
                      source_file="sub-01/anat/sub-01_T1w.nii.gz", suffix="T1w",
                      chronological_age=50.0, precision="fp32")
    res = node.run(cwd=str(tmp_path))
    rows = pd.read_csv(res.outputs.out_tsv, sep="\t", dtype=str, keep_default_na=False)
    assert list(rows.columns) == list(COLUMNS)
    assert list(zip(rows["model"], rows["lesion_filled"])) == [
        ("a", "false"), ("b", "false"), ("ensemble", "false"),
        ("a", "true"), ("b", "true"), ("ensemble", "true")]
    assert (rows["lesion_volume_ml"] == "12.5").all()
    ages = rows["predicted_age"].astype(float).to_numpy()
    assert ages[0] == pytest.approx(ages[1])       # the same weights under two names
    assert ages[0] != pytest.approx(ages[3], abs=1e-3)
    for i in range(3):
        disagree = abs(ages[i + 3] - ages[i]) > LESION_FILLING_MAX_DIFF
        for j in (i, i + 3):
            assert ("lesion_filling_disagreement" in rows["qc_flags"][j]) == disagree
    dist = pd.read_csv(res.outputs.out_distribution, sep="\t")
    assert sorted(dist["model"].unique()) == ["a", "b"]    # raw rows only
    assert res.outputs.predicted_age == pytest.approx(ages[2])
    meta = json.loads(Path(res.outputs.out_json).read_text())
    assert "LesionFilling" in meta


def test_add_lesion_filling_flags_keeps_existing_flags():
    from brainage_bids.interfaces.predict import add_lesion_filling_flags, brainage_row

    common = dict(participant_id="sub-01", session_id=None, source_file="x", suffix="T1w",
                  age=50.0, sd=3.0, lesion_volume_ml=4.0)
    rows = [brainage_row(model="a", predicted=50.0, flags=["low_registration"], **common),
            brainage_row(model="b", predicted=50.0, **common),
            brainage_row(model="a", predicted=55.0, lesion_filled=True,
                         flags=["low_registration"], **common),
            brainage_row(model="b", predicted=53.0, lesion_filled=True, **common)]
    add_lesion_filling_flags(rows)
    assert [r["qc_flags"] for r in rows] == [
        "low_registration;lesion_filling_disagreement", None,
        "low_registration;lesion_filling_disagreement", None]
    raw_only = [brainage_row(model="a", predicted=50.0, **common)]
    add_lesion_filling_flags(raw_only)
    assert raw_only[0]["qc_flags"] is None and raw_only[0]["lesion_volume_ml"] == 4.0


def test_real_filling_is_reproducible(tmp_path):
    """Atropos seeds from the clock unless told otherwise; the filling must not vary between
    runs (a slab of patient19's FLAIR, with its lesions)."""
    if not MS.is_dir():
        pytest.skip(f"../shared/data not present ({MS} missing)")
    img = nib.load(str(MS / "sub-patient19" / "anat" / "sub-patient19_FLAIR.nii.gz"))
    les = nib.load(str(MS / "derivatives" / "lesions" / "sub-patient19" / "anat"
                       / "sub-patient19_label-lesion_mask.nii.gz"))
    box = (slice(40, 140), slice(60, 160), slice(50, 110))
    img, les = img.slicer[box], les.slicer[box]
    data = img.get_fdata(dtype=np.float32)
    src = _save(data, img.affine, tmp_path / "in.nii.gz")
    mask = _save(ndimage.binary_fill_holes(data > 0), img.affine, tmp_path / "mask.nii.gz",
                 np.uint8)
    lesion = _save(np.asarray(les.dataobj) > 0, img.affine, tmp_path / "lesion.nii.gz", np.uint8)
    xfm = _identity_transform(tmp_path / "identity.mat")
    outs = []
    for k in range(2):
        out, nawm = tmp_path / f"filled{k}.nii.gz", tmp_path / f"nawm{k}.nii.gz"
        fill_image(str(src), str(mask), str(lesion), xfm, str(out), out_nawm=str(nawm),
                   threads=2 if k else 1)
        outs.append((nib.load(str(out)).get_fdata(), np.asarray(nib.load(str(nawm)).dataobj)))
    assert np.array_equal(outs[0][1], outs[1][1])
    assert np.array_equal(outs[0][0], outs[1][0])
    assert not np.array_equal(outs[0][0], data)
