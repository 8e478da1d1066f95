"""The participant report: ``OUTPUT_DIR/sub-<label>.html`` with figures in ``sub-<label>/figures/``.

One section per scan: the input as acquired (when the BIDS dataset is reachable), the
registration check, the brain and lesion masks, the saliency map when present, the predicted age
per model, the brain-age table and its QC flags; then the participant's crash files. Works on
partial outputs: whatever a failed scan left is shown with the errors.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from ..utils.images import atomic_write_text
from . import data, qc
from ..utils.provenance import latest_boilerplate
from .html import relpath, render

LOG = logging.getLogger("brainage_bids.reports")

ROW_COLUMNS = ("model", "chronological_age", "predicted_age", "predicted_age_sd",
               "brain_age_gap", "lesion_filled", "lesion_volume_ml", "qc_flags")


def _label(participant_id: str) -> str:
    return participant_id.removeprefix("sub-")


def _wm_prior() -> Path | None:
    import nilearn

    path = (Path(nilearn.__file__).parent / "datasets" / "data"
            / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
    return path if path.exists() else None


class _Figures:
    """Draws figures into one folder, keeping the names made and the failures."""

    def __init__(self, folder: Path, report_dir: Path):
        self.folder = folder
        self.report_dir = report_dir
        self.made: set[Path] = set()
        self.errors: list[str] = []

    def make(self, name: str, what: str, func, *args, **kwargs) -> str | None:
        path = self.folder / name
        try:
            out = func(*args, **kwargs)
        except Exception as exc:  # a figure must not cost the report
            LOG.warning("report figure %s failed: %s", name, exc)
            self.errors.append(f"{what}: figure failed ({type(exc).__name__}: {exc})")
            return None
        paths = out if isinstance(out, tuple) else (out,)
        self.made.update(Path(p) for p in paths)
        return relpath(path, self.report_dir)

    def prune(self) -> None:
        """Remove figures of earlier reports that this one did not make."""
        if not self.folder.is_dir():
            return
        made = {p.resolve() for p in self.made}
        for f in self.folder.iterdir():
            if f.is_file() and f.suffix in (".png", ".svg") and f.resolve() not in made:
                f.unlink()


def _source_file(table: pd.DataFrame | None, preproc_meta: dict) -> str | None:
    """The input image, relative to the BIDS root, from the table or the image sidecar."""
    if table is not None and "source_file" in table and table["source_file"].notna().any():
        return str(table["source_file"].dropna().iloc[0])
    for src in preproc_meta.get("Sources") or []:
        if isinstance(src, str) and src.startswith("bids:raw:"):
            return src[len("bids:raw:"):]
    return None


def _metrics(sidecar: dict, preproc_meta: dict, suffix: str) -> list[dict]:
    """Registration and mask figures with their thresholds (status ok / flag / None). The
    thresholds are those recorded in the sidecar (QCThresholds) when it has them, so older
    outputs are judged by the rules they were written under."""
    rules = sidecar.get("QCThresholds") if isinstance(sidecar.get("QCThresholds"), dict) else {}
    rules = rules or qc.REGISTRATION_THRESHOLDS
    out = []
    corr = sidecar.get("RegistrationCorrelation", preproc_meta.get("RegistrationCorrelation"))
    dice = sidecar.get("RegistrationMaskDice", preproc_meta.get("RegistrationMaskDice"))
    vol = (sidecar.get("BrainMaskVolume") or {}).get("Value")
    cmin = rules.get("RegistrationCorrelationMin")
    applies = cmin is not None and suffix in rules.get("RegistrationCorrelationApplies", [suffix])
    if corr is not None:
        out.append({"name": "registration correlation with the T1w template",
                    "value": f"{float(corr):.3f}",
                    "status": ("flag" if float(corr) < cmin else "ok") if applies else None,
                    "note": f"flag below {cmin}" if applies
                    else f"not applied to {suffix} (other contrast)"})
    dmin = rules.get("RegistrationMaskDiceMin")
    if dice is not None:
        out.append({"name": "brain mask Dice with the template mask", "value": f"{float(dice):.3f}",
                    "status": None if dmin is None else "flag" if float(dice) < dmin else "ok",
                    "note": f"flag below {dmin}" if dmin is not None else ""})
    soft = preproc_meta.get("SkullStrippingSoftware")
    if isinstance(soft, dict) and soft.get("Name"):
        out.append({"name": "skull stripping", "status": None,
                    "value": " ".join(str(x) for x in (soft["Name"], soft.get("Version")) if x),
                    "note": (f"{soft['Mode']} mode: {soft.get('ModeDescription', '')}"
                             if soft.get("Mode") else "")})
    if vol is not None:
        lo, hi = qc.MASK_VOLUME_RANGE_ML
        out.append({"name": "brain mask volume (native space)", "value": f"{float(vol):.0f} mL",
                    "status": "flag" if qc.mask_volume_implausible(vol) else "ok",
                    "note": f"plausible {lo:.0f}-{hi:.0f} mL"})
    return out


def _rows(table: pd.DataFrame | None, sidecar: dict, cards: dict) -> list[dict]:
    """Table rows with every flag: those in the table and those the report evaluates."""
    if table is None or table.empty:
        return []
    table = table.reset_index(drop=True)
    refs = {m: qc.reference_sd(cards.get(m)) for m in cards}
    members = {}
    if isinstance(sidecar.get("Ensemble"), dict):
        members["ensemble"] = list(sidecar["Ensemble"].get("Members") or [])
    vol = (sidecar.get("BrainMaskVolume") or {}).get("Value")
    extra = qc.evaluate_rows(table, mask_volume_ml=vol, reference_sds=refs, members=members)
    rows = []
    for i, r in table.iterrows():
        written = qc.split_flags(r.get("qc_flags"))
        flags = [{"name": f, "source": "table"} for f in written]
        flags += [{"name": f, "source": "report"} for f in extra[i] if f not in written]
        rows.append({**{c: (None if c not in r or pd.isna(r[c]) else r[c]) for c in ROW_COLUMNS},
                     "flags": flags, "mae": row_mae(str(r.get("model")), sidecar, cards)})
    return rows


def row_mae(model: str, sidecar: dict, cards: dict) -> dict | None:
    """The MAE to read a row's age against: the sidecar's (the publisher's test MAE for
    published models, the ensemble's for a published ensemble, else the model card's held-out
    test MAE), else the card's test MAE for outputs written before sidecars carried it; None
    when neither is known. ``{"value", "source", "test_set"}``."""
    entry = (sidecar.get("MAE") or {}).get(model) if isinstance(sidecar.get("MAE"), dict) \
        else None
    if isinstance(entry, dict) and qc.as_finite(entry.get("Value")) is not None:
        return {"value": float(entry["Value"]), "source": str(entry.get("Source") or ""),
                "test_set": str(entry.get("TestSet") or "")}
    test = (cards.get(model) or {}).get("test") or {}
    if qc.as_finite(test.get("mae")) is not None:
        return {"value": float(test["mae"]), "source": "model card (held-out test)",
                "test_set": f"n={test['n']}" if test.get("n") else ""}
    return None


def _flag_list(rows: list[dict], sidecar: dict) -> list[dict]:
    """Each flag once, with its meaning (as the table's sidecar words it, else the current one),
    the models that carry it and where it comes from."""
    levels = ((sidecar.get("qc_flags") or {}).get("Levels") or {})
    seen: dict[str, dict] = {}
    for r in rows:
        for f in r["flags"]:
            meaning = (levels.get(f["name"]) if f["source"] == "table" else None) \
                or qc.FLAG_DESCRIPTIONS.get(f["name"], "")
            item = seen.setdefault(f["name"], {
                "name": f["name"], "models": [], "source": f["source"], "description": meaning})
            if str(r["model"]) not in item["models"]:
                item["models"].append(str(r["model"]))
    return list(seen.values())


def _trained_on(m: dict) -> str | None:
    """What a sidecar's model was trained on: its modality, or for a contrast-agnostic model
    the synthetic images and the contrasts it reads."""
    if m.get("TrainedOn") == "synthetic":
        return f"synthetic images (reads {', '.join(m.get('Contrasts') or [])})"
    return m.get("Modality")


def _models(sidecar: dict, cards: dict) -> list[dict]:
    out = []
    for m in sidecar.get("Models") or []:
        card = cards.get(m.get("Name"), {})
        rng = data.card_age_range(card)
        out.append({"name": m.get("Name"), "architecture": m.get("Architecture"),
                    "output": m.get("Output"), "modality": _trained_on(m),
                    "age_range": f"{rng[0]:.0f}-{rng[1]:.0f}" if rng else None,
                    "test_mae": (row_mae(m.get("Name"), sidecar, cards) or {}).get("value"),
                    "sd_threshold": qc.sd_threshold(
                        qc.reference_sd(card)) if m.get("Output") == "bins" else None})
    return out


def _unprocessed(bids_root: Path | None, label: str, scans) -> list[str]:
    """Images of the participant in the BIDS dataset that left no output at all."""
    if bids_root is None:
        return []
    done = {(s.prefix, s.suffix) for s in scans}
    out = []
    for path in sorted((bids_root / f"sub-{label}").glob("**/anat/*.nii*")):
        m = re.match(r"^(sub-.+)_(T1w|FLAIR|T2w)\.nii(\.gz)?$", path.name)
        if m and (m.group(1), m.group(2)) not in done:
            out.append(relpath(path, bids_root))
    return out


def write_participant_report(output_dir, participant_id: str, *, run_id: str | None = None,
                             bids_dir=None) -> Path:
    """Write ``OUTPUT_DIR/sub-<label>.html`` from the participant's outputs and crash files.

    Parameters
    ----------
    output_dir : the derivatives folder.
    participant_id : ``sub-<label>`` or ``<label>``.
    run_id : the current run; its crash files are listed first and marked.
    bids_dir : the input dataset (default: the local SourceDatasets URL of
        dataset_description.json), for participants.tsv and the images as acquired.

    Returns the report path.
    """
    from ..utils.templates import get_template

    output_dir = Path(output_dir)
    label = _label(participant_id)
    pid = f"sub-{label}"
    report = output_dir / f"{pid}.html"
    figs = _Figures(output_dir / pid / "figures", output_dir)
    bids_root = data.source_dataset(output_dir, bids_dir)
    participants = data.read_participants_table(output_dir, bids_dir)
    info = {}
    if participants is not None and "participant_id" in participants:
        hit = participants[participants["participant_id"].astype(str) == pid]
        if len(hit):
            info = {k: v for k, v in hit.iloc[0].items() if k != "participant_id"}

    template = None
    try:
        template = get_template()
    except Exception as exc:
        figs.errors.append(f"template not available, no registration figures: {exc}")
    wm = _wm_prior()
    template_fig = None
    card_cache: dict[str, dict] = {}
    scans = data.find_scans(output_dir, pid)
    sections = []
    for scan in scans:
        table = data.read_tsv(scan.get("brainage"))
        sidecar = data.read_json(scan.get("brainage_json"))
        preproc_meta = data.read_json(scan.get("preproc_json"))
        dist = data.read_tsv(scan.get("agedist"))
        names = [str(m) for m in table["model"]] if table is not None and "model" in table else []
        names += [m.get("Name") for m in sidecar.get("Models") or [] if m.get("Name")]
        for name in names:
            if name not in card_cache:
                card_cache[name] = data.model_card(output_dir, name)
        cards = {n: card_cache[n] for n in names}
        base = scan.slug
        figures = []
        source = _source_file(table, preproc_meta)
        if bids_root is not None and source and (bids_root / source).is_file():
            from .figures import native_figure

            src = figs.make(f"{base}_desc-input.png", "input image", native_figure,
                            bids_root / source, figs.folder / f"{base}_desc-input.png")
            if src:
                figures.append({"title": "Input image as acquired", "src": src,
                                "caption": f"{source}: central slices in RAS orientation."})
        preproc = scan.get("preproc")
        if preproc is not None and template is not None:
            from .figures import registration_figure, template_figure

            if template_fig is None:
                template_fig = figs.make(f"{pid}_desc-template_mosaic.png", "template",
                                         template_figure, template.brain, template.mask,
                                         figs.folder / f"{pid}_desc-template_mosaic.png",
                                         wm_prior=wm)
            src = figs.make(f"{base}_desc-registration.png", "registration",
                            registration_figure, preproc, template.brain, template.mask,
                            figs.folder / f"{base}_desc-registration.png", wm_prior=wm)
            if src:
                figures.append({
                    "title": "Registration to MNI152NLin2009aSym", "src": src, "alt": template_fig,
                    "caption": "The brain after affine registration, with the template's brain "
                               "outline (red) and white-matter boundary (orange)."
                               + (" Hover to see the template under the same outlines: edges "
                                  "that move show misregistration." if template_fig else "")})
        if preproc is not None:
            from .figures import mask_figure

            lesion = scan.get("lesion")
            src = figs.make(f"{base}_desc-brainmask.png", "brain mask", mask_figure, preproc,
                            scan.get("mask"), figs.folder / f"{base}_desc-brainmask.png",
                            lesion_file=lesion)
            if src:
                cap = "Brain mask outline (cyan) on the registered image."
                if lesion:
                    cap += " Lesion mask in magenta."
                figures.append({"title": "Brain mask" + (" and lesions" if lesion else ""),
                                "src": src, "caption": cap})
        if preproc is not None and scan.get("filled") is not None and scan.get("lesion"):
            from .figures import lesion_filling_figures

            raw_png = figs.folder / f"{base}_desc-lesionraw.png"
            src = figs.make(f"{base}_desc-lesionfilled.png", "lesion filling",
                            lesion_filling_figures, preproc, scan.get("filled"),
                            scan.get("lesion"), raw_png,
                            figs.folder / f"{base}_desc-lesionfilled.png",
                            mask_file=scan.get("mask"))
            if src:
                figures.append({
                    "title": "Lesion filling", "src": src, "alt_label": "as acquired",
                    "alt": relpath(raw_png, figs.report_dir),
                    "caption": "The lesion-filled image on the slices with the most lesion "
                               "voxels, lesion outline in magenta; hover to see the image as "
                               "acquired on the same slices and grey scale. Filled lesions "
                               "should look like the white matter around them."})
        if preproc is not None and scan.get("saliency") is not None:
            from .figures import saliency_figure

            src = figs.make(f"{base}_desc-saliency.png", "saliency", saliency_figure, preproc,
                            scan.get("saliency"), figs.folder / f"{base}_desc-saliency.png",
                            mask_file=scan.get("mask"))
            if src:
                figures.append({
                    "title": "SmoothGrad saliency", "src": src,
                    "caption": "Mean absolute gradient of the predicted age over noisy copies of "
                               "the input, averaged over the models; the top 20 % of brain "
                               "voxels are shown (hot colours: more influence on the age)."})
        if table is not None and len(table):
            from .figures import age_figure

            ranges = {n: data.card_age_range(c) for n, c in cards.items()
                      if data.card_age_range(c)}
            src = figs.make(f"{base}_desc-agedist.svg", "age distribution", age_figure, table,
                            dist, figs.folder / f"{base}_desc-agedist.svg",
                            training_ranges=ranges)
            if src:
                cap = ("Predicted age per model: solid line the estimate, dashed lines one SD, "
                       "dotted black line the chronological age, grey band the model's "
                       "training ages.")
                cap += (" Curves: the soft-label output (probability per age bin)." if
                        dist is not None and len(dist) else
                        " No age distribution file: the models regress a single age, or the "
                        "outputs predate it.")
                figures.append({"title": "Predicted age", "src": src, "caption": cap})
        rows = _rows(table, sidecar, cards)
        expected = {"preproc": "registered image", "mask": "brain mask",
                    "brainage": "brain-age table"}
        missing = [v for k, v in expected.items() if scan.get(k) is None]
        volumes = [r["lesion_volume_ml"] for r in rows if r.get("lesion_volume_ml") is not None]
        lesion_ml = qc.as_finite(volumes[0]) if volumes else None
        sections.append({
            "id": base, "label": scan.label, "suffix": scan.suffix, "source": source,
            "lesion_volume_ml": lesion_ml,
            "session": scan.session_id, "figures": figures, "rows": rows,
            "flags": _flag_list(rows, sidecar), "metrics": _metrics(sidecar, preproc_meta,
                                                                    scan.suffix),
            "models": _models(sidecar, cards), "missing": missing,
            "files": [{"name": p.name, "href": relpath(p, output_dir)}
                      for k, p in sorted(scan.files.items())],
        })

    crashes = []
    for c in data.find_crash_files(output_dir, pid):
        crashes.append({"run_id": c.run_id, "node": c.node, "lines": c.lines,
                        "href": relpath(c.path, output_dir), "name": c.path.name,
                        "current": run_id is not None and c.run_id == run_id})
    crashes.sort(key=lambda c: not c["current"])
    html = render(
        "participant.html", participant_id=pid, info=info, scans=sections, crashes=crashes,
        run_id=run_id, unprocessed=_unprocessed(bids_root, label, scans),
        figure_errors=figs.errors, flag_descriptions=qc.FLAG_DESCRIPTIONS,
        thresholds=threshold_rows(), bids_root=str(bids_root) if bids_root else None,
        methods=[b for b in [latest_boilerplate(output_dir, run_id, "participant")] if b])
    atomic_write_text(report, html)
    figs.prune()
    return report


def threshold_rows() -> list[dict]:
    """Every QC threshold with its value and where it comes from (shown in the reports)."""
    lo, hi = qc.MASK_VOLUME_RANGE_ML
    reg = qc.REGISTRATION_THRESHOLDS
    return [
        {"flag": "low_registration",
         "rule": f"mask Dice < {reg.get('RegistrationMaskDiceMin')}, or T1w template "
                 f"correlation < {reg.get('RegistrationCorrelationMin')}",
         "basis": "Dice 0.93-0.97 and T1w correlation 0.46-0.62 on well registered IXI, MPRAGE "
                  "and MS scans; misregistrations fall far below"},
        {"flag": "age_outside_training_range",
         "rule": "chronological age outside the model card's age_range",
         "basis": "predictions outside the training ages are extrapolations"},
        {"flag": "model_modality_mismatch", "rule": "model modality differs from the image's",
         "basis": "a model only reads the contrast it was trained on"},
        {"flag": "mask_volume_implausible", "rule": f"brain mask < {lo:.0f} or > {hi:.0f} mL",
         "basis": "NMOSD study brain tissue volumes 1154.6 ± 98.5 mL (HC), 1058.9 ± 94.4 mL "
                  "(RRMS); masks also hold ventricles and sulcal CSF (1096-1629 mL in this "
                  "project's runs); adult intracranial volumes are about 1.2-1.8 L"},
        {"flag": "predicted_age_sd_high",
         "rule": f"SD > {qc.SD_REFERENCE_FACTOR:g} x the model's test-set mean SD (card), else "
                 f"> {qc.SD_ABSOLUTE_MAX:g} years",
         "basis": "NMOSD study: high SD with low image quality or incomplete coverage (its "
                  "Figure 1D-G cases 4.4-7.2 years); the default model's SD on 148 IXI controls "
                  "is at most 1.44 x its test mean"},
        {"flag": "lesion_filling_disagreement",
         "rule": f"|lesion-filled - raw predicted age| > {qc.LESION_FILLING_MAX_DIFF:g} years",
         "basis": "NMOSD study Bland-Altman: 0.28 ± 2.11 years, upper 95 % limit of agreement "
                  "4.4 years"},
    ]
