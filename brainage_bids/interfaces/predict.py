"""The brain-age predictor interface and the participant-level table it writes."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from .. import __version__

COLUMNS = ("participant_id", "session_id", "source_file", "suffix", "model", "chronological_age",
           "predicted_age", "predicted_age_sd", "brain_age_gap", "lesion_filled", "qc_flags")

COLUMN_DESCRIPTIONS = {
    "participant_id": {"Description": "BIDS participant label (sub-<label>)"},
    "session_id": {"Description": "BIDS session label (ses-<label>), n/a without sessions"},
    "source_file": {"Description": "input image, relative to the BIDS dataset root"},
    "suffix": {"Description": "BIDS suffix of the input image (modality)",
               "Levels": {"T1w": "T1-weighted", "FLAIR": "T2-FLAIR"}},
    "model": {"Description": "name of the brain-age model that produced the row"},
    "chronological_age": {"Description": "age at the scan, from sessions.tsv (age column) when present, "
                                         "else participants.tsv", "Units": "year"},
    "predicted_age": {"Description": "brain age: expectation of the model's predicted age distribution",
                      "Units": "year"},
    "predicted_age_sd": {"Description": "standard deviation of the model's predicted age distribution "
                                        "(per-scan uncertainty)", "Units": "year"},
    "brain_age_gap": {"Description": "predicted_age - chronological_age, uncorrected (brain-PAD); "
                                     "n/a when the age is unknown", "Units": "year"},
    "lesion_filled": {"Description": "whether lesions were filled before prediction",
                      "Levels": {"true": "lesion-filled image", "false": "image as acquired"}},
    "qc_flags": {"Description": "semicolon-separated quality flags, n/a when none",
                 "Levels": {
                     "low_registration": "correlation with the template inside its brain mask below "
                                         "the threshold in QCThresholds",
                     "age_outside_training_range": "chronological age outside the ages the model "
                                                   "was trained on",
                 }},
}

# Correlation of the registered brain with the template inside the template mask; the 148 IXI
# scans score 0.50-0.62 and a clinical 2D T1w 0.46 (see README); misregistrations fall far below.
QC_THRESHOLDS = {"RegistrationCorrelationMin": 0.35}


def qc_flags(registration_correlation: float | None, age: float | None,
             age_range: tuple | None) -> list[str]:
    flags = []
    if registration_correlation is not None and registration_correlation < QC_THRESHOLDS[
            "RegistrationCorrelationMin"]:
        flags.append("low_registration")
    if age is not None and age_range and not (age_range[0] <= age <= age_range[1]):
        flags.append("age_outside_training_range")
    return flags


def brainage_row(*, participant_id, session_id, source_file, suffix, model, age, predicted, sd,
                 lesion_filled=False, flags=()) -> dict:
    """One row of the participant-level table; missing values are None (written as n/a)."""
    return {
        "participant_id": participant_id, "session_id": session_id, "source_file": source_file,
        "suffix": suffix, "model": model, "chronological_age": age,
        "predicted_age": round(float(predicted), 4), "predicted_age_sd": round(float(sd), 4),
        "brain_age_gap": None if age is None else round(float(predicted) - float(age), 4),
        "lesion_filled": "true" if lesion_filled else "false",
        "qc_flags": ";".join(flags) if flags else None,
    }


def write_table(rows: list[dict], path: str) -> None:
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df.to_csv(path, sep="\t", index=False, na_rep="n/a")


def brainage_sidecar(model, registration_correlation=None, mask_volume_ml=None) -> dict:
    meta = dict(COLUMN_DESCRIPTIONS)
    meta["Model"] = {
        "Name": model.name, "Architecture": model.arch, "SHA256": model.sha256,
        "InputShape": list(model.input.shape), "InputVoxelSize": model.input.voxel_size,
        "Normalisation": model.input.normalisation,
        "AgeBins": [float(model.centres[0]), float(model.centres[-1])],
    }
    meta["SoftwareVersion"] = __version__
    meta["GeneratedBy"] = [{"Name": "brainage-bids", "Version": __version__}]
    meta["Template"] = "MNI152NLin2009aSym"
    if registration_correlation is not None:
        meta["RegistrationCorrelation"] = round(float(registration_correlation), 4)
    if mask_volume_ml is not None:
        meta["BrainMaskVolume"] = {"Value": round(float(mask_volume_ml), 1), "Units": "mL"}
    meta["QCThresholds"] = QC_THRESHOLDS
    return meta


def model_age_range(model) -> tuple | None:
    rng = model.card.get("age_range") if model.card else None
    return tuple(rng) if rng else None


class _PredictInputSpec(BaseInterfaceInputSpec):
    preproc_file = File(exists=True, mandatory=True, desc="brain in MNI space")
    mask_file = File(exists=True, mandatory=True, desc="brain mask in MNI space")
    model_file = File(exists=True, mandatory=True)
    device = traits.Enum("cpu", "cuda", "auto", usedefault=True)
    num_threads = traits.Int(1, usedefault=True)
    participant_id = traits.Str(mandatory=True)
    session_id = traits.Str("", usedefault=True)
    source_file = traits.Str(mandatory=True)
    suffix = traits.Str("T1w", usedefault=True)
    chronological_age = traits.Float(desc="age at scan; leave undefined when unknown")
    registration_correlation = traits.Float()
    mask_volume_ml = traits.Float()


class _PredictOutputSpec(TraitedSpec):
    out_tsv = File(exists=True)
    out_json = File(exists=True)
    out_distribution = File(exists=True, desc="npz with bin centres and probabilities")
    predicted_age = traits.Float()


class PredictAge(SimpleInterface):
    """Predict brain age from a preprocessed image and write the participant-level row."""

    input_spec = _PredictInputSpec
    output_spec = _PredictOutputSpec

    def _run_interface(self, runtime):
        import torch

        from ..models.checkpoint import load_model
        from ..models.inference import model_input, predict_arrays, resolve_device

        torch.set_num_threads(max(1, self.inputs.num_threads))
        device = resolve_device(self.inputs.device)
        model = load_model(self.inputs.model_file, device=device)
        x = model_input(self.inputs.preproc_file, self.inputs.mask_file, model.input)
        mean, sd, prob = predict_arrays(model, [x], device=device)
        age = self.inputs.chronological_age if isdefined(self.inputs.chronological_age) else None
        reg = (self.inputs.registration_correlation
               if isdefined(self.inputs.registration_correlation) else None)
        vol = self.inputs.mask_volume_ml if isdefined(self.inputs.mask_volume_ml) else None
        row = brainage_row(
            participant_id=self.inputs.participant_id, session_id=self.inputs.session_id or None,
            source_file=self.inputs.source_file, suffix=self.inputs.suffix, model=model.name,
            age=age, predicted=mean[0], sd=sd[0],
            flags=qc_flags(reg, age, model_age_range(model)),
        )
        tsv = os.path.join(runtime.cwd, "brainage.tsv")
        write_table([row], tsv)
        js = os.path.join(runtime.cwd, "brainage.json")
        with open(js, "w") as fh:
            json.dump(brainage_sidecar(model, reg, vol), fh, indent=2)
        dist = os.path.join(runtime.cwd, "distribution.npz")
        np.savez(dist, centres=model.centres, probabilities=prob[0], model=model.name)
        self._results.update(out_tsv=tsv, out_json=js, out_distribution=dist,
                             predicted_age=float(mean[0]))
        return runtime
