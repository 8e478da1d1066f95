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
