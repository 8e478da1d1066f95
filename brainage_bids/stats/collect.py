"""Collect participant-level tables into the group table."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..interfaces.predict import CONTRACT_COLUMNS, EXTRA_COLUMNS


def is_lesion_filled(df: pd.DataFrame) -> pd.Series:
    """True for the rows predicted on the lesion-filled image (``lesion_filled`` is "true")."""
    return df["lesion_filled"].astype(str).str.strip().str.lower().eq("true")


def read_brainage_tables(output_dir: str | Path) -> pd.DataFrame:
    """Every ``*_desc-brainage_*.tsv`` under ``output_dir/sub-*``, in one frame (contract columns)."""
    output_dir = Path(output_dir)
    files = sorted(output_dir.glob("sub-*/**/anat/*_desc-brainage_*.tsv"))
    if not files:
        raise FileNotFoundError(f"no participant-level brain-age tables under {output_dir}; "
                                "run the participant level first")
    # Text columns stay text (pandas would turn the "true"/"false" levels of lesion_filled into
    # booleans and write them back as True/False).
    text = {c: str for c in ("participant_id", "session_id", "source_file", "suffix", "model",
                             "lesion_filled", "qc_flags")}
    frames = [pd.read_csv(f, sep="\t", na_values=["n/a"], keep_default_na=False, dtype=text)
              for f in files]
    df = pd.concat(frames, ignore_index=True)
    missing = [c for c in CONTRACT_COLUMNS if c not in df]
    if missing:
        raise ValueError(f"participant tables lack columns {missing}")
    for c in EXTRA_COLUMNS:  # absent from tables written before the column existed
        if c not in df:
            df[c] = float("nan")
    return df
