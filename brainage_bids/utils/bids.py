"""BIDS input indexing (PyBIDS), per-scan demographics and derivative naming."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import __version__
from .images import atomic_write_text

# Entities of the source image that name its derivatives, in BIDS order.
SOURCE_ENTITIES = (("subject", "sub"), ("session", "ses"), ("acquisition", "acq"),
                   ("ceagent", "ce"), ("reconstruction", "rec"), ("run", "run"))
DEFAULT_FILTERS = {
    "t1w": {"datatype": "anat", "suffix": "T1w", "extension": [".nii", ".nii.gz"]},
    "flair": {"datatype": "anat", "suffix": "FLAIR", "extension": [".nii", ".nii.gz"]},
}
MODALITIES = ("T1w", "FLAIR")


class BIDSInputError(Exception):
    """Problem with the input dataset; ``exit_code`` follows the BIDS execution spec."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Scan:
    """One input image with the demographics that go with it."""

    path: str
    relpath: str
    subject: str
    session: str | None
    suffix: str
    entities: tuple  # ((bids key, value), ...) in SOURCE_ENTITIES order
    age: float | None
    sex: str | None

    @property
    def participant_id(self) -> str:
        return f"sub-{self.subject}"

    @property
    def session_id(self) -> str | None:
        return f"ses-{self.session}" if self.session else None

    @property
    def prefix(self) -> str:
        """``sub-<l>[_ses-<l>][_acq-...][_run-...]``: the source entities of derivative names."""
        return "_".join(f"{k}-{v}" for k, v in self.entities)

    @property
    def anat_dir(self) -> str:
        parts = [self.participant_id] + ([self.session_id] if self.session else []) + ["anat"]
        return os.path.join(*parts)


def validate_dataset(bids_dir: Path) -> None:
    """Minimal BIDS validation: a dataset_description.json and BIDS-valid names under sub-*/.

    Raises BIDSInputError(exit_code=16) listing the offending files.
    """
    from bids_validator import BIDSValidator

    desc = bids_dir / "dataset_description.json"
    problems = []
    if not desc.exists():
        problems.append("dataset_description.json is missing")
    else:
        try:
            d = json.loads(desc.read_text())
            for key in ("Name", "BIDSVersion"):
                if key not in d:
                    problems.append(f"dataset_description.json lacks {key}")
        except json.JSONDecodeError as exc:
            problems.append(f"dataset_description.json is not valid JSON ({exc})")
    validator = BIDSValidator()
    for sub in sorted(bids_dir.glob("sub-*")):
        for f in sorted(sub.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                rel = "/" + f.relative_to(bids_dir).as_posix()
                if not validator.is_bids(rel):
                    problems.append(f"not a valid BIDS file name: {rel}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise BIDSInputError(
            f"BIDS validation failed for {bids_dir}:\n  {shown}{more}\n"
            "(use --skip-bids-validation to proceed anyway)", 16)


def _clean(value):
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    s = str(value).strip()
    return None if s in ("", "n/a", "nan", "NaN") else value


def _age(value) -> float | None:
    value = _clean(value)
    if value is None:
        return None
    try:
        age = float(value)
    except (TypeError, ValueError):
        return None
    return age if math.isfinite(age) else None


def read_participants(bids_dir: Path) -> pd.DataFrame:
    """participants.tsv indexed by participant_id (empty frame when absent)."""
    f = bids_dir / "participants.tsv"
    if not f.exists():
        return pd.DataFrame(index=pd.Index([], name="participant_id"))
    df = pd.read_csv(f, sep="\t", dtype=str, na_values=["n/a"], keep_default_na=False)
    if "participant_id" not in df:
        raise BIDSInputError(f"{f}: no participant_id column", 65)
    df["participant_id"] = [p if str(p).startswith("sub-") else f"sub-{p}" for p in df["participant_id"]]
    return df.set_index("participant_id")


def read_sessions(bids_dir: Path, subject: str) -> pd.DataFrame | None:
    f = bids_dir / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
    if not f.exists():
        return None
    df = pd.read_csv(f, sep="\t", dtype=str, na_values=["n/a"], keep_default_na=False)
    if "session_id" not in df:
        return None
    df["session_id"] = [s if str(s).startswith("ses-") else f"ses-{s}" for s in df["session_id"]]
    return df.set_index("session_id")


def scan_age(bids_dir: Path, participants: pd.DataFrame, subject: str, session: str | None):
    """Age at this scan: sessions.tsv ``age`` when present for the session, else participants.tsv."""
    if session:
        sessions = read_sessions(bids_dir, subject)
        if sessions is not None and "age" in sessions and f"ses-{session}" in sessions.index:
            age = _age(sessions.loc[f"ses-{session}", "age"])
            if age is not None:
                return age
    pid = f"sub-{subject}"
    if "age" in participants and pid in participants.index:
        return _age(participants.loc[pid, "age"])
    return None


def scan_sex(participants: pd.DataFrame, subject: str) -> str | None:
    pid = f"sub-{subject}"
    if "sex" in participants and pid in participants.index:
        value = _clean(participants.loc[pid, "sex"])
        return None if value is None else str(value)
    return None


def load_filters(path: str | None) -> dict:
    """Query filters: the defaults updated by a --bids-filter-file JSON (fMRIPrep's format)."""
    filters = json.loads(json.dumps(DEFAULT_FILTERS))
    if path:
        try:
            user = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BIDSInputError(f"--bids-filter-file {path}: {exc}", 64) from exc
        for key, value in user.items():
            if key.lower() not in filters:
                raise BIDSInputError(f"--bids-filter-file {path}: unknown query {key!r} "
                                     f"(known: {', '.join(filters)})", 64)
            if not isinstance(value, dict):
                raise BIDSInputError(f"--bids-filter-file {path}: query {key!r} must be an object", 64)
            filters[key.lower()].update(value)
    return filters


def _narrow(labels: list[str], allowed) -> list[str]:
    """``labels`` restricted to ``allowed`` (a filter-file value: label, list of labels or None)."""
    if allowed is None:
        return list(labels)
    allowed = {str(a) for a in (allowed if isinstance(allowed, (list, tuple)) else [allowed])}
    return [lab for lab in labels if lab in allowed]


def collect_scans(bids_dir: str | os.PathLike, participant_labels=None, session_labels=None,
                  filters: dict | None = None, validate: bool = True,
                  modalities=("T1w",)) -> list[Scan]:
    """Index every image of the given modalities (T1w, FLAIR) matching the filters with PyBIDS.

    Raises BIDSInputError: 16 when validation fails, 66 when the dataset has no subjects or a
    requested participant is absent, 18 when the filters match no image.
    """
    from bids import BIDSLayout

    bids_dir = Path(bids_dir).resolve()
    if not bids_dir.is_dir():
        raise BIDSInputError(f"BIDS directory not found: {bids_dir}", 66)
    if validate:
        validate_dataset(bids_dir)
    layout = BIDSLayout(str(bids_dir), validate=False, derivatives=False)
    subjects = layout.get_subjects()
    if not subjects:
        raise BIDSInputError(f"{bids_dir}: no sub-* folders found", 66)
    if participant_labels:
        wanted = [p[4:] if p.startswith("sub-") else p for p in participant_labels]
        missing = sorted(set(wanted) - set(subjects))
        if missing:
            raise BIDSInputError(f"participant(s) not found in {bids_dir}: {', '.join(missing)}", 66)
        subjects = wanted
    files, queries = [], []
    for modality in modalities:
        query = dict((filters or DEFAULT_FILTERS)[modality.lower()])
        # A subject or session in the filter file narrows the command-line selection.
        query["subject"] = _narrow(subjects, query.get("subject"))
        if session_labels:
            query["session"] = _narrow([s[4:] if s.startswith("ses-") else s for s in session_labels],
                                       query.get("session"))
        emptied = [k for k in ("subject", "session") if isinstance(query.get(k), list) and not query[k]]
        queries.append(query)
        if not emptied:
            files += layout.get(return_type="object", **query)
    if not files:
        raise BIDSInputError(f"no {'/'.join(modalities)} image matches the filters "
                             f"{queries if len(queries) > 1 else queries[0]} in {bids_dir}", 18)
    participants = read_participants(bids_dir)
    scans = []
    for f in sorted(files, key=lambda x: x.path):
        ent = f.get_entities()
        subject = ent["subject"]
        session = ent.get("session")
        pairs = tuple((short, str(ent[long]) if long != "run" else str(ent[long]))
                      for long, short in SOURCE_ENTITIES if ent.get(long) is not None)
        scans.append(Scan(
            path=f.path, relpath=os.path.relpath(f.path, bids_dir), subject=subject, session=session,
            suffix=ent.get("suffix", "T1w"), entities=pairs,
            age=scan_age(bids_dir, participants, subject, session), sex=scan_sex(participants, subject),
        ))
    return scans


def write_derivative_description(bids_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """dataset_description.json of the derivatives (GeneratedBy, SourceDatasets)."""
    out = Path(out_dir)
    desc = {
        "Name": "brainage-bids outputs",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "brainage-bids", "Version": __version__,
                         "CodeURL": "https://github.com/brainage-bids/brainage-bids"}],
        "SourceDatasets": [{"URL": Path(bids_dir).resolve().as_uri()}],
    }
    src = Path(bids_dir) / "dataset_description.json"
    if src.exists():
        try:
            d = json.loads(src.read_text())
            if "DatasetDOI" in d:
                desc["SourceDatasets"][0]["DOI"] = d["DatasetDOI"]
        except json.JSONDecodeError:
            pass
    atomic_write_text(out / "dataset_description.json", json.dumps(desc, indent=2) + "\n")
    ignore = out / ".bidsignore"
    if not ignore.exists():
        atomic_write_text(ignore, "*.html\nlogs/\n*/log/\ngroup/\nmodels/\n")
