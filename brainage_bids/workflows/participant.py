"""The participant level: one sub-workflow per participant, one branch per scan."""
from __future__ import annotations

import os
import re
from copy import deepcopy

from nipype.pipeline import engine as pe

from ..utils.bids import Scan
from .outputs import init_ds_brainage_wf, init_ds_fsl_wf, init_ds_lesion_wf, init_ds_preproc_wf
from .predict import FSL_INPUTS, fsl_images, init_predict_wf, needs_head
from .preproc import init_preproc_wf


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", text)


def crash_dir(output_dir: str, participant_id: str, run_id: str) -> str:
    return os.path.join(os.path.abspath(output_dir), participant_id, "log", run_id)


def models_for(scan: Scan, models: list | None) -> list:
    """The model requests that run on a scan: those of its modality (a contrast-agnostic one
    names several) or of unknown modality."""
    from ..models.checkpoint import reads_contrast

    return [r for r in models or [] if reads_contrast(r.modality, scan.suffix)]


def init_scan_wf(*, scan: Scan, output_dir: str, template: str, template_mask: str,
                 models: list | None, skull_strip: str, device: str, omp_nthreads: int,
                 precision: str = "fast", saliency: bool = False, lesion=None,
                 hd_bet_mode: str = "fast", fsl_template=None, name: str | None = None):
    """Preprocess one scan, write its MNI outputs and, when models apply to it, predict and
    write its brain-age table.

    ``lesion`` (utils.lesion_masks.LesionMask): with voxels, the lesions are filled, the filled image
    and the MNI lesion mask are written and the table gets lesion-filled rows too; its volume
    goes in ``lesion_volume_ml`` (also for a mask without voxels).

    Models whose recipe is a publisher's (models/recipes.py) get their image from an
    MNI152NLin6Asym branch (``fsl_template``: utils.templates.TemplateFiles), built only when one
    of the scan's models needs it; its outputs are written as ``space-MNI152NLin6Asym``.
    """
    wf = pe.Workflow(name=name or f"scan_{_safe(scan.prefix)}_{scan.suffix}")
    models = models_for(scan, models)
    head = bool(models) and needs_head(models)
    fsl = fsl_images(models) if models else ()
    if fsl and fsl_template is None:
        raise ValueError(f"{scan.relpath}: models {', '.join(r.name for r in models)} need the "
                         "MNI152NLin6Asym template (fsl_template)")
    fill = lesion is not None and not lesion.empty
    preproc_wf = init_preproc_wf(template=template, template_mask=template_mask,
                                 skull_strip=skull_strip, device=device, omp_nthreads=omp_nthreads,
                                 source_file=scan.path, head=head, hd_bet_mode=hd_bet_mode,
                                 lesion_mask=lesion.path if fill else None,
                                 lesion_error=lesion.error if fill else "",
                                 fsl_template=fsl_template, fsl_images=fsl)
    preproc_wf.inputs.inputnode.in_file = scan.path
    # With models, the MNI outputs are written only once the prediction succeeded: a scan that
    # fails later publishes nothing (its crash file says why).
    ds_preproc_wf = init_ds_preproc_wf(scan=scan, output_dir=output_dir, skull_strip=skull_strip,
                                       gated=bool(models), hd_bet_mode=hd_bet_mode)
    wf.connect([(preproc_wf, ds_preproc_wf, [
        ("outputnode.preproc", "inputnode.preproc"), ("outputnode.mask", "inputnode.mask"),
        ("outputnode.registration_report", "inputnode.registration_report")])])
    if fill:
        ds_lesion_wf = init_ds_lesion_wf(scan=scan, output_dir=output_dir, lesion_file=lesion.path,
                                         gated=bool(models))
        wf.connect([(preproc_wf, ds_lesion_wf, [
            ("outputnode.filled", "inputnode.filled"), ("outputnode.lesion", "inputnode.lesion"),
            ("outputnode.fill_report", "inputnode.fill_report")])])
    if models:
        predict_wf = init_predict_wf(
            models=models, participant_id=scan.participant_id, session_id=scan.session_id,
            source_file=scan.relpath, suffix=scan.suffix, age=scan.age, device=device,
            omp_nthreads=omp_nthreads, precision=precision, saliency=saliency, template=template,
            lesion_filled=fill, lesion_volume_ml=None if lesion is None else lesion.volume_ml)
        ds_brainage_wf = init_ds_brainage_wf(scan=scan, output_dir=output_dir, saliency=saliency)
        wf.connect([(predict_wf, ds_preproc_wf, [("outputnode.out_tsv", "inputnode.after")])]
                   + ([(predict_wf, ds_lesion_wf, [("outputnode.out_tsv", "inputnode.after")])]
                      if fill else []))
        wf.connect([
            (preproc_wf, predict_wf, [
                ("outputnode.preproc", "inputnode.preproc"), ("outputnode.mask", "inputnode.mask"),
                ("outputnode.registration_correlation", "inputnode.registration_correlation"),
                ("outputnode.registration_dice", "inputnode.registration_dice"),
                ("outputnode.mask_volume_ml", "inputnode.mask_volume_ml")]
                + ([("outputnode.head", "inputnode.head")] if head else [])
                + ([("outputnode.filled", "inputnode.filled")] if fill else [])
                + ([("outputnode.filled_head", "inputnode.filled_head")] if fill and head
                   else [])),
            (predict_wf, ds_brainage_wf, [("outputnode.out_tsv", "inputnode.out_tsv"),
                                          ("outputnode.out_json", "inputnode.out_json"),
                                          ("outputnode.out_distribution",
                                           "inputnode.out_distribution")]
             + ([("outputnode.out_saliency", "inputnode.out_saliency")] if saliency else [])),
        ])
    for image in fsl:  # the publishers' recipes: their image to the predictor, then written
        wf.connect([(preproc_wf, predict_wf, [
            (f"outputnode.fsl_{image}_{f}", f"inputnode.fsl_{image}_{f}")
            for f in FSL_INPUTS if f != "filled" or fill])])
        ds_fsl_wf = init_ds_fsl_wf(scan=scan, output_dir=output_dir, image=image,
                                   skull_strip=skull_strip, hd_bet_mode=hd_bet_mode,
                                   template_source=fsl_template.source,
                                   name=f"ds_fsl_{image}_wf")
        wf.connect([
            (preproc_wf, ds_fsl_wf, [(f"outputnode.fsl_{image}_{f}", f"inputnode.{f}")
                                     for f in ("image", "mask", "registration_report")]),
            (predict_wf, ds_fsl_wf, [("outputnode.out_tsv", "inputnode.after")]),
        ])
    return wf


def init_single_subject_wf(*, participant_id: str, scans: list[Scan], output_dir: str, run_id: str,
                           lesion_masks: dict | None = None, name: str | None = None,
                           **scan_kwargs):
    """All scans of one participant; crash files go to ``sub-<l>/log/<run_id>/``.
    ``lesion_masks``: scan path -> utils.lesion_masks.LesionMask."""
    wf = pe.Workflow(name=name or f"single_subject_{_safe(participant_id[4:])}_wf")
    for scan in scans:
        wf.add_nodes([init_scan_wf(scan=scan, output_dir=output_dir,
                                   lesion=(lesion_masks or {}).get(scan.path), **scan_kwargs)])
    wf.config["execution"]["crashdump_dir"] = crash_dir(output_dir, participant_id, run_id)
    wf.config["execution"]["crashfile_format"] = "txt"
    for node in wf._get_all_nodes():
        node.config = deepcopy(wf.config)
    return wf


def init_brainage_wf(*, scans: list[Scan], output_dir: str, work_dir: str, run_id: str,
                     template: str, template_mask: str, models: list | None,
                     skull_strip: str = "deepbet", device: str = "cpu", omp_nthreads: int = 1,
                     precision: str = "fast", saliency: bool = False,
                     lesion_masks: dict | None = None, hd_bet_mode: str = "fast",
                     fsl_template=None, name: str = "brainage_wf"):
    """The participant level over all selected scans, one sub-workflow per participant.
    ``lesion_masks``: scan path -> utils.lesion_masks.LesionMask (see utils/lesion_masks.py).
    ``fsl_template``: utils.templates.TemplateFiles of MNI152NLin6Asym, for published models."""
    wf = pe.Workflow(name=name, base_dir=work_dir)
    by_subject: dict[str, list[Scan]] = {}
    for scan in scans:
        by_subject.setdefault(scan.participant_id, []).append(scan)
    for participant_id, subject_scans in sorted(by_subject.items()):
        wf.add_nodes([init_single_subject_wf(
            participant_id=participant_id, scans=subject_scans, output_dir=output_dir, run_id=run_id,
            template=template, template_mask=template_mask, models=models,
            skull_strip=skull_strip, device=device, omp_nthreads=omp_nthreads,
            precision=precision, saliency=saliency, lesion_masks=lesion_masks,
            hd_bet_mode=hd_bet_mode, fsl_template=fsl_template)])
    return wf
