"""Shared fixtures: real data from ../shared/data when present, synthetic BIDS data, a random model.

Nothing here depends on the model shipped with the package: ``random_model`` writes a small, randomly
initialised SFCN checkpoint in our own format.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainage_bids.utils.images import rotation

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REFERENCE = SHARED.parent / "reference"
TESTS_DATA = Path(__file__).resolve().parent / "data"

RANDOM_MODEL_CHANNELS = [4, 8, 8, 16, 16, 8]
RANDOM_MODEL_BINS = [6, 90, 1]


def shared_dataset(name: str) -> Path:
    """Path of a dataset under ../shared/data; skips the test when it is not there."""
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"../shared/data not present ({path} missing)")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty model cache (``$BRAINAGE_BIDS_MODELS``) for the test."""
    from brainage_bids.models import zoo

    path = tmp_path / "cache"
    monkeypatch.setenv(zoo.CACHE_ENV, str(path))
    return path


@pytest.fixture
def shared_data():
    """Return :func:`shared_dataset` (skips when ../shared/data or the dataset is absent)."""
    return shared_dataset


def template_image(resolution: int = 2, degrees=(0.0, 0.0, 0.0), shift=(0.0, 0.0, 0.0),
                   scale: float = 1000.0) -> nib.Nifti1Image:
    """nilearn's bundled MNI152 2009 template (brain only) as float32, its affine moved in world
    space by a rotation (degrees about x, y, z) and then a shift (mm)."""
    from nilearn.datasets import load_mni152_template

    tpl = load_mni152_template(resolution=resolution)
    data = (np.asarray(tpl.get_fdata(), dtype=np.float32) * scale).astype(np.float32)
    move = rotation(degrees)
    move[:3, 3] = shift
    img = nib.Nifti1Image(data, move @ tpl.affine)
    img.header.set_xyzt_units("mm")
    return img


def write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    lines = ["\t".join(header)] + ["\t".join("n/a" if v is None else str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def make_bids(root: Path, subjects: dict | None = None, image: nib.Nifti1Image | None = None) -> Path:
    """Write a small BIDS dataset of template-derived T1w scans and return its root.

    ``subjects`` maps a label to ``{"age": float | None, "sex": str | None, "sessions": {label:
    age | None} | None}``. A subject with sessions gets ``sub-<l>_sessions.tsv`` with an ``age``
    column (``n/a`` where None) and one T1w per session.
    """
    if subjects is None:
        subjects = {"01": {"age": 31.5, "sex": "F"}, "02": {"age": 64.25, "sex": "M"}}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "synthetic template dataset", "BIDSVersion": "1.9.0", "DatasetType": "raw"}) + "\n")
    write_tsv(root / "participants.tsv", ["participant_id", "age", "sex"],
              [[f"sub-{lab}", s.get("age"), s.get("sex")] for lab, s in subjects.items()])
    for i, (label, spec) in enumerate(subjects.items()):
        img = image if image is not None else template_image(
            2, degrees=(3.0 * (i % 3), -2.0, 4.0), shift=(2.0 * i, -3.0, 1.5))
        sessions = spec.get("sessions")
        if sessions:
            (root / f"sub-{label}").mkdir(parents=True, exist_ok=True)
            write_tsv(root / f"sub-{label}" / f"sub-{label}_sessions.tsv", ["session_id", "age"],
                      [[f"ses-{ses}", age] for ses, age in sessions.items()])
            for ses in sessions:
                anat = root / f"sub-{label}" / f"ses-{ses}" / "anat"
                anat.mkdir(parents=True, exist_ok=True)
                nib.save(img, str(anat / f"sub-{label}_ses-{ses}_T1w.nii.gz"))
        else:
            anat = root / f"sub-{label}" / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            nib.save(img, str(anat / f"sub-{label}_T1w.nii.gz"))
    return root


def listing(root: Path) -> dict:
    """Every file under ``root`` with its size and modification time (to prove nothing changed)."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
        for f in filenames:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="session")
def synthetic_bids(tmp_path_factory) -> Path:
    """A read-only synthetic dataset: sub-01 (31.5 y), sub-02 (64.25 y), sub-03 (no age), and
    sub-04 with two sessions whose sessions.tsv gives an age for ses-A only."""
    root = tmp_path_factory.mktemp("synthetic") / "bids"
    make_bids(root, {
        "01": {"age": 31.5, "sex": "F"},
        "02": {"age": 64.25, "sex": "M"},
        "03": {"age": None, "sex": "F"},
        "04": {"age": 50.0, "sex": "M", "sessions": {"A": 52.75, "B": None}},
    })
    return root


@pytest.fixture
def make_dataset(tmp_path):
    """Factory writing a fresh (mutable) synthetic dataset under tmp_path."""
    def _make(subjects=None, name="bids", image=None):
        return make_bids(tmp_path / name, subjects, image)
    return _make


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Path:
    """A small randomly initialised SFCN in our checkpoint format (4 mm grid, 6-90 y bins)."""
    import torch

    from brainage_bids.models.checkpoint import InputSpec, build_sfcn, mni_box_grid, save_checkpoint

    torch.manual_seed(1234)
    config = {"channels": list(RANDOM_MODEL_CHANNELS), "bins": list(RANDOM_MODEL_BINS)}
    net = build_sfcn(config)
    affine, shape = mni_box_grid(4.0)
    spec = InputSpec(affine, shape, "mask_mean")
    path = tmp_path_factory.mktemp("model") / "random-sfcn.pt"
    save_checkpoint(path, net, "random-sfcn", config, spec, card={"age_range": [20, 80]})
    return path


# ---------------------------------------------------------------------------------------------
# participant-level outputs made by the tests (for the group level and the reports)
def _bids_ages(bids: Path) -> tuple[dict, dict]:
    """participants.tsv ages by participant and sessions.tsv ages by (participant, session)."""
    import pandas as pd

    read = dict(sep="\t", na_values=["n/a"], keep_default_na=False, dtype={"participant_id": str})
    p = pd.read_csv(bids / "participants.tsv", **read)
    ages = {r.participant_id: (None if pd.isna(r.age) else float(r.age)) for r in p.itertuples()}
    sessions = {}
    for f in bids.glob("sub-*/sub-*_sessions.tsv"):
        s = pd.read_csv(f, **read)
        pid = f.name.split("_")[0]
        if "age" in s:
            for r in s.itertuples():
                sessions[(pid, r.session_id)] = None if pd.isna(r.age) else float(r.age)
    return ages, sessions


def write_participant_outputs(bids: Path, out: Path, models: dict, participants=None,
                              images: bool = False, seed: int = 0, flags: dict | None = None):
    """Participant-level outputs in the output contract for the scans of a BIDS dataset, as the
    participant level writes them, without running it: for each ``<suffix>`` image of the chosen
    participants (all when None), one ``desc-brainage_<suffix>.tsv`` with a row per model of
    ``models[suffix]`` (predicted age = chronological age + a seeded offset), its JSON sidecar,
    and with ``images`` the MNI preproc image, brain mask and (bins models) age distribution made
    from nilearn's template. ``flags`` maps a suffix to the qc_flags of its rows. The
    chronological age is the session's age in sessions.tsv, else (no sessions) participants.tsv.
    Writes OUT/dataset_description.json pointing at ``bids``; returns the rows written."""
    import pandas as pd

    from brainage_bids.interfaces.predict import COLUMNS

    bids, out = Path(bids), Path(out)
    rng = np.random.default_rng(seed)
    ages, session_ages = _bids_ages(bids)
    keep = None if participants is None else set(participants)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "brainage-bids outputs", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "SourceDatasets": [{"URL": bids.resolve().as_uri()}]}))
    brain = mask = affine = None
    if images:
        tpl = template_image(resolution=2, scale=1.0)
        data = np.asarray(tpl.dataobj, dtype=np.float32)
        mask = data > 0.05 * data.max()
        brain = np.where(mask, data / data[mask].mean(), 0).astype(np.float32)
        affine = tpl.affine
    rows = []
    for src in sorted(bids.glob("sub-*/**/anat/sub-*.nii.gz")):
        stem = src.name[: -len(".nii.gz")]
        prefix, suffix = stem.rsplit("_", 1)
        pid = prefix.split("_")[0]
        if suffix not in models or (keep is not None and pid not in keep):
            continue
        ses = next((e for e in prefix.split("_") if e.startswith("ses-")), None)
        age = session_ages.get((pid, ses)) if ses else ages.get(pid)
        anat = out / src.parent.relative_to(bids)
        anat.mkdir(parents=True, exist_ok=True)
        scan_rows = []
        for name in models[suffix]:
            pred = round((age if age is not None else 50.0) + float(rng.normal(3.0, 4.0)), 4)
            scan_rows.append({
                "participant_id": pid, "session_id": ses,
                "source_file": src.relative_to(bids).as_posix(), "suffix": suffix, "model": name,
                "chronological_age": age, "predicted_age": pred, "predicted_age_sd": 6.0,
                "brain_age_gap": None if age is None else round(pred - age, 4),
                "lesion_filled": "false", "qc_flags": (flags or {}).get(suffix)})
        pd.DataFrame(scan_rows, columns=list(COLUMNS)).to_csv(
            anat / f"{prefix}_desc-brainage_{suffix}.tsv", sep="\t", index=False, na_rep="n/a")
        low = "low_registration" in str((flags or {}).get(suffix))
        (anat / f"{prefix}_desc-brainage_{suffix}.json").write_text(json.dumps({
            "Models": [{"Name": n, "Architecture": "sfcn", "Output": "bins", "Modality": suffix}
                       for n in models[suffix]],
            "RegistrationCorrelation": 0.6, "RegistrationMaskDice": 0.80 if low else 0.95,
            "BrainMaskVolume": {"Value": 1250.0, "Units": "mL"},
            "QCThresholds": {"RegistrationCorrelationMin": 0.35,
                             "RegistrationCorrelationApplies": ["T1w"],
                             "RegistrationMaskDiceMin": 0.85}}))
        if images:
            space = "space-MNI152NLin2009aSym"
            mdesc = "brain" if suffix == "T1w" else f"{suffix.lower()}brain"
            nib.save(nib.Nifti1Image(brain, affine),
                     str(anat / f"{prefix}_{space}_desc-preproc_{suffix}.nii.gz"))
            nib.save(nib.Nifti1Image(mask.astype(np.float32), affine),
                     str(anat / f"{prefix}_{space}_desc-{mdesc}_mask.nii.gz"))
            bins = np.arange(6.5, 90, 1.0)
            dist = [{"model": r["model"], "age": a, "probability": p}
                    for r in scan_rows
                    for a, p in zip(bins, np.exp(-0.5 * ((bins - r["predicted_age"]) / 6.0) ** 2)
                                    / (6.0 * np.sqrt(2 * np.pi)))]
            pd.DataFrame(dist).to_csv(anat / f"{prefix}_desc-agedist_{suffix}.tsv", sep="\t",
                                      index=False)
        rows += scan_rows
    return pd.DataFrame(rows, columns=list(COLUMNS))


# ---------------------------------------------------------------------------------------------
# a stand-in for FSL's MNI152 (TemplateFlow's MNI152NLin6Asym), for the published models' recipes
def write_fsl_template_stand_in(home: Path) -> Path:
    """A stand-in MNI152NLin6Asym res-1 in TemplateFlow's layout under ``home``: whole-head
    ``tpl-MNI152NLin6Asym_res-01_T1w.nii.gz`` and ``..._res-01_desc-brain_mask.nii.gz`` (no brain
    T1w: utils.templates derives it), on the FSL 182x218x182 world grid but stored in RAS voxel
    order (so the LAS model grid is reached through world space). The head is nilearn's
    MNI152NLin2009aSym brain plus a synthetic scalp (a shell 4-12 mm outside the brain)."""
    from nilearn.datasets import load_mni152_template
    from scipy import ndimage

    from brainage_bids.utils.images import resample_to_grid

    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-91.0, -126.0, -72.0]
    shape = (182, 218, 182)
    src = load_mni152_template(resolution=1)
    offset = np.linalg.solve(src.affine, affine)[:3, 3]  # the FSL grid's corner in src voxels
    if np.allclose(src.affine[:3, :3], np.eye(3)) and np.allclose(offset, np.round(offset)):
        i, j, k = (int(round(v)) for v in offset)  # an integer shift: slice, do not resample
        brain = np.asarray(src.dataobj, dtype=np.float32)[i:i + shape[0], j:j + shape[1],
                                                          k:k + shape[2]]
    else:
        brain = resample_to_grid(src, affine, shape, order=1)
    brain = (np.clip(brain, 0, None) * 1000.0).astype(np.float32)
    mask = ndimage.binary_fill_holes(brain > 0.05 * brain.max())
    distance = ndimage.distance_transform_edt(~mask)
    shell = (distance > 4) & (distance <= 12)
    head = brain.copy()
    head[shell] = 0.8 * float(np.percentile(brain[mask], 90))
    folder = Path(home) / "tpl-MNI152NLin6Asym"
    folder.mkdir(parents=True, exist_ok=True)
    (Path(home) / "dataset_description.json").write_text(
        '{"Name": "TemplateFlow", "BIDSVersion": "1.1.0"}')
    nib.save(nib.Nifti1Image(head, affine), str(folder / "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz"))
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine),
             str(folder / "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz"))
    return Path(home)
