"""Skull stripping in native space: deepbet (CPU or GPU) or HD-BET (GPU, optional extra)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)
from scipy import ndimage

from ..utils.images import MIN_BRAIN_ML, check_mask, load_image

METHODS = ("auto", "deepbet", "hd-bet", "none")


def hdbet_available() -> bool:
    """HD-BET can run: the package and its CLI are installed and its weights are on disk.

    HD-BET 2.x reads its weights from ``~/hd-bet_params`` whatever ``HD_BET_PARAMS`` says, and
    downloads them when absent, so only that folder counts.
    """
    if importlib.util.find_spec("HD_BET") is None or shutil.which("hd-bet") is None:
        return False
    weights = Path.home() / "hd-bet_params"
    return weights.is_dir() and any(weights.iterdir())


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_method(method: str, device: str = "auto") -> str:
    """Pick the skull-stripping tool: HD-BET for ``auto`` only when installed and a GPU is used."""
    if method not in METHODS:
        raise ValueError(f"unknown skull-strip method {method!r}; choose from {METHODS}")
    if method != "auto":
        return method
    use_gpu = device == "cuda" or (device == "auto" and cuda_available())
    return "hd-bet" if use_gpu and hdbet_available() else "deepbet"


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def skull_strip(in_file: str, out_brain: str, out_mask: str, method: str = "deepbet",
                device: str = "cpu", source_file: str | None = None) -> float:
    """Write the brain and its mask on the grid of ``in_file``; return the mask volume in mL.

    ``none`` takes the non-zero voxels of an already stripped image as the mask. Errors name
    ``source_file`` (the BIDS input) when given.
    """
    img = load_image(in_file)
    data = img.get_fdata(dtype=np.float32)
    if method == "none":
        mask = ndimage.binary_fill_holes(data > 0)
    elif method == "deepbet":
        import deepbet
        import torch

        no_gpu = device != "cuda" or not torch.cuda.is_available()
        with tempfile.TemporaryDirectory() as tmp:
            # deepbet wants a file; give it the validated (RAS, float) image.
            src = os.path.join(tmp, "in.nii.gz")
            nib.save(img, src)
            _, mask_img, _ = deepbet.BrainExtraction(no_gpu=no_gpu).run(src)
        mask = np.asarray(mask_img.dataobj) > 0.5
    elif method == "hd-bet":
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "in.nii.gz")
            out = os.path.join(tmp, "out.nii.gz")
            nib.save(img, src)
            dev = "cuda" if device in ("cuda", "auto") and cuda_available() else "cpu"
            # HD-BET 2.x flags; its mask is <out>_bet.nii.gz (1.x wrote <out>_mask.nii.gz)
            proc = subprocess.run(["hd-bet", "-i", src, "-o", out, "-device", dev, "--save_bet_mask"],
                                  capture_output=True, text=True)
            found = [f for f in (os.path.join(tmp, "out_bet.nii.gz"), os.path.join(tmp, "out_mask.nii.gz"))
                     if os.path.exists(f)]
            if proc.returncode != 0 or not found:
                raise RuntimeError(f"{source_file or in_file}: HD-BET failed (exit {proc.returncode}): "
                                   f"{proc.stderr.strip()[-500:]}")
            mask = np.asarray(nib.load(found[0]).dataobj) > 0
    else:
        raise ValueError(f"unknown skull-strip method {method!r}")
    mask = _largest_component(mask)
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    check_mask(mask, source_file or in_file, min_ml=MIN_BRAIN_ML, voxel_ml=voxel_ml)
    brain = np.where(mask, data, 0).astype(np.float32)
    nib.save(nib.Nifti1Image(brain, img.affine), out_brain)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine), out_mask)
    return float(mask.sum()) * voxel_ml


class _SkullStripInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    method = traits.Enum("deepbet", "hd-bet", "none", usedefault=True)
    device = traits.Enum("cpu", "cuda", "auto", usedefault=True)
    source_file = traits.Str(desc="BIDS input named in error messages")
    num_threads = traits.Int(1, usedefault=True, desc="PyTorch threads (deepbet on CPU)")


class _SkullStripOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="skull-stripped image")
    out_mask = File(exists=True, desc="brain mask")
    mask_volume_ml = traits.Float()


class SkullStrip(SimpleInterface):
    """Native-space skull stripping (see :func:`skull_strip`)."""

    input_spec = _SkullStripInputSpec
    output_spec = _SkullStripOutputSpec

    def _run_interface(self, runtime):
        if self.inputs.method == "deepbet":
            import torch

            torch.set_num_threads(max(1, self.inputs.num_threads))
        brain = os.path.join(runtime.cwd, "brain.nii.gz")
        mask = os.path.join(runtime.cwd, "brain_mask.nii.gz")
        vol = skull_strip(self.inputs.in_file, brain, mask, self.inputs.method, self.inputs.device,
                          source_file=self.inputs.source_file or None)
        self._results.update(out_file=brain, out_mask=mask, mask_volume_ml=vol)
        return runtime
