"""Brain-age prediction from preprocessed MNI images."""
from __future__ import annotations

from functools import lru_cache

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.predict import PredictAge


#: Inputs of each MNI152NLin6Asym branch the predictor reads (workflows/preproc.FSL_OUTPUTS).
FSL_INPUTS = ("image", "mask", "registration_correlation", "registration_dice", "filled")


def init_predict_wf(*, models: list, participant_id: str, session_id: str | None,
                    source_file: str, suffix: str, age: float | None, device: str = "cpu",
                    omp_nthreads: int = 1, precision: str = "fast", saliency: bool = False,
                    template: str | None = None, lesion_filled: bool = False,
                    lesion_volume_ml: float | None = None, name: str = "predict_wf"):
    """Predict brain age with every member of ``models`` (zoo.ModelRequest) on one scan.

    One row per member; with more than one member, an ensemble row. Each member reads the image
    of its own recipe: the MNI152NLin2009aSym brain (``preproc``) or head (``head``), or an
    MNI152NLin6Asym branch (``fsl_brain_*``, ``fsl_head_*``; see :func:`fsl_images`).
    ``saliency`` adds a SmoothGrad map on the grid of ``template``. ``lesion_filled`` adds the
    rows of the lesion-filled images (inputs ``filled``, ``filled_head``, ``fsl_*_filled``);
    ``lesion_volume_ml`` goes on every row.
    Inputs: ``preproc``, ``mask``, ``head`` (optional), ``registration_correlation``,
    ``registration_dice``, ``mask_volume_ml``, ``filled``, ``filled_head`` and
    ``fsl_<image>_<FSL_INPUTS>``. Outputs: ``out_tsv``, ``out_json``, ``out_distribution``,
    ``out_saliency`` (with ``saliency``).
    """
    fsl = fsl_images(models)
    fsl_fields = [f"fsl_{image}_{f}" for image in fsl for f in FSL_INPUTS
                  if f != "filled" or lesion_filled]
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["preproc", "mask", "head", "registration_correlation", "registration_dice",
                "mask_volume_ml", "filled", "filled_head"] + fsl_fields),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["out_tsv", "out_json", "out_distribution", "out_saliency"]), name="outputnode")
    members = [m for r in models for m in r.members]
    predict = pe.Node(PredictAge(model_files=[m[1] for m in members],
                                 model_names=[m[0] for m in members],
                                 model_modalities=[m[2] or "" for m in members],
                                 device=device, precision=precision, num_threads=omp_nthreads,
                                 participant_id=participant_id, session_id=session_id or "",
                                 source_file=source_file, suffix=suffix, saliency=saliency),
                      name="predict", n_procs=omp_nthreads)
    if saliency:
        predict.inputs.template = template
    if age is not None:
        predict.inputs.chronological_age = float(age)
    if lesion_volume_ml is not None:
        predict.inputs.lesion_volume_ml = float(lesion_volume_ml)
    wf.connect([
        (inputnode, predict, [("preproc", "preproc_file"), ("mask", "mask_file"),
                              ("registration_correlation", "registration_correlation"),
                              ("registration_dice", "registration_dice"),
                              ("mask_volume_ml", "mask_volume_ml")]
         + [(f, f) for f in fsl_fields]),
        (predict, outputnode, [("out_tsv", "out_tsv"), ("out_json", "out_json"),
                               ("out_distribution", "out_distribution")]),
    ])
    if saliency:
        wf.connect(predict, "out_saliency", outputnode, "out_saliency")
    if needs_head(models):
        wf.connect(inputnode, "head", predict, "head_file")
    if lesion_filled:
        wf.connect(inputnode, "filled", predict, "filled_file")
        if needs_head(models):
            wf.connect(inputnode, "filled_head", predict, "filled_head_file")
    return wf


@lru_cache(maxsize=None)
def input_spec(path: str):
    """The :class:`~brainage_bids.models.checkpoint.InputSpec` of the checkpoint at ``path``."""
    from ..models.checkpoint import load_model

    return load_model(path).input


def input_image(path: str) -> str:
    """``brain`` or ``head``: what the checkpoint at ``path`` reads."""
    return input_spec(path).image


def input_keys(models: list) -> set:
    """The (template, image) pairs the members of ``models`` read (models.recipes.input_key):
    which preprocessing branches a scan needs."""
    from ..models.recipes import input_key

    return {input_key(input_spec(m[1])) for r in models for m in r.members}


def needs_head(models: list) -> bool:
    """Whether any member reads the whole head in MNI152NLin2009aSym (our own recipe; the
    published whole-head models read it in MNI152NLin6Asym, :func:`fsl_images`)."""
    from ..utils.templates import TEMPLATE

    return (TEMPLATE, "head") in input_keys(models)


def fsl_images(models: list) -> tuple:
    """The MNI152NLin6Asym branches (``brain``, ``head``) the members of ``models`` need."""
    from ..utils.templates import FSL_TEMPLATE

    keys = input_keys(models)
    return tuple(i for i in ("brain", "head") if (FSL_TEMPLATE, i) in keys)
