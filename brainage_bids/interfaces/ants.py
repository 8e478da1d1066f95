"""N4 bias correction and affine registration to a template with antspyx.

Two recipes (models/recipes.py): our own (N4 inside the brain mask, brain to template brain) and
the FLAIR-Brain-Age whole-head one (N4 on the whole head without a mask, whole head to the
whole-head template).
"""
from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from ..utils.images import mask_correlation, normalise_mean_in_mask


REGISTRATION_SEED = 1


def _set_threads(n: int) -> None:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(n)))


def n4_in_mask(in_file: str, mask_file: str, out_file: str, threads: int = 1,
               out_head: str | None = None) -> None:
    """N4 bias-field correction estimated inside the brain mask; output is masked, on the input grid.

    The shrink factor keeps the fit on a ~4 mm grid whatever the input resolution. ``out_head``
    receives the corrected whole image (the field estimated in the mask, applied everywhere).
    """
    import ants

    _set_threads(threads)
    img = ants.image_read(in_file)
    mask = ants.image_read(mask_file)
    shrink = int(np.clip(round(4.0 / min(img.spacing)), 1, 4))
    corrected = ants.n4_bias_field_correction(img, mask=mask, shrink_factor=shrink)
    affine = nib.load(in_file).affine
    head = corrected.numpy()
    nib.save(nib.Nifti1Image((head * (mask.numpy() > 0)).astype(np.float32), affine), out_file)
    if out_head:
        nib.save(nib.Nifti1Image(np.clip(head, 0, None).astype(np.float32), affine), out_head)


def n4_whole_head(in_file: str, out_file: str, threads: int = 1) -> None:
    """N4 bias-field correction of the whole image, no mask (the FLAIR-Brain-Age deployed
    pipeline); negative values and NaNs are set to 0 first (N4 fits the log intensity)."""
    import ants

    _set_threads(threads)
    img = ants.image_read(in_file)
    data = np.clip(np.nan_to_num(img.numpy(), nan=0.0), 0, None)
    if not data.any():
        raise ValueError(f"{in_file}: the image has no positive voxels")
    shrink = int(np.clip(round(4.0 / min(img.spacing)), 1, 4))
    corrected = ants.n4_bias_field_correction(img.new_image_like(data), mask=None,
                                              shrink_factor=shrink)
    out = np.clip(np.nan_to_num(corrected.numpy(), nan=0.0), 0, None).astype(np.float32)
    nib.save(nib.Nifti1Image(out, nib.load(in_file).affine), out_file)


def _seeded_affine(moving_file: str, mask_file: str, template_file: str, transform: str,
                   threads: int):
    """Affine ``transform`` of ``moving_file`` to ``template_file`` with the fixed metric
    sampling seed (reruns give the same transform; ``ants.set_ants_deterministic`` would also
    force one ITK thread). Returns (moving resampled onto the template grid (linear), native
    mask ``mask_file`` carried along (linear, > 0.5), forward transform file)."""
    import ants

    _set_threads(threads)
    if hasattr(ants, "config") and hasattr(ants.config, "_random_seed"):
        ants.config._random_seed = REGISTRATION_SEED
    fixed = ants.image_read(template_file)
    moving = ants.image_read(moving_file)
    reg = ants.registration(fixed=fixed, moving=moving, type_of_transform=transform)
    fwd = reg["fwdtransforms"]
    warped = ants.apply_transforms(fixed, moving, fwd, interpolator="linear").numpy()
    mask = ants.apply_transforms(fixed, ants.image_read(mask_file), fwd,
                                 interpolator="linear").numpy() > 0.5
    return warped, mask, fwd[0]


def _agreement_and_save(data, mask, template_file: str, template_mask_file: str, out_file: str,
                        out_mask: str, transform_file: str, out_transform: str,
                        written=None) -> tuple[float, float]:
    """Registration QC and outputs shared by both registrations: (correlation of ``data`` with
    the template inside the template brain mask, Dice of ``mask`` with that mask); writes
    ``written`` (default ``data``) and the mask on the template grid, and the transform."""
    tpl_img = nib.load(template_file)
    tpl_mask = np.asarray(nib.load(template_mask_file).dataobj) > 0
    corr = mask_correlation(data, tpl_img.get_fdata(dtype=np.float32), tpl_mask)
    dice = float(2 * (mask & tpl_mask).sum() / max(1, mask.sum() + tpl_mask.sum()))
    nib.save(nib.Nifti1Image(data if written is None else written, tpl_img.affine), out_file)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), tpl_img.affine), out_mask)
    shutil.copyfile(transform_file, out_transform)
    return corr, dice


def register_head_to_template(head_file: str, mask_file: str, template_file: str,
                              template_mask_file: str, out_file: str, out_mask: str,
                              out_transform: str, transform: str = "AffineFast",
                              threads: int = 1) -> tuple[float, float]:
    """Affinely register a whole head to the whole-head template and resample it onto the
    template grid (linear, clipped at 0, NaN -> 0; no intensity normalisation: the model applies
    its own). The native brain mask follows the same transform, for quality control only.

    Returns (correlation, dice) as :func:`register_to_template` does: the correlation of the
    registered head with the template inside the template brain mask, and the Dice overlap of
    the registered brain mask with it.
    """
    warped, mask, fwd = _seeded_affine(head_file, mask_file, template_file, transform, threads)
    data = np.clip(np.nan_to_num(warped, nan=0.0), 0, None).astype(np.float32)
    return _agreement_and_save(data, mask, template_file, template_mask_file, out_file, out_mask,
                               fwd, out_transform)


def register_to_template(brain_file: str, mask_file: str, template_file: str, template_mask_file: str,
                         out_file: str, out_mask: str, out_transform: str, transform: str = "AffineFast",
                         threads: int = 1) -> float:
    """Affinely register a brain to the template brain and resample brain and mask onto its grid.

    The output brain is divided by its mean inside the registered brain mask. Returns
    (correlation, dice): the Pearson correlation of the registered brain with the template inside
    the template mask (meaningful for T1w only), and the Dice overlap of the registered brain mask
    with the template mask (any modality).
    """
    warped, mask, fwd = _seeded_affine(brain_file, mask_file, template_file, transform, threads)
    data = np.clip(warped, 0, None) * mask
    return _agreement_and_save(data, mask, template_file, template_mask_file, out_file, out_mask,
                               fwd, out_transform, written=normalise_mean_in_mask(data, mask))


class _N4InputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)
    num_threads = traits.Int(1, usedefault=True)
    write_head = traits.Bool(True, usedefault=True,
                             desc="also write out_head (a full-size image: only when a later "
                                  "step reads the whole head)")


class _N4OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="corrected brain (zero outside the mask)")
    out_head = File(exists=True, desc="corrected whole image")


class N4InMask(SimpleInterface):
    """N4 bias-field correction inside a brain mask (see :func:`n4_in_mask`)."""

    input_spec = _N4InputSpec
    output_spec = _N4OutputSpec

    def _run_interface(self, runtime):
        out = os.path.join(runtime.cwd, "brain_n4.nii.gz")
        head = os.path.join(runtime.cwd, "head_n4.nii.gz") if self.inputs.write_head else None
        n4_in_mask(self.inputs.in_file, self.inputs.mask_file, out, self.inputs.num_threads,
                   out_head=head)
        self._results["out_file"] = out
        if head:
            self._results["out_head"] = head
        return runtime


def apply_to_template(in_file: str, transform: str, template_file: str, out_file: str) -> None:
    """Resample an image into template space with an affine from :func:`register_to_template`."""
    import ants

    fixed = ants.image_read(template_file)
    warped = ants.apply_transforms(fixed, ants.image_read(in_file), [transform],
                                   interpolator="linear")
    nib.save(nib.Nifti1Image(np.clip(warped.numpy(), 0, None).astype(np.float32),
                             nib.load(template_file).affine), out_file)


class _ApplyInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    transform = File(exists=True, mandatory=True)
    template = File(exists=True, mandatory=True)


class _OutFileSpec(TraitedSpec):
    out_file = File(exists=True)


class ApplyToTemplate(SimpleInterface):
    """Resample an image into template space (see :func:`apply_to_template`)."""

    input_spec = _ApplyInputSpec
    output_spec = _OutFileSpec

    def _run_interface(self, runtime):
        out = os.path.join(runtime.cwd, "head_mni.nii.gz")
        apply_to_template(self.inputs.in_file, self.inputs.transform, self.inputs.template, out)
        self._results["out_file"] = out
        return runtime


class _RegisterInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="skull-stripped, bias-corrected brain")
    mask_file = File(exists=True, mandatory=True, desc="native brain mask")
    template = File(exists=True, mandatory=True)
    template_mask = File(exists=True, mandatory=True)
    transform = traits.Enum("AffineFast", "Affine", "Rigid", usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _RegisterOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="brain in template space, mean 1 inside the mask")
    out_mask = File(exists=True, desc="brain mask in template space")
    out_transform = File(exists=True, desc="ANTs affine, native to template")
    out_report = File(exists=True, desc="JSON with the registration-quality figure")
    registration_correlation = traits.Float()
    registration_dice = traits.Float(desc="Dice of the registered brain mask and the template mask")


class _TemplateRegistration(SimpleInterface):
    """Runs ``_register`` (a function of this module) and writes its QC figures to a report."""

    output_spec = _RegisterOutputSpec
    _files = ("", "", "")  # registered image, registered mask, transform

    def _run_interface(self, runtime):
        out, out_mask, xfm = (os.path.join(runtime.cwd, f) for f in self._files)
        corr, dice = type(self)._register(
            self.inputs.in_file, self.inputs.mask_file, self.inputs.template,
            self.inputs.template_mask, out, out_mask, xfm, self.inputs.transform,
            self.inputs.num_threads)
        report = os.path.join(runtime.cwd, "registration.json")
        with open(report, "w") as fh:
            json.dump({"RegistrationCorrelation": corr, "RegistrationMaskDice": dice,
                       "Transform": self.inputs.transform}, fh)
        self._results.update(out_file=out, out_mask=out_mask, out_transform=xfm, out_report=report,
                             registration_correlation=corr, registration_dice=dice)
        return runtime


class RegisterToTemplate(_TemplateRegistration):
    """Affine registration to the MNI template (see :func:`register_to_template`)."""

    input_spec = _RegisterInputSpec
    _files = ("brain_mni.nii.gz", "brain_mni_mask.nii.gz", "native2mni_affine.mat")
    _register = staticmethod(register_to_template)


class _N4HeadInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="whole-head image")
    num_threads = traits.Int(1, usedefault=True)


class N4WholeHead(SimpleInterface):
    """N4 bias-field correction of the whole head, no mask (see :func:`n4_whole_head`)."""

    input_spec = _N4HeadInputSpec
    output_spec = _OutFileSpec

    def _run_interface(self, runtime):
        out = os.path.join(runtime.cwd, "head_n4.nii.gz")
        n4_whole_head(self.inputs.in_file, out, self.inputs.num_threads)
        self._results["out_file"] = out
        return runtime


class _RegisterHeadInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="bias-corrected whole head")
    mask_file = File(exists=True, mandatory=True, desc="native brain mask (quality control)")
    template = File(exists=True, mandatory=True, desc="whole-head template")
    template_mask = File(exists=True, mandatory=True, desc="the template's brain mask")
    transform = traits.Enum("AffineFast", "Affine", "Rigid", usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class RegisterHeadToTemplate(_TemplateRegistration):
    """Whole-head affine registration to the whole-head template (see
    :func:`register_head_to_template`)."""

    input_spec = _RegisterHeadInputSpec
    _files = ("head_template.nii.gz", "head_template_brain_mask.nii.gz",
              "native2template_affine.mat")
    _register = staticmethod(register_head_to_template)
