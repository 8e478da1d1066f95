"""From a preprocessed MNI image to an age distribution."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from ..utils.images import resample_to_grid
from .checkpoint import InputSpec, LoadedModel
from .sfcn import expected_age


def model_input(preproc_file: str, mask_file: str, spec: InputSpec) -> np.ndarray:
    """Resample a preprocessed image onto the model grid and normalise it as the model expects."""
    img = nib.load(preproc_file)
    affine = np.asarray(spec.affine, dtype=float)
    data = resample_to_grid(img, affine, spec.shape, order=1)
    if spec.normalisation == "volume_mean":
        mean = float(data.mean())
    else:
        mask = resample_to_grid(nib.load(mask_file), affine, spec.shape, order=1) > 0.5
        if not mask.any():
            raise ValueError(f"{mask_file}: brain mask is empty on the model grid")
        data = np.where(mask, data, 0.0)
        mean = float(data[mask].mean())
    if not mean > 0:
        raise ValueError(f"{preproc_file}: non-positive mean intensity on the model grid")
    return (data / mean).astype(np.float32)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but PyTorch sees no CUDA device")
    return device


@torch.no_grad()
def predict_arrays(model: LoadedModel, arrays: list[np.ndarray], device: str = "cpu"):
    """Predict ages for model-grid arrays; returns (mean, sd, probabilities) as numpy arrays."""
    x = torch.from_numpy(np.stack(arrays)[:, None]).to(device)
    net = model.network.to(device).eval()
    if device == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            logp = net(x)
    else:
        logp = net(x)
    centres = torch.as_tensor(model.centres, dtype=torch.float32, device=logp.device)
    mean, sd = expected_age(logp.float(), centres)
    return mean.cpu().numpy(), sd.cpu().numpy(), logp.float().exp().cpu().numpy()
