"""The brain-age predictor interface and the participant-level table it writes."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

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
from ..reports import qc as _qc
from ..utils.output_schema import COLUMNS, CONTRACT_COLUMNS, EXTRA_COLUMNS, column_descriptions
from ..utils.templates import TEMPLATE

# The flag logic lives in reports/qc.py; the old names stay importable from here.
FLAG_ORDER = _qc.FLAG_ORDER
QC_THRESHOLDS = _qc.REGISTRATION_THRESHOLDS
qc_flags = _qc.registration_age_flags
COLUMN_DESCRIPTIONS = column_descriptions(_qc.FLAG_DESCRIPTIONS)


def brainage_row(*, participant_id, session_id, source_file, suffix, model, age, predicted, sd,
                 lesion_filled=False, flags=(), lesion_volume_ml=None) -> dict:
    """One row of the participant-level table; missing values are None (written as n/a)."""
    return {
        "participant_id": participant_id, "session_id": session_id, "source_file": source_file,
        "suffix": suffix, "model": model, "chronological_age": age,
        "predicted_age": round(float(predicted), 4),
        "predicted_age_sd": None if not np.isfinite(sd) else round(float(sd), 4),
        "brain_age_gap": None if age is None else round(float(predicted) - float(age), 4),
        "lesion_filled": "true" if lesion_filled else "false",
        "qc_flags": ";".join(flags) if flags else None,
        "lesion_volume_ml": None if lesion_volume_ml is None else round(float(lesion_volume_ml), 3),
    }


def add_lesion_filling_flags(rows: list[dict]) -> None:
    """Append ``lesion_filling_disagreement`` (reports/qc.py) to the rows of models whose raw and
    lesion-filled predictions disagree; no change without both kinds of row."""
    for row, extra in zip(rows, _qc.lesion_filling_flags(rows)):
        if extra:
            flags = _qc.split_flags(row["qc_flags"])
            flags += [f for f in extra if f not in flags]
            row["qc_flags"] = ";".join(flags)


def write_table(rows: list[dict], path: str) -> None:
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df.to_csv(path, sep="\t", index=False, na_rep="n/a")


def model_description(model, branch: tuple | None = None,
                      registration: dict | None = None) -> dict:
    """The sidecar's description of a model: its card facts, MAE, the recipe its training
    images were made with (``Recipe``) and what this run did (``AppliedPreprocessing``, from the
    workflow ``branch`` = (template, image) whose image the model read; None: its own recipe's
    branch), ``RecipeFollowed`` when the two agree; ``registration``: the QC figures of the
    registration that made the model's image."""
    from ..models.checkpoint import contrasts_of

    d = {"Name": model.name, "Architecture": model.arch, "SHA256": model.sha256,
         "Modality": model.modality, "Contrasts": list(contrasts_of(model.modality)) or None,
         "TrainedOn": (getattr(model, "card", None) or {}).get("trained_on", "real"),
         "Output": model.output,
         "InputShape": list(model.input.shape), "InputVoxelSize": model.input.voxel_size,
         "InputImage": model.input.image, "Normalisation": model.input.normalisation}
    if model.centres is not None:
        d["AgeBins"] = [float(model.centres[0]), float(model.centres[-1])]
    mae = model_mae(getattr(model, "card", None))
    if mae is not None:
        d["MAE"] = mae
    from ..models.recipes import TOOLS, applied, recipe_for

    recipe = recipe_for(model.input)
    done = applied(recipe, branch)
    d["Recipe"] = recipe.as_dict()  # how the model's training images were made
    d["AppliedPreprocessing"] = {**done.as_dict(), "Tools": dict(TOOLS)}  # what this run did
    d["RecipeFollowed"] = done == recipe
    if registration:
        d["Registration"] = registration
    return d


def model_warnings(model, age: float | None, suffix: str, source: str,
                   branch: tuple | None = None) -> list[str]:
    """Why a prediction is outside what ``model`` was trained on: an age outside its
    training range (zoo or card ``age_range``), another contrast, another preprocessing recipe
    (``branch``: see :func:`model_description`)."""
    out = []
    rng = model_age_range(model)
    if age is not None and rng and not (rng[0] <= age <= rng[1]):
        out.append(f"{source}: age {age:g} is outside the training ages {rng[0]:g}-{rng[1]:g} "
                   f"of model {model.name}; its prediction is an extrapolation")
    from ..models.checkpoint import reads_contrast

    if not reads_contrast(model.modality, suffix):
        out.append(f"{source}: model {model.name} was trained on {model.modality}, not {suffix}")
    d = model_description(model, branch)
    if not d["RecipeFollowed"]:
        out.append(f"{source}: model {model.name} was trained on {d['Recipe']['Template']} "
                   f"({d['Recipe']['Registration']}; N4 {d['Recipe']['N4']}); this run "
                   f"registered to {d['AppliedPreprocessing']['Template']} "
                   f"({d['AppliedPreprocessing']['Registration']}) and resampled")
    return out


def model_mae(card: dict | None) -> dict | None:
    """The MAE to read an age against: the publisher's (published models) or the held-out test
    MAE of our model card; None when neither is known."""
    card = card or {}
    pub = card.get("publisher_mae") or {}
    if _qc.as_finite(pub.get("value")) is not None:
        return {"Value": float(pub["value"]), "Units": "year", "Source": "publisher",
                "TestSet": pub.get("test_set", "")}
    test = card.get("test") or {}
    value = _qc.as_finite(test.get("mae", card.get("test_mae")))
    if value is not None:
        out = {"Value": round(value, 4), "Units": "year", "Source": "model card (held-out test)"}
        if test.get("n"):
            out["TestSet"] = f"n={test['n']}"
        return out
    return None


def ensemble_mae(names: list[str]) -> dict | None:
    """The publisher's MAE of a zoo ensemble whose members are exactly ``names``."""
    from ..models import zoo

    for entry in zoo.REGISTRY.values():
        if entry.members and list(entry.members) == list(names) and entry.mae is not None:
            return {"Value": entry.mae, "Units": "year", "Source": f"publisher ({entry.name})",
                    "TestSet": entry.mae_test_set}
    return None


def brainage_sidecar(models, registration_correlation=None, mask_volume_ml=None,
                     precision: str = "fp32", registration_dice=None,
                     branches: list | None = None, registrations: list | None = None) -> dict:
    """Sidecar of a brain-age table: column descriptions, the models, QC figures.

    ``branches`` and ``registrations``: per model, the workflow branch its image came from and
    that registration's QC figures (:func:`model_description`). ``RegistrationCorrelation`` and
    ``RegistrationMaskDice`` at the top are those of the MNI152NLin2009aSym registration every
    scan gets."""
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    branches = list(branches or [None] * len(models))
    registrations = list(registrations or [None] * len(models))
    meta = dict(COLUMN_DESCRIPTIONS)
    meta["Models"] = [model_description(m, b, r)
                      for m, b, r in zip(models, branches, registrations)]
    if len(models) == 1:
        meta["Model"] = meta["Models"][0]
    else:
        meta["Ensemble"] = {
            "Members": [m.name for m in models],
            "Age": "mean of the members' predicted ages",
            "SD": "law of total variance: sqrt(mean of the members' variances + population "
                  "variance of the members' ages (ddof 0: divided by the number of members, the "
                  "variance of the equal-weight mixture of the members' distributions, not a "
                  "sample estimate)); members without a distribution (scalar output) contribute "
                  "through the spread of their ages only",
        }
    # the MAE to read each row's age against, by the row's model (n/a: none known)
    meta["MAE"] = {m.name: model_mae(getattr(m, "card", None)) for m in models}
    if len(models) > 1:
        meta["MAE"]["ensemble"] = ensemble_mae([m.name for m in models])
        if meta["MAE"]["ensemble"] is not None:
            meta["Ensemble"]["MAE"] = meta["MAE"]["ensemble"]
    meta["Precision"] = precision
    meta["SoftwareVersion"] = __version__
    meta["GeneratedBy"] = [{"Name": "brainage-bids", "Version": __version__}]
    meta["Template"] = TEMPLATE
    meta["Templates"] = sorted({d["AppliedPreprocessing"]["Template"] for d in meta["Models"]})
    if registration_correlation is not None:
        meta["RegistrationCorrelation"] = round(float(registration_correlation), 4)
    if registration_dice is not None:
        meta["RegistrationMaskDice"] = round(float(registration_dice), 4)
    if mask_volume_ml is not None:
        meta["BrainMaskVolume"] = {"Value": round(float(mask_volume_ml), 1), "Units": "mL"}
    meta["QCThresholds"] = {**QC_THRESHOLDS, **_qc.QC_THRESHOLDS}
    return meta


def model_age_range(model) -> tuple | None:
    rng = model.card.get("age_range") if model.card else None
    return tuple(rng) if rng else None


@dataclass(frozen=True)
class BranchImage:
    """The image one preprocessing branch made for a scan (raw and lesion-filled), its brain
    mask and the QC figures of the registration that made it."""

    raw: str | None
    filled: str | None
    mask: str | None
    correlation: float | None
    dice: float | None
    space: str = ""

    def qc(self) -> dict:
        out = {"Space": self.space}
        if self.correlation is not None:
            out["RegistrationCorrelation"] = round(float(self.correlation), 4)
        if self.dice is not None:
            out["RegistrationMaskDice"] = round(float(self.dice), 4)
        return out


def branch_images(inputs) -> dict:
    """(template, image) -> :class:`BranchImage` from the predictor's inputs: the
    MNI152NLin2009aSym brain and head, and the MNI152NLin6Asym brain and head branches."""
    from ..utils.templates import FSL_TEMPLATE

    def get(name):
        value = getattr(inputs, name)
        return value if isdefined(value) else None

    ours = dict(mask=get("mask_file"), correlation=get("registration_correlation"),
                dice=get("registration_dice"), space=TEMPLATE)
    out = {(TEMPLATE, "brain"): BranchImage(get("preproc_file"), get("filled_file"), **ours),
           (TEMPLATE, "head"): BranchImage(get("head_file"), get("filled_head_file"), **ours)}
    for image in ("brain", "head"):
        out[(FSL_TEMPLATE, image)] = BranchImage(
            get(f"fsl_{image}_image"), get(f"fsl_{image}_filled"), get(f"fsl_{image}_mask"),
            get(f"fsl_{image}_registration_correlation"), get(f"fsl_{image}_registration_dice"),
            space=FSL_TEMPLATE)
    return out


def image_for(image: BranchImage, key: tuple, model: str, source: str, filled: bool) -> str:
    """The file a model reads; ValueError when the workflow did not make its recipe's image."""
    path = image.filled if filled else image.raw
    if path is None:
        what = "lesion-filled " if filled else ""
        raise ValueError(f"{source}: model {model} reads the {what}{key[1]} on {key[0]} (its "
                         "preprocessing recipe), but the workflow made no such image")
    return path


class _PredictInputSpec(BaseInterfaceInputSpec):
    preproc_file = File(exists=True, mandatory=True, desc="brain in MNI space")
    mask_file = File(exists=True, mandatory=True, desc="brain mask in MNI space")
    head_file = File(exists=True, desc="whole head in MNI space (for models that read the head)")
    model_files = traits.List(File(exists=True), mandatory=True, minlen=1)
    model_names = traits.List(traits.Str, desc="row names of the models (default: from the files)")
    model_modalities = traits.List(traits.Str, desc="modality of each model ('' when unknown)")
    device = traits.Enum("cpu", "cuda", "auto", usedefault=True)
    precision = traits.Enum("fast", "fp32", "bf16", usedefault=True)
    num_threads = traits.Int(1, usedefault=True)
    participant_id = traits.Str(mandatory=True)
    session_id = traits.Str("", usedefault=True)
    source_file = traits.Str(mandatory=True)
    suffix = traits.Str("T1w", usedefault=True)
    chronological_age = traits.Float(desc="age at scan; leave undefined when unknown")
    registration_correlation = traits.Float()
    registration_dice = traits.Float()
    mask_volume_ml = traits.Float()
    filled_file = File(exists=True, desc="lesion-filled brain in MNI space: adds lesion_filled "
                                         "rows")
    filled_head_file = File(exists=True, desc="lesion-filled whole head in MNI space")
    lesion_volume_ml = traits.Float(desc="lesion mask volume, written on every row")
    fsl_brain_image = File(exists=True, desc="brain on the MNI152NLin6Asym grid (SFCN recipe)")
    fsl_brain_mask = File(exists=True, desc="its brain mask")
    fsl_brain_registration_correlation = traits.Float()
    fsl_brain_registration_dice = traits.Float()
    fsl_brain_filled = File(exists=True, desc="the lesion-filled brain on that grid")
    fsl_head_image = File(exists=True, desc="whole head on the MNI152NLin6Asym grid "
                                            "(FLAIR-Brain-Age recipe)")
    fsl_head_mask = File(exists=True, desc="the brain mask through the head's transform")
    fsl_head_registration_correlation = traits.Float()
    fsl_head_registration_dice = traits.Float()
    fsl_head_filled = File(exists=True, desc="the lesion-filled head on that grid")
    saliency = traits.Bool(False, usedefault=True, desc="write a SmoothGrad map (25 samples)")
    template = File(exists=True, desc="MNI template: the grid of the saliency map")


class _PredictOutputSpec(TraitedSpec):
    out_tsv = File(exists=True)
    out_json = File(exists=True)
    out_distribution = File(exists=True, desc="TSV: model, age (bin centre), probability")
    predicted_age = traits.Float(desc="the ensemble's age when several models ran")
    out_saliency = File(exists=True, desc="SmoothGrad map averaged over the models, MNI space")


class PredictAge(SimpleInterface):
    """Predict brain age with one or several models and write the participant-level rows.

    One row per model; with several models a last row ``model=ensemble`` (see
    :func:`brainage_bids.models.inference.ensemble`). With ``filled_file`` the same rows again
    on the lesion-filled image (``lesion_filled=true``), and both kinds of row of a model get
    ``lesion_filling_disagreement`` when they differ by more than the QC threshold.
    """

    input_spec = _PredictInputSpec
    output_spec = _PredictOutputSpec

    def _run_interface(self, runtime):
        import torch

        from ..models.checkpoint import load_model, reads_contrast
        from ..models.inference import ensemble, model_input, predict_arrays, resolve_device

        torch.set_num_threads(max(1, self.inputs.num_threads))
        device = resolve_device(self.inputs.device)
        names = list(self.inputs.model_names) if isdefined(self.inputs.model_names) else []
        modalities = (list(self.inputs.model_modalities)
                      if isdefined(self.inputs.model_modalities) else [])
        age = self.inputs.chronological_age if isdefined(self.inputs.chronological_age) else None
        reg = (self.inputs.registration_correlation
               if isdefined(self.inputs.registration_correlation) else None)
        vol = self.inputs.mask_volume_ml if isdefined(self.inputs.mask_volume_ml) else None
        dice = (self.inputs.registration_dice
                if isdefined(self.inputs.registration_dice) else None)
        lesion_ml = (self.inputs.lesion_volume_ml if isdefined(self.inputs.lesion_volume_ml)
                     else None)
        common = dict(participant_id=self.inputs.participant_id,
                      session_id=self.inputs.session_id or None,
                      source_file=self.inputs.source_file, suffix=self.inputs.suffix, age=age,
                      lesion_volume_ml=lesion_ml)
        images = branch_images(self.inputs)
        conditions = [False] + ([True] if isdefined(self.inputs.filled_file) else [])
        models = [load_model(path, device=device, name=names[i] if i < len(names) else None,
                             modality=(modalities[i] or None) if i < len(modalities) else None)
                  for i, path in enumerate(self.inputs.model_files)]
        from ..models.recipes import input_key

        keys = [input_key(m.input) for m in models]
        import logging

        log = logging.getLogger("brainage_bids.predict")
        for model, key in zip(models, keys):
            for msg in model_warnings(model, age, self.inputs.suffix, self.inputs.source_file,
                                      key):
                log.warning(msg)
        rows, dist = [], []
        inputs: dict = {}  # raw model input arrays, once per input specification (saliency)
        for filled in conditions:
            arrays: dict = {}
            ages, sds, all_flags = [], [], set()
            for model, key in zip(models, keys):
                image = images[key]
                if model.input not in arrays:
                    path = image_for(image, key, model.name, self.inputs.source_file, filled)
                    arrays[model.input] = model_input(path, image.mask, model.input,
                                                      head_file=path)
                mean, sd, prob = predict_arrays(model, [arrays[model.input]], device=device,
                                                precision=self.inputs.precision)
                flags = qc_flags(image.correlation, age, model_age_range(model),
                                 self.inputs.suffix, image.dice)
                flags += _qc.scan_flags(predicted_age_sd=sd[0],
                                        reference_sd=_qc.reference_sd(model.card),
                                        mask_volume_ml=vol)
                if not reads_contrast(model.modality, self.inputs.suffix):
                    flags.append("model_modality_mismatch")
                all_flags.update(flags)
                rows.append(brainage_row(model=model.name, predicted=mean[0], sd=sd[0],
                                         flags=flags, lesion_filled=filled, **common))
                ages.append(float(mean[0]))
                sds.append(float(sd[0]))
                if prob is not None and not filled:  # distributions of the raw rows only
                    dist += [{"model": model.name, "age": round(float(c), 4),
                              "probability": float(q)} for c, q in zip(model.centres, prob[0])]
            if len(models) > 1:
                e_age, e_sd = ensemble(ages, sds)
                refs = [r for r in (_qc.reference_sd(m.card) for m in models) if r is not None]
                all_flags.update(_qc.ensemble_flags(
                    predicted_age_sd=e_sd, member_ages=ages,
                    reference_sd=float(np.mean(refs)) if refs else None, mask_volume_ml=vol))
                order = [f for f in FLAG_ORDER if f in all_flags]
                rows.append(brainage_row(model="ensemble", predicted=e_age, sd=e_sd, flags=order,
                                         lesion_filled=filled, **common))
            if not filled:
                inputs = arrays
        add_lesion_filling_flags(rows)
        raw_rows = [r for r in rows if r["lesion_filled"] == "false"]
        tsv = os.path.join(runtime.cwd, "brainage.tsv")
        write_table(rows, tsv)
        js = os.path.join(runtime.cwd, "brainage.json")
        with open(js, "w") as fh:
            meta = brainage_sidecar(models, reg, vol, self.inputs.precision, dice,
                                    branches=keys,
                                    registrations=[images[k].qc() for k in keys])
            if len(conditions) > 1:
                meta["LesionFilling"] = {
                    "Rows": "lesion_filled=false: the image as acquired; lesion_filled=true: the "
                            "same image with its lesions filled (see the sidecar of the "
                            "desc-lesionfilled image); age distributions are those of the raw "
                            "rows"}
            json.dump(meta, fh, indent=2)
        if self.inputs.saliency:
            from ..models.saliency import mni_saliency

            if not isdefined(self.inputs.template):
                raise ValueError("saliency needs the template input")
            out_sal = os.path.join(runtime.cwd, "saliency.nii.gz")
            mni_saliency(models, inputs, self.inputs.template, out_sal, device=device,
                         n_samples=25, noise_fraction=0.15)
            self._results["out_saliency"] = out_sal
        dist_tsv = os.path.join(runtime.cwd, "distribution.tsv")
        pd.DataFrame(dist, columns=["model", "age", "probability"]).to_csv(
            dist_tsv, sep="\t", index=False, float_format="%.6g")
        self._results.update(out_tsv=tsv, out_json=js, out_distribution=dist_tsv,
                             predicted_age=float(raw_rows[-1]["predicted_age"]))
        return runtime
