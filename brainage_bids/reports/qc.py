"""All quality flags, raised by the predictor and explained by the reports: registration, age
outside the training range, brain mask volume, predicted-age SD, lesion filling.

Thresholds and why:

- ``mask_volume_implausible``: native-space brain mask volume outside 800-2000 mL. The NMOSD
  study's FreeSurfer brain tissue volumes were 1154.6 +/- 98.5 mL in healthy controls and
  1058.9 +/- 94.4 mL in RRMS; a skull-strip mask also holds the ventricles and sulcal CSF, so
  masks are larger (1096-1629 mL on the MS, IXI, MPRAGE and longitudinal runs of this project).
  Below 800 mL (about 2.7 SD under the RRMS tissue mean) the mask has cut away brain; above
  2000 mL (beyond adult intracranial volumes, about 1.2-1.8 L) it has taken in skull, eyes or
  neck.
- ``predicted_age_sd_high``: the SD of the predicted age distribution above 1.5 times the model's
  mean SD on its held-out test set (model card ``test.mean_sd``, else ``validation.mean_sd``), or
  above 10 years when the card gives none. The NMOSD study found high SDs in scans of low quality
  or incomplete coverage but gave no cut-off; its Figure 1D-G cases had SDs of 4.4-7.2 years.
  SD scales differ between models (the default ixi-sfcn-2mm gives 4.8-18.0 years, median 12.9,
  on the 148 IXI controls, whose maximum is 1.44 times its test mean of 12.5), so the cut is
  relative to the model: 1.5 times flags none of those controls and marks distributions that are
  nearly flat. Ensemble rows have their own rule: above 1.5 times the mean reference of the
  members that have one, or a spread of the members' ages (population SD, ddof 0) above 5 years.
  The absolute 10-year cut is not used for them: an ensemble of scalar-output members (the
  Inception-ResNet-V2 FLAIR models) has no within-member SD, so its SD is that spread alone and
  would practically never reach 10 years. 5 years is half the single-model cut, a provisional
  value (no published figure; members of one ensemble are trained on the same data, so a 5-year
  disagreement means at least one member is far off). Each member row keeps its own flags, and
  the ensemble row also carries the flags of its members.
- ``lesion_filling_disagreement``: lesion-filled and raw predictions of the same scan and model
  differ by more than 4.4 years, the wider 95 % limit of agreement of the NMOSD study's
  Bland-Altman analysis (mean difference 0.28 +/- 2.11 years: 0.28 + 1.96 * 2.11 = 4.4).

:func:`scan_flags` evaluates the first two per model row (the predictor adds them to its own);
:func:`lesion_filling_flags` needs the raw and lesion-filled rows of a scan together.
"""
from __future__ import annotations

import math

import pandas as pd

MASK_VOLUME_RANGE_ML = (800.0, 2000.0)
SD_REFERENCE_FACTOR = 1.5
SD_ABSOLUTE_MAX = 10.0
ENSEMBLE_SPREAD_MAX = 5.0
LESION_FILLING_MAX_DIFF = 4.4

#: Added to the sidecar's QCThresholds next to the registration thresholds.
QC_THRESHOLDS = {
    "BrainMaskVolumeRange": list(MASK_VOLUME_RANGE_ML),
    "PredictedAgeSDFactor": SD_REFERENCE_FACTOR,
    "PredictedAgeSDMax": SD_ABSOLUTE_MAX,
    "EnsembleMemberSpreadMax": ENSEMBLE_SPREAD_MAX,
    "LesionFillingMaxDifference": LESION_FILLING_MAX_DIFF,
}

# Correlation of the registered brain with the T1w template inside the template mask: the 148 IXI
# scans score 0.50-0.62 and a clinical 2D T1w 0.46; misregistrations fall far below. It is only
# applied to T1w (FLAIR contrast differs: 0.25-0.38 on well registered MS FLAIR). The Dice overlap
# of the registered brain mask with the template mask is modality-free: 0.93-0.97 on IXI, MPRAGE,
# 3D and 2D MS T1w/FLAIR.
#: The sidecar's registration thresholds (QCThresholds, next to :data:`QC_THRESHOLDS`).
REGISTRATION_THRESHOLDS = {"RegistrationCorrelationMin": 0.35,
                           "RegistrationCorrelationApplies": ["T1w"],
                           "RegistrationMaskDiceMin": 0.85}

#: The order flags are written in.
FLAG_ORDER = ("low_registration", "age_outside_training_range", "model_modality_mismatch",
              "mask_volume_implausible", "predicted_age_sd_high", "lesion_filling_disagreement")

#: Meaning of every flag the participant level can write (shown in the reports).
FLAG_DESCRIPTIONS = {
    "low_registration": "the registered brain mask overlaps the template mask less than 0.85 "
                        "(Dice), or a T1w image correlates with the T1w template less than 0.35",
    "age_outside_training_range": "chronological age outside the ages the model was trained on: "
                                  "predictions there are extrapolations",
    "model_modality_mismatch": "the model was trained on another modality than the image (run "
                               "on explicit request)",
    "mask_volume_implausible": f"brain mask volume outside {MASK_VOLUME_RANGE_ML[0]:.0f}-"
                               f"{MASK_VOLUME_RANGE_ML[1]:.0f} mL: skull stripping removed brain "
                               "or kept non-brain tissue",
    "predicted_age_sd_high": f"predicted-age SD above {SD_REFERENCE_FACTOR:g} x the model's mean "
                             f"SD on its test set (or above {SD_ABSOLUTE_MAX:g} years): the model "
                             "is unsure, often from poor image quality or incomplete coverage; "
                             f"for an ensemble, its members' ages spread by an SD above "
                             f"{ENSEMBLE_SPREAD_MAX:g} years",
    "lesion_filling_disagreement": f"lesion-filled and raw predictions differ by more than "
                                   f"{LESION_FILLING_MAX_DIFF:g} years",
}


def as_finite(v) -> float | None:
    """``v`` as a finite float, or None (missing, text, NaN, inf)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def registration_age_flags(registration_correlation: float | None, age: float | None,
                           age_range: tuple | None, suffix: str = "T1w",
                           registration_dice: float | None = None) -> list[str]:
    """``low_registration`` (see :data:`REGISTRATION_THRESHOLDS`) and
    ``age_outside_training_range`` (``age`` outside the model's ``age_range``) of one scan."""
    th = REGISTRATION_THRESHOLDS
    flags = []
    low_corr = (registration_correlation is not None
                and suffix in th["RegistrationCorrelationApplies"]
                and registration_correlation < th["RegistrationCorrelationMin"])
    low_dice = (registration_dice is not None
                and registration_dice < th["RegistrationMaskDiceMin"])
    if low_corr or low_dice:
        flags.append("low_registration")
    if age is not None and age_range and not (age_range[0] <= age <= age_range[1]):
        flags.append("age_outside_training_range")
    return flags


def mask_volume_implausible(volume_ml) -> bool:
    """True when the brain mask volume (mL) lies outside :data:`MASK_VOLUME_RANGE_ML`."""
    v = as_finite(volume_ml)
    return v is not None and not (MASK_VOLUME_RANGE_ML[0] <= v <= MASK_VOLUME_RANGE_ML[1])


def reference_sd(card: dict | None) -> float | None:
    """A model's mean predicted-age SD on its held-out data (card ``test.mean_sd``, else
    ``validation.mean_sd``), or None."""
    for part in ("test", "validation"):
        v = as_finite(((card or {}).get(part) or {}).get("mean_sd"))
        if v is not None and v > 0:
            return v
    return None


def sd_threshold(reference: float | None) -> float:
    """The SD above which ``predicted_age_sd_high`` is raised."""
    ref = as_finite(reference)
    return SD_REFERENCE_FACTOR * ref if ref is not None and ref > 0 else SD_ABSOLUTE_MAX


def predicted_age_sd_high(sd, reference: float | None = None) -> bool:
    """True when ``sd`` (years) exceeds :func:`sd_threshold` of ``reference``."""
    s = as_finite(sd)
    return s is not None and s > sd_threshold(reference)


def member_spread(member_ages) -> float | None:
    """Population SD (ddof 0) of the members' predicted ages; None with fewer than two."""
    ages = [a for a in (as_finite(v) for v in member_ages) if a is not None]
    if len(ages) < 2:
        return None
    mean = sum(ages) / len(ages)
    return math.sqrt(sum((a - mean) ** 2 for a in ages) / len(ages))


def ensemble_sd_high(sd, member_ages, reference: float | None = None) -> bool:
    """The ensemble rule of ``predicted_age_sd_high`` (see the module docstring): ``sd`` above
    1.5 x ``reference`` (mean member reference), or the members' spread above
    :data:`ENSEMBLE_SPREAD_MAX`."""
    s, ref = as_finite(sd), as_finite(reference)
    if s is not None and ref is not None and ref > 0 and s > SD_REFERENCE_FACTOR * ref:
        return True
    spread = member_spread(member_ages)
    return spread is not None and spread > ENSEMBLE_SPREAD_MAX


def ensemble_flags(*, predicted_age_sd=None, member_ages=(), reference_sd=None,
                   mask_volume_ml=None) -> list[str]:
    """:func:`scan_flags` for an ensemble row, with :func:`ensemble_sd_high` for the SD."""
    flags = []
    if mask_volume_implausible(mask_volume_ml):
        flags.append("mask_volume_implausible")
    if ensemble_sd_high(predicted_age_sd, member_ages, reference_sd):
        flags.append("predicted_age_sd_high")
    return flags


def scan_flags(*, predicted_age_sd=None, reference_sd=None, mask_volume_ml=None) -> list[str]:
    """The flags of this module for one model row: ``mask_volume_implausible`` and
    ``predicted_age_sd_high`` (in that order). Missing values raise no flag."""
    flags = []
    if mask_volume_implausible(mask_volume_ml):
        flags.append("mask_volume_implausible")
    if predicted_age_sd_high(predicted_age_sd, reference_sd):
        flags.append("predicted_age_sd_high")
    return flags


def is_true(v) -> bool:
    """Whether a table cell reads as true ("true", "1" or "yes", any case)."""
    return str(v).strip().lower() in ("true", "1", "yes")


def lesion_filling_flags(rows) -> list[list[str]]:
    """``lesion_filling_disagreement`` for the rows of one scan (a frame or a list of dicts with
    ``model``, ``predicted_age`` and ``lesion_filled``): both rows of a model get the flag when
    its lesion-filled and raw predictions differ by more than :data:`LESION_FILLING_MAX_DIFF`
    years. Returns one list of flags per row, in order; empty lists when the scan lacks either
    kind of row."""
    df = pd.DataFrame(rows).reset_index(drop=True)
    out: list[list[str]] = [[] for _ in range(len(df))]
    if df.empty or not {"model", "predicted_age", "lesion_filled"} <= set(df.columns):
        return out
    filled = df["lesion_filled"].map(is_true)
    for model, g in df.groupby(df["model"].astype(str), sort=False):
        raw = [as_finite(v) for v in g.loc[~filled[g.index], "predicted_age"]]
        fil = [as_finite(v) for v in g.loc[filled[g.index], "predicted_age"]]
        raw = [v for v in raw if v is not None]
        fil = [v for v in fil if v is not None]
        if raw and fil and abs(sum(fil) / len(fil) - sum(raw) / len(raw)) > LESION_FILLING_MAX_DIFF:
            for i in g.index:
                out[i].append("lesion_filling_disagreement")
    return out


def split_flags(value) -> list[str]:
    """The flags of a ``qc_flags`` cell (semicolon-separated; n/a or empty -> [])."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    text = str(value).strip()
    if text.lower() in ("", "n/a", "nan", "none"):
        return []
    return [f.strip() for f in text.split(";") if f.strip()]


def evaluate_rows(rows: pd.DataFrame, *, mask_volume_ml=None, reference_sds: dict | None = None,
                  members: dict | None = None) -> list[list[str]]:
    """Flags of this module for every row of one scan's brain-age table, as the report evaluates
    them on outputs written before the predictor raised them.

    reference_sds : model -> reference SD (see :func:`reference_sd`).
    members : ensemble row name -> member model names, for the ensemble's reference.
    """
    reference_sds = reference_sds or {}
    members = members or {}
    rows = rows.reset_index(drop=True)
    out = []
    filled = rows["lesion_filled"].map(is_true) if "lesion_filled" in rows else None
    for i, r in rows.iterrows():
        model = str(r.get("model"))
        ref = reference_sds.get(model)
        if model in members:
            refs = [reference_sds[m] for m in members[model] if reference_sds.get(m)]
            ref = sum(refs) / len(refs) if refs else None
            same = rows["model"].astype(str).isin(members[model])
            if filled is not None:
                same &= filled == filled[i]
            out.append(ensemble_flags(predicted_age_sd=r.get("predicted_age_sd"),
                                      member_ages=rows.loc[same, "predicted_age"].tolist()
                                      if "predicted_age" in rows else [],
                                      reference_sd=ref, mask_volume_ml=mask_volume_ml))
            continue
        out.append(scan_flags(predicted_age_sd=r.get("predicted_age_sd"), reference_sd=ref,
                              mask_volume_ml=mask_volume_ml))
    for i, extra in enumerate(lesion_filling_flags(rows)):
        out[i] += extra
    return out
