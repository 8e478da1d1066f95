"""Structural preprocessing: validate/reorient -> skull strip -> N4 in mask -> affine to MNI."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.ants import ApplyToTemplate, N4InMask, RegisterToTemplate
from ..interfaces.bids import ValidateImage
from ..interfaces.skullstrip import SkullStrip


def init_preproc_wf(*, template: str, template_mask: str, skull_strip: str = "deepbet",
                    device: str = "cpu", omp_nthreads: int = 1, source_file: str = "",
                    head: bool = False, name: str = "preproc_wf"):
    """Bring one structural image to MNI152NLin2009aSym (1 mm), brain only, mean 1 in the mask.

    Parameters
    ----------
    template, template_mask : the 1 mm brain template and its mask (see utils.templates).
    skull_strip : ``deepbet``, ``hd-bet`` or ``none`` (input already brain-extracted).
    device : device for deep-learning skull stripping.
    omp_nthreads : threads for ITK and PyTorch within one node.
    source_file : the BIDS input, named in error messages.
    head : also bring the bias-corrected whole head to MNI (for models that read the head).

    Inputs: ``in_file``. Outputs: ``preproc`` (MNI image), ``mask`` (MNI brain mask),
    ``transform`` (native-to-MNI affine), ``registration_correlation``, ``mask_volume_ml``,
    ``head`` (MNI whole head, when ``head``).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["preproc", "mask", "transform", "registration_correlation", "registration_dice",
                "mask_volume_ml",
                "registration_report", "head"]), name="outputnode")
    validate = pe.Node(ValidateImage(), name="validate")
    strip = pe.Node(SkullStrip(method=skull_strip, device=device, source_file=source_file,
                               num_threads=omp_nthreads),
                    name="skull_strip", n_procs=omp_nthreads)
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
    return wf
