"""SmoothGrad saliency of brain-age networks, in model and MNI space, and its group summary.

SmoothGrad (Smilkov et al. 2017), as in the FLAIR brain-age study: Gaussian noise of 10-20 % of the
input's intensity range is added to the input ~25 times, and the absolute gradients of the
predicted age (the expectation over the bins for soft-label networks, the scalar otherwise) with
respect to the input voxels are averaged. Units: year per unit of normalised intensity.

The group level averages the participant maps (each first divided by its mean inside the template
brain mask, so that scans and models weigh the same) per diagnosis and modality, and summarises
them per region of :func:`tissue_atlas`, built offline from the MNI152 2009a tissue priors that
nilearn bundles.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..utils.images import atomic_write_bytes, atomic_write_text, resample_to_grid
from ..utils.templates import TEMPLATE
from .checkpoint import IRV2_CROP, IRV2_RESIZE, SFCN_CROP, InputSpec, centre_crop_slices

SALIENCY_PATTERN = re.compile(
    r"^(?P<prefix>sub-[^_]+(?:_[a-z]+-[^_]+)*?)_space-" + TEMPLATE
    + r"_desc-saliency_(?P<suffix>[A-Za-z0-9]+)\.nii\.gz$")


def _predicted_age(out: torch.Tensor, output: str, centres) -> torch.Tensor:
    if output == "bins":
        if centres is None:
            raise ValueError("output='bins' needs the bin centres")
        c = torch.as_tensor(np.asarray(centres), dtype=out.dtype, device=out.device)
        return (out.exp() * c).sum(dim=1)
    if output == "scalar":
        return out.reshape(out.shape[0], -1)[:, 0]
    raise ValueError(f"unknown output {output!r} (bins or scalar)")


def smoothgrad(network: torch.nn.Module, x: np.ndarray, *, output: str, centres=None,
               n_samples: int = 25, noise_fraction: float = 0.15, seed: int = 0,
               device: str = "cpu", batch_size: int = 1) -> np.ndarray:
    """SmoothGrad map of one model-grid input.

    Parameters
    ----------
    network : a network in inference form; it is run in eval mode on ``device`` (where it is
        left), its training flag and parameters' ``requires_grad`` restored afterwards.
    x : the model input (the array :func:`~brainage_bids.models.inference.model_input` returns).
    output : ``"bins"`` (log-probabilities; age = sum(exp(out) * centres)) or ``"scalar"``.
    centres : age-bin centres for ``"bins"``.
    n_samples : noisy copies averaged.
    noise_fraction : noise SD as a fraction of the input's intensity range (max - min).
    seed : seed of the noise, so maps are reproducible.
    batch_size : noisy copies per forward pass.

    Returns
    -------
    float32 array shaped like ``x``: mean absolute gradient of the predicted age (years per unit
    intensity).
    """
    x = np.asarray(x, dtype=np.float32)
    if not (0 <= noise_fraction < 1):
        raise ValueError("noise_fraction must be in [0, 1)")
    if n_samples < 1:
        raise ValueError("n_samples must be at least 1")
    sigma = float(noise_fraction) * float(x.max() - x.min())
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    base = torch.from_numpy(x)[None, None]
    was_training = network.training
    flags = [p.requires_grad for p in network.parameters()]
    dtype = next(iter(network.parameters()), torch.empty(0)).dtype
    network.eval().to(device)
    for p in network.parameters():
        p.requires_grad_(False)
    total = torch.zeros_like(base, dtype=torch.float64)
    try:
        done = 0
        while done < n_samples:
            k = min(batch_size, n_samples - done)
            noise = torch.randn((k, *base.shape[1:]), generator=gen) * sigma
            xi = (base + noise).to(device=device, dtype=dtype).requires_grad_(True)
            age = _predicted_age(network(xi), output, centres)
            (grad,) = torch.autograd.grad(age.sum(), xi)
            total += grad.abs().sum(dim=0, keepdim=True).detach().cpu().to(torch.float64)
            done += k
    finally:
        for p, f in zip(network.parameters(), flags):
            p.requires_grad_(f)
        network.train(was_training)
    return (total / n_samples)[0, 0].numpy().astype(np.float32)


def ensemble_saliency(models, arrays, **kwargs) -> np.ndarray:
    """Mean SmoothGrad map over ensemble members that read the same grid.

    ``models`` are :class:`~brainage_bids.models.checkpoint.LoadedModel`; ``arrays`` their inputs
    (one per model, or a single array shared by all). ``kwargs`` go to :func:`smoothgrad`.
    Members on different grids are averaged in MNI space by :func:`scan_saliency`.
    """
    models = list(models)
    if isinstance(arrays, np.ndarray):
        arrays = [arrays] * len(models)
    arrays = list(arrays)
    if len(arrays) != len(models) or not models:
        raise ValueError("give one input array per model (or one shared array)")
    if len({a.shape for a in arrays}) != 1:
        raise ValueError("members read different grids: average them in MNI space "
                         "(scan_saliency)")
    maps = [smoothgrad(m.network, a, output=m.output, centres=m.centres, **kwargs)
            for m, a in zip(models, arrays)]
    return np.mean(maps, axis=0).astype(np.float32)


def model_grid_map(sal: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A saliency map on the network's input array, put back on ``spec``'s grid.

    For the FLAIR-Brain-Age recipe the network reads a resized (121x145x121) and cropped
    (118x142x118) array: the crop is padded back with zeros and the map resized to ``spec.shape``;
    for the published SFCNs the 160x192x160 crop is padded back onto the FSL grid.
    """
    sal = np.asarray(sal, dtype=np.float32)
    if sal.shape == tuple(spec.shape):
        return sal
    if spec.normalisation in ("ukb_sfcn", "flair_brain_age_sfcn") and sal.shape == SFCN_CROP:
        full = np.zeros(tuple(spec.shape), dtype=np.float32)
        full[centre_crop_slices(spec.shape, SFCN_CROP)] = sal
        return full
    if spec.normalisation == "flair_brain_age" and sal.shape == tuple(IRV2_CROP):
        full = np.zeros(IRV2_RESIZE, dtype=np.float32)
        starts = [(s - c) // 2 for s, c in zip(IRV2_RESIZE, IRV2_CROP)]
        full[tuple(slice(a, a + c) for a, c in zip(starts, IRV2_CROP))] = sal
        t = torch.from_numpy(full)[None, None]
        return F.interpolate(t, size=tuple(spec.shape), mode="trilinear",
                             align_corners=False)[0, 0].numpy()
    raise ValueError(f"saliency shape {sal.shape} does not match the model grid {spec.shape}")


def saliency_to_mni(sal: np.ndarray, spec: InputSpec, template_file, out_file) -> str:
    """Resample a model-grid saliency map onto the 1 mm template grid and write it as NIfTI.

    Trilinear interpolation in world coordinates; negative interpolation overshoot is clipped.
    Returns ``out_file``.
    """
    grid = model_grid_map(sal, spec)
    tpl = nib.load(str(template_file))
    img = nib.Nifti1Image(grid, np.asarray(spec.affine, dtype=float))
    data = np.clip(resample_to_grid(img, tpl.affine, tpl.shape[:3], order=1), 0, None)
    _write_nifti(data, tpl.affine, out_file)
    return str(out_file)


def mni_saliency(models, inputs: dict, template_file, out_file, **kwargs) -> str:
    """Mean SmoothGrad map of ``models`` written in MNI space, from inputs already computed.

    ``inputs`` maps each model's :class:`InputSpec` to its input array (what the predictor builds
    with :func:`~brainage_bids.models.inference.model_input`). Members sharing a grid are
    averaged there (:func:`ensemble_saliency`); groups on different grids are mapped to MNI and
    averaged weighted by their member count. ``kwargs`` go to :func:`smoothgrad`.
    Returns ``out_file``.
    """
    by_spec: dict = {}
    for m in models:
        by_spec.setdefault(m.input, []).append(m)
    tpl = nib.load(str(template_file))
    total = np.zeros(tpl.shape[:3], dtype=np.float64)
    n = 0
    for spec, members in by_spec.items():
        grid = model_grid_map(ensemble_saliency(members, inputs[spec], **kwargs), spec)
        img = nib.Nifti1Image(grid, np.asarray(spec.affine, dtype=float))
        total += len(members) * np.clip(
            resample_to_grid(img, tpl.affine, tpl.shape[:3], order=1), 0, None)
        n += len(members)
    if not n:
        raise ValueError("no models to explain")
    _write_nifti((total / n).astype(np.float32), tpl.affine, out_file)
    return str(out_file)


def scan_saliency(models, preproc_file, mask_file, out_file, *, template_file, head_file=None,
                  **kwargs) -> str:
    """:func:`mni_saliency` of one scan, building the model inputs from its preprocessed image
    and brain mask (and whole-head image for models that read the head)."""
    from .inference import model_input

    inputs = {m.input: None for m in models}
    for spec in inputs:
        inputs[spec] = model_input(str(preproc_file), str(mask_file), spec, head_file=head_file)
    return mni_saliency(models, inputs, template_file, out_file, **kwargs)


def _write_nifti(data: np.ndarray, affine, out_file) -> None:
    import gzip

    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm")
    payload = img.to_bytes()
    if str(out_file).endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6)
    atomic_write_bytes(out_file, payload)


# ---------------------------------------------------------------------------------------------
# the atlas
#: Regions of :func:`tissue_atlas` (label -> name); hemisphere from the sign of x (RAS).
ATLAS_REGIONS = {
    1: "thalamus", 2: "basal_ganglia", 3: "other_deep_gm", 4: "cortical_gm",
    5: "white_matter", 6: "csf",
}
ATLAS_DESCRIPTION = (
    "Tissue-prior regions on the MNI152NLin2009aSym 1 mm grid, made from the ICBM 2009a tissue "
    "priors that nilearn bundles (no download). Inside the template brain mask each voxel takes "
    "its most probable tissue (GM, WM, or CSF = 1 - GM - WM). Grey matter inside the central box "
    "|x| <= 32, -40 <= y <= 28, -12 <= z <= 24 mm is deep grey matter, split by coordinates into "
    "'thalamus' (|x| <= 22, -38 <= y <= -4, -4 <= z <= 20 mm) and 'basal_ganglia' (y > -4: "
    "caudate, putamen, accumbens; the pallidum is WM-like in these priors) and 'other_deep_gm' "
    "(the rest, e.g. parts of hippocampus and amygdala); all other grey matter, cerebellar cortex "
    "included, is 'cortical_gm'. Boxes are approximations, not anatomical delineations. Left "
    "labels are the region label, right ones the label + 10.")


def _nilearn_prior(kind: str) -> nib.Nifti1Image:
    import nilearn

    path = (Path(nilearn.__file__).parent / "datasets" / "data"
            / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")
    if not path.exists():
        raise FileNotFoundError(f"{path}: the MNI152 2009a {kind.upper()} prior bundled with "
                                "nilearn is missing; reinstall nilearn")
    return nib.load(str(path))


def tissue_atlas(mask_file=None) -> tuple[nib.Nifti1Image, pd.DataFrame]:
    """The region atlas described in :data:`ATLAS_DESCRIPTION` and its label table.

    ``mask_file``: template brain mask (default: that of
    :func:`~brainage_bids.utils.templates.get_template`).
    Returns the label image (uint8, 0 outside the brain) and a frame (index, name, hemisphere,
    voxels).
    """
    from ..utils.templates import get_template

    gm_img = _nilearn_prior("gm")
    gm = np.asarray(gm_img.dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(_nilearn_prior("wm").dataobj, dtype=np.float32) / 255.0
    mask_img = nib.load(str(mask_file or get_template().mask))
    mask = np.asarray(mask_img.dataobj) > 0
    if mask.shape != gm.shape or not np.allclose(mask_img.affine, gm_img.affine):
        mask = resample_to_grid(mask_img, gm_img.affine, gm.shape, order=0) > 0
    tissue = np.argmax(np.stack([gm, wm, np.clip(1 - gm - wm, 0, 1)]), axis=0)  # 0 GM 1 WM 2 CSF
    ijk = np.indices(gm.shape).reshape(3, -1)
    xyz = (gm_img.affine[:3, :3] @ ijk + gm_img.affine[:3, 3:4]).reshape(3, *gm.shape)
    x, y, z = xyz
    ax = np.abs(x)
    deep = (ax <= 32) & (y >= -40) & (y <= 28) & (z >= -12) & (z <= 24)
    thal = (ax <= 22) & (y >= -38) & (y <= -4) & (z >= -4) & (z <= 20)
    labels = np.zeros(gm.shape, dtype=np.uint8)
    is_gm = mask & (tissue == 0)
    labels[is_gm] = 4
    labels[is_gm & deep] = 3
    labels[is_gm & deep & (y > -4)] = 2
    labels[is_gm & thal] = 1
    labels[mask & (tissue == 1)] = 5
    labels[mask & (tissue == 2)] = 6
    labels[(labels > 0) & (x >= 0)] += 10
    rows = []
    for idx, name in ATLAS_REGIONS.items():
        for hemi, off in (("left", 0), ("right", 10)):
            rows.append({"index": idx + off, "name": name, "hemisphere": hemi,
                         "voxels": int((labels == idx + off).sum())})
    return nib.Nifti1Image(labels, gm_img.affine), pd.DataFrame(rows)


def region_means(data: np.ndarray, labels: np.ndarray, table: pd.DataFrame) -> pd.DataFrame:
    """Mean of ``data`` in every atlas region, and relative to the mean over all labelled voxels
    (``relative`` > 1: above the brain average). ``data`` must be on the atlas grid."""
    brain = labels > 0
    overall = float(data[brain].mean()) if brain.any() else float("nan")
    rows = []
    for r in table.itertuples():
        sel = labels == r.index
        mean = float(data[sel].mean()) if sel.any() else float("nan")
        rows.append({"region": r.name, "hemisphere": r.hemisphere, "voxels": int(sel.sum()),
                     "mean_saliency": mean,
                     "relative": mean / overall if overall > 0 else float("nan")})
    rows.append({"region": "brain", "hemisphere": "both", "voxels": int(brain.sum()),
                 "mean_saliency": overall, "relative": 1.0 if overall > 0 else float("nan")})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# group level
def find_saliency_maps(output_dir) -> pd.DataFrame:
    """Participant saliency maps under ``output_dir``: participant_id, session_id, suffix, path."""
    rows = []
    for path in sorted(Path(output_dir).glob("sub-*/**/anat/*_desc-saliency_*.nii.gz")):
        m = SALIENCY_PATTERN.match(path.name)
        if not m:
            continue
        ents = dict(e.split("-", 1) for e in m["prefix"].split("_"))
        rows.append({"participant_id": f"sub-{ents['sub']}",
                     "session_id": f"ses-{ents['ses']}" if "ses" in ents else None,
                     "suffix": m["suffix"], "path": str(path)})
    return pd.DataFrame(rows, columns=["participant_id", "session_id", "suffix", "path"])


def participant_groups(output_dir, bids_dir=None, column: str = "diagnosis") -> dict[str, str]:
    """participant_id -> group label from participants.tsv (``bids_dir``, else the local
    SourceDatasets URL of the derivatives' dataset_description.json); empty when unknown."""
    from ..reports.data import read_participants_table

    parts = read_participants_table(output_dir, bids_dir)
    if parts is None or column not in parts:
        return {}
    return {str(p): str(v) for p, v in zip(parts["participant_id"], parts[column])
            if isinstance(v, str) and v}


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "", str(text)) or "na"


def group_saliency(output_dir, *, bids_dir=None, group_column: str = "diagnosis") -> dict:
    """Mean saliency map per group and modality, and the region table.

    Each scan's map is divided by its mean inside the template brain mask; a participant's scans
    (sessions) are averaged first, then participants within a group (``group_column`` of
    participants.tsv; ``all`` when there is none). Writes, under ``OUTPUT_DIR/group/saliency/``:
    ``group-<label>_space-MNI152NLin2009aSym_desc-saliency_<suffix>.nii.gz``,
    ``saliency_regions.tsv`` (group, suffix, n, region, hemisphere, voxels, relative: the
    region's mean of the normalised map, 1 = the brain's mean) and the atlas
    (``atlas-tissue_space-MNI152NLin2009aSym_dseg.nii.gz`` + ``.tsv``).
    Returns {"maps": [...], "regions": path or None, "atlas": path or None}.
    """
    from ..utils.templates import get_template

    output_dir = Path(output_dir)
    maps = find_saliency_maps(output_dir)
    out = {"maps": [], "regions": None, "atlas": None}
    if maps.empty:
        return out
    dest = output_dir / "group" / "saliency"
    tpl = get_template()
    atlas_img, atlas_table = tissue_atlas(tpl.mask)
    labels = np.asarray(atlas_img.dataobj)
    brain = labels > 0
    groups = participant_groups(output_dir, bids_dir, group_column)
    maps["group"] = [groups.get(p, "all" if not groups else "n/a") for p in maps["participant_id"]]
    region_rows = []
    for (group, suffix), g in maps.groupby(["group", "suffix"], sort=True):
        per_participant = []
        for _, scans in g.groupby("participant_id", sort=True):
            acc = np.zeros(labels.shape, dtype=np.float64)
            for path in scans["path"]:
                img = nib.load(path)
                data = np.asarray(img.dataobj, dtype=np.float32)
                if data.shape != labels.shape or not np.allclose(img.affine, atlas_img.affine):
                    data = resample_to_grid(img, atlas_img.affine, labels.shape, order=1)
                mean = float(data[brain].mean())
                acc += data / mean if mean > 0 else data
            per_participant.append(acc / len(scans))
        mean_map = np.mean(per_participant, axis=0).astype(np.float32)
        path = dest / f"group-{_label(group)}_space-{TEMPLATE}_desc-saliency_{suffix}.nii.gz"
        _write_nifti(mean_map, atlas_img.affine, path)
        out["maps"].append(str(path))
        reg = region_means(mean_map, labels, atlas_table).drop(columns="mean_saliency")
        reg.insert(0, "n", len(per_participant))
        reg.insert(0, "suffix", suffix)
        reg.insert(0, "group", group)
        region_rows.append(reg)
    regions = pd.concat(region_rows, ignore_index=True)
    regions_path = dest / "saliency_regions.tsv"
    atomic_write_text(regions_path, regions.to_csv(sep="\t", index=False, na_rep="n/a",
                                                   float_format="%.6g"))
    atlas_path = dest / f"atlas-tissue_space-{TEMPLATE}_dseg.nii.gz"
    import gzip

    atomic_write_bytes(atlas_path, gzip.compress(atlas_img.to_bytes(), compresslevel=6))
    atomic_write_text(atlas_path.with_name(atlas_path.name.replace(".nii.gz", ".tsv")),
                      atlas_table.to_csv(sep="\t", index=False))
    out.update(regions=str(regions_path), atlas=str(atlas_path))
    return out


def saliency_file(preproc_file: str | os.PathLike) -> str:
    """Saliency path of a scan from its desc-preproc path (same folder and entities)."""
    name = str(preproc_file)
    if "_desc-preproc_" not in name:
        raise ValueError(f"{name}: not a desc-preproc file")
    return name.replace("_desc-preproc_", "_desc-saliency_")
