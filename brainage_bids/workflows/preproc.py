"""Structural preprocessing: validate/reorient -> skull strip -> N4 in mask -> affine to
MNI152NLin2009aSym, and with a lesion mask the lesion-filled image in MNI.

When a selected published model needs it, the same scan also gets its publisher's recipe
(models/recipes.py) on FSL's MNI152NLin6Asym: the brain branch (:func:`init_fsl_brain_wf`, the
SFCNs) or the whole-head branch (:func:`init_fsl_head_wf`, the FLAIR-Brain-Age IRV2 and
DenseNet169). Validation, skull stripping, N4 in the mask and lesion filling are shared.
"""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.ants import (ApplyToTemplate, N4InMask, N4WholeHead, RegisterHeadToTemplate,
                               RegisterToTemplate)
from ..interfaces.bids import ValidateImage
from ..interfaces.lesion_filling import FillLesions, FillLike, LesionMaskOnGrid, LesionToTemplate
from ..interfaces.skullstrip import MEM_GB, SkullStrip



def registration_outputs(image_field: str) -> list[tuple[str, str]]:
    """The connections from a registration node to an outputnode: its image as ``image_field``,
    then mask, transform, report and the registration QC figures."""
    return [("out_file", image_field), ("out_mask", "mask"), ("out_transform", "transform"),
            ("out_report", "registration_report"),
            ("registration_correlation", "registration_correlation"),
            ("registration_dice", "registration_dice")]

def init_preproc_wf(*, template: str, template_mask: str, skull_strip: str = "deepbet",
                    device: str = "cpu", omp_nthreads: int = 1, source_file: str = "",
                    hd_bet_mode: str = "fast",
                    head: bool = False, lesion_mask: str | None = None,
                    lesion_error: str = "", fsl_template=None, fsl_images: tuple = (),
                    name: str = "preproc_wf"):
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
    fsl_template : utils.templates.TemplateFiles of MNI152NLin6Asym (head, brain, mask), needed
        with ``fsl_images``.
    fsl_images : which publisher branches to build on it: ``"brain"`` and/or ``"head"``.

    Inputs: ``in_file``. Outputs: ``preproc`` (MNI image), ``mask`` (MNI brain mask),
    ``transform`` (native-to-MNI affine), ``registration_correlation``, ``mask_volume_ml``,
    ``head`` (MNI whole head, when ``head``); with ``lesion_mask``: ``filled`` (lesion-filled MNI
    image), ``filled_head`` (when ``head``), ``lesion`` (MNI lesion mask), ``fill_report`` (JSON).
    Each FSL branch adds its outputs prefixed ``fsl_brain_`` or ``fsl_head_`` (see
    :data:`FSL_OUTPUTS`).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["preproc", "mask", "transform", "registration_correlation", "registration_dice",
                "mask_volume_ml",
                "registration_report", "head"]
        + (["filled", "filled_head", "lesion", "fill_report"] if lesion_mask else [])
        + [f"fsl_{image}_{f}" for image in fsl_images for f in FSL_OUTPUTS]),
        name="outputnode")
    validate = pe.Node(ValidateImage(), name="validate")
    strip = pe.Node(SkullStrip(method=skull_strip, device=device, source_file=source_file,
                               num_threads=omp_nthreads, hd_bet_mode=hd_bet_mode),
                    name="skull_strip", n_procs=omp_nthreads, mem_gb=MEM_GB[skull_strip])
    # the whole head only for the steps that read it (head_to_mni, the lesion fill with head)
    n4 = pe.Node(N4InMask(num_threads=omp_nthreads, write_head=head), name="n4",
                 n_procs=omp_nthreads)
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
        (register, outputnode, registration_outputs("preproc")),
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
    for image in fsl_images:
        factory = {"brain": init_fsl_brain_wf, "head": init_fsl_head_wf}[image]
        branch = factory(template=str(fsl_template.head if image == "head"
                                      else fsl_template.brain),
                         template_mask=str(fsl_template.mask), omp_nthreads=omp_nthreads,
                         lesion=bool(lesion_mask))
        wf.connect([
            (validate, branch, [("out_file", "inputnode.in_file")]),
            (strip, branch, [("out_mask", "inputnode.mask")]),
            (n4, branch, [("out_file", "inputnode.brain")]),
            (branch, outputnode, [(f"outputnode.{f}", f"fsl_{image}_{f}")
                                  for f in FSL_OUTPUTS]),
        ])
        if lesion_mask:
            wf.connect([(fill, branch, [("out_file", "inputnode.filled")]),
                        (on_grid, branch, [("out_file", "inputnode.lesion")])])
    return wf


#: Outputs of each MNI152NLin6Asym branch (``image``: the brain or the whole head on the FSL
#: grid; ``filled``: the same made from the lesion-filled image, with a lesion mask).
FSL_OUTPUTS = ("image", "mask", "transform", "registration_report", "registration_correlation",
               "registration_dice", "filled")


def _fsl_nodes(lesion: bool):
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["in_file", "mask", "brain", "filled", "lesion"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=list(FSL_OUTPUTS)), name="outputnode")
    return inputnode, outputnode


def init_fsl_brain_wf(*, template: str, template_mask: str, omp_nthreads: int = 1,
                      lesion: bool = False, name: str = "fsl_brain_wf"):
    """The SFCN publishers' recipe: the skull-stripped brain (N4 in the mask) affinely registered
    to the MNI152NLin6Asym brain (its T1w x desc-brain_mask), mean 1 in the registered mask (the
    models' own normalisations do not depend on the scale).

    Inputs: ``brain`` (native N4 brain), ``mask`` (native brain mask); with ``lesion``:
    ``filled`` (native lesion-filled brain), ``lesion`` (native lesion mask). Outputs:
    :data:`FSL_OUTPUTS` (``filled`` stays undefined without ``lesion``).
    """
    wf = pe.Workflow(name=name)
    inputnode, outputnode = _fsl_nodes(lesion)
    register = pe.Node(RegisterToTemplate(template=template, template_mask=template_mask,
                                          num_threads=omp_nthreads),
                       name="register", n_procs=omp_nthreads)
    wf.connect([
        (inputnode, register, [("brain", "in_file"), ("mask", "mask_file")]),
        (register, outputnode, registration_outputs("image")),
    ])
    if lesion:
        to_tpl = pe.Node(LesionToTemplate(template=template), name="filled_to_template")
        wf.connect([
            (inputnode, to_tpl, [("filled", "filled_file"), ("lesion", "lesion_file")]),
            (register, to_tpl, [("out_transform", "transform"), ("out_mask", "mni_mask")]),
            (to_tpl, outputnode, [("filled", "filled")]),
        ])
    return wf


def init_fsl_head_wf(*, template: str, template_mask: str, omp_nthreads: int = 1,
                     lesion: bool = False, name: str = "fsl_head_wf"):
    """The FLAIR-Brain-Age deployed recipe: N4 on the whole head without a mask, the whole head
    affinely registered to the whole-head MNI152NLin6Asym T1w, resampled onto its grid (linear,
    NaN -> 0, no intensity normalisation). The native brain mask follows for quality control.

    Inputs: ``in_file`` (validated native image), ``mask`` (native brain mask); with ``lesion``:
    ``brain`` (the native N4-in-mask brain the fill was made on), ``filled`` and ``lesion``: the
    fill is carried into the whole-head N4 image (:func:`~..interfaces.lesion_filling.fill_like`)
    and follows the head's transform. Outputs: :data:`FSL_OUTPUTS`.
    """
    wf = pe.Workflow(name=name)
    inputnode, outputnode = _fsl_nodes(lesion)
    n4 = pe.Node(N4WholeHead(num_threads=omp_nthreads), name="n4_head", n_procs=omp_nthreads)
    register = pe.Node(RegisterHeadToTemplate(template=template, template_mask=template_mask,
                                              num_threads=omp_nthreads),
                       name="register_head", n_procs=omp_nthreads)
    wf.connect([
        (inputnode, n4, [("in_file", "in_file")]),
        (n4, register, [("out_file", "in_file")]),
        (inputnode, register, [("mask", "mask_file")]),
        (register, outputnode, registration_outputs("image")),
    ])
    if lesion:
        fill = pe.Node(FillLike(), name="fill_head")
        to_tpl = pe.Node(ApplyToTemplate(template=template), name="filled_head_to_template")
        wf.connect([
            (n4, fill, [("out_file", "head_file")]),
            (inputnode, fill, [("brain", "brain_file"), ("filled", "filled_file"),
                               ("lesion", "lesion_file")]),
            (fill, to_tpl, [("out_file", "in_file")]),
            (register, to_tpl, [("out_transform", "transform")]),
            (to_tpl, outputnode, [("out_file", "filled")]),
        ])
    return wf
