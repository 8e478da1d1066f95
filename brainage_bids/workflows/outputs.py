"""Derivative paths and sinks: every file the participant level writes is named here."""
from __future__ import annotations

import os

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.bids import DerivativesSink
from ..interfaces.skullstrip import describe as describe_skull_strip
from ..utils.bids import Scan
from ..utils.templates import FSL_TEMPLATE, TEMPLATE


def _sink(name: str, out_path: str, metadata: dict | None = None) -> pe.Node:
    """A node writing one derivative (and its JSON sidecar) atomically, in the main process."""
    sink = DerivativesSink(out_path=out_path)
    if metadata is not None:
        sink.inputs.metadata = metadata
    return pe.Node(sink, name=name, run_without_submitting=True, overwrite=True)


def derivative_paths(scan: Scan, output_dir: str) -> dict:
    """Absolute output paths of one scan (DESIGN.md output contract).

    The brain mask of a T1w scan is ``desc-brain_mask``; other modalities of the same session
    have their own mask from their own registration, ``desc-<suffix>brain_mask`` (e.g.
    ``desc-flairbrain_mask``), so the two never overwrite each other; lesion masks in MNI follow
    the same rule (``desc-lesion_mask``, ``desc-flairlesion_mask``). ``filled`` is the
    lesion-filled MNI image (``desc-lesionfilled_<suffix>``).

    The publishers' recipes write into ``space-MNI152NLin6Asym``: ``fsl_brain`` (the brain,
    ``desc-preproc``) with ``fsl_mask`` (its brain mask, named as above), and ``fsl_head`` (the
    whole head, ``desc-head``).
    """
    base = os.path.join(os.path.abspath(output_dir), scan.anat_dir, scan.prefix)
    mask_desc = "brain" if scan.suffix == "T1w" else f"{scan.suffix.lower()}brain"
    lesion_desc = "lesion" if scan.suffix == "T1w" else f"{scan.suffix.lower()}lesion"
    return {
        "preproc": f"{base}_space-{TEMPLATE}_desc-preproc_{scan.suffix}.nii.gz",
        "mask": f"{base}_space-{TEMPLATE}_desc-{mask_desc}_mask.nii.gz",
        "filled": f"{base}_space-{TEMPLATE}_desc-lesionfilled_{scan.suffix}.nii.gz",
        "lesion": f"{base}_space-{TEMPLATE}_desc-{lesion_desc}_mask.nii.gz",
        "saliency": f"{base}_space-{TEMPLATE}_desc-saliency_{scan.suffix}.nii.gz",
        "brainage": f"{base}_desc-brainage_{scan.suffix}.tsv",
        "distribution": f"{base}_desc-agedist_{scan.suffix}.tsv",
        "fsl_brain": f"{base}_space-{FSL_TEMPLATE}_desc-preproc_{scan.suffix}.nii.gz",
        "fsl_mask": f"{base}_space-{FSL_TEMPLATE}_desc-{mask_desc}_mask.nii.gz",
        "fsl_head": f"{base}_space-{FSL_TEMPLATE}_desc-head_{scan.suffix}.nii.gz",
    }


def _hold_back(wf, inputnode, sinks) -> None:
    """Connect ``inputnode.after`` to every sink's ``after``: they run once it is set."""
    wf.connect([(inputnode, sink, [("after", "after")]) for sink in sinks])


def init_ds_preproc_wf(*, scan: Scan, output_dir: str, skull_strip: str, gated: bool = False,
                       hd_bet_mode: str = "fast", name: str = "ds_preproc_wf"):
    """Write the MNI-space image and brain mask with their sidecars (the skull stripper, its
    version and, for HD-BET, its mode are named in both).

    Inputs: ``preproc``, ``mask``, ``registration_report`` and, with ``gated``, ``after`` (the
    prediction's table): nothing is written unless the prediction succeeded.
    """
    paths = derivative_paths(scan, output_dir)
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["preproc", "mask", "registration_report", "after"]), name="inputnode")
    common = {"SpatialReference": TEMPLATE, "Sources": [f"bids:raw:{scan.relpath}"]}
    stripper = describe_skull_strip(skull_strip, hd_bet_mode)
    ds_preproc = _sink("ds_preproc", paths["preproc"], {
        **common, "SkullStripped": True, **stripper,
        "BiasCorrection": "N4 (antspyx) inside the brain mask",
        "Registration": "affine (antspyx AffineFast) to the 1 mm brain template",
        "IntensityNormalisation": "divided by the mean inside the brain mask"})
    ds_mask = _sink("ds_mask", paths["mask"], {**common, "Type": "Brain", **stripper})
    wf.connect([
        (inputnode, ds_preproc, [("preproc", "in_file"), ("registration_report", "sidecar_file")]),
        (inputnode, ds_mask, [("mask", "in_file")]),
    ])
    if gated:
        _hold_back(wf, inputnode, [ds_preproc, ds_mask])
    return wf


def init_ds_fsl_wf(*, scan: Scan, output_dir: str, image: str, skull_strip: str,
                   hd_bet_mode: str = "fast", template_source: str = "",
                   name: str = "ds_fsl_wf"):
    """Write one MNI152NLin6Asym branch (``image``: ``brain`` or ``head``) with its sidecar: the
    brain and its mask (SFCN recipe), or the whole head (FLAIR-Brain-Age recipe); the sidecar
    says how it was made and carries the registration's QC figures.

    Inputs: ``image``, ``mask`` (brain only), ``registration_report``, ``after`` (the
    prediction's table: nothing is written unless the prediction succeeded).
    """
    from ..models.recipes import FSL_BRAIN, FSL_HEAD, TOOLS

    paths = derivative_paths(scan, output_dir)
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["image", "mask", "registration_report", "after"]), name="inputnode")
    common = {"SpatialReference": FSL_TEMPLATE, "Sources": [f"bids:raw:{scan.relpath}"],
              "Template": FSL_TEMPLATE, "TemplateSource": template_source}
    stripper = describe_skull_strip(skull_strip, hd_bet_mode)
    recipe = FSL_HEAD if image == "head" else FSL_BRAIN
    steps = {"BiasCorrection": f"N4 ({TOOLS['N4']}), {recipe.n4}",
             "Registration": f"{recipe.registration}; {TOOLS['Registration']}",
             "Interpolation": recipe.interpolation, "Grid": recipe.grid}
    if image == "head":
        ds_image = _sink("ds_fsl_head", paths["fsl_head"], {
            **common, "SkullStripped": False, **steps,
            "Description": "the whole head, for the models of the FLAIR-Brain-Age recipe",
            "IntensityNormalisation": "none (NaN set to 0, clipped at 0); each model applies "
                                      "its own"})
        sinks = [ds_image]
    else:
        ds_image = _sink("ds_fsl_brain", paths["fsl_brain"], {
            **common, "SkullStripped": True, **stripper, **steps,
            "Description": "the skull-stripped brain, for the published SFCNs",
            "IntensityNormalisation": "divided by the mean inside the brain mask (each model "
                                      "then applies its own, which does not depend on scale)"})
        ds_mask = _sink("ds_fsl_mask", paths["fsl_mask"], {**common, "Type": "Brain",
                                                            **stripper})
        wf.connect(inputnode, "mask", ds_mask, "in_file")
        sinks = [ds_image, ds_mask]
    wf.connect(inputnode, "image", ds_image, "in_file")
    wf.connect(inputnode, "registration_report", ds_image, "sidecar_file")
    _hold_back(wf, inputnode, sinks)
    return wf


def init_ds_brainage_wf(*, scan: Scan, output_dir: str, saliency: bool = False,
                        name: str = "ds_brainage_wf"):
    """Write the brain-age table with its sidecar, the predicted age distributions and, with
    ``saliency``, the SmoothGrad map.

    Inputs: ``out_tsv``, ``out_json``, ``out_distribution``, ``out_saliency``.
    """
    paths = derivative_paths(scan, output_dir)
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["out_tsv", "out_json", "out_distribution", "out_saliency"]), name="inputnode")
    ds_brainage = _sink("ds_brainage", paths["brainage"])
    ds_distribution = _sink("ds_distribution", paths["distribution"], {
        "Description": "predicted age distribution of each model with a soft-label output "
                       "(one row per age bin)",
        "model": {"Description": "model name, as in the brain-age table"},
        "age": {"Description": "bin centre", "Units": "year"},
        "probability": {"Description": "probability of the bin"}})
    wf.connect([(inputnode, ds_brainage, [("out_tsv", "in_file"), ("out_json", "sidecar_file")]),
                (inputnode, ds_distribution, [("out_distribution", "in_file")])])
    if saliency:
        ds_saliency = _sink("ds_saliency", paths["saliency"], {
            "SpatialReference": TEMPLATE, "Sources": [f"bids:raw:{scan.relpath}"],
            "Description": "SmoothGrad saliency: mean absolute gradient of the predicted age "
                           "with respect to the input, over 25 noisy copies (noise SD 15 % of "
                           "the intensity range), averaged over the models of the scan"})
        wf.connect(inputnode, "out_saliency", ds_saliency, "in_file")
    return wf


def init_ds_lesion_wf(*, scan: Scan, output_dir: str, lesion_file: str, gated: bool = False,
                      name: str = "ds_lesion_wf"):
    """Write the lesion-filled MNI image (sidecar: the filling report) and the lesion mask in MNI.

    Inputs: ``filled``, ``lesion``, ``fill_report`` and, with ``gated``, ``after`` (see
    :func:`init_ds_preproc_wf`).
    """
    paths = derivative_paths(scan, output_dir)
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["filled", "lesion", "fill_report", "after"]),
                        name="inputnode")
    sources = [f"bids:raw:{scan.relpath}", lesion_file]
    ds_filled = _sink("ds_filled", paths["filled"], {
        "SpatialReference": TEMPLATE, "Sources": sources, "SkullStripped": True,
        "Description": "the desc-preproc image with its lesions filled with normal-appearing "
                       "white-matter intensities before resampling and normalisation (same "
                       "transform and brain mask as desc-preproc)",
        "IntensityNormalisation": "divided by the mean inside the brain mask"})
    ds_lesion = _sink("ds_lesion", paths["lesion"], {
        "SpatialReference": TEMPLATE, "Sources": sources, "Type": "Lesion",
        "Resampling": "the lesion mask on the image grid, brought to MNI with the image's "
                      "affine (trilinear, thresholded at 0.5)"})
    wf.connect([
        (inputnode, ds_filled, [("filled", "in_file"), ("fill_report", "sidecar_file")]),
        (inputnode, ds_lesion, [("lesion", "in_file")]),
    ])
    if gated:
        _hold_back(wf, inputnode, [ds_filled, ds_lesion])
    return wf


def add_sidecar_metadata(wf, extra: dict) -> None:
    """Add ``extra`` (e.g. utils.provenance.sidecar_provenance: tool versions, template, seed,
    threads) to the sidecar of every derivative ``wf`` writes; keys of a node's own sidecar
    file win."""
    from nipype.interfaces.base import isdefined

    for node in wf._get_all_nodes():
        if isinstance(node.interface, DerivativesSink):
            own = node.inputs.metadata
            node.inputs.metadata = {**extra, **(own if isdefined(own) else {})}
