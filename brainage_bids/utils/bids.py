"""BIDS input indexing (PyBIDS), per-scan demographics and derivative naming."""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from .images import atomic_write_text

# Entities of the source image that name its derivatives, in BIDS order.
SOURCE_ENTITIES = (("subject", "sub"), ("session", "ses"), ("acquisition", "acq"),
                   ("ceagent", "ce"), ("reconstruction", "rec"), ("run", "run"))
DEFAULT_FILTERS = {
    "t1w": {"datatype": "anat", "suffix": "T1w", "extension": [".nii", ".nii.gz"]},
    "flair": {"datatype": "anat", "suffix": "FLAIR", "extension": [".nii", ".nii.gz"]},
    "t2w": {"datatype": "anat", "suffix": "T2w", "extension": [".nii", ".nii.gz"]},
}
MODALITIES = ("T1w", "FLAIR", "T2w")
LOG = logging.getLogger("brainage_bids.bids")


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
    age_note: str | None = None  # why age is None (file, line, value), when it is

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


#: Ages outside this range (years) are refused as impossible.
AGE_RANGE = (0.0, 120.0)
_DICOM_AGE = re.compile(r"^(\d{1,3})\s*([YMWD])$", re.IGNORECASE)
_PER_YEAR = {"Y": 1.0, "M": 12.0, "W": 365.25 / 7, "D": 365.25}
DAYS_PER_YEAR = 365.25


def parse_age(value) -> tuple[float | None, str | None]:
    """(age in years, problem) from a TSV cell.

    BIDS ages are numbers of years. A DICOM age string (``045Y``, ``18M``, ``10W``, ``300D``) is
    converted, with a note; ``89+`` (BIDS de-identification) is censored and unusable; other text
    and ages outside :data:`AGE_RANGE` are unusable. Empty and ``n/a`` give (None, None).
    """
    value = _clean(value)
    if value is None:
        return None, None
    text = str(value).strip()
    try:
        age = float(text)
    except ValueError:
        m = _DICOM_AGE.match(text)
        if text.endswith("+") and text[:-1].strip().replace(".", "", 1).isdigit():
            return None, f"age {text!r} is censored (de-identified), so no gap can be computed"
        if not m:
            return None, f"age {text!r} is not a number of years"
        age = int(m[1]) / _PER_YEAR[m[2].upper()]
        if AGE_RANGE[0] <= age <= AGE_RANGE[1]:
            return age, (f"age {text!r} read as {age:.4g} years (a DICOM age string; BIDS "
                         "expects a number of years)")
    if not math.isfinite(age) or not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
        return None, f"age {text!r} is outside {AGE_RANGE[0]:g}-{AGE_RANGE[1]:g} years"
    return age, None


def _age(value) -> float | None:
    return parse_age(value)[0]


def read_tsv(f: Path) -> pd.DataFrame:
    """A BIDS TSV as text columns; an unreadable file is a BIDSInputError (65) naming it."""
    try:
        return pd.read_csv(f, sep="\t", dtype=str, na_values=["n/a"], keep_default_na=False)
    except UnicodeDecodeError as exc:
        raise BIDSInputError(f"{f}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                             f"offset {exc.start})", 65) from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise BIDSInputError(f"{f}: not a readable TSV ({' '.join(str(exc).split())})",
                             65) from exc


def _merge_duplicates(df: pd.DataFrame, key: str, f: Path) -> pd.DataFrame:
    """One row per ``key``: identical duplicates are kept once, columns on which duplicates
    disagree become n/a; both with a warning naming the file, lines and values."""
    df = df.copy()
    df["_line"] = range(2, len(df) + 2)
    dup = df[key].duplicated(keep=False)
    if not dup.any():
        return df
    keep = []
    for k, g in df.groupby(key, sort=False):
        first = g.index[0]
        keep.append(first)
        if len(g) == 1:
            continue
        lines = ", ".join(str(n) for n in g["_line"])
        cols = [c for c in g.columns if c not in (key, "_line")
                and g[c].fillna("n/a").nunique() > 1]
        if not cols:
            LOG.warning("%s: %s is on lines %s (identical rows); one is kept", f, k, lines)
            continue
        what = "; ".join(f"{c} {', '.join(g[c].fillna('n/a'))}" for c in cols)
        LOG.warning("%s: %s is on lines %s with conflicting values (%s); those values are n/a",
                    f, k, lines, what)
        df.loc[first, cols] = None
    return df.loc[keep]


def read_participants(bids_dir: Path) -> pd.DataFrame:
    """participants.tsv indexed by participant_id (empty frame when absent). Duplicate rows are
    merged (see :func:`_merge_duplicates`); column ``_line`` is the row's line in the file."""
    f = bids_dir / "participants.tsv"
    if not f.exists():
        return pd.DataFrame(index=pd.Index([], name="participant_id"))
    df = read_tsv(f)
    if "participant_id" not in df:
        raise BIDSInputError(f"{f}: no participant_id column", 65)
    df["participant_id"] = [p if str(p).startswith("sub-") else f"sub-{p}" for p in df["participant_id"]]
    return _merge_duplicates(df, "participant_id", f).set_index("participant_id")


def read_sessions(bids_dir: Path, subject: str) -> pd.DataFrame | None:
    """sub-<l>_sessions.tsv indexed by session_id (None when absent or without session_id);
    duplicates merged as in participants.tsv, ``_line`` the line in the file."""
    f = bids_dir / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
    if not f.exists():
        return None
    df = read_tsv(f)
    if "session_id" not in df:
        return None
    df["session_id"] = [s if str(s).startswith("ses-") else f"ses-{s}" for s in df["session_id"]]
    return _merge_duplicates(df, "session_id", f).set_index("session_id")


class Ages:
    """Age at each scan (years) with the reason when there is none; problems in the TSVs are
    logged once.

    Rules, in order: the session's ``age`` in sessions.tsv; for a session row with
    ``days_since_baseline`` (or ``acq_time``), the age of another session with both, plus the
    time between them, else (days only) participants.tsv ``age`` as the age at day 0; for a
    subject with a single session folder (or none), participants.tsv ``age``. Otherwise n/a.
    """

    def __init__(self, bids_dir: Path, participants: pd.DataFrame):
        self.bids_dir = Path(bids_dir)
        self.participants = participants
        self._sessions: dict[str, pd.DataFrame | None] = {}
        self._logged: set[str] = set()

    def _cell(self, frame, index, f: Path, what: str) -> tuple[float | None, str | None]:
        if frame is None or "age" not in frame or index not in frame.index:
            return None, None
        age, problem = parse_age(frame.loc[index, "age"])
        if problem:
            line = frame.loc[index, "_line"] if "_line" in frame else "?"
            problem = f"{f} line {line} ({what}): {problem}"
            if age is not None and problem not in self._logged:
                self._logged.add(problem)
                LOG.warning("%s", problem)
        return age, problem

    def participant(self, subject: str) -> tuple[float | None, str | None]:
        pid = f"sub-{subject}"
        f = self.bids_dir / "participants.tsv"
        if pid not in self.participants.index:
            return None, f"{pid} is not in {f}"
        if "age" not in self.participants:
            return None, f"{f} has no age column"
        age, problem = self._cell(self.participants, pid, f, pid)
        return age, problem or (None if age is not None else f"{f}: the age of {pid} is n/a")

    def sessions(self, subject: str) -> pd.DataFrame | None:
        if subject not in self._sessions:
            self._sessions[subject] = read_sessions(self.bids_dir, subject)
        return self._sessions[subject]

    def __call__(self, subject: str, session: str | None) -> tuple[float | None, str | None]:
        if not session:
            return self.participant(subject)
        f = self.bids_dir / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
        ses = self.sessions(subject)
        sid = f"ses-{session}"
        age, problem = self._cell(ses, sid, f, sid)
        if age is not None:
            return age, None
        derived = self._from_time(subject, ses, sid)
        if derived is not None:
            return derived, None
        if problem:
            return None, problem
        n_sessions = len(list((self.bids_dir / f"sub-{subject}").glob("ses-*")))
        if n_sessions <= 1:
            return self.participant(subject)
        where = (f"{f} does not exist" if ses is None else f"{sid} is not in {f}"
                 if sid not in ses.index else f"{f} gives no age, days_since_baseline or "
                 f"acq_time for {sid}")
        return None, (f"sub-{subject} has {n_sessions} sessions and {where}; the "
                      "participants.tsv age is not used for a session")

    def _from_time(self, subject, ses, sid) -> float | None:
        """Age from days_since_baseline or acq_time relative to a session with a known age."""
        if ses is None or sid not in ses.index:
            return None
        for col, to_days in (("days_since_baseline", lambda v: pd.to_numeric(v, errors="coerce")),
                             ("acq_time", _acq_days)):
            if col not in ses:
                continue
            days = to_days(ses[col])
            if pd.isna(days[sid]):
                continue
            ages = pd.Series([parse_age(a)[0] for a in ses["age"]], index=ses.index,
                             dtype=float) if "age" in ses else pd.Series(np.nan, index=ses.index)
            ref = ages.notna() & days.notna()
            if ref.any():
                r = ref[ref].index[0]
                return float(ages[r] + (days[sid] - days[r]) / DAYS_PER_YEAR)
            if col == "days_since_baseline":
                base, _ = self.participant(subject)
                if base is not None:
                    return float(base + days[sid] / DAYS_PER_YEAR)
        return None


def _acq_days(values: pd.Series) -> pd.Series:
    """acq_time as days since the epoch (NaN where unreadable)."""
    t = pd.to_datetime(values, errors="coerce", utc=True)
    return (t - pd.Timestamp(0, tz="UTC")).dt.total_seconds() / 86400.0


def scan_age(bids_dir: Path, participants: pd.DataFrame, subject: str, session: str | None):
    """Age at this scan (see :class:`Ages`), None when unknown."""
    return Ages(bids_dir, participants)(subject, session)[0]


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
    """Index every image of the given modalities (T1w, FLAIR, T2w) matching the filters with PyBIDS.

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
    ages = Ages(bids_dir, participants)
    scans = []
    for f in sorted(files, key=lambda x: x.path):
        ent = f.get_entities()
        subject = ent["subject"]
        session = ent.get("session")
        pairs = tuple((short, str(ent[long]) if long != "run" else str(ent[long]))
                      for long, short in SOURCE_ENTITIES if ent.get(long) is not None)
        age, note = ages(subject, session)
        scans.append(Scan(
            path=f.path, relpath=os.path.relpath(f.path, bids_dir), subject=subject, session=session,
            suffix=ent.get("suffix", "T1w"), entities=pairs, age=age,
            sex=scan_sex(participants, subject), age_note=None if age is not None else note,
        ))
    return scans


def write_derivative_description(bids_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """dataset_description.json of the derivatives (GeneratedBy, with Container inside the
    app's container; SourceDatasets)."""
    from .provenance import generated_by

    out = Path(out_dir)
    desc = {
        "Name": "brainage-bids outputs",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": generated_by(),
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
        atomic_write_text(ignore, "*.html\nlogs/\n*/log/\ngroup/\nmodels/\nwork/\n")
