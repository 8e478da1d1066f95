"""Brain-age prediction from preprocessed MNI images."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.predict import PredictAge


def init_predict_wf(*, model_file: str, participant_id: str, session_id: str | None,
                    source_file: str, suffix: str, age: float | None, device: str = "cpu",
                    omp_nthreads: int = 1, name: str = "predict_wf"):
    """Predict brain age with one model.

    Inputs: ``preproc``, ``mask``, ``registration_correlation``, ``mask_volume_ml``.
    Outputs: ``out_tsv`` (one row, DESIGN.md columns), ``out_json`` (its sidecar),
    ``out_distribution`` (bin centres and probabilities).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["preproc", "mask", "registration_correlation", "mask_volume_ml"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_tsv", "out_json", "out_distribution"]),
                         name="outputnode")
    predict = pe.Node(PredictAge(model_file=model_file, device=device, num_threads=omp_nthreads,
                                 participant_id=participant_id, session_id=session_id or "",
                                 source_file=source_file, suffix=suffix),
                      name="predict", n_procs=omp_nthreads)
    if age is not None:
        predict.inputs.chronological_age = float(age)
    wf.connect([
        (inputnode, predict, [("preproc", "preproc_file"), ("mask", "mask_file"),
                              ("registration_correlation", "registration_correlation"),
                              ("mask_volume_ml", "mask_volume_ml")]),
        (predict, outputnode, [("out_tsv", "out_tsv"), ("out_json", "out_json"),
                               ("out_distribution", "out_distribution")]),
    ])
    return wf
