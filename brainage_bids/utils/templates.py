"""The MNI152NLin2009aSym 1 mm brain template, found offline.

Lookup order: ``$TEMPLATEFLOW_HOME`` (default ``~/.cache/templateflow``) holding
``tpl-MNI152NLin2009aSym/tpl-MNI152NLin2009aSym_res-01_desc-brain_T1w.nii.gz`` (``res-1`` is accepted
too), else nilearn's bundled copy of the same template, written once into that cache in TemplateFlow
layout so later runs and containers find it. Nothing is downloaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .images import atomic_write_bytes

TEMPLATE = "MNI152NLin2009aSym"


@dataclass(frozen=True)
class TemplateFiles:
    brain: Path
    mask: Path
    source: str


def templateflow_home() -> Path:
    return Path(os.environ.get("TEMPLATEFLOW_HOME", Path.home() / ".cache" / "templateflow"))


def _cached(home: Path) -> TemplateFiles | None:
    folder = home / f"tpl-{TEMPLATE}"
    for res in ("01", "1"):
        brain = folder / f"tpl-{TEMPLATE}_res-{res}_desc-brain_T1w.nii.gz"
        mask = folder / f"tpl-{TEMPLATE}_res-{res}_desc-brain_mask.nii.gz"
        if brain.exists() and mask.exists():
            return TemplateFiles(brain, mask, f"TemplateFlow cache {folder}")
        whole = folder / f"tpl-{TEMPLATE}_res-{res}_T1w.nii.gz"
        if whole.exists() and mask.exists():
            return TemplateFiles(whole, mask, f"TemplateFlow cache {folder} (masked at use)")
    return None


def _nilearn_copy(home: Path) -> TemplateFiles:
    import nilearn

    src = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not src.exists():
        raise FileNotFoundError(
            f"template {TEMPLATE} not found: put tpl-{TEMPLATE}_res-01_desc-brain_T1w.nii.gz and "
            f"_res-01_desc-brain_mask.nii.gz under {home}/tpl-{TEMPLATE}/ (TEMPLATEFLOW_HOME), "
            "or install nilearn, which bundles it"
        )
    img = nib.load(str(src))
    data = np.asarray(img.dataobj, dtype=np.float32)
    mask = ndimage.binary_fill_holes(data > 0)
    brain_img = nib.Nifti1Image(data, img.affine)
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), img.affine)
    folder = home / f"tpl-{TEMPLATE}"
    brain = folder / f"tpl-{TEMPLATE}_res-01_desc-brain_T1w.nii.gz"
    mask_path = folder / f"tpl-{TEMPLATE}_res-01_desc-brain_mask.nii.gz"
    atomic_write_bytes(brain, _gz(brain_img))
    atomic_write_bytes(mask_path, _gz(mask_img))
    return TemplateFiles(brain, mask_path, f"nilearn {nilearn.__version__} bundled copy, cached in {folder}")


def _gz(img: nib.Nifti1Image) -> bytes:
    import gzip

    return gzip.compress(img.to_bytes(), compresslevel=6)


def get_template(home: str | os.PathLike | None = None) -> TemplateFiles:
    """Paths of the 1 mm brain template and its mask; see the module docstring for the lookup."""
    home = Path(home) if home is not None else templateflow_home()
    found = _cached(home)
    if found is not None:
        return found
    try:
        return _nilearn_copy(home)
    except PermissionError:
        # Read-only cache (e.g. a container): fall back to a per-user temporary cache.
        import tempfile

        return _nilearn_copy(Path(tempfile.gettempdir()) / "brainage-bids-templateflow")
