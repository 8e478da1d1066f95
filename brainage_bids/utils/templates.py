"""Templates through the TemplateFlow client, read offline from ``$TEMPLATEFLOW_HOME``.

- ``MNI152NLin2009aSym`` (res-1) for our own models. When TemplateFlow does not hold it, nilearn's
  bundled copy of the same template stands in, written into a cache of our own
  (``$XDG_CACHE_HOME/brainage-bids/templates``), never into ``$TEMPLATEFLOW_HOME``.
- ``MNI152NLin6Asym`` (res-1, FSL's ``MNI152_T1_1mm``) for every published model; no stand-in.
  TemplateFlow stores it in RAS voxel order, FSL (and the publishers' arrays) with x flipped:
  copies in FSL's stored order (same world grid, voxels only reordered) go into our cache, so
  everything registered to it lands on the published models' grid as stored.

TemplateFlow's real layout has the whole head (``_T1w``) and ``desc-brain_mask`` for
MNI152NLin2009aSym but no brain image: the brain is then the head masked, written into our
cache. Files of size 0 are TemplateFlow's not-yet-fetched stubs and count as missing, so nothing
is downloaded; a missing template raises :class:`TemplateMissing` with the command that fetches
it on a connected machine.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .images import atomic_write_bytes

TEMPLATE = "MNI152NLin2009aSym"     # our models
FSL_TEMPLATE = "MNI152NLin6Asym"    # FSL MNI152_T1_1mm: the published models


class TemplateMissing(FileNotFoundError):
    """A template is not in the TemplateFlow cache; the message says how to fetch it."""


@dataclass(frozen=True)
class TemplateFiles:
    brain: Path
    mask: Path
    source: str
    head: Path | None = None
    name: str = TEMPLATE


def templateflow_home() -> Path:
    return Path(os.environ.get("TEMPLATEFLOW_HOME", Path.home() / ".cache" / "templateflow"))


def own_cache() -> Path:
    """Our template cache (derived brains, the nilearn stand-in); not TemplateFlow's."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "brainage-bids" / "templates"


def fetch_command(name: str, home: Path | None = None) -> str:
    """The one command that fetches a template's res-1 head, brain and mask into the cache."""
    home = home or templateflow_home()
    return (f"TEMPLATEFLOW_HOME={home} python -c \"from templateflow.api import get; "
            f"[get('{name}', resolution=1, suffix=s, desc=d) for s, d in "
            f"(('T1w', None), ('T1w', 'brain'), ('mask', 'brain'))]\"")


@lru_cache(maxsize=8)
def _client(home: Path):
    """A TemplateFlow client on ``home``; imported with ``$TEMPLATEFLOW_HOME`` pointing at that
    non-empty folder so the package's import-time set-up writes nothing anywhere."""
    old = os.environ.get("TEMPLATEFLOW_HOME")
    os.environ["TEMPLATEFLOW_HOME"] = str(home)
    try:
        from templateflow import TemplateFlowClient
    finally:
        if old is None:
            os.environ.pop("TEMPLATEFLOW_HOME", None)
        else:
            os.environ["TEMPLATEFLOW_HOME"] = old
    return TemplateFlowClient(root=home, autoupdate=False)


def _get(client, name: str, **query) -> Path | None:
    """One fetched (non-empty) file of ``name`` at res-1, through the client's ``get``; None when
    the cache lacks it or holds only TemplateFlow's empty stub (``get`` would go online)."""
    listed = [p for p in client.ls(name, resolution=1, extension=".nii.gz", **query)]
    if len(listed) != 1 or not listed[0].is_file() or listed[0].stat().st_size == 0:
        return None
    return Path(client.get(name, resolution=1, extension=".nii.gz", **query))


def _direct(home: Path, name: str, suffix: str, desc: str | None):
    """TemplateFlow's own file for the query, found by its name without indexing the cache:
    ``(True, path)``; ``(True, None)`` for the empty stub of a file not fetched, or for a name
    absent from a template folder without cohorts; None when the client must look (cohort
    folders, or the name there twice: ``res-1`` and ``res-01``). Building the client's index of
    the whole cache costs seconds at every run."""
    folder = home / f"tpl-{name}"
    stem = f"_desc-{desc}_{suffix}" if desc else f"_{suffix}"
    hits = [p for p in (folder / f"tpl-{name}_res-{r}{stem}.nii.gz" for r in ("1", "01"))
            if p.is_file()]
    if len(hits) > 1 or (not hits and any(p.is_dir() for p in folder.iterdir())):
        return None
    return True, (hits[0] if hits and hits[0].stat().st_size > 0 else None)


def _from_templateflow(name: str, home: Path) -> TemplateFiles | None:
    if not home.is_dir() or not (home / f"tpl-{name}").is_dir():
        return None
    queries = {"head": ("T1w", None), "brain": ("T1w", "brain"), "mask": ("mask", "brain")}
    direct = {k: _direct(home, name, *q) for k, q in queries.items()}
    if all(direct.values()):
        head, brain, mask = (direct[k][1] for k in ("head", "brain", "mask"))
    else:
        client = _client(home)
        head, brain, mask = (_get(client, name, suffix=q[0], desc=q[1])
                             for q in queries.values())
    if mask is None or (brain is None and head is None):
        return None
    source = f"TemplateFlow {home}"
    if brain is None:
        brain = _masked_head(name, head, mask)
        source += " (brain = head x desc-brain_mask)"
    return TemplateFiles(brain=brain, mask=mask, source=source, head=head, name=name)


def _masked_head(name: str, head: Path, mask: Path) -> Path:
    """The whole-head template masked by its brain mask, cached in our own folder."""
    key = hashlib.sha256()
    for p in (head, mask):
        st = p.stat()
        key.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    fname = f"{name}_res-1_brain-from-templateflow-{key.hexdigest()[:12]}.nii.gz"
    import tempfile

    for folder in (own_cache(), Path(tempfile.gettempdir()) / "brainage-bids-templates"):
        out = folder / fname
        if out.exists():
            return out
        img = nib.load(str(head))
        inside = np.asarray(nib.load(str(mask)).dataobj) > 0
        data = np.where(inside, np.asarray(img.dataobj, dtype=np.float32), 0).astype(np.float32)
        try:
            atomic_write_bytes(out, _gz(nib.Nifti1Image(data, img.affine)))
            return out
        except PermissionError:  # read-only home (containers): a per-user temporary cache
            continue
    raise PermissionError(f"cannot write the masked {name} template into {own_cache()} nor "
                          f"{tempfile.gettempdir()}")


def _in_fsl_order(tpl: TemplateFiles) -> TemplateFiles:
    """``tpl`` with every file stored on the FSL MNI152 1 mm grid (182x218x182, x flipped): files
    covering that world grid in another voxel order are reordered (no resampling) into our own
    cache; other files are used as they are."""
    from ..models.checkpoint import FSL_MNI_1MM_AFFINE, FSL_MNI_1MM_SHAPE

    target = np.asarray(FSL_MNI_1MM_AFFINE, dtype=float)
    paths = {}
    for key in ("brain", "mask", "head"):
        path = getattr(tpl, key)
        if path is None:
            paths[key] = None
            continue
        img = nib.load(str(path))
        if img.shape[:3] == FSL_MNI_1MM_SHAPE and np.allclose(img.affine, target, atol=1e-3):
            paths[key] = path
            continue
        ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                               nib.orientations.io_orientation(target))
        moved = img.as_reoriented(ornt)
        if moved.shape[:3] != FSL_MNI_1MM_SHAPE or not np.allclose(moved.affine, target,
                                                                    atol=1e-3):
            paths[key] = path  # not the FSL grid in any voxel order: used as it is
            continue
        paths[key] = _cached_copy(path, f"fsl-order_{Path(path).name}",
                                  nib.Nifti1Image(np.asarray(moved.dataobj), target, img.header))
    return TemplateFiles(brain=paths["brain"], mask=paths["mask"], head=paths["head"],
                         name=tpl.name, source=tpl.source + " (voxels in FSL's stored order)")


def _cached_copy(src: Path, fname: str, img: nib.Nifti1Image) -> Path:
    """``img`` (derived from ``src``) in our own cache, keyed by ``src``'s path, size and time."""
    import tempfile

    st = Path(src).stat()
    key = hashlib.sha256(f"{Path(src).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    name = fname.replace(".nii.gz", f"-{key.hexdigest()[:12]}.nii.gz")
    for folder in (own_cache(), Path(tempfile.gettempdir()) / "brainage-bids-templates"):
        out = folder / name
        if out.exists():
            return out
        try:
            atomic_write_bytes(out, _gz(img))
            return out
        except PermissionError:
            continue
    raise PermissionError(f"cannot write {name} into {own_cache()} nor {tempfile.gettempdir()}")


def _nilearn_copy(folder: Path) -> TemplateFiles:
    import nilearn

    src = (Path(nilearn.__file__).parent / "datasets" / "data"
           / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    if not src.exists():
        raise TemplateMissing(f"template {TEMPLATE} not found in TemplateFlow "
                              f"({templateflow_home()}) and nilearn has no bundled copy; fetch it "
                              f"with: {fetch_command(TEMPLATE)}")
    brain = folder / f"nilearn-{nilearn.__version__}_{TEMPLATE}_brain.nii.gz"
    mask_path = folder / f"nilearn-{nilearn.__version__}_{TEMPLATE}_mask.nii.gz"
    if not (brain.exists() and mask_path.exists()):
        img = nib.load(str(src))
        data = np.asarray(img.dataobj, dtype=np.float32)
        mask = ndimage.binary_fill_holes(data > 0)
        atomic_write_bytes(brain, _gz(nib.Nifti1Image(data, img.affine)))
        atomic_write_bytes(mask_path, _gz(nib.Nifti1Image(mask.astype(np.uint8), img.affine)))
    return TemplateFiles(brain, mask_path, f"nilearn {nilearn.__version__} bundled copy "
                                           f"(cached in {folder})")


def _gz(img: nib.Nifti1Image) -> bytes:
    import gzip

    return gzip.compress(img.to_bytes(), compresslevel=6)


def get_template(name: str = TEMPLATE, home: str | os.PathLike | None = None) -> TemplateFiles:
    """The res-1 brain, brain mask (and whole head when TemplateFlow has it) of ``name``; see the
    module docstring. :class:`TemplateMissing` names the template and the fetch command."""
    home = Path(home) if home is not None else templateflow_home()
    found = _from_templateflow(name, home)
    if found is not None:
        return _in_fsl_order(found) if name == FSL_TEMPLATE else found
    if name != TEMPLATE:
        raise TemplateMissing(
            f"template {name} (res-1) is not in the TemplateFlow cache {home} (set "
            f"TEMPLATEFLOW_HOME to the folder that holds it); fetch it on a connected machine "
            f"with: {fetch_command(name, home)}")
    try:
        return _nilearn_copy(own_cache())
    except PermissionError:
        # Read-only home (e.g. a container): fall back to a per-user temporary cache.
        import tempfile

        return _nilearn_copy(Path(tempfile.gettempdir()) / "brainage-bids-templates")


def template_for(spec) -> str:
    """The template a model with input ``spec`` was trained on: FSL's for the published models
    (whose input grid is the FSL MNI152 1 mm grid), MNI152NLin2009aSym for ours."""
    from ..models.direct import needs_exact_grid

    return FSL_TEMPLATE if needs_exact_grid(spec) else TEMPLATE
