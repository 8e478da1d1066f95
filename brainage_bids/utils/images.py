"""Image checks and array operations used by the preprocessing interfaces.

Everything here works on nibabel images or arrays so tests can call it on small synthetic volumes.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


LOG = logging.getLogger("brainage_bids.images")

#: Smallest extent (mm) along each axis of an image that can hold an adult brain (about
#: 140 x 170 x 120 mm); a smaller field of view is refused.
MIN_FOV_MM = 100.0
#: Smallest plausible brain-mask volume (mL): an adult brain is 1000-1600 mL, a newborn's ~400.
MIN_BRAIN_ML = 300.0
#: qform and sform that place a corner of the image this far apart (mm) are reported.
QFORM_SFORM_TOLERANCE_MM = 1.0


class InputImageError(ValueError):
    """An input image cannot be used; the message names the file and the problem."""


def _float32_limit(n_voxels: int) -> float:
    """Largest |value| whose sum of squares over ``n_voxels`` stays within float32."""
    return float(np.sqrt(np.finfo(np.float32).max / max(n_voxels, 1)))


def _check_qform_sform(img, path: str) -> None:
    """Warn when a coded qform and sform place the image more than
    :data:`QFORM_SFORM_TOLERANCE_MM` apart (nibabel, and so this app, uses the sform)."""
    hdr = getattr(img, "header", None)
    if not isinstance(hdr, nib.Nifti1Header):
        return
    qform, qcode = hdr.get_qform(coded=True)
    sform, scode = hdr.get_sform(coded=True)
    if qform is None or sform is None or not qcode or not scode:
        return
    shape = np.asarray(img.shape[:3]) - 1
    corners = np.array([[i, j, k, 1] for i in (0, shape[0]) for j in (0, shape[1])
                        for k in (0, shape[2])], float).T
    gap = float(np.max(np.linalg.norm((qform @ corners - sform @ corners)[:3], axis=0)))
    if gap > QFORM_SFORM_TOLERANCE_MM:
        LOG.warning("%s: the qform and sform disagree (corners up to %.1f mm apart); the sform "
                    "is used", path, gap)


def load_image(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load a NIfTI and check it is a usable 3D scan.

    A trailing singleton 4th dimension is dropped. Raises :class:`InputImageError` for a file that
    cannot be read or decompressed, a 4D series, non-finite or constant data, or a singular affine.
    """
    path = str(path)
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt or truncated files
        raise InputImageError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputImageError(
            f"{path}: expected a 3D image, got shape {tuple(data.shape)}"
            + (f" ({data.shape[3]} volumes)" if data.ndim == 4 else "")
        )
    if min(data.shape) < 2:
        raise InputImageError(f"{path}: image has a degenerate shape {tuple(data.shape)}")
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise InputImageError(f"{path}: the image affine is singular or not finite")
    _check_qform_sform(img, path)
    # Checked at the stored precision, before float32: a finite float64 value can overflow it.
    finite = np.isfinite(data)
    if not finite.all():
        bad = int((~finite).sum())
        if bad > 0.01 * data.size:
            raise InputImageError(f"{path}: {bad} voxels are NaN or infinite")
        LOG.warning("%s: %d NaN or infinite voxel(s) set to 0", path, bad)
        data = np.where(finite, data, 0)
    limit = _float32_limit(data.size)
    big = float(np.max(np.abs(data))) if data.size else 0.0
    if big > limit:
        raise InputImageError(f"{path}: values overflow float32 (largest |value| {big:.3g}; "
                              f"above {limit:.3g} sums over the image leave the float32 range); "
                              "rescale the intensities")
    data = np.asarray(data, dtype=np.float32)
    if float(data.max()) == float(data.min()):
        raise InputImageError(f"{path}: the image is constant ({float(data.max())})")
    if float(data.max()) <= 0:
        raise InputImageError(f"{path}: no voxel is positive (values {float(data.min()):.4g} to "
                              f"{float(data.max()):.4g}); a magnitude MRI image is >= 0")
    if -float(data.min()) > float(data.max()):
        raise InputImageError(f"{path}: the image is mostly negative (values "
                              f"{float(data.min()):.4g} to {float(data.max()):.4g}: the most "
                              "negative value outweighs the brightest); a magnitude MRI image "
                              "is >= 0")
    out = nib.Nifti1Image(data, affine)
    out.header.set_xyzt_units("mm")
    return out


def reorient_ras(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Return ``img`` with its voxel axes reordered to RAS (closest canonical orientation)."""
    return nib.as_closest_canonical(img)


def check_field_of_view(img: nib.Nifti1Image, source: str,
                        min_mm: float = MIN_FOV_MM) -> None:
    """Raise :class:`InputImageError` when the image is smaller than ``min_mm`` along an axis
    (it cannot hold a brain)."""
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    extent = zooms * np.asarray(img.shape[:3])
    if np.any(extent < min_mm):
        dims = " x ".join(f"{e:.0f}" for e in extent)
        raise InputImageError(f"{source}: the field of view ({dims} mm) is too small to hold a "
                              f"brain (at least {min_mm:.0f} mm along each axis)")


def check_mask(mask: np.ndarray, source: str, min_ml: float = 1.0, voxel_ml: float = 1e-3) -> None:
    """Raise :class:`InputImageError` when a brain mask is empty or implausibly small."""
    volume = float(np.count_nonzero(mask)) * voxel_ml
    if volume == 0:
        raise InputImageError(f"{source}: the brain mask is empty (0 mL)")
    if volume < min_ml:
        raise InputImageError(f"{source}: the brain mask is implausibly small ({volume:.2f} mL, "
                              f"below {min_ml:g} mL)")


def normalise_mean_in_mask(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Divide intensities by their mean inside ``mask``; voxels outside the mask become 0."""
    mask = mask > 0
    if not mask.any():
        raise InputImageError("normalisation: the brain mask is empty")
    mean = float(data[mask].mean())
    if mean <= 0:
        raise InputImageError("normalisation: mean intensity inside the brain mask is not positive")
    return np.where(mask, data / mean, 0.0).astype(np.float32)


def mask_correlation(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two images inside ``mask`` (registration quality)."""
    sel = mask > 0
    a = image[sel].astype(np.float64)
    b = reference[sel].astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def resample_to_grid(
    img: nib.Nifti1Image, affine: np.ndarray, shape: tuple[int, int, int], order: int = 1
) -> np.ndarray:
    """Resample ``img`` onto the grid (``affine``, ``shape``) in world space.

    When the target voxels are larger than the source voxels the source is smoothed first with a
    Gaussian of sigma ``(factor - 1) / 2`` voxels per axis (the usual anti-aliasing rule).
    """
    src = np.asarray(img.dataobj, dtype=np.float32)
    src_zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    dst_zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    factor = dst_zooms.mean() / src_zooms
    if order > 0 and np.any(factor > 1.01):
        src = ndimage.gaussian_filter(src, sigma=np.maximum((factor - 1) / 2, 0))
    vox2vox = np.linalg.inv(img.affine) @ np.asarray(affine)
    return ndimage.affine_transform(
        src, vox2vox[:3, :3], offset=vox2vox[:3, 3], output_shape=tuple(shape), order=order,
        mode="constant", cval=0.0,
    ).astype(np.float32)


def rotation(degrees_xyz) -> np.ndarray:
    """4x4 rotation about x, then y, then z (degrees), for moving an image's affine."""
    ax, ay, az = np.deg2rad(degrees_xyz)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ ry @ rx
    return out


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files 0600; honour the umask instead
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_npy(path: str | os.PathLike, array) -> None:
    """``np.save`` through :func:`atomic_write_bytes` (a cache that several runs may share)."""
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a file to ``dst`` atomically."""
    atomic_write_bytes(dst, Path(src).read_bytes())
