"""From a preprocessed MNI image to a predicted age (distribution).

Speed settings (``precision``):

- ``fp32``: plain float32, contiguous memory (reference).
- ``fast`` (default): on CPU, float32 in the channels_last_3d memory format (same ages to 1e-3
  year; 1.6x faster on the 160x192x160 SFCN, a gain only in batches on smaller networks, see
  ``scripts/benchmark_inference.py``); on CUDA, plain float32: float16 autocast has not been
  checked on a GPU yet, and stays off until a benchmark shows its ages within 0.1 year of fp32.
- ``bf16``: on CPU, channels_last_3d and bfloat16 autocast: 2-3x faster than fp32, but it moved
  the shipped model's ages by up to 0.15 year, above the 0.1-year tolerance, so it is opt-in.
  On CUDA it means bfloat16 autocast.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from ..utils.images import resample_to_grid
from .checkpoint import (IRV2_CROP, IRV2_RESIZE, SFCN_CROP, InputSpec, LoadedModel,
                         centre_crop_slices)
from .sfcn import expected_age

PRECISIONS = ("fast", "fp32", "bf16")


def zscore_nonzero(data: np.ndarray) -> np.ndarray:
    """MONAI ``NormalizeIntensity(nonzero=True)``: z-score over the non-zero voxels (population
    SD; an SD of 0 counts as 1), zeros stay 0; NaN -> 0 first."""
    data = np.nan_to_num(np.asarray(data, dtype=np.float32), nan=0.0)
    nz = data != 0
    if nz.sum() < 2:
        raise ValueError("image has no non-zero voxels on the model grid")
    vals = data[nz]
    std = float(vals.std())
    data = data.copy()
    data[nz] = (vals - vals.mean()) / (std if std > 0 else 1.0)
    return data


def min_max(t):
    """MONAI ``ScaleIntensity()``: min-max scale the whole volume to [0, 1] (constant -> 0)."""
    lo, hi = float(t.min()), float(t.max())
    return (t - lo) / (hi - lo) if hi > lo else t * 0


def flair_brain_age_normalise(data: np.ndarray) -> np.ndarray:
    """The FLAIR-Brain-Age IRV2/DenseNet recipe on a 182x218x182 FSL-grid array: z-score over
    non-zero voxels (zeros stay 0, NaN -> 0), trilinear resize to 121x145x121 (align_corners
    False, no anti-aliasing), min-max scale to [0, 1], centre crop to 118x142x118."""
    t = torch.from_numpy(zscore_nonzero(data))[None, None]
    t = F.interpolate(t, size=IRV2_RESIZE, mode="trilinear", align_corners=False)[0, 0]
    t = min_max(t)
    return t[centre_crop_slices(IRV2_RESIZE, IRV2_CROP)].numpy().astype(np.float32)


def flair_brain_age_sfcn_normalise(data: np.ndarray) -> np.ndarray:
    """The FLAIR-Brain-Age SFCN recipe on a 182x218x182 FSL-grid array: z-score over non-zero
    voxels, min-max scale to [0, 1], centre crop to 160x192x160."""
    data = min_max(zscore_nonzero(data))
    return np.ascontiguousarray(data[centre_crop_slices(data.shape, SFCN_CROP)], dtype=np.float32)


def ukb_sfcn_normalise(data: np.ndarray, source: str = "image") -> np.ndarray:
    """The UK Biobank SFCN recipe on a 182x218x182 FSL-grid array: divide by the mean of the
    whole volume (zeros included), then centre crop [11:-11, 13:-13, 11:-11] -> 160x192x160."""
    data = np.asarray(data, dtype=np.float32)
    mean = float(data.mean(dtype=np.float64))
    if not mean > 0:
        raise ValueError(f"{source}: non-positive mean intensity on the model grid")
    data = data / np.float32(mean)
    return np.ascontiguousarray(data[centre_crop_slices(data.shape, SFCN_CROP)], dtype=np.float32)


def normalise(data: np.ndarray, spec: InputSpec, mask: np.ndarray | None = None,
              source: str = "image") -> np.ndarray:
    """Turn an array on ``spec``'s grid into the network input of ``spec.normalisation``.

    ``mask`` (boolean, same grid) is needed for ``mask_mean`` only; ``source`` names the image in
    errors.
    """
    if tuple(data.shape) != tuple(spec.shape):
        raise ValueError(f"{source}: array of shape {tuple(data.shape)} is not on the model grid "
                         f"{tuple(spec.shape)}")
    if spec.normalisation == "flair_brain_age":
        return flair_brain_age_normalise(data)
    if spec.normalisation == "flair_brain_age_sfcn":
        return flair_brain_age_sfcn_normalise(data)
    if spec.normalisation == "ukb_sfcn":
        return ukb_sfcn_normalise(data, source)
    if spec.normalisation == "volume_mean":
        mean = float(data.mean())
    else:
        if mask is None or not mask.any():
            raise ValueError(f"{source}: brain mask is empty on the model grid")
        data = np.where(mask, data, 0.0)
        mean = float(data[mask].mean())
    if not mean > 0:
        raise ValueError(f"{source}: non-positive mean intensity on the model grid")
    return (data / mean).astype(np.float32)


def on_grid(img: nib.Nifti1Image, spec: InputSpec) -> bool:
    """Whether ``img`` is stored on ``spec``'s grid (same shape, affine to 1e-3 mm)."""
    return (tuple(img.shape[:3]) == tuple(spec.shape)
            and np.allclose(img.affine, np.asarray(spec.affine, dtype=float), atol=1e-3))


def to_grid(img: nib.Nifti1Image, spec: InputSpec, order: int = 1) -> np.ndarray:
    """``img``'s data on ``spec``'s grid: as stored when it is already there, else resampled in
    world space."""
    if on_grid(img, spec):
        data = np.asarray(img.dataobj, dtype=np.float32)
        return data.reshape(data.shape[:3])
    return resample_to_grid(img, np.asarray(spec.affine, dtype=float), spec.shape, order=order)


def model_input(preproc_file: str, mask_file: str, spec: InputSpec,
                head_file: str | None = None) -> np.ndarray:
    """Resample a preprocessed image onto the model grid and normalise it as the model expects.

    ``spec.image == "head"`` reads ``head_file`` (the whole-head MNI image) instead of the brain.
    """
    source = preproc_file
    if spec.image == "head":
        if not head_file:
            raise ValueError("this model reads the whole head, but no head image was given")
        source = head_file
    data = to_grid(nib.load(source), spec)
    mask = None
    if spec.normalisation == "mask_mean":
        mask = to_grid(nib.load(mask_file), spec) > 0.5
        if not mask.any():
            raise ValueError(f"{mask_file}: brain mask is empty on the model grid")
    return normalise(data, spec, mask, source)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but PyTorch sees no CUDA device")
    return device


def _forward(net: torch.nn.Module, x: torch.Tensor, device: str, precision: str) -> torch.Tensor:
    if precision == "fp32":
        return net(x).float()
    if device == "cuda":
        if precision == "fast":  # float32 until float16 is benchmarked on a GPU (module docstring)
            return net(x).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return net(x).float()
    net = net.to(memory_format=torch.channels_last_3d)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    if precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(x).float()
    return net(x).float()


@torch.no_grad()
def predict_network(net: torch.nn.Module, arrays, centres, device: str = "cpu",
                    precision: str = "fp32", batch_size: int = 4):
    """Run a bare network on model-grid arrays in batches.

    Returns (age, sd, probabilities): for binned outputs the mean and SD of the distribution and
    the probabilities; for scalar outputs the age, NaN SDs and None.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}")
    net = net.to(device).eval()
    ages, sds, probs = [], [], []
    for start in range(0, len(arrays), batch_size):
        chunk = arrays[start:start + batch_size]
        x = torch.from_numpy(np.stack(chunk)[:, None].astype(np.float32)).to(device)
        out = _forward(net, x, device, precision)
        if centres is None:
            ages.append(out.reshape(-1).cpu().numpy())
            sds.append(np.full(len(chunk), np.nan))
        else:
            c = torch.as_tensor(np.asarray(centres), dtype=torch.float32, device=out.device)
            mean, sd = expected_age(out, c)
            ages.append(mean.cpu().numpy())
            sds.append(sd.cpu().numpy())
            probs.append(out.exp().cpu().numpy())
    if precision != "fp32" and device == "cpu":
        net.to(memory_format=torch.contiguous_format)
    return (np.concatenate(ages), np.concatenate(sds),
            np.concatenate(probs) if probs else None)


def predict_arrays(model: LoadedModel, arrays, device: str = "cpu", precision: str = "fp32",
                   batch_size: int = 4):
    """Predict ages for model-grid arrays with a loaded model; see :func:`predict_network`."""
    return predict_network(model.network, list(arrays), model.centres, device=device,
                           precision=precision, batch_size=batch_size)


def ensemble(ages, sds) -> tuple[float, float]:
    """Combine member predictions of one scan: mean age, and SD by the law of total variance.

    SD^2 = mean of the members' own variances + population variance of the member means. Members
    without an SD (scalar outputs) contribute only through the spread of their means.
    """
    ages = np.asarray(ages, dtype=float)
    sds = np.asarray(sds, dtype=float)
    within = np.nanmean(sds ** 2) if np.isfinite(sds).any() else 0.0
    between = float(ages.var()) if len(ages) > 1 else 0.0
    if not np.isfinite(sds).any() and len(ages) < 2:
        return float(ages.mean()), float("nan")
    return float(ages.mean()), float(np.sqrt(within + between))
