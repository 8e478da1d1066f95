"""Image checks and array operations used by the preprocessing interfaces.

Everything here works on nibabel images or arrays so tests can call it on small synthetic volumes.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


class InputImageError(ValueError):
    """An input image cannot be used; the message names the file and the problem."""


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
    data = np.asarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        bad = int((~np.isfinite(data)).sum())
        if bad > 0.01 * data.size:
            raise InputImageError(f"{path}: {bad} voxels are NaN or infinite")
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    if float(data.max()) == float(data.min()):
        raise InputImageError(f"{path}: the image is constant ({float(data.max())})")
    out = nib.Nifti1Image(data, affine)
    out.header.set_xyzt_units("mm")
    return out


def reorient_ras(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Return ``img`` with its voxel axes reordered to RAS (closest canonical orientation)."""
    return nib.as_closest_canonical(img)


def check_mask(mask: np.ndarray, source: str, min_ml: float = 1.0, voxel_ml: float = 1e-3) -> None:
    """Raise :class:`InputImageError` when a brain mask is empty or implausibly small."""
    volume = float(np.count_nonzero(mask)) * voxel_ml
    if volume < min_ml:
        raise InputImageError(f"{source}: the brain mask is empty ({volume:.2f} mL)")


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
