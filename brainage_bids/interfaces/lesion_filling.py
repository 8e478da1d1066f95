"""Lesion filling with intensities of the normal-appearing white matter (NAWM) of the same image.

Method (native space, on the N4-corrected brain, before resampling and intensity normalisation):

1. Lesion mask on the image grid (:func:`brainage_bids.utils.lesion_masks.mask_on_grid`); lesion voxels
   outside the brain mask are left alone (they are 0 after skull stripping).
2. White matter: Atropos (antspyx; Avants et al. 2011, Neuroinformatics 9:381-400) three-class
   mixture model with an MRF prior (smoothing 0.1, radius 1 voxel, 5 iterations), initialised with
   the MNI152NLin2009aSym tissue priors (nilearn's GM and WM probability maps, CSF = 1 - GM - WM)
   brought to the native grid through the inverse of the scan's affine registration, prior weight
   0.25 - the prior-guided segmentation LST builds on (SPM) - run inside the brain mask minus the
   dilated lesions, on intensities clipped to their 1st-99th percentiles there, with a constant
   random seed (Atropos seeds from the clock by default). With prior images Atropos keeps their
   order, so the WM class is the class of the WM prior whatever the contrast. This matters on
   FLAIR, where grey matter is slightly brighter than white matter: on the three MS patients of
   ms-lesjak2018-mni, the k-means class of the FLAIR closest to the T1w white matter was the
   middle one for two patients and the brightest for the third (Dice 0.58-0.77), whereas the
   prior-guided FLAIR white matter overlaps the prior-guided T1w white matter with Dice 0.73-0.81
   and 97.5-99.6 % of its NAWM voxels lie in T1w white matter.
3. NAWM: WM posterior >= 0.9, outside the lesion mask dilated by one voxel (3x3x3 cube), so the
   lesion rim and partial-volume voxels do not enter the reference distribution.
4. Filling, per lesion (26-connected component), in the manner of FSL's lesion_filling
   (Battaglini, Jenkinson & De Stefano 2012, Hum Brain Mapp 33:2062-2071), which fills each
   lesion with intensities of the white matter around it, and of LST and LEAP (Chard et al. 2010,
   J Magn Reson Imaging 32:223-228), which draw from the NAWM intensity distribution. The
   neighbourhood rule and the non-parametric draw are this project's: the reference is the NAWM
   within a distance of the lesion that grows over 2, 4, 8, 16 and 32 mm until it holds at least
   :data:`MIN_NEIGHBOURS` voxels (all NAWM when none does); each lesion voxel takes the intensity
   of a NAWM voxel of that reference drawn at random with replacement (numpy PCG64, fixed seed),
   so filled values follow the empirical local NAWM distribution and never leave its range.
   Voxels outside the lesion mask are not changed.

Filling happens in native space because the masks are drawn there (no interpolation of the
mask before filling) and LST and FSL fill the native image too. The filled image is brought to
MNI with the raw image's affine and normalised inside the raw image's MNI brain mask, so raw and
filled predictions differ by the filling only, not by a second registration.
"""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)
from scipy import ndimage

from ..utils.atropos import PRIOR_WEIGHT, prior_guided_atropos
from ..utils.images import normalise_mean_in_mask

FILL_SEED = 1
NEIGHBOURHOOD_MM = (2.0, 4.0, 8.0, 16.0, 32.0)
MIN_NEIGHBOURS = 500
NAWM_POSTERIOR = 0.9
MIN_NAWM_ML = 1.0
REFERENCES = [
    ("Battaglini M, Jenkinson M, De Stefano N. Evaluating and reducing the impact of white matter "
     "lesions on brain volume measurements. Hum Brain Mapp. 2012;33:2062-2071"),
    ("Chard DT et al. Reducing the impact of white matter lesions on automated measures of brain "
     "gray and white matter volumes. J Magn Reson Imaging. 2010;32:223-228"),
    ("Avants BB et al. An open source multivariate framework for n-tissue segmentation with "
     "evaluation on public data. Neuroinformatics. 2011;9:381-400"),
]
METHOD = ("lesion voxels replaced by intensities drawn at random (with replacement, seeded) from "
          "the normal-appearing white matter (NAWM) around each lesion: NAWM within 2, 4, 8, 16 "
          "or 32 mm of the lesion, the smallest distance giving at least 500 voxels (after FSL "
          "lesion_filling, Battaglini et al. 2012, and LST); NAWM = Atropos WM posterior "
          ">= 0.9 (prior-guided with the MNI152NLin2009aSym tissue priors) outside the lesion "
          "mask dilated by one voxel; done on the N4-corrected native image, which is then "
          "resampled with the raw image's affine and normalised in the raw image's MNI brain "
          "mask")


def prior_files() -> tuple[str, str]:
    """nilearn's MNI152NLin2009aSym GM and WM probability maps (bundled in its wheel)."""
    from pathlib import Path

    import nilearn

    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    files = [folder / f"mni_icbm152_{t}_tal_nlin_sym_09a_converted.nii.gz" for t in ("gm", "wm")]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"tissue priors not found: {', '.join(missing)} (they ship with "
                                "nilearn; reinstall it)")
    return str(files[0]), str(files[1])


def native_priors(reference_file: str, transform: str) -> np.ndarray:
    """CSF, GM and WM prior probabilities (3, X, Y, Z) on the grid of ``reference_file``, brought
    from MNI through the inverse of ``transform`` (native -> MNI affine)."""
    import ants

    fixed = ants.image_read(reference_file)
    out = []
    for f in prior_files():
        moving = ants.image_read(f)
        arr = moving.numpy()
        if arr.max() > 1.5:  # stored as 0-255
            moving = moving.new_image_like((arr / 255.0).astype(np.float32))
        warped = ants.apply_transforms(fixed, moving, [transform], interpolator="linear",
                                       whichtoinvert=[True])
        out.append(np.clip(warped.numpy(), 0, 1))
    gm, wm = out
    csf = np.clip(1.0 - gm - wm, 0, 1)
    return np.stack([csf, gm, wm]).astype(np.float32)


def segment_white_matter(data: np.ndarray, zooms, region: np.ndarray, priors: np.ndarray,
                         threads: int = 1) -> dict:
    """Prior-guided three-class Atropos inside ``region``; returns ``posterior`` (WM posterior),
    ``labels`` (1 CSF, 2 GM, 3 WM, 0 outside) and ``class_means`` (clipped intensities).

    Atropos runs with a constant seed, so reruns give identical results (see
    :func:`~brainage_bids.utils.atropos.prior_guided_atropos`).
    """
    region = region > 0
    clipped, seg = prior_guided_atropos(data, zooms, region, priors, threads)
    labels = np.rint(seg["segmentation"].numpy()).astype(np.uint8) * region
    posterior = seg["probabilityimages"][2].numpy().astype(np.float32) * region
    means = [float(clipped[labels == k].mean()) if (labels == k).any() else float("nan")
             for k in (1, 2, 3)]
    return {"posterior": posterior, "labels": labels.astype(np.uint8), "class_means": means}


def nawm_mask(posterior: np.ndarray, brain: np.ndarray, lesion: np.ndarray,
              threshold: float = NAWM_POSTERIOR) -> np.ndarray:
    """WM posterior >= ``threshold`` in the brain, outside the lesion mask dilated by one voxel
    (3x3x3 cube)."""
    exclude = ndimage.binary_dilation(lesion > 0, structure=np.ones((3, 3, 3), bool))
    return (posterior >= threshold) & (brain > 0) & ~exclude


def fill_lesions(data: np.ndarray, lesion: np.ndarray, nawm: np.ndarray, zooms, *,
                 seed: int = FILL_SEED, radii_mm=NEIGHBOURHOOD_MM,
                 min_neighbours: int = MIN_NEIGHBOURS) -> tuple[np.ndarray, dict]:
    """Replace the voxels of ``lesion`` by NAWM intensities drawn around each lesion (module
    docstring, step 4). Returns the filled copy (every other voxel bit-identical) and a summary."""
    data = np.asarray(data)
    lesion = np.asarray(lesion) > 0
    nawm = np.asarray(nawm) > 0
    if not nawm.any():
        raise ValueError("no normal-appearing white matter to draw fill values from")
    zooms = np.asarray(zooms, dtype=float)[:3]
    filled = data.copy()
    rng = np.random.default_rng(seed)
    labels, n = ndimage.label(lesion, structure=np.ones((3, 3, 3), bool))
    boxes = ndimage.find_objects(labels)
    pad = np.ceil(max(radii_mm) / zooms).astype(int)
    used_radii = []
    all_nawm = data[nawm]
    for i, box in enumerate(boxes, start=1):
        lo = [max(0, s.start - p) for s, p in zip(box, pad)]
        hi = [min(d, s.stop + p) for s, p, d in zip(box, pad, data.shape)]
        crop = tuple(slice(a, b) for a, b in zip(lo, hi))
        comp = labels[crop] == i
        dist = ndimage.distance_transform_edt(~comp, sampling=zooms)
        ref_nawm = nawm[crop]
        values, radius = None, None
        for r in radii_mm:
            sel = ref_nawm & (dist <= r)
            if sel.sum() >= min_neighbours:
                values, radius = data[crop][sel], float(r)
                break
        if values is None:
            values = all_nawm
        used_radii.append(radius)
        idx = np.nonzero(comp)
        draws = values[rng.integers(0, values.size, size=idx[0].size)]
        sub = filled[crop]
        sub[idx] = draws
    info = {"LesionComponents": int(n), "FilledVoxels": int(lesion.sum()),
            "NeighbourhoodRadiiMm": {str(r): int(sum(u == r for u in used_radii))
                                     for r in radii_mm},
            "ComponentsFilledFromAllNAWM": int(sum(u is None for u in used_radii))}
    return filled, info


def _stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"N": 0}
    p1, p50, p99 = np.percentile(values, [1, 50, 99])
    return {"N": int(values.size), "Mean": float(values.mean()), "SD": float(values.std()),
            "P01": float(p1), "Median": float(p50), "P99": float(p99)}


def fill_image(in_file: str, mask_file: str, lesion_file: str, transform: str, out_file: str, *,
               head_file: str | None = None, out_head: str | None = None,
               out_nawm: str | None = None, seed: int = FILL_SEED, threads: int = 1) -> dict:
    """Fill the lesions of a native N4-corrected brain (module docstring); all files on one grid.

    Writes ``out_file`` (and ``out_head``: the whole head with the same voxels replaced, when
    ``head_file`` is given; ``out_nawm``: the NAWM mask). Returns the report (JSON-ready).
    """
    img = nib.load(in_file)
    data = np.asarray(img.dataobj, dtype=np.float32)
    brain = np.asarray(nib.load(mask_file).dataobj) > 0
    lesion_all = np.asarray(nib.load(lesion_file).dataobj) > 0
    for name, arr in (("brain mask", brain), ("lesion mask", lesion_all)):
        if arr.shape != data.shape:
            raise ValueError(f"{name} shape {arr.shape} differs from the image {data.shape}")
    lesion = lesion_all & brain
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    voxel_ml = float(np.prod(zooms)) / 1000.0
    exclude = ndimage.binary_dilation(lesion, structure=np.ones((3, 3, 3), bool))
    priors = native_priors(in_file, transform)
    seg = segment_white_matter(data, zooms, brain & ~exclude, priors, threads=threads)
    nawm = nawm_mask(seg["posterior"], brain, lesion)
    threshold = NAWM_POSTERIOR
    if nawm.sum() * voxel_ml < MIN_NAWM_ML:  # a poor segmentation: take the whole WM class
        nawm = (seg["labels"] == 3) & ~exclude
        threshold = None
    if nawm.sum() * voxel_ml < MIN_NAWM_ML:
        raise ValueError(f"{in_file}: less than {MIN_NAWM_ML} mL of normal-appearing white "
                         "matter found; cannot fill lesions")
    filled, info = fill_lesions(data, lesion, nawm, zooms, seed=seed)
    nib.save(nib.Nifti1Image(filled, img.affine, img.header), out_file)
    if head_file and out_head:
        himg = nib.load(head_file)
        head = np.asarray(himg.dataobj, dtype=np.float32).copy()
        head[lesion] = np.clip(filled[lesion], 0, None)
        nib.save(nib.Nifti1Image(head, himg.affine, himg.header), out_head)
    if out_nawm:
        nib.save(nib.Nifti1Image(nawm.astype(np.uint8), img.affine), out_nawm)
    means = seg["class_means"]
    return {
        "LesionFilling": {
            "Method": METHOD,
            "References": REFERENCES,
            "Seed": int(seed),
            "Space": "native (N4-corrected, before resampling and normalisation)",
            "WhiteMatter": {
                "Segmentation": "Atropos, 3 classes, MNI152NLin2009aSym priors (weight "
                                f"{PRIOR_WEIGHT}), MRF [0.1,1x1x1], 5 iterations",
                "NAWMPosteriorMin": threshold,
                "NAWMExclusion": "lesion mask dilated by 1 voxel (3x3x3)",
                "ClassMeans": {"CSF": means[0], "GM": means[1], "WM": means[2]},
            },
            "LesionVoxelsInBrain": int(lesion.sum()),
            "LesionVoxelsOutsideBrainMask": int((lesion_all & ~brain).sum()),
            "LesionVolumeInBrainMl": round(float(lesion.sum()) * voxel_ml, 3),
            **info,
            "NativeIntensities": {"NAWM": _stats(data[nawm]),
                                  "LesionRaw": _stats(data[lesion]),
                                  "LesionFilled": _stats(filled[lesion])},
        }
    }


def filled_to_template(in_file: str, transform: str, template_file: str, mask_file: str,
                       out_file: str) -> None:
    """A native image to MNI as the raw image went: affine (linear), clipped at 0, masked with the
    raw image's MNI brain mask and divided by its mean there."""
    import ants

    fixed = ants.image_read(template_file)
    warped = ants.apply_transforms(fixed, ants.image_read(in_file), [transform],
                                   interpolator="linear").numpy()
    mask = np.asarray(nib.load(mask_file).dataobj) > 0
    norm = normalise_mean_in_mask(np.clip(warped, 0, None) * mask, mask)
    nib.save(nib.Nifti1Image(norm, nib.load(template_file).affine), out_file)


def mask_to_template(in_file: str, transform: str, template_file: str, out_file: str) -> None:
    """A native binary mask to MNI: affine, trilinear, thresholded at 0.5 (uint8). A lesion too
    small to reach 0.5 anywhere keeps its highest voxel, so no lesion disappears."""
    import ants

    fixed = ants.image_read(template_file)
    warped = ants.apply_transforms(fixed, ants.image_read(in_file), [transform],
                                   interpolator="linear").numpy()
    mask = warped >= 0.5
    labels, n = ndimage.label(warped > 0.05, structure=np.ones((3, 3, 3), bool))
    if n:
        index = np.arange(1, n + 1)
        kept = ndimage.maximum(mask, labels, index)
        for has, peak in zip(kept, ndimage.maximum_position(warped, labels, index)):
            if not has:
                mask[peak] = True
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), nib.load(template_file).affine), out_file)


# ---------------------------------------------------------------------------------------------
# interfaces
class _MaskOnGridInputSpec(BaseInterfaceInputSpec):
    mask_file = File(exists=True, mandatory=True, desc="lesion mask as supplied")
    reference = File(exists=True, mandatory=True, desc="the image whose grid the mask goes to")
    source_file = traits.Str(desc="the BIDS image, named in errors")
    error = traits.Str(desc="when set, the mask cannot be used: fail with this message")


class _MaskOnGridOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="binary lesion mask on the reference grid")
    volume_ml = traits.Float(desc="lesion volume on the reference grid")
    resampled = traits.Bool(desc="whether the mask was on another grid")


class LesionMaskOnGrid(SimpleInterface):
    """A lesion mask on the grid of its image (see
    :func:`~brainage_bids.utils.lesion_masks.mask_on_grid`)."""

    input_spec = _MaskOnGridInputSpec
    output_spec = _MaskOnGridOutputSpec

    def _run_interface(self, runtime):
        from ..utils.lesion_masks import mask_on_grid

        if isdefined(self.inputs.error) and self.inputs.error:
            raise ValueError(self.inputs.error)
        out = os.path.join(runtime.cwd, "lesion_native.nii.gz")
        info = mask_on_grid(self.inputs.mask_file, self.inputs.reference, out,
                            source=self.inputs.source_file or None)
        self._results.update(out_file=out, volume_ml=info["volume_ml"],
                             resampled=info["resampled"])
        return runtime


class _FillInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="N4-corrected native brain")
    mask_file = File(exists=True, mandatory=True, desc="native brain mask")
    lesion_file = File(exists=True, mandatory=True, desc="lesion mask on the image grid")
    transform = File(exists=True, mandatory=True, desc="native -> MNI affine (for the priors)")
    head_file = File(exists=True, desc="N4-corrected whole head, filled alike when given")
    seed = traits.Int(FILL_SEED, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _FillOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="lesion-filled native brain")
    out_head = File(desc="lesion-filled native head (when head_file is given)")
    out_nawm = File(exists=True, desc="NAWM mask the fill values were drawn from")
    out_report = File(exists=True, desc="JSON: method, NAWM and lesion intensity statistics")


class FillLesions(SimpleInterface):
    """Lesion filling with NAWM intensities (see the module docstring)."""

    input_spec = _FillInputSpec
    output_spec = _FillOutputSpec

    def _run_interface(self, runtime):
        out = os.path.join(runtime.cwd, "brain_filled.nii.gz")
        nawm = os.path.join(runtime.cwd, "nawm_mask.nii.gz")
        head = (self.inputs.head_file if isdefined(self.inputs.head_file) else None)
        out_head = os.path.join(runtime.cwd, "head_filled.nii.gz") if head else None
        report = fill_image(self.inputs.in_file, self.inputs.mask_file, self.inputs.lesion_file,
                            self.inputs.transform, out, head_file=head, out_head=out_head,
                            out_nawm=nawm, seed=self.inputs.seed,
                            threads=self.inputs.num_threads)
        js = os.path.join(runtime.cwd, "lesion_filling.json")
        with open(js, "w") as fh:
            json.dump(report, fh, indent=2)
        self._results.update(out_file=out, out_nawm=nawm, out_report=js)
        if out_head:
            self._results["out_head"] = out_head
        return runtime


class _ToTemplateInputSpec(BaseInterfaceInputSpec):
    filled_file = File(exists=True, mandatory=True, desc="lesion-filled native brain")
    lesion_file = File(exists=True, mandatory=True, desc="native lesion mask")
    transform = File(exists=True, mandatory=True, desc="the raw image's native -> MNI affine")
    template = File(exists=True, mandatory=True)
    mni_mask = File(exists=True, mandatory=True, desc="the raw image's MNI brain mask")
    filled_head = File(exists=True, desc="lesion-filled native head")


class _ToTemplateOutputSpec(TraitedSpec):
    filled = File(exists=True, desc="lesion-filled brain in MNI, mean 1 in the brain mask")
    lesion = File(exists=True, desc="lesion mask in MNI")
    head = File(desc="lesion-filled head in MNI")


class LesionToTemplate(SimpleInterface):
    """The filled brain (normalised as the raw one), the lesion mask and optionally the filled
    head in MNI space, with the raw image's transform."""

    input_spec = _ToTemplateInputSpec
    output_spec = _ToTemplateOutputSpec

    def _run_interface(self, runtime):
        from .ants import apply_to_template

        filled = os.path.join(runtime.cwd, "brain_filled_mni.nii.gz")
        lesion = os.path.join(runtime.cwd, "lesion_mni.nii.gz")
        filled_to_template(self.inputs.filled_file, self.inputs.transform, self.inputs.template,
                           self.inputs.mni_mask, filled)
        mask_to_template(self.inputs.lesion_file, self.inputs.transform, self.inputs.template,
                         lesion)
        self._results.update(filled=filled, lesion=lesion)
        if isdefined(self.inputs.filled_head):
            head = os.path.join(runtime.cwd, "head_filled_mni.nii.gz")
            apply_to_template(self.inputs.filled_head, self.inputs.transform,
                              self.inputs.template, head)
            self._results["head"] = head
        return runtime


def fill_like(head_file: str, brain_file: str, filled_file: str, lesion_file: str,
              out_file: str) -> int:
    """Carry a fill made on ``brain_file`` (N4 fitted in the brain mask) into another bias
    correction of the same image, ``head_file`` (e.g. the whole-head N4 of the FLAIR-Brain-Age
    recipe): each filled voxel becomes ``filled * head / brain`` there, the filled value times the
    ratio of the two bias fields, so the fill keeps its relation to the white matter around it.
    All files on one grid; returns the number of voxels replaced."""
    himg = nib.load(head_file)
    head = np.asarray(himg.dataobj, dtype=np.float32).copy()
    brain = np.asarray(nib.load(brain_file).dataobj, dtype=np.float32)
    filled = np.asarray(nib.load(filled_file).dataobj, dtype=np.float32)
    lesion = np.asarray(nib.load(lesion_file).dataobj) > 0
    for name, arr in (("brain", brain), ("filled", filled), ("lesion mask", lesion)):
        if arr.shape != head.shape:
            raise ValueError(f"{name} shape {arr.shape} differs from the head {head.shape}")
    sel = lesion & (brain > 0)
    head[sel] = np.clip(filled[sel] * head[sel] / brain[sel], 0, None)
    nib.save(nib.Nifti1Image(head, himg.affine, himg.header), out_file)
    return int(sel.sum())


class _FillLikeInputSpec(BaseInterfaceInputSpec):
    head_file = File(exists=True, mandatory=True, desc="the image under another bias correction")
    brain_file = File(exists=True, mandatory=True, desc="the brain the fill was made on")
    filled_file = File(exists=True, mandatory=True, desc="that brain, lesion-filled")
    lesion_file = File(exists=True, mandatory=True, desc="lesion mask on the image grid")


class _FillLikeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="lesion-filled head")


class FillLike(SimpleInterface):
    """A fill carried into another bias correction of the image (see :func:`fill_like`)."""

    input_spec = _FillLikeInputSpec
    output_spec = _FillLikeOutputSpec

    def _run_interface(self, runtime):
        out = os.path.join(runtime.cwd, "head_filled.nii.gz")
        fill_like(self.inputs.head_file, self.inputs.brain_file, self.inputs.filled_file,
                  self.inputs.lesion_file, out)
        self._results["out_file"] = out
        return runtime
