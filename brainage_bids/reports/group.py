"""The group report ``OUTPUT_DIR/group/report.html`` and :func:`write_reports` (--reports-only).

Sections: brain age against chronological age per group, the gap per group and per site, the
bias correction, every table of ``group/stats/`` (``skipped.tsv`` with its reasons), the figures
of ``group/figures/``, the group saliency maps, the model cards and the flagged scans. Its own
figures go to ``group/report_figures/`` (``group/figures/`` belongs to the statistics step, which
prunes it).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from ..stats.collect import is_lesion_filled
from ..utils.images import atomic_write_text
from . import data, qc
from .group_figures import slug as _slug
from ..utils.provenance import latest_boilerplate
from .html import relpath, render

LOG = logging.getLogger("brainage_bids.reports")

#: Order of the statistics tables in the report; others follow alphabetically.
STATS_ORDER = ("evaluation", "site_mae", "model_comparison", "lesion_filling_agreement",
               "contrast_agreement",
               "gap_summary", "gap_by_diagnosis", "gap_by_phenotype", "gap_longitudinal", "sex_by_diagnosis", "edss_by_diagnosis",
               "lm_gap_diagnosis", "lm_gap_phenotype", "lm_gap_duration", "lm_edss_gap",
               "psm_balance", "psm_gap", "psm_pairs", "edss_worsening", "roc_worsening",
               "km_worsening", "logrank_worsening", "cox_worsening")
SITE_COLUMNS = ("site", "centre", "center", "scanner")
MAX_ROWS = 300


def collect_rows(output_dir) -> pd.DataFrame | None:
    """``group/brainage.tsv``, else every participant-level brain-age table stacked."""
    out = Path(output_dir)
    table = data.read_tsv(out / "group" / "brainage.tsv")
    if table is not None:
        return table
    frames = [t for t in (data.read_tsv(p) for p in
                          sorted(out.glob("sub-*/**/anat/*_desc-brainage_*.tsv")))
              if t is not None]
    return pd.concat(frames, ignore_index=True) if frames else None


def _with_clinical(table: pd.DataFrame, participants: pd.DataFrame | None,
                   group_column: str) -> tuple[pd.DataFrame, str | None]:
    """``table`` with ``group`` (from ``group_column``) and the site column of participants.tsv
    where the table lacks them; returns the frame and the site column's name (or None)."""
    d = table.copy()
    if participants is not None and "participant_id" in participants:
        add = [c for c in participants.columns
               if c != "participant_id" and c not in d.columns
               and (c == group_column or c in SITE_COLUMNS)]
        if add:
            d = d.merge(participants[["participant_id"] + add].drop_duplicates("participant_id"),
                        on="participant_id", how="left")
    d["group"] = d[group_column].astype("string") if group_column in d else "all"
    d["group"] = d["group"].fillna("n/a")
    site = next((c for c in SITE_COLUMNS if c in d and d[c].notna().any()), None)
    return d, site


def _stats_tables(stats_dir: Path) -> tuple[list[dict], list[dict]]:
    """(tables, skipped rows) from ``group/stats``."""
    tables, skipped = [], []
    files = sorted(stats_dir.glob("*.tsv")) if stats_dir.is_dir() else []
    rank = {n: i for i, n in enumerate(STATS_ORDER)}
    files.sort(key=lambda p: (rank.get(p.stem, len(rank)), p.stem))
    for path in files:
        df = data.read_tsv(path)
        if df is None:
            continue
        if path.stem == "skipped":
            keep = [c for c in ("analysis", "model", "suffix", "reason") if c in df]
            skipped = df[keep].astype(object).where(df[keep].notna(), None).to_dict("records")
            continue
        df = df.dropna(axis=1, how="all")
        numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]
        rows = df.head(MAX_ROWS).astype(object).where(df.head(MAX_ROWS).notna(), None)
        tables.append({"name": path.stem, "file": path.name, "columns": list(df.columns),
                       "numeric": numeric, "rows": rows.to_dict("records"), "n": len(df),
                       "truncated": len(df) > MAX_ROWS})
    return tables, skipped


def _shorten(text: str, limit: int = 220) -> str | None:
    """``text`` cut at the last sentence or word end before ``limit`` characters."""
    text = " ".join(str(text).split())
    if not text:
        return None
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = cut.rfind(". ")
    return (cut[:end + 1] if end > limit // 2 else cut.rsplit(" ", 1)[0]) + " …"


def _card_summary(name: str, card: dict) -> dict:
    td = card.get("training_data") or {}
    test = card.get("test") or {}
    splits = card.get("splits") or {}
    rng = data.card_age_range(card)
    notes = card.get("notes")
    if isinstance(notes, (list, tuple)):
        notes = " ".join(str(n) for n in notes)
    extra = [str(v) for v in (card.get("source"), card.get("citation")) if v]
    return {
        "name": name, "architecture": card.get("architecture") or card.get("arch"),
        "training": "; ".join(str(v) for v in (td.get("dataset"), td.get("selection")) if v)
        or None,
        "splits": ", ".join(f"{k} {v}" for k, v in splits.items()) if splits else None,
        "age_range": f"{rng[0]:.1f}-{rng[1]:.1f}" if rng else None,
        "test_mae": test.get("mae"), "test_r": test.get("pearson_r"), "test_n": test.get("n"),
        "mean_sd": test.get("mean_sd"),
        "notes": " ".join([notes] + extra if notes else extra) or None,
        "notes_short": _shorten(" ".join([notes] + extra if notes else extra)),
        "source": card.get("_source"),
    }


def _scan_sidecar(output_dir: Path, source_file, suffix) -> dict:
    if not isinstance(source_file, str) or not source_file:
        return {}
    src = Path(source_file)
    prefix = re.sub(rf"_{suffix}\.nii(\.gz)?$", "", src.name)
    return data.read_json(output_dir / src.parent / f"{prefix}_desc-brainage_{suffix}.json")


def _flagged(output_dir: Path, table: pd.DataFrame, cards: dict) -> list[dict]:
    """Scans with any flag: those in the table and those the report evaluates (qc module)."""
    refs = {m: qc.reference_sd(c) for m, c in cards.items()}
    out = []
    keys = ["participant_id", "session_id", "source_file", "suffix"]
    for key, g in table.groupby([table[k].fillna("") for k in keys], sort=True):
        pid, ses, source, suffix = key
        sidecar = _scan_sidecar(output_dir, source, suffix)
        members = {}
        if isinstance(sidecar.get("Ensemble"), dict):
            members["ensemble"] = list(sidecar["Ensemble"].get("Members") or [])
        vol = (sidecar.get("BrainMaskVolume") or {}).get("Value")
        g = g.reset_index(drop=True)
        extra = qc.evaluate_rows(g, mask_volume_ml=vol, reference_sds=refs, members=members)
        for i, r in g.iterrows():
            written = qc.split_flags(r.get("qc_flags"))
            flags = [{"name": f, "source": "table"} for f in written]
            flags += [{"name": f, "source": "report"} for f in extra[i] if f not in written]
            if flags:
                report = output_dir / f"{pid}.html"
                out.append({"participant_id": pid, "session_id": ses or None, "suffix": suffix,
                            "model": r.get("model"), "lesion_filled": r.get("lesion_filled"),
                            "flags": flags, "predicted_age_sd": r.get("predicted_age_sd"),
                            "href": f"../{pid}.html" if report.is_file() else None})
    return out


def _bias(output_dir: Path) -> dict | None:
    doc = data.read_json(output_dir / "group" / "bias_correction.json")
    if not doc:
        return None
    fits = []
    for f in doc.get("fits") or []:
        if isinstance(f, dict):
            fits.append({k: (v if not isinstance(v, (list, dict)) else None)
                         for k, v in f.items() if k != "rows"})
    cols = []
    for f in fits:
        cols += [k for k in f if k not in cols and any(g.get(k) is not None for g in fits)]
    return {"method": doc.get("method"), "formula": doc.get("Formula"),
            "grouping": doc.get("Grouping"), "controls": doc.get("ControlLabels"),
            "columns": cols, "fits": fits}


def write_group_report(output_dir, *, bids_dir=None, group_column: str = "diagnosis") -> Path:
    """Write ``OUTPUT_DIR/group/report.html`` from the group outputs (see the module docstring).

    ``bids_dir`` (default: the local SourceDatasets URL) provides participants.tsv for the groups
    (``group_column``) and sites. Returns the report path.
    """
    from . import figures as F

    output_dir = Path(output_dir)
    group_dir = output_dir / "group"
    report = group_dir / "report.html"
    fig_dir = group_dir / "report_figures"
    made: set[Path] = set()
    problems: list[str] = []

    def draw(func, name, *args, **kwargs):
        try:
            path = func(*args, fig_dir / name, **kwargs)
        except Exception as exc:  # a figure must not cost the report
            LOG.warning("group report figure %s failed: %s", name, exc)
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
            return None
        made.add(Path(path).resolve())
        return relpath(path, group_dir)

    table = collect_rows(output_dir)
    participants = data.read_participants_table(output_dir, bids_dir)
    panels, flagged, cards, people = [], [], [], []
    n_participants = n_scans = 0
    models: list[str] = []
    if table is not None and len(table):
        table, site = _with_clinical(table, participants, group_column)
        raw = table[~is_lesion_filled(table)] if "lesion_filled" in table else table
        n_participants = table["participant_id"].nunique()
        n_scans = table.groupby(["participant_id", table["session_id"].fillna(""),
                                 "suffix"]).ngroups
        models = sorted(table["model"].dropna().astype(str).unique(),
                        key=lambda m: (m == "ensemble", m))
        for (model, suffix), g in raw.groupby(["model", "suffix"], sort=True):
            g = g.copy()
            for c in ("chronological_age", "predicted_age", "predicted_age_corrected",
                      "brain_age_gap", "brain_age_gap_corrected"):
                if c in g:
                    g[c] = pd.to_numeric(g[c], errors="coerce")
            corrected = ("brain_age_gap_corrected" in g
                         and g["brain_age_gap_corrected"].notna().any())
            gap_col = "brain_age_gap_corrected" if corrected else "brain_age_gap"
            member = model != "ensemble" and ((raw["model"] == "ensemble")
                                              & (raw["suffix"] == suffix)).any()
            panel = {"model": model, "suffix": suffix, "n": len(g), "gap_col": gap_col,
                     "id": _slug(model, suffix), "member": bool(member)}
            panel["scatter"] = draw(F.scatter_figure, f"scatter_{_slug(model, suffix)}.svg", g,
                                    title=f"{model} {suffix}")
            by = ["group"] + ([site] if site else [])
            panel["gap"] = (draw(F.gap_figure, f"gap_{_slug(model, suffix)}.svg", g, by=by,
                                 gap_col=gap_col, title=f"{model} {suffix}")
                            if g[gap_col].notna().any() else None)
            summary = (g.groupby("group")[gap_col].agg(["count", "mean", "std"])
                       .reset_index().rename(columns={"count": "n"}))
            panel["summary"] = summary.astype(object).where(summary.notna(), None).to_dict(
                "records")
            panels.append(panel)
        for name in models:
            if name == "ensemble":
                continue
            card = data.model_card(output_dir, name)
            cards.append(_card_summary(name, card))
        card_map = {c["name"]: data.model_card(output_dir, c["name"]) for c in cards}
        flagged = _flagged(output_dir, table, card_map)
        nflags = {}
        for f in flagged:
            nflags[f["participant_id"]] = nflags.get(f["participant_id"], 0) + 1
        for pid, g in table.groupby("participant_id", sort=True):
            people.append({"participant_id": pid, "group": str(g["group"].iloc[0]),
                           "scans": g.groupby([g["session_id"].fillna(""), "suffix"]).ngroups,
                           "flags": nflags.get(pid, 0),
                           "href": f"../{pid}.html" if (output_dir / f"{pid}.html").is_file()
                           else None})
    tables, skipped = _stats_tables(group_dir / "stats")
    stat_figures = []
    for path in sorted((group_dir / "figures").glob("*")) if (group_dir / "figures").is_dir() \
            else []:
        if path.name.startswith("scatter_") and panels:
            continue  # the statistics step's scatter plots: the report draws them per group
        if path.suffix.lower() in (".png", ".svg"):
            stat_figures.append({"src": relpath(path, group_dir),
                                 "title": path.stem.replace("_", " ")})
    saliency = _saliency_section(output_dir, draw)
    html = render("group.html", n_participants=n_participants, n_scans=n_scans, models=models,
                  panels=panels, tables=tables, skipped=skipped, stat_figures=stat_figures,
                  cards=cards, flagged=flagged, people=people, bias=_bias(output_dir),
                  saliency=saliency, problems=problems, group_column=group_column,
                  has_groups=table is not None and group_column in (table.columns
                                                                    if table is not None else []),
                  flag_descriptions=qc.FLAG_DESCRIPTIONS, thresholds=_thresholds(),
                  methods=[b for b in (latest_boilerplate(output_dir, level=level)
                                       for level in ("participant", "group")) if b])
    atomic_write_text(report, html)
    if fig_dir.is_dir():
        for f in fig_dir.iterdir():
            if f.is_file() and f.resolve() not in made:
                f.unlink()
    return report


def _thresholds():
    from .participant import threshold_rows

    return threshold_rows()


def _saliency_section(output_dir: Path, draw) -> dict | None:
    """Figures of the group mean saliency maps and the region table, when the group saliency
    step has run."""
    from ..models.saliency import ATLAS_DESCRIPTION
    from ..utils.templates import get_template
    from .figures import group_saliency_figure

    folder = output_dir / "group" / "saliency"
    regions = data.read_tsv(folder / "saliency_regions.tsv")
    maps = sorted(folder.glob("group-*_desc-saliency_*.nii.gz")) if folder.is_dir() else []
    if regions is None and not maps:
        return None
    figs = []
    try:
        tpl = get_template()
    except Exception:
        tpl = None
    for path in maps if tpl is not None else []:
        name = path.name.replace(".nii.gz", ".png")
        src = draw(group_saliency_figure, f"saliency_{name}", path, tpl.brain)
        if src:
            figs.append({"src": src, "title": path.name.split("_space-")[0] + " "
                         + path.name.rsplit("_", 1)[-1].replace(".nii.gz", "")})
    table = None
    if regions is not None:
        table = {"columns": list(regions.columns),
                 "numeric": [c for c in regions.columns
                             if pd.api.types.is_numeric_dtype(regions[c])],
                 "rows": regions.astype(object).where(regions.notna(), None).to_dict("records")}
    return {"figures": figs, "regions": table, "atlas": ATLAS_DESCRIPTION}


def write_reports(output_dir, participant_ids=None, *, run_id: str | None = None,
                  bids_dir=None) -> list[Path]:
    """Regenerate the reports from existing outputs (``--reports-only``): every participant's
    (or those in ``participant_ids``, with or without ``sub-``), then the group report when
    ``group/brainage.tsv`` exists. A report that fails is logged and skipped."""
    from .participant import write_participant_report

    output_dir = Path(output_dir)
    ids = data.participants_in(output_dir) if participant_ids is None else [
        p if str(p).startswith("sub-") else f"sub-{p}" for p in participant_ids]
    written = []
    for pid in ids:
        try:
            written.append(write_participant_report(output_dir, pid, run_id=run_id,
                                                     bids_dir=bids_dir))
        except Exception as exc:
            LOG.error("report of %s failed: %s", pid, exc)
    if (output_dir / "group" / "brainage.tsv").is_file():
        try:
            written.append(write_group_report(output_dir, bids_dir=bids_dir))
        except Exception as exc:
            LOG.error("group report failed: %s", exc)
    return written


__all__ = ["collect_rows", "write_group_report", "write_reports"]
