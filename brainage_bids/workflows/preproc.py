"""Structural preprocessing: validate/reorient -> skull strip -> N4 in mask -> affine to MNI, and
with a lesion mask the lesion-filled image in MNI."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.ants import ApplyToTemplate, N4InMask, RegisterToTemplate
from ..interfaces.bids import ValidateImage
from ..interfaces.lesion_filling import FillLesions, LesionMaskOnGrid, LesionToTemplate
from ..interfaces.skullstrip import MEM_GB, SkullStrip


def init_preproc_wf(*, template: str, template_mask: str, skull_strip: str = "deepbet",
                    device: str = "cpu", omp_nthreads: int = 1, source_file: str = "",
                    hd_bet_mode: str = "fast",
                    head: bool = False, lesion_mask: str | None = None,
                    lesion_error: str = "", name: str = "preproc_wf"):
    """Bring one structural image to MNI152NLin2009aSym (1 mm), brain only, mean 1 in the mask.

    Parameters
    ----------
    template, template_mask : the 1 mm brain template and its mask (see utils.templates).
    skull_strip : ``deepbet``, ``hd-bet`` or ``none`` (input already brain-extracted).
    device : device for deep-learning skull stripping.
    hd_bet_mode : HD-BET's ``fast`` (one network) or ``accurate`` (five, mirrored) mode.
    omp_nthreads : threads for ITK and PyTorch within one node.
    source_file : the BIDS input, named in error messages.
    head : also bring the bias-corrected whole head to MNI (for models that read the head).
    lesion_mask : a lesion mask drawn on this image (any grid in the image's world space): its
        lesions are filled in native space after N4 (interfaces/lesion_filling.py) and the filled image
        follows the raw image's transform and normalisation.
    lesion_error : why ``lesion_mask`` cannot be used (e.g. an ambiguous match): the lesion node
        fails with it, so this scan fails with a clear message.

    Inputs: ``in_file``. Outputs: ``preproc`` (MNI image), ``mask`` (MNI brain mask),
    ``transform`` (native-to-MNI affine), ``registration_correlation``, ``mask_volume_ml``,
    ``head`` (MNI whole head, when ``head``); with ``lesion_mask``: ``filled`` (lesion-filled MNI
    image), ``filled_head`` (when ``head``), ``lesion`` (MNI lesion mask), ``fill_report`` (JSON).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["preproc", "mask", "transform", "registration_correlation", "registration_dice",
                "mask_volume_ml",
                "registration_report", "head"]
        + (["filled", "filled_head", "lesion", "fill_report"] if lesion_mask else [])),
        name="outputnode")
    validate = pe.Node(ValidateImage(), name="validate")
    strip = pe.Node(SkullStrip(method=skull_strip, device=device, source_file=source_file,
                               num_threads=omp_nthreads, hd_bet_mode=hd_bet_mode),
                    name="skull_strip", n_procs=omp_nthreads, mem_gb=MEM_GB[skull_strip])
    n4 = pe.Node(N4InMask(num_threads=omp_nthreads), name="n4", n_procs=omp_nthreads)
    register = pe.Node(RegisterToTemplate(template=template, template_mask=template_mask,
                                          num_threads=omp_nthreads),
                       name="register", n_procs=omp_nthreads)
    wf.connect([
        (inputnode, validate, [("in_file", "in_file")]),
        (validate, strip, [("out_file", "in_file")]),
        (strip, n4, [("out_file", "in_file"), ("out_mask", "mask_file")]),
        (n4, register, [("out_file", "in_file")]),
        (strip, register, [("out_mask", "mask_file")]),
        (strip, outputnode, [("mask_volume_ml", "mask_volume_ml")]),
        (register, outputnode, [("out_file", "preproc"), ("out_mask", "mask"),
                                ("out_transform", "transform"),
                                ("registration_correlation", "registration_correlation"),
                                ("registration_dice", "registration_dice"),
                                ("out_report", "registration_report")]),
    ])
    if head:
        head_to_mni = pe.Node(ApplyToTemplate(template=template), name="head_to_mni")
        wf.connect([
            (n4, head_to_mni, [("out_head", "in_file")]),
            (register, head_to_mni, [("out_transform", "transform")]),
            (head_to_mni, outputnode, [("out_file", "head")]),
        ])
    if lesion_mask:
        on_grid = pe.Node(LesionMaskOnGrid(mask_file=lesion_mask, source_file=source_file,
                                           error=lesion_error),
                          name="lesion_on_grid")
        fill = pe.Node(FillLesions(num_threads=omp_nthreads), name="fill_lesions",
                       n_procs=omp_nthreads)
        to_mni = pe.Node(LesionToTemplate(template=template), name="lesion_to_mni")
        wf.connect([
            (validate, on_grid, [("out_file", "reference")]),
            (n4, fill, [("out_file", "in_file")] + ([("out_head", "head_file")] if head else [])),
            (strip, fill, [("out_mask", "mask_file")]),
            (on_grid, fill, [("out_file", "lesion_file")]),
            (register, fill, [("out_transform", "transform")]),
            (fill, to_mni, [("out_file", "filled_file")]
             + ([("out_head", "filled_head")] if head else [])),
            (on_grid, to_mni, [("out_file", "lesion_file")]),
            (register, to_mni, [("out_transform", "transform"), ("out_mask", "mni_mask")]),
            (to_mni, outputnode, [("filled", "filled"), ("lesion", "lesion")]
             + ([("head", "filled_head")] if head else [])),
            (fill, outputnode, [("out_report", "fill_report")]),
        ])
    return wf
