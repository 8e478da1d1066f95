"""Collect participant-level tables into the group table."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils.output_schema import CONTRACT_COLUMNS, EXTRA_COLUMNS

LOG = logging.getLogger("brainage_bids.stats.collect")


def is_lesion_filled(df: pd.DataFrame) -> pd.Series:
    """True for the rows predicted on the lesion-filled image (``lesion_filled`` is "true")."""
    return df["lesion_filled"].astype(str).str.strip().str.lower().eq("true")


#: Columns a valid row must fill (the contract's identifying columns and the prediction).
REQUIRED_VALUES = ("participant_id", "source_file", "suffix", "model", "predicted_age",
                   "lesion_filled")
NUMERIC_COLUMNS = ("chronological_age", "predicted_age", "predicted_age_sd", "brain_age_gap",
                   "lesion_volume_ml")
TEXT = {c: str for c in ("participant_id", "session_id", "source_file", "suffix", "model",
                         "lesion_filled", "qc_flags")}


def check_table(df: pd.DataFrame, path: Path) -> str | None:
    """Why a participant-level table breaks the output contract (None when it does not):
    missing columns, rows without participant, source, suffix, model, prediction or
    lesion_filled (a truncated file), non-numeric ages, or rows of another participant or
    suffix than the file name says."""
    missing = [c for c in CONTRACT_COLUMNS if c not in df]
    if missing:
        return f"lacks the columns {', '.join(missing)}"
    if df.empty:
        return "has no rows"
    for c in REQUIRED_VALUES:
        empty = df[c].isna() | df[c].astype(str).str.strip().eq("")
        if empty.any():
            return f"row {int(empty.to_numpy().argmax()) + 2}: {c} is empty (truncated file?)"
    for c in (c for c in NUMERIC_COLUMNS if c in df):
        values = df[c]
        bad = values.notna() & pd.to_numeric(values, errors="coerce").isna()
        if bad.any():
            i = int(bad.to_numpy().argmax())
            return f"row {i + 2}: {c} {values.iloc[i]!r} is not a number"
    if not df["lesion_filled"].astype(str).str.strip().str.lower().isin(["true", "false"]).all():
        return "lesion_filled is not true/false"
    owner = next((part for part in path.parts if part.startswith("sub-")), None)
    if owner and not df["participant_id"].eq(owner).all():
        return f"has rows of another participant than {owner}"
    suffix = path.name.rsplit("_", 1)[-1].removesuffix(".tsv")
    if not df["suffix"].eq(suffix).all():
        return f"has rows of another suffix than {suffix}"
    return None


def read_brainage_tables(output_dir: str | Path) -> pd.DataFrame:
    """Every ``*_desc-brainage_*.tsv`` under ``output_dir/sub-*``, in one frame (contract columns).

    Each table is checked against the output contract (:func:`check_table`); an unreadable or
    invalid one is named in a warning and left out. Raises FileNotFoundError when there is no
    table, ValueError (naming them) when none is valid.
    """
    output_dir = Path(output_dir)
    files = sorted(output_dir.glob("sub-*/**/anat/*_desc-brainage_*.tsv"))
    if not files:
        raise FileNotFoundError(f"no participant-level brain-age tables under {output_dir}; "
                                "run the participant level first")
    frames, bad = [], []
    for f in files:
        # Text columns stay text (pandas would turn the "true"/"false" levels of lesion_filled
        # into booleans and write them back as True/False).
        try:
            df = pd.read_csv(f, sep="\t", na_values=["n/a"], keep_default_na=False, dtype=TEXT)
        except UnicodeDecodeError:
            problem = "is not UTF-8 text"
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as exc:
            problem = f"is not a readable TSV ({' '.join(str(exc).split())})"
        else:
            problem = check_table(df, f)
        if problem:
            LOG.warning("%s %s; left out of the group level", f, problem)
            bad.append(f"{f} {problem}")
            continue
        for c in NUMERIC_COLUMNS:
            if c in df:
                df[c] = pd.to_numeric(df[c])
        frames.append(df)
    if not frames:
        raise ValueError("no valid participant-level table: " + "; ".join(bad))
    df = pd.concat(frames, ignore_index=True)
    for c in EXTRA_COLUMNS:  # absent from tables written before the column existed
        if c not in df:
            df[c] = float("nan")
    return df


def is_control(diagnosis, labels) -> np.ndarray:
    """Which entries of a diagnosis column are healthy controls: equal to one of ``labels`` (the
    spec's ``controls``) once both are stripped and lower-cased; missing values are not. The one
    definition of a control, shared by the group and train levels."""
    wanted = {str(label).strip().lower() for label in labels}
    values = pd.Series(diagnosis, dtype="string").str.strip().str.lower()
    return values.isin(wanted).fillna(False).to_numpy(dtype=bool)
