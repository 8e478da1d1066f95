"""Reading what the participant and group levels left in OUTPUT_DIR, for the reports.

Nothing here writes; every reader tolerates missing or unreadable files (a failed scan leaves
only some of them) and returns None or an empty frame instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd

from ..models.cards import model_card, packaged_cards_dir  # noqa: F401 (data.model_card)
from ..models.cards import read_card as read_json
from ..utils.templates import TEMPLATE

IMAGE_SUFFIXES = ("T1w", "FLAIR", "T2w")
_ENTITY = r"(?:_(?:ses|acq|ce|rec|run|dir|echo|part|inv)-[a-zA-Z0-9]+)"
NAME_PATTERN = re.compile(
    rf"^(?P<prefix>sub-[a-zA-Z0-9]+{_ENTITY}*)_(?:space-(?P<space>[a-zA-Z0-9]+)_)?"
    r"desc-(?P<desc>[a-zA-Z0-9]+)_(?P<suffix>[a-zA-Z0-9]+)\.(?P<ext>nii\.gz|tsv|json)$")


@dataclass
class ScanOutputs:
    """The participant-level files of one scan (one BIDS image); absent files are None."""

    participant_id: str
    prefix: str                   # BIDS entities of the input, e.g. sub-01_ses-1_acq-3d
    suffix: str                   # T1w or FLAIR
    folder: Path
    files: dict = field(default_factory=dict)  # kind -> Path

    @property
    def session_id(self) -> str | None:
        m = re.search(r"_(ses-[a-zA-Z0-9]+)", self.prefix)
        return m.group(1) if m else None

    @property
    def label(self) -> str:
        """Human-readable scan name: the entities after sub- and the suffix."""
        rest = self.prefix.split("_", 1)[1] if "_" in self.prefix else ""
        return " ".join([p for p in rest.split("_") if p] + [self.suffix])

    @property
    def slug(self) -> str:
        return f"{self.prefix}_{self.suffix}"

    def get(self, kind: str) -> Path | None:
        return self.files.get(kind)


def _kind(desc: str, suffix: str, ext: str) -> tuple[str, str | None] | None:
    """(kind, suffix it belongs to or None for every suffix) of a derivative file name."""
    if suffix == "mask" and ext == "nii.gz":
        # desc-brain / desc-lesion are the T1w masks; desc-<suffix>brain / desc-<suffix>lesion
        # (e.g. flairbrain, flairlesion) those of another modality
        for s in IMAGE_SUFFIXES:
            if s != "T1w" and desc == f"{s.lower()}brain":
                return ("mask", s)
            if s != "T1w" and desc == f"{s.lower()}lesion":
                return ("lesion", s)
        return {"brain": ("mask", "T1w"), "lesion": ("lesion", "T1w")}.get(desc)
    if suffix not in IMAGE_SUFFIXES:
        return None
    table = {("preproc", "nii.gz"): "preproc", ("preproc", "json"): "preproc_json",
             ("lesionfilled", "nii.gz"): "filled", ("lesionfilled", "json"): "filled_json",
             ("brainage", "tsv"): "brainage", ("brainage", "json"): "brainage_json",
             ("agedist", "tsv"): "agedist", ("saliency", "nii.gz"): "saliency"}
    kind = table.get((desc, ext))
    return (kind, suffix) if kind else None


def find_scans(output_dir, participant_id: str) -> list[ScanOutputs]:
    """Every scan of one participant with any participant-level output, in session then
    T1w-before-FLAIR order. Brain and lesion masks name their modality in desc (``brain`` and
    ``lesion`` for T1w, ``<suffix>brain`` and ``<suffix>lesion`` otherwise); a mask of no known
    modality would go to every scan with the same entities."""
    label = participant_id.removeprefix("sub-")
    root = Path(output_dir) / f"sub-{label}"
    scans: dict[tuple, ScanOutputs] = {}
    shared: dict[str, dict] = {}
    for path in sorted(root.glob("**/anat/*")) if root.is_dir() else []:
        m = NAME_PATTERN.match(path.name)
        if not m or (m["space"] and m["space"] != TEMPLATE):
            continue
        kind = _kind(m["desc"], m["suffix"], m["ext"])
        if kind is None:
            continue
        name, suffix = kind
        if suffix is None:
            shared.setdefault(m["prefix"], {})[name] = path
            continue
        key = (m["prefix"], suffix)
        scan = scans.setdefault(key, ScanOutputs(f"sub-{label}", m["prefix"], suffix, path.parent))
        scan.files[name] = path
    for (prefix, _), scan in scans.items():
        for name, path in shared.get(prefix, {}).items():
            scan.files.setdefault(name, path)
    order = {s: i for i, s in enumerate(IMAGE_SUFFIXES)}
    return sorted(scans.values(), key=lambda s: (s.session_id or "", s.prefix,
                                                 order.get(s.suffix, 9)))


def participants_in(output_dir) -> list[str]:
    """participant_id of every sub-* folder or report under OUTPUT_DIR."""
    out = Path(output_dir)
    ids = {p.name for p in out.glob("sub-*") if p.is_dir()}
    ids |= {p.name[:-len(".html")] for p in out.glob("sub-*.html")}
    return sorted(ids)


def read_tsv(path) -> pd.DataFrame | None:
    """A BIDS TSV (n/a as missing), or None when absent or unreadable."""
    if path is None or not Path(path).is_file():
        return None
    try:
        return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False,
                           dtype={"participant_id": str, "session_id": str})
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return None


def source_dataset(output_dir, bids_dir=None) -> Path | None:
    """The input BIDS dataset: ``bids_dir``, else the local ``file://`` SourceDatasets URL in the
    derivatives' dataset_description.json, when that folder exists."""
    if bids_dir is not None:
        return Path(bids_dir) if Path(bids_dir).is_dir() else None
    desc = read_json(Path(output_dir) / "dataset_description.json")
    for src in desc.get("SourceDatasets") or []:
        url = src.get("URL", "") if isinstance(src, dict) else ""
        parsed = urlparse(url)
        if parsed.scheme == "file":
            path = Path(unquote(parsed.path))
            if path.is_dir():
                return path
    return None


def read_participants_table(output_dir, bids_dir=None) -> pd.DataFrame | None:
    """participants.tsv of the source dataset (see :func:`source_dataset`), or None."""
    src = source_dataset(output_dir, bids_dir)
    return read_tsv(src / "participants.tsv") if src else None


@dataclass
class CrashFile:
    run_id: str
    path: Path
    node: str
    lines: list[str]              # the last lines of the traceback


def find_crash_files(output_dir, participant_id: str, n_lines: int = 8) -> list[CrashFile]:
    """Crash files of one participant (``sub-<l>/log/<run_id>/crash-*``, every run), newest run
    first, with the failing node and the last ``n_lines`` non-empty lines."""
    label = participant_id.removeprefix("sub-")
    log = Path(output_dir) / f"sub-{label}" / "log"
    out = []
    for path in sorted(log.glob("*/crash-*"), reverse=True) if log.is_dir() else []:
        if not path.is_file():
            continue
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
        node = next((ln.split(":", 1)[1].strip() for ln in lines
                     if ln.lower().startswith("node:")), "")
        out.append(CrashFile(path.parent.name, path, node, lines[-n_lines:]))
    return out


def card_age_range(card: dict) -> tuple[float, float] | None:
    rng = card.get("age_range")
    try:
        return (float(rng[0]), float(rng[1])) if rng else None
    except (TypeError, ValueError, IndexError):
        return None
