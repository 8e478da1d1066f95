"""Model checkpoints: our own format and the published layouts.

Our format is a ``torch.save`` dict::

    {"format": "brainage-bids", "arch": "sfcn" | "irv2", "name": ...,
     "modality": "T1w" | "FLAIR" | "T1w+FLAIR+T2w" (contrast-agnostic, see contrasts_of),
     "config": {...}, "input": InputSpec as dict, "card": {...}, "state_dict": {...}}

with ``config`` holding ``channels`` and ``bins`` [lo, hi, width] for SFCN.

Plain state_dicts of two published models are recognised by their keys:

- the UK Biobank SFCN (optionally with the ``module.`` prefix of ``torch.nn.DataParallel``): 40
  one-year bins centred 42.5 ... 81.5; input the brain on the FSL MNI152 1 mm grid divided by
  the mean of the whole 182x218x182 volume, then cropped [11:-11, 13:-13, 11:-11]
  (``normalisation="ukb_sfcn"``);
- the FLAIR-Brain-Age 3D Inception-ResNet-V2 and DenseNet169: a scalar age; input the whole head
  on the FSL MNI152 1 mm grid, z-scored over non-zero voxels, resized to 121x145x121, scaled to
  [0, 1] and cropped to 118x142x118 (``normalisation="flair_brain_age"``).

The SFCN layout is shared by several zoo entries (UK Biobank: 42-82 years, divided by the volume
mean; FLAIR-Brain-Age: 15-95 years in 2-year bins, z-score and min-max) that a bare file cannot
tell apart: such files run by the zoo name they were installed under (the install record beside
the cached file), and a bare one is refused with the names it could be.
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
NORMALISATIONS = ("mask_mean", "volume_mean", "flair_brain_age", "ukb_sfcn",
                  "flair_brain_age_sfcn")
IMAGES = ("brain", "head")
ARCHS = ("sfcn", "irv2")
PUBLISHED_ARCHS = ("sfcn", "irv2", "densenet169")  # layouts of published plain state_dicts
CONTRASTS = ("T1w", "FLAIR", "T2w")  # image suffixes a model can read


def contrasts_of(modality: str | None) -> tuple[str, ...]:
    """The contrasts a model's ``modality`` names: one (``T1w``), or several joined by ``+``
    for a contrast-agnostic model (``T1w+FLAIR+T2w``); () when unknown (None or "")."""
    return tuple(m for m in (modality or "").split("+") if m)


def reads_contrast(modality: str | None, suffix: str) -> bool:
    """Whether a model of ``modality`` applies to images of ``suffix`` (unknown: yes)."""
    found = contrasts_of(modality)
    return not found or suffix in found


@dataclass(frozen=True)
class InputSpec:
    """The grid (world affine, shape) a model reads, which image (the brain or the whole head) and
    how intensities are normalised on it."""

    affine: tuple
    shape: tuple
    normalisation: str = "mask_mean"
    image: str = "brain"

    @property
    def voxel_size(self) -> float:
        return float(np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(0)).mean())

    def as_dict(self) -> dict:
        return {"affine": [list(map(float, r)) for r in self.affine], "shape": list(self.shape),
                "normalisation": self.normalisation, "image": self.image}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        if d["normalisation"] not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {d['normalisation']!r}")
        image = d.get("image", "brain")
        if image not in IMAGES:
            raise ValueError(f"unknown input image {image!r}")
        return cls(tuple(tuple(r) for r in d["affine"]), tuple(int(s) for s in d["shape"]),
                   d["normalisation"], image)


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


# FSL MNI152 1 mm grid (182x218x182, LAS voxel order).
FSL_MNI_1MM_AFFINE = ((-1.0, 0.0, 0.0, 90.0), (0.0, 1.0, 0.0, -126.0), (0.0, 0.0, 1.0, -72.0),
                      (0, 0, 0, 1.0))
FSL_MNI_1MM_SHAPE = (182, 218, 182)

# The FLAIR-Brain-Age models read the whole head on the full FSL grid; resizing and cropping to
# 118x142x118 are part of their normalisation.
IRV2_FLAIR_INPUT = InputSpec(affine=FSL_MNI_1MM_AFFINE, shape=FSL_MNI_1MM_SHAPE,
                             normalisation="flair_brain_age", image="head")
IRV2_RESIZE = (121, 145, 121)
IRV2_CROP = (118, 142, 118)

# The published SFCNs read the brain on the full FSL grid; the division by the whole-volume mean
# (UK Biobank) or the MONAI z-score and min-max (FLAIR-Brain-Age) come before the centre crop
# [11:-11, 13:-13, 11:-11] -> 160x192x160, so both are part of the normalisation.
UKB_INPUT = InputSpec(affine=FSL_MNI_1MM_AFFINE, shape=FSL_MNI_1MM_SHAPE, normalisation="ukb_sfcn")
FLAIR_BRAIN_AGE_SFCN_INPUT = InputSpec(affine=FSL_MNI_1MM_AFFINE, shape=FSL_MNI_1MM_SHAPE,
                                       normalisation="flair_brain_age_sfcn")
SFCN_CROP = (160, 192, 160)
UKB_BINS = (42.0, 82.0, 1.0)
FLAIR_BRAIN_AGE_SFCN_BINS = (15.0, 95.0, 2.0)


def centre_crop_slices(shape, size) -> tuple:
    """Slices of MONAI's ``CenterSpatialCrop``: start ``shape // 2 - size // 2`` per axis (on the
    FSL grid and 160x192x160 this is [11:-11, 13:-13, 11:-11])."""
    return tuple(slice(s // 2 - c // 2, s // 2 - c // 2 + c) for s, c in zip(shape, size))


def network_grid(spec: InputSpec) -> tuple[tuple, tuple]:
    """(affine, shape) of the array the network reads when it is a crop of ``spec``'s grid (the
    published SFCNs); ``spec``'s own grid otherwise (resized recipes are not a plain grid)."""
    if spec.normalisation in ("ukb_sfcn", "flair_brain_age_sfcn"):
        sl = centre_crop_slices(spec.shape, SFCN_CROP)
        shift = np.eye(4)
        shift[:3, 3] = [s.start for s in sl]
        affine = np.asarray(spec.affine, dtype=float) @ shift
        return tuple(tuple(r) for r in affine.tolist()), SFCN_CROP
    return spec.affine, spec.shape


@dataclass
class LoadedModel:
    """A network ready for inference with what is needed to feed it and read its output."""

    name: str
    arch: str
    network: torch.nn.Module
    input: InputSpec
    centres: np.ndarray | None  # age bins; None for networks that regress a scalar age
    sha256: str
    path: str
    card: dict = field(default_factory=dict)
    modality: str | None = None  # T1w, FLAIR, T1w+FLAIR+T2w, or None when the file does not say

    @property
    def contrasts(self) -> tuple[str, ...]:
        """The contrasts the model applies to (() when unknown)."""
        return contrasts_of(self.modality)

    @property
    def output(self) -> str:
        return "scalar" if self.centres is None else "bins"


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


def build_network(arch: str, config: dict, dropout: float | None = None) -> torch.nn.Module:
    """A network of our format from its architecture name and config."""
    if arch == "sfcn":
        return build_sfcn(config, 0.5 if dropout is None else dropout)
    if arch == "irv2":
        from .inception_resnet import InceptionResNetV2
        return InceptionResNetV2(dropout=0.0 if dropout is None else dropout)
    raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})")


def save_checkpoint(path: str | os.PathLike, network: torch.nn.Module, name: str, config: dict,
                    spec: InputSpec, card: dict | None = None, arch: str = "sfcn",
                    modality: str = "T1w") -> str:
    """Write a checkpoint in our format atomically; return its sha256."""
    from ..utils.images import atomic_write_bytes

    payload = {
        "format": FORMAT, "arch": arch, "name": name, "modality": modality, "config": config,
        "input": spec.as_dict(), "card": card or {},
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


def _is_irv2_layout(state: dict) -> bool:
    return "features.0.features.0.conv.weight" in state and "linear.1.weight" in state


def _is_densenet_layout(state: dict) -> bool:
    return "0.features.conv0.weight" in state and "1.weight" in state


def read_checkpoint(path, what: str | None = None) -> tuple[object, str]:
    """The object stored in ``path`` (loaded on the CPU, tensors only) and its layout
    (:func:`detect_layout`); the ValueError when none fits names ``what`` (default the path)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    try:
        return obj, detect_layout(obj)
    except ValueError as exc:
        raise ValueError(f"{what or path}: {exc}") from None


def detect_layout(obj) -> str:
    """``brainage-bids`` for our format, else the architecture of a published plain state_dict
    (``sfcn``, ``irv2``, ``densenet169``); ValueError otherwise."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return FORMAT
    state = strip_module_prefix(obj) if isinstance(obj, dict) else {}
    if _is_ukb_layout(state):
        return "sfcn"
    if _is_irv2_layout(state):
        return "irv2"
    if _is_densenet_layout(state):
        return "densenet169"
    raise ValueError("not a brainage-bids checkpoint nor a published state_dict (UK Biobank / "
                     "FLAIR-Brain-Age SFCN, FLAIR-Brain-Age Inception-ResNet-V2 or DenseNet169)")


def installed_name(path: str | os.PathLike) -> str | None:
    """The zoo name a cached file was installed under (``<stem>.json`` written by ``install``)."""
    import json

    record = Path(path).with_suffix(".json")
    if not record.is_file():
        return None
    try:
        name = json.loads(record.read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if name == Path(path).stem else None


def published_entry(path: str | os.PathLike, arch: str, entry: str | None = None):
    """(zoo entry whose recipe a published ``arch`` state_dict runs with, whether the file is
    that entry).

    ``entry`` names it; else the install record beside the file does; else the file runs with the
    recipe its layout's entries share. ValueError when they differ (the SFCNs) or ``entry`` has
    another architecture.
    """
    from . import zoo

    if entry is not None:
        e = zoo.get_entry(entry)
        if e.arch != arch:
            raise ValueError(f"{path}: holds a {arch} network, but {entry} is {e.arch}")
        return e, True
    candidates = [e for e in zoo.REGISTRY.values()
                  if e.arch == arch and not e.members and not e.bundled]
    named = installed_name(path)
    for e in candidates:
        if e.name == named:
            return e, True
    if len({(e.input, tuple(e.bins)) for e in candidates}) == 1:
        return candidates[0], False
    names = ", ".join(e.name for e in candidates)
    raise ValueError(
        f"{path}: a plain {arch.upper()} state_dict; this layout is shared by {names}, which differ "
        f"in age bins and input normalisation, so the file alone cannot say which it is. Install "
        f"it under its name (`brainage-bids models install NAME --from {path}`, NAME one of "
        f"{names}) and run it by that name")


def build_published(arch: str) -> torch.nn.Module:
    """An empty network of a published layout (dropout 0 where the publisher evaluates so)."""
    if arch == "sfcn":
        return SFCN(channels=UKB_CHANNELS, n_bins=40)
    if arch == "irv2":
        from .inception_resnet import InceptionResNetV2
        return InceptionResNetV2(dropout=0.0)
    if arch == "densenet169":
        from .densenet import build_densenet169
        return build_densenet169()
    raise ValueError(f"unknown published layout {arch!r}")


def published_card(entry, named: bool) -> dict:
    """What the QC and sidecars need from a zoo entry of a published model."""
    card = {"source": entry.citation}
    if entry.age_range:
        card["age_range"] = list(entry.age_range)
    if named and entry.mae is not None:
        card["publisher_mae"] = {"value": entry.mae, "test_set": entry.mae_test_set}
    return card


def load_model(path: str | os.PathLike, device: str = "cpu", name: str | None = None,
               modality: str | None = None, entry: str | None = None) -> LoadedModel:
    """Load a checkpoint (our format or a published layout) for inference on ``device``.

    ``name`` and ``modality`` override what the file says (published files say neither);
    ``entry`` is the zoo name whose recipe a published file runs with (see
    :func:`published_entry`).
    """
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    obj, layout = read_checkpoint(path)
    card: dict = {}
    if layout == FORMAT:
        arch = obj.get("arch", "sfcn")
        config = obj["config"]
        net = build_network(arch, config)
        net.load_state_dict(obj["state_dict"], strict=True)
        spec = InputSpec.from_dict(obj["input"])
        centres = bin_centres(*config["bins"]) if arch == "sfcn" else None
        name = name or obj.get("name") or Path(path).stem
        card = dict(obj.get("card", {}))
        _merge_card_file(card, path)
        modality = modality or obj.get("modality", "T1w")
    else:
        arch = layout
        state = strip_module_prefix(obj)
        if arch == "sfcn" and state["classifier.conv_6.weight"].shape[0] != 40:
            raise ValueError(f"{path}: SFCN layout with {state['classifier.conv_6.weight'].shape[0]}"
                             " bins; the published SFCNs have 40")
        zoo_entry, named = published_entry(path, arch, entry)
        net = build_published(arch)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{path}: does not load strictly into the published {arch}: "
                             f"{exc}") from None
        spec = zoo_entry.input
        centres = bin_centres(*zoo_entry.bins) if zoo_entry.bins else None
        card = published_card(zoo_entry, named)
        if named:
            name = name or zoo_entry.name
            modality = modality or zoo_entry.modality
    net.eval().to(device)
    return LoadedModel(name=name or Path(path).stem, arch=arch, network=net, input=spec,
                       centres=centres, sha256=sha256sum(path), path=path, card=card,
                       modality=modality)


def _merge_card_file(card: dict, path: str) -> None:
    """Add the held-out figures (``test``, ``validation``) of the model card written next to the
    weights (``<stem>_card.json``) when the card inside the checkpoint lacks them."""
    from .cards import card_beside

    if "test" in card:
        return
    full = card_beside(path)
    for key in ("test", "validation"):
        if isinstance(full.get(key), dict):
            card[key] = {k: v for k, v in full[key].items() if k != "predictions"}
