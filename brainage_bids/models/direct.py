"""``brainage-bids models predict``: run a model on images that are already on its template grid.

For a published model that is the FSL MNI152 1 mm grid (182x218x182, e.g. UK Biobank's
``T1_brain_linearto_MNI``): the image must be stored on exactly that grid, because resampling
another template's space onto it would not reproduce the publisher's input. Our own models read a
box of MNI152NLin2009aSym; images in that space are resampled onto the model grid in world
coordinates. Each model applies its own normalisation (:func:`~.inference.normalise`).
"""
from __future__ import annotations

import os

import numpy as np

from .checkpoint import FSL_MNI_1MM_AFFINE, FSL_MNI_1MM_SHAPE, InputSpec, LoadedModel, load_model
from .inference import ensemble, normalise, on_grid, predict_arrays, to_grid


def needs_exact_grid(spec: InputSpec) -> bool:
    """Whether ``spec`` is the full FSL MNI152 1 mm grid (published models): images must be
    stored on it, not resampled onto it."""
    return (tuple(spec.shape) == FSL_MNI_1MM_SHAPE
            and np.allclose(np.asarray(spec.affine, float), np.asarray(FSL_MNI_1MM_AFFINE)))


def image_input(path: str, spec: InputSpec, mask_path: str | None = None) -> np.ndarray:
    """The network input of one image for ``spec``; ValueError naming the file when the image
    is not on the model's template grid. ``mask_mean`` models use ``mask_path``, else the
    image's non-zero voxels (a skull-stripped brain), resampled as the participant level
    resamples its mask (trilinear, > 0.5)."""
    import nibabel as nib

    from ..utils.images import load_image

    img = load_image(path)
    if needs_exact_grid(spec) and not on_grid(img, spec):
        raise ValueError(
            f"{path}: shape {tuple(img.shape[:3])}, affine {np.round(img.affine, 3).tolist()} is "
            f"not the model's template grid, the FSL MNI152 1 mm grid (182x218x182, affine "
            f"{[list(r) for r in FSL_MNI_1MM_AFFINE]}); `models predict` runs on images already "
            "registered to that grid (run the participant level for raw scans)")
    data = to_grid(img, spec)
    mask = None
    if spec.normalisation == "mask_mean":
        mask_img = nib.load(mask_path) if mask_path else nib.Nifti1Image(
            (np.asarray(img.dataobj) != 0).astype(np.float32), img.affine)
        mask = to_grid(mask_img, spec) > 0.5
        if not mask.any():
            raise ValueError(f"{mask_path or path}: the brain mask is empty on the model grid")
    return normalise(data, spec, mask, source=path)


def predict_images(members: list[LoadedModel], images: list[str], name: str | None = None,
                   masks: list[str] | None = None, device: str = "cpu",
                   precision: str = "fp32") -> list[dict]:
    """One dict per image: image, model, predicted_age, predicted_age_sd (None without one).

    Several ``members`` are an ensemble: mean age, SD by the law of total variance.
    """
    if masks and len(masks) != len(images):
        raise ValueError(f"give one mask per image ({len(masks)} masks, {len(images)} images)")
    name = name or members[0].name
    rows = []
    for i, image in enumerate(images):
        arrays: dict = {}
        ages, sds = [], []
        for model in members:
            if model.input not in arrays:
                arrays[model.input] = image_input(image, model.input, masks[i] if masks else None)
            age, sd, _ = predict_arrays(model, [arrays[model.input]], device=device,
                                        precision=precision)
            ages.append(float(age[0]))
            sds.append(float(sd[0]))
        age, sd = ensemble(ages, sds) if len(members) > 1 else (ages[0], sds[0])
        rows.append({"image": image, "model": name, "predicted_age": float(age),
                     "predicted_age_sd": float(sd) if np.isfinite(sd) else None})
    return rows


def load_request(request, device: str = "cpu") -> list[LoadedModel]:
    """The loaded members of a :class:`~.zoo.ModelRequest`."""
    return [load_model(path, device=device, name=row_name, modality=modality or None)
            for row_name, path, modality in request.members]


def check_images(images: list[str]) -> None:
    """FileNotFoundError naming the first image that does not exist."""
    for image in images:
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image not found: {image}")
