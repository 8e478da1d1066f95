"""Lesion masks from a BIDS derivatives dataset (``--lesion-masks DIR``), matched to input scans.

Accepted names (anywhere under ``DIR/sub-<l>/``)::

    sub-<l>[_ses-<l>][_acq-<l>][_ce-<l>][_rec-<l>][_run-<l>][_mod-<suffix>][_space-<x>]
        _label-lesion[_desc-<x>]_mask.nii[.gz]
    ... _desc-lesion_mask.nii[.gz]          (no label entity)

Matching: the mask's sub (and ses, acq, ce, rec, run where it has them) must equal the image's;
an entity the mask lacks matches any value (BIDS inheritance). ``mod-<suffix>``, or a ``space-``
that names a modality (``space-FLAIR``), restricts the mask to images of that suffix; a mask
without either applies to every modality of the session. Among several candidates the most
specific wins (more matching entities, then a modality-specific mask); an unresolved tie fails
that scan (its lesion node stops with a message naming the masks), not the run. A mask is in
the space of the image it was drawn on: masks whose ``space-`` names a standard template
(MNI..., fsaverage, ...) are rejected. A mask without voxels (none >= 0.5) is
reported and gives raw rows only; a mask that matches no selected image is reported.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from .bids import MODALITIES, BIDSInputError, Scan

LOG = logging.getLogger("brainage_bids.lesions")

#: Entities that must agree between a mask and its image when the mask has them.
MATCH_ENTITIES = ("ses", "acq", "ce", "rec", "run")
_NAME = re.compile(
    r"^sub-(?P<sub>[a-zA-Z0-9]+)(?P<rest>(?:_[a-z]+-[a-zA-Z0-9]+)*)_mask\.nii(?:\.gz)?$")
_TEMPLATE_SPACE = re.compile(r"^(MNI|ICBM|Talairach|fsaverage|fsLR|OASIS|NKI|UNC|Fischer|"
                             r"MNIColin|MNIPediatric|WHS)", re.IGNORECASE)
#: A voxel belongs to the lesion when its mask value is at least this (binary or probability).
THRESHOLD = 0.5


@dataclass(frozen=True)
class LesionMask:
    """One lesion mask file with its entities and size (on its own grid)."""

    path: str
    entities: tuple          # ((key, value), ...) as in the file name, without sub
    subject: str
    modality: str | None     # the suffix it is restricted to, or None for every modality
    n_voxels: int
    volume_ml: float
    error: str = ""          # set when the scan cannot use this mask (the scan then fails)

    def get(self, key: str) -> str | None:
        return dict(self.entities).get(key)

    @property
    def empty(self) -> bool:
        return self.n_voxels == 0


@dataclass
class LesionMatch:
    """Result of :func:`match_lesion_masks`."""

    by_scan: dict = field(default_factory=dict)     # scan.path -> LesionMask (non-empty only)
    empty: dict = field(default_factory=dict)       # scan.path -> LesionMask without voxels
    unmatched: list = field(default_factory=list)   # LesionMask matching no selected scan
    rejected: list = field(default_factory=list)    # (path, reason)
    ambiguous: dict = field(default_factory=dict)   # scan.path -> equally specific masks


def parse_mask_name(name: str) -> dict | None:
    """Entities of a lesion mask file name (``{"sub": ..., "ses": ..., ...}``), or None when the
    name is not a lesion mask (see the module docstring)."""
    m = _NAME.match(name)
    if not m:
        return None
    ents = {"sub": m["sub"]}
    for part in m["rest"].split("_")[1:]:
        key, value = part.split("-", 1)
        if key in ents:
            return None
        ents[key] = value
    if ents.get("label", "").lower() != "lesion" and not (
            "label" not in ents and ents.get("desc", "").lower() == "lesion"):
        return None
    return ents


def mask_size(path: str | Path) -> tuple[int, float]:
    """(voxels >= :data:`THRESHOLD`, their volume in mL) of a mask on its own grid."""
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: a lesion mask must be 3D, got shape {data.shape}")
    n = int(np.count_nonzero(np.nan_to_num(np.asarray(data, dtype=np.float32)) >= THRESHOLD))
    voxel_ml = float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0
    return n, n * voxel_ml


def find_lesion_masks(lesion_dir: str | Path) -> tuple[list[LesionMask], list[tuple]]:
    """Every lesion mask under ``lesion_dir/sub-*/`` and the files rejected, with the reason.

    Raises BIDSInputError (66) when ``lesion_dir`` is not a folder.
    """
    root = Path(lesion_dir)
    if not root.is_dir():
        raise BIDSInputError(f"--lesion-masks: folder not found: {root}", 66)
    desc = root / "dataset_description.json"
    if not desc.exists():
        LOG.warning("--lesion-masks %s has no dataset_description.json (expected a BIDS "
                    "derivatives dataset); reading its masks anyway", root)
    masks, rejected = [], []
    for path in sorted(root.glob("sub-*/**/*_mask.nii*")):
        ents = parse_mask_name(path.name)
        if ents is None:
            continue
        space = ents.get("space")
        if space and _TEMPLATE_SPACE.match(space):
            reason = (f"space-{space} is a template space; lesion masks must be in the space "
                      "of the image they were drawn on")
            rejected.append((str(path), reason))
            continue
        modality = ents.get("mod") or (space if space in MODALITIES else None)
        if modality is not None and modality not in MODALITIES:
            rejected.append((str(path), f"mod-{modality} is not one of {', '.join(MODALITIES)}"))
            continue
        try:
            n, vol = mask_size(path)
        except Exception as exc:  # unreadable or not 3D
            rejected.append((str(path), f"cannot read the mask ({type(exc).__name__}: {exc})"))
            continue
        entities = tuple((k, ents[k]) for k in MATCH_ENTITIES if k in ents)
        masks.append(LesionMask(str(path), entities, ents["sub"], modality, n, vol))
    return masks, rejected


def _specificity(mask: LesionMask) -> tuple[int, int]:
    return (len(mask.entities), int(mask.modality is not None))


def mask_matches(mask: LesionMask, scan: Scan) -> bool:
    """Whether ``mask`` applies to ``scan`` (see the module docstring)."""
    if mask.subject != scan.subject:
        return False
    if mask.modality is not None and mask.modality != scan.suffix:
        return False
    image = dict(scan.entities)
    return all(image.get(k) == v for k, v in mask.entities)


def match_lesion_masks(lesion_dir: str | Path, scans: list[Scan], *,
                       complete_selection: bool = True) -> LesionMatch:
    """Match the lesion masks of ``lesion_dir`` to ``scans`` and log what cannot be used.

    ``complete_selection``: the scans are the whole dataset (no participant or session filter),
    so a mask whose participant has no selected scan is reported as unmatched (else it was left
    out by the selection and is only logged at info level).

    When equally specific masks apply to one scan, the scan's entry carries an ``error`` (its
    lesion node fails with it, so that scan fails and the others run) and is listed in
    ``ambiguous``.
    """
    masks, rejected = find_lesion_masks(lesion_dir)
    result = LesionMatch(rejected=rejected)
    for path, reason in rejected:
        LOG.warning("lesion mask %s not used: %s", path, reason)
    used: set[str] = set()
    for scan in scans:
        cands = [m for m in masks if mask_matches(m, scan)]
        if not cands:
            continue
        best = max(_specificity(m) for m in cands)
        top = [m for m in cands if _specificity(m) == best]
        used.update(m.path for m in top)
        if len(top) > 1:
            msg = (f"{scan.relpath}: several lesion masks apply equally: "
                   f"{', '.join(m.path for m in top)} (add entities such as mod-{scan.suffix} "
                   "to tell them apart)")
            LOG.error("%s; this scan will fail", msg)
            result.ambiguous[scan.path] = top
            result.by_scan[scan.path] = replace(top[0], error=msg)
            continue
        mask = top[0]
        if mask.empty:
            result.empty[scan.path] = mask
            LOG.warning("lesion mask %s has no voxels (none >= %g): %s gets raw rows only",
                        mask.path, THRESHOLD, scan.relpath)
        else:
            result.by_scan[scan.path] = mask
            LOG.info("lesion mask %s -> %s (%.2f mL)", mask.path, scan.relpath, mask.volume_ml)
    subjects = {s.subject for s in scans}
    for mask in masks:
        if mask.path in used:
            continue
        result.unmatched.append(mask)
        if complete_selection or mask.subject in subjects:
            LOG.warning("lesion mask %s matches no selected image (sub-%s%s%s)", mask.path,
                        mask.subject, "".join(f"_{k}-{v}" for k, v in mask.entities),
                        f", {mask.modality} only" if mask.modality else "")
        else:
            LOG.info("lesion mask %s: participant not selected", mask.path)
    if scans and not result.by_scan and not result.empty:
        LOG.warning("--lesion-masks %s: no mask matches any selected image; no lesion filling",
                    lesion_dir)
    return result


def mask_on_grid(mask_file: str, reference_file: str, out_file: str,
                 source: str | None = None) -> dict:
    """Write ``mask_file`` as a binary uint8 mask on the grid of ``reference_file``.

    Same grid (shape and affine): thresholded at :data:`THRESHOLD` only. Otherwise resampled in
    world coordinates, trilinearly (with anti-aliasing when the reference voxels are larger),
    and thresholded at 0.5. Raises ValueError when the mask does not overlap the image, or when
    less than half of its volume falls inside the image's field of view. Returns
    ``{"resampled": bool, "volume_ml": volume on the reference grid, "fraction_kept": ...}``.
    """
    from .images import resample_to_grid

    mimg = nib.load(mask_file)
    ref = nib.load(reference_file)
    mdata = np.nan_to_num(np.asanyarray(mimg.dataobj).astype(np.float32))
    if mdata.ndim == 4 and mdata.shape[3] == 1:
        mdata = mdata[..., 0]
    binary = (mdata >= THRESHOLD).astype(np.float32)
    src_ml = float(binary.sum()) * abs(np.linalg.det(mimg.affine[:3, :3])) / 1000.0
    same = binary.shape == ref.shape[:3] and np.allclose(mimg.affine, ref.affine, atol=1e-4)
    if same:
        out = binary > 0
    else:
        out = resample_to_grid(nib.Nifti1Image(binary, mimg.affine), ref.affine, ref.shape[:3],
                               order=1) >= 0.5
    ref_voxel_ml = abs(np.linalg.det(ref.affine[:3, :3])) / 1000.0
    out_ml = float(out.sum()) * ref_voxel_ml
    fraction = out_ml / src_ml if src_ml > 0 else 0.0
    name = source or reference_file
    if src_ml > 0 and out_ml == 0:
        raise ValueError(f"lesion mask {mask_file} does not overlap {name} in world coordinates "
                         "(was it drawn on another image or in another space?)")
    if src_ml > 0 and fraction < 0.5:
        raise ValueError(f"lesion mask {mask_file}: only {100 * fraction:.0f} % of its volume "
                         f"falls inside {name} (is it in the space of that image?)")
    img = nib.Nifti1Image(out.astype(np.uint8), ref.affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, out_file)
    return {"resampled": bool(not same), "volume_ml": float(out_ml),
            "fraction_kept": float(fraction)}
