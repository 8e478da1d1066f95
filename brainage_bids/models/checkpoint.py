"""Model checkpoints: our own format and the published UK Biobank SFCN layout.

Our format is a ``torch.save`` dict::

    {"format": "brainage-bids", "arch": "sfcn", "name": ..., "config": {"channels": [...],
     "bins": [lo, hi, width]}, "input": InputSpec as dict, "state_dict": {...}}

A plain state_dict (optionally with the ``module.`` prefix of ``torch.nn.DataParallel``) in the
layout of the published UK Biobank SFCN is recognised by its keys; its 40 output bins are the
one-year bins centred 42.5 ... 81.5 and its input is the FSL MNI152 1 mm grid cropped
[11:-11, 13:-13, 11:-11], divided by the mean of the whole volume.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .sfcn import SFCN, UKB_CHANNELS, bin_centres

FORMAT = "brainage-bids"
NORMALISATIONS = ("mask_mean", "volume_mean")


@dataclass(frozen=True)
class InputSpec:
    """The grid (world affine, shape) a model reads, and how intensities are normalised on it."""

    affine: tuple
    shape: tuple
    normalisation: str = "mask_mean"

    @property
    def voxel_size(self) -> float:
        return float(np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(0)).mean())

    def as_dict(self) -> dict:
        return {"affine": [list(map(float, r)) for r in self.affine], "shape": list(self.shape),
                "normalisation": self.normalisation}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        if d["normalisation"] not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {d['normalisation']!r}")
        return cls(tuple(tuple(r) for r in d["affine"]), tuple(int(s) for s in d["shape"]),
                   d["normalisation"])


def mni_box_grid(voxel_size: float) -> tuple[tuple, tuple]:
    """RAS grid covering the UK Biobank SFCN field of view at ``voxel_size`` mm.

    Voxel edges span x -80.5..79.5, y -113.5..78.5, z -61.5..98.5 mm, the box of the FSL MNI152
    1 mm grid cropped [11:-11, 13:-13, 11:-11]; at 1 mm the voxel centres fall on integer
    coordinates, as on the template grid.
    """
    v = float(voxel_size)
    shape = (int(round(160 / v)), int(round(192 / v)), int(round(160 / v)))
    lo = np.array([-80.5, -113.5, -61.5]) + v / 2
    affine = np.diag([v, v, v, 1.0])
    affine[:3, 3] = lo
    return tuple(tuple(r) for r in affine.tolist()), shape


# FSL MNI152 1 mm grid (182x218x182, LAS voxel order) cropped [11:-11, 13:-13, 11:-11].
UKB_INPUT = InputSpec(
    affine=((-1.0, 0.0, 0.0, 79.0), (0.0, 1.0, 0.0, -113.0), (0.0, 0.0, 1.0, -61.0), (0, 0, 0, 1.0)),
    shape=(160, 192, 160),
    normalisation="volume_mean",
)
UKB_BINS = (42.0, 82.0, 1.0)


@dataclass
class LoadedModel:
    """A network ready for inference with what is needed to feed it and read its output."""

    name: str
    arch: str
    network: torch.nn.Module
    input: InputSpec
    centres: np.ndarray
    sha256: str
    path: str
    card: dict = field(default_factory=dict)


def sha256sum(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def strip_module_prefix(state_dict: dict) -> dict:
    """Remove the ``module.`` prefix that ``torch.nn.DataParallel`` adds to every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def build_sfcn(config: dict, dropout: float = 0.5) -> SFCN:
    lo, hi, width = config["bins"]
    return SFCN(channels=config["channels"], n_bins=len(bin_centres(lo, hi, width)), dropout=dropout)


def save_checkpoint(path: str | os.PathLike, network: SFCN, name: str, config: dict, spec: InputSpec,
                    card: dict | None = None) -> str:
    """Write a checkpoint in our format atomically; return its sha256."""
    from ..utils.images import atomic_write_bytes

    payload = {
        "format": FORMAT, "arch": "sfcn", "name": name, "config": config, "input": spec.as_dict(),
        "card": card or {},
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    return sha256sum(path)


def _is_ukb_layout(state: dict) -> bool:
    w = state.get("classifier.conv_6.weight")
    return (w is not None and "feature_extractor.conv_0.0.weight" in state
            and tuple(state["feature_extractor.conv_0.0.weight"].shape)[:2] == (UKB_CHANNELS[0], 1))


def load_model(path: str | os.PathLike, device: str = "cpu", name: str | None = None) -> LoadedModel:
    """Load a checkpoint (our format or the UK Biobank SFCN layout) for inference on ``device``."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        config = obj["config"]
        net = build_sfcn(config)
        net.load_state_dict(obj["state_dict"], strict=True)
        spec = InputSpec.from_dict(obj["input"])
        centres = bin_centres(*config["bins"])
        model_name = name or obj.get("name") or Path(path).stem
        card = obj.get("card", {})
    elif isinstance(obj, dict) and _is_ukb_layout(strip_module_prefix(obj)):
        state = strip_module_prefix(obj)
        n_bins = state["classifier.conv_6.weight"].shape[0]
        if n_bins != 40:
            raise ValueError(f"{path}: SFCN layout with {n_bins} bins; only the 40-bin UK Biobank "
                             "model (42-82 years) is known for plain state_dicts")
        net = SFCN(channels=UKB_CHANNELS, n_bins=40)
        net.load_state_dict(state, strict=True)
        spec = UKB_INPUT
        centres = bin_centres(*UKB_BINS)
        model_name = name or Path(path).stem
        card = {"source": "UK Biobank SFCN (Peng et al. 2021)"}
    else:
        raise ValueError(f"{path}: not a brainage-bids checkpoint nor a UK Biobank SFCN state_dict")
    net.eval().to(device)
    return LoadedModel(name=model_name, arch="sfcn", network=net, input=spec, centres=centres,
                       sha256=sha256sum(path), path=path, card=card)
