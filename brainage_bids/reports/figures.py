"""Figures of the reports, drawn with matplotlib's object API (Agg canvas, no pyplot state).

Brain figures are PNG mosaics (sagittal, coronal and axial rows) of images on the 1 mm MNI grid,
shown in neurological convention (left on the left). Charts are SVG. Every figure is written
atomically and its path returned.
"""
from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..utils.images import atomic_write_bytes, resample_to_grid
from .qc import as_finite

TEMPLATE_CONTOUR = "#ff4040"
WM_CONTOUR = "#ffb000"
MASK_CONTOUR = "#30e0ff"
LESION_COLOUR = "#ff30ff"
CHRONO_COLOUR = "#000000"
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]


def _save(fig: Figure, path, fmt: str | None = None, dpi: int = 90) -> Path:
    """Write ``fig`` atomically; the format follows the file's extension unless ``fmt`` says."""
    fmt = fmt or Path(path).suffix.lstrip(".").lower() or "png"
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, facecolor=fig.get_facecolor(), bbox_inches="tight",
                pad_inches=0.05, metadata={"Date": None} if fmt == "svg" else None)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ---------------------------------------------------------------------------------------------
# volumes
def load_ras(path) -> nib.Nifti1Image:
    """An image reoriented to RAS voxel order, as float32."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    if not np.isfinite(data).all():  # one pass; nan_to_num alone makes four
        if not data.flags.writeable:  # a read-only memory map of an uncompressed file
            data = data.copy()
        data = np.nan_to_num(data, copy=False)
    return nib.Nifti1Image(data, img.affine)


def on_grid(img: nib.Nifti1Image | None, ref: nib.Nifti1Image, order: int = 1):
    """``img``'s data on ``ref``'s grid (None stays None)."""
    if img is None:
        return None
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.shape[:3] == ref.shape[:3] and np.allclose(img.affine, ref.affine, atol=1e-3):
        return data
    return resample_to_grid(img, ref.affine, ref.shape[:3], order=order)


def _bbox(mask: np.ndarray, margin: int = 4) -> tuple[slice, slice, slice]:
    """Bounding box of the non-zero voxels of ``mask``, widened by ``margin`` voxels."""
    mask = np.asarray(mask) != 0
    out = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if not hit.size:
            return tuple(slice(0, s) for s in mask.shape)
        out.append(slice(max(int(hit[0]) - margin, 0),
                         min(int(hit[-1]) + margin + 1, mask.shape[axis])))
    return tuple(out)


def slice_positions(mask: np.ndarray, n: int, lo: float = 0.12, hi: float = 0.88) -> list:
    """``n`` evenly spaced slice indices per axis inside the bounding box of ``mask``."""
    box = _bbox(mask, 0)
    return [np.linspace(b.start + lo * (b.stop - b.start), b.start + hi * (b.stop - b.start),
                        n).round().astype(int).tolist() for b in box]


def _take(vol: np.ndarray, axis: int, index: int, box) -> np.ndarray:
    """A 2D slice, cropped to ``box`` and transposed for imshow(origin='lower')."""
    if axis == 0:
        return vol[index, box[1], box[2]].T
    if axis == 1:
        return vol[box[0], index, box[2]].T
    return vol[box[0], box[1], index].T


def _window(data: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    vals = data[mask > 0] if (mask > 0).any() else data[data != 0]
    if not vals.size:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [0.5, 99.5])
    return float(min(lo, 0.0)), float(hi if hi > lo else lo + 1)


def _row(vol: np.ndarray, axis: int, positions, box, gap: int, fill=0.0) -> np.ndarray:
    """The slices of one mosaic row side by side, separated by ``gap`` columns of ``fill``."""
    parts = []
    for k, index in enumerate(positions):
        sl = _take(vol, axis, index, box)
        if k:
            parts.append(np.full((sl.shape[0], gap), fill, dtype=sl.dtype))
        parts.append(sl)
    return np.concatenate(parts, axis=1)


def mosaic(background: np.ndarray, out_file, *, box_mask: np.ndarray, n: int = 7,
           contours=(), filled=(), overlay=None, affine=None, title: str = "",
           positions=None, window=None, dpi: int = 110) -> Path:
    """Three rows of ``n`` slices (sagittal, coronal, axial) of ``background``, cropped to the
    bounding box of ``box_mask``. Each row is drawn as one image, so the figure stays light.

    contours : (volume, level, colour) drawn as outlines.
    filled : (binary volume, colour) drawn as translucent fills.
    overlay : (volume, vmin, vmax, cmap) drawn above ``vmin`` (e.g. saliency).
    affine : voxel-to-world affine (RAS), to label slices in mm.
    positions : slice indices per axis (default: ``n`` evenly spaced in ``box_mask``).
    window : (vmin, vmax) of the grey scale (default: from ``background`` in ``box_mask``).
    """
    box = _bbox(box_mask)
    pos = slice_positions(box_mask, n) if positions is None else [list(p) for p in positions]
    vmin, vmax = _window(background, box_mask) if window is None else window
    gap = 4
    rows = [_row(background, axis, pos[axis], box, gap) for axis in range(3)]
    width = 11.0
    heights = [width * r.shape[0] / r.shape[1] for r in rows]
    fig = Figure(figsize=(width, sum(heights) * 1.02 + (0.3 if title else 0)), facecolor="black")
    gs = fig.add_gridspec(3, 1, height_ratios=heights, hspace=0.02, left=0, right=1, bottom=0,
                          top=0.97 if title else 1)
    names = ("x", "y", "z")
    for axis in range(3):
        ax = fig.add_subplot(gs[axis, 0])
        ax.set_facecolor("black")
        ax.imshow(rows[axis], cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                  interpolation="nearest")
        for vol, colour in filled:
            sl = _row(vol, axis, pos[axis], box, gap) > 0.5
            if sl.any():
                rgba = np.zeros(sl.shape + (4,))
                rgba[sl] = list(_rgb(colour)) + [0.6]
                ax.imshow(rgba, origin="lower", interpolation="nearest")
        if overlay is not None:
            vol, lo, hi, cmap = overlay
            sl = _row(vol, axis, pos[axis], box, gap)
            # the colour scale starts below the threshold so the weakest shown voxels are dark
            # red, not black
            ax.imshow(np.ma.masked_less_equal(sl, lo), cmap=cmap, vmin=lo - 0.4 * (hi - lo),
                      vmax=hi, origin="lower", interpolation="nearest", alpha=0.85)
        for vol, level, colour in contours:
            sl = _row(vol, axis, pos[axis], box, gap)
            if sl.min() < level < sl.max():
                ax.contour(sl, levels=[level], colors=[colour], linewidths=0.7, origin="lower")
        ax.set_axis_off()
        w = rows[axis].shape[1]
        step = (w + gap) / n
        for k, index in enumerate(pos[axis]):
            where = index if affine is None else affine[axis, axis] * index + affine[axis, 3]
            ax.text(k * step + 2, 2, f"{names[axis]}={where:.0f}", color="white", fontsize=6,
                    va="bottom")
    if title:
        fig.suptitle(title, color="white", fontsize=9, y=0.995)
    return _save(fig, out_file, dpi=dpi)


def _rgb(colour: str) -> tuple:
    from matplotlib.colors import to_rgb

    return to_rgb(colour)


@lru_cache(maxsize=4)
def _template_contours(template_brain, template_mask, wm_prior):
    """The template image, its mask and the outlines drawn over every registration figure
    (cached: the same for every scan of a run)."""
    ref = load_ras(template_brain)
    tmask = on_grid(load_ras(template_mask), ref, order=0)
    contours = [(tmask, 0.5, TEMPLATE_CONTOUR)]
    if wm_prior is not None:
        wm = on_grid(load_ras(wm_prior), ref)
        contours.append((wm / max(float(wm.max()), 1e-6), 0.5, WM_CONTOUR))
    for arr in [tmask] + [c[0] for c in contours]:
        arr.setflags(write=False)
    return ref, tmask, contours


def registration_figure(preproc_file, template_brain, template_mask, out_file, *,
                        wm_prior=None) -> Path:
    """The registration check: the registered image with the template's brain outline (red) and
    white-matter boundary (orange, from the WM prior at 0.5). Paired in the report with
    :func:`template_figure`, which has the same outlines, so misalignment shows as edges that
    move when the two swap."""
    ref, tmask, contours = _template_contours(str(template_brain), str(template_mask),
                                              None if wm_prior is None else str(wm_prior))
    subject = on_grid(load_ras(preproc_file), ref)
    return mosaic(subject, out_file, box_mask=tmask, contours=contours, affine=ref.affine)


def template_figure(template_brain, template_mask, out_file, *, wm_prior=None) -> Path:
    """The template with the outlines of :func:`registration_figure`, on the same slices."""
    ref, tmask, contours = _template_contours(str(template_brain), str(template_mask),
                                              None if wm_prior is None else str(wm_prior))
    return mosaic(np.asarray(ref.dataobj, dtype=np.float32), out_file, box_mask=tmask,
                  contours=contours, affine=ref.affine)


def mask_figure(preproc_file, mask_file, out_file, *, lesion_file=None) -> Path:
    """The registered image with its brain mask outline (cyan) and lesion mask (magenta fill)."""
    ref = load_ras(preproc_file)
    data = np.asarray(ref.dataobj, dtype=np.float32)
    mask = on_grid(load_ras(mask_file), ref, order=0) if mask_file else (data != 0)
    filled = []
    if lesion_file:
        filled.append((on_grid(load_ras(lesion_file), ref, order=0), LESION_COLOUR))
    box = mask if np.asarray(mask).any() else (data != 0)
    return mosaic(data, out_file, box_mask=box, contours=[(mask.astype(np.float32), 0.5,
                                                            MASK_CONTOUR)], filled=filled,
                  affine=ref.affine)


def lesion_slices(lesion: np.ndarray, n: int = 7) -> list:
    """Per axis, the ``n`` slices holding the most lesion voxels (at least 2 apart where the
    lesions allow), in increasing order."""
    lesion = np.asarray(lesion) > 0.5
    out = []
    for axis in range(3):
        counts = lesion.sum(axis=tuple(a for a in range(3) if a != axis))
        ranked = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
        chosen: list[int] = []
        for i in ranked:
            if len(chosen) < n and all(abs(i - c) >= 2 for c in chosen):
                chosen.append(i)
        chosen += [i for i in ranked if i not in chosen][:n - len(chosen)]
        if not chosen:  # no lesion: the centre of the volume
            chosen = [lesion.shape[axis] // 2]
        out.append(sorted(chosen))
    return out


def lesion_filling_figures(raw_file, filled_file, lesion_file, out_raw, out_filled, *,
                           mask_file=None) -> tuple[Path, Path]:
    """The raw and the lesion-filled registered image on the same slices (those with the most
    lesion voxels) and grey scale, with the lesion outline (magenta); shown as a pair in the
    report so the filled lesions can be compared with the surrounding white matter."""
    ref = load_ras(raw_file)
    raw = np.asarray(ref.dataobj, dtype=np.float32)
    filled = on_grid(load_ras(filled_file), ref)
    lesion = on_grid(load_ras(lesion_file), ref, order=0)
    mask = on_grid(load_ras(mask_file), ref, order=0) if mask_file else (raw != 0)
    box = mask if np.asarray(mask).any() else (raw != 0)
    common = {"box_mask": box, "positions": lesion_slices(lesion),
              "window": _window(raw, box), "affine": ref.affine,
              "contours": [(lesion.astype(np.float32), 0.5, LESION_COLOUR)]}
    return (mosaic(raw, out_raw, title="as acquired", **common),
            mosaic(filled, out_filled, title="lesion-filled", **common))


def saliency_figure(background_file, saliency_file, out_file, *, mask_file=None,
                    percentile: float = 80.0) -> Path:
    """SmoothGrad saliency above its ``percentile``-th percentile inside the brain, over the
    registered image ('hot' colour map, scaled to the 99.5th percentile)."""
    ref = load_ras(background_file)
    data = np.asarray(ref.dataobj, dtype=np.float32)
    sal = on_grid(load_ras(saliency_file), ref)
    mask = on_grid(load_ras(mask_file), ref, order=0) > 0.5 if mask_file else data != 0
    vals = sal[mask] if mask.any() else sal.ravel()
    lo, hi = np.percentile(vals, [percentile, 99.5]) if vals.size else (0.0, 1.0)
    sal = np.where(mask, sal, 0)
    return mosaic(data, out_file, box_mask=mask, affine=ref.affine,
                  overlay=(sal, float(lo), float(max(hi, lo + 1e-12)), "hot"))


def native_figure(input_file, out_file) -> Path:
    """Three orthogonal slices through the centre of the head in the input image as acquired
    (RAS order, true voxel aspect, cropped to the non-background voxels)."""
    img = load_ras(input_file)
    data = np.asarray(img.dataobj, dtype=np.float32)
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    p5, p99 = np.percentile(data, [5, 99])
    fg = data > p5 + 0.05 * (p99 - p5)
    box = _bbox(fg, margin=3)
    # window on the brighter half of the head, so white matter does not saturate
    vmin, vmax = _window(data, fg & (data > np.median(data[fg]) if fg.any() else fg))
    centre = [(b.start + b.stop) // 2 for b in box]
    fig = Figure(figsize=(9, 3.2), facecolor="black")
    for axis in range(3):
        ax = fig.add_subplot(1, 3, axis + 1)
        other = [a for a in range(3) if a != axis]
        ax.imshow(_take(data, axis, centre[axis], box), cmap="gray", vmin=vmin, vmax=vmax,
                  origin="lower", aspect=zooms[other[1]] / zooms[other[0]],
                  interpolation="nearest")
        ax.set_axis_off()
    fig.suptitle(f"as acquired: {data.shape[0]}x{data.shape[1]}x{data.shape[2]} voxels of "
                 f"{zooms[0]:.2g}x{zooms[1]:.2g}x{zooms[2]:.2g} mm", color="white", fontsize=9)
    return _save(fig, out_file, dpi=80)


# ---------------------------------------------------------------------------------------------
# charts
def age_figure(rows: pd.DataFrame, distributions: pd.DataFrame | None, out_file, *,
               training_ranges: dict | None = None) -> Path:
    """Predicted age per model of one scan, as in the NMOSD study's Figure 1D-G: the soft-label
    distribution as a curve where the model has one, the predicted age as a solid line and
    +/- one SD as dashed lines; chronological age as a dotted black line across all rows and the
    model's training age range shaded grey.

    rows : the scan's brain-age rows (model, predicted_age, predicted_age_sd,
        chronological_age, lesion_filled).
    distributions : the desc-agedist table (model, age, probability) or None.
    """
    training_ranges = training_ranges or {}
    rows = rows.reset_index(drop=True)
    n = len(rows)
    fig = Figure(figsize=(7.5, 0.75 * n + 1.1), facecolor="white")
    ax = fig.add_subplot(1, 1, 1)
    xs = []
    for i, r in rows.iterrows():
        y0 = n - 1 - i
        model = str(r["model"])
        colour = "#222222" if model == "ensemble" else PALETTE[i % len(PALETTE)]
        rng = training_ranges.get(model)
        if rng:
            ax.fill_between(rng, y0 - 0.05, y0 + 0.9, color="#e8e8e8", lw=0, zorder=0)
        pred = as_finite(r.get("predicted_age"))
        sd = as_finite(r.get("predicted_age_sd"))
        filled = str(r.get("lesion_filled", "false")).lower() == "true"
        d = None
        if distributions is not None and not filled and len(distributions):
            d = distributions[distributions["model"].astype(str) == model]
        if d is not None and len(d):
            p = d["probability"].to_numpy(float)
            a = d["age"].to_numpy(float)
            ax.fill_between(a, y0, y0 + 0.85 * p / p.max(), color=colour, alpha=0.35, lw=0)
            ax.plot(a, y0 + 0.85 * p / p.max(), color=colour, lw=1.2)
            keep = a[p > 1e-3 * p.max()]
            xs += [keep.min(), keep.max()]
        if pred is not None:
            ax.plot([pred, pred], [y0, y0 + 0.85], color=colour, lw=2)
            xs.append(pred)
            if sd is not None and sd > 0:
                for v in (pred - sd, pred + sd):
                    ax.plot([v, v], [y0, y0 + 0.85], color=colour, lw=1.2, ls="--")
                xs += [pred - sd, pred + sd]
            txt = f"{pred:.1f}" + (f" ± {sd:.1f}" if sd is not None else "") + " y"
            ax.text(1.01, y0 + 0.4, txt, transform=ax.get_yaxis_transform(), fontsize=8,
                    va="center", color=colour)
        ax.axhline(y0, color="#999999", lw=0.5)
    ages = [a for a in (as_finite(v) for v in rows.get("chronological_age", [])) if a is not None]
    if ages:
        ax.axvline(ages[0], color=CHRONO_COLOUR, ls=":", lw=1.5,
                   label=f"chronological age {ages[0]:.1f} y")
        xs.append(ages[0])
    lo, hi = (min(xs), max(xs)) if xs else (0.0, 100.0)
    pad = max(5.0, 0.08 * (hi - lo))
    ax.set_xlim(max(lo - pad, 0), hi + pad)
    ax.set_ylim(-0.1, n)
    ax.set_yticks([n - 1 - i + 0.4 for i in range(n)])
    ax.set_yticklabels([str(m) + (" (lesion-filled)" if str(f).lower() == "true" else "")
                        for m, f in zip(rows["model"], rows.get("lesion_filled",
                                                                ["false"] * n))], fontsize=8)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel("age (years)")
    for s in ("top", "right", "left"):
        ax.spines[s].set_visible(False)
    handles = ax.get_legend_handles_labels()[0]
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles += [Line2D([], [], color="#444444", lw=2, label="predicted age"),
                Line2D([], [], color="#444444", lw=1.2, ls="--", label="± 1 SD")]
    if any(str(m) in training_ranges for m in rows["model"]):
        handles.append(Patch(color="#e8e8e8", label="training age range"))
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35 / (
        0.75 * n / 2 + 0.5)), ncol=4, frameon=False)
    return _save(fig, out_file)


def scatter_figure(df: pd.DataFrame, out_file, *, group_col: str = "group",
                   title: str = "") -> Path:
    """Predicted against chronological age per group; raw, and bias-corrected when the table has
    ``predicted_age_corrected`` values. Identity line dashed."""
    panels = [("predicted_age", "raw")]
    if "predicted_age_corrected" in df and df["predicted_age_corrected"].notna().any():
        panels.append(("predicted_age_corrected", "bias-corrected"))
    fig = Figure(figsize=(4.4 * len(panels) + 1.4, 4.2), facecolor="white")
    groups = sorted(df[group_col].fillna("n/a").astype(str).unique())
    vals = df[["chronological_age"] + [c for c, _ in panels]].to_numpy(float)
    finite = vals[np.isfinite(vals)]
    lim = ([finite.min() - 3, finite.max() + 3] if finite.size else [0, 100])
    for k, (col, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for j, g in enumerate(groups):
            s = df[df[group_col].fillna("n/a").astype(str) == g]
            ax.scatter(s["chronological_age"], s[col], s=18, alpha=0.75,
                       color=PALETTE[j % len(PALETTE)], label=f"{g} (n={len(s)})",
                       edgecolors="white", linewidths=0.4)
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlim(lim)
        ax.set_ylim(lim)
        ax.set_aspect("equal")
        ax.set_xlabel("chronological age (years)")
        ax.set_ylabel("brain age (years)" if k == 0 else "")
        ax.set_title(f"{title}: {label}" if title else label, fontsize=9)
    fig.axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    return _save(fig, out_file)


def gap_figure(df: pd.DataFrame, out_file, *, by: list[str], gap_col: str, title: str = "") -> Path:
    """Brain-age gap per level of each column in ``by`` (box and jittered points)."""
    by = [b for b in by if b in df and df[b].notna().any()]
    fig = Figure(figsize=(max(3.2, 2.6 * len(by)) + 1.5, 3.8), facecolor="white")
    rng = np.random.default_rng(0)
    for k, col in enumerate(by):
        ax = fig.add_subplot(1, len(by), k + 1)
        levels = sorted(df[col].fillna("n/a").astype(str).unique())
        data = [df.loc[df[col].fillna("n/a").astype(str) == lev, gap_col].dropna().to_numpy(float)
                for lev in levels]
        keep = [i for i, d in enumerate(data) if d.size]
        if keep:
            ax.boxplot([data[i] for i in keep], positions=keep, widths=0.5, showfliers=False,
                       medianprops={"color": "black"})
        for i, d in enumerate(data):
            ax.scatter(i + rng.uniform(-0.15, 0.15, d.size), d, s=12, alpha=0.7,
                       color=PALETTE[i % len(PALETTE)], zorder=3)
        ax.axhline(0, color="#888888", lw=0.8, ls="--")
        ax.set_xticks(range(len(levels)))
        ax.set_xticklabels([f"{lev}\n(n={d.size})" for lev, d in zip(levels, data)], fontsize=7)
        ax.set_xlim(-0.6, len(levels) - 0.4)
        ax.set_title(f"by {col}", fontsize=9)
        if k == 0:
            ax.set_ylabel(f"{gap_col} (years)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, out_file)


def group_saliency_figure(map_file, template_brain, out_file) -> Path:
    """Mean saliency of a group over the template (top 20 % of brain voxels shown)."""
    return saliency_figure(template_brain, map_file, out_file,
                           mask_file=None, percentile=80.0)
