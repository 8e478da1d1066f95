"""The figures of the group statistics (``OUTPUT_DIR/group/figures/``, PNG): predicted against
chronological age, the ROC and Kaplan-Meier curves of EDSS worsening, the Bland-Altman plots of
raw against lesion-filled brain age. The statistics step draws them through
:class:`StatsFigures`; a figure that fails is a warning, never a lost table.
"""
from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils.images import atomic_write_bytes

LOG = logging.getLogger("brainage_bids.stats.group")


def slug(*parts) -> str:
    """File-name-safe join of ``parts`` with underscores."""
    return "_".join(re.sub(r"[^A-Za-z0-9]+", "-", str(p)).strip("-") for p in parts if p)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class StatsFigures:
    """The figures one group-level run draws into ``fig_dir``; ``written`` lists them in order."""

    def __init__(self, fig_dir):
        self.fig_dir = Path(fig_dir)
        self.written: list[Path] = []

    def save(self, fig, path: Path) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        atomic_write_bytes(path, buf.getvalue())
        self.written.append(path)

    def scatter(self, df: pd.DataFrame, diagnosis_col: str) -> None:
        """Predicted against chronological age, raw and bias-corrected, per (model, suffix) of
        the raw (not lesion-filled) rows, coloured by ``diagnosis_col``."""
        from ..stats.collect import is_lesion_filled

        try:
            plt = _pyplot()
        except Exception as exc:  # pragma: no cover - matplotlib is a dependency
            LOG.warning("no figures: %s", exc)
            return
        dx = diagnosis_col
        d = df[~is_lesion_filled(df)]
        for (model, suffix), g in d.groupby(["model", "suffix"], sort=True):
            fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
            labels = g[dx].fillna("n/a").astype(str) if dx in g else pd.Series("all", index=g.index)
            for ax, col, title in ((axes[0], "predicted_age", "raw"),
                                   (axes[1], "predicted_age_corrected", "bias-corrected")):
                for lab in sorted(labels.unique()):
                    s = g[labels == lab]
                    ax.scatter(s["chronological_age"], s[col], s=14, alpha=0.7, label=lab)
                lim = [np.nanmin(g[["chronological_age", "predicted_age"]].to_numpy(float)) - 5,
                       np.nanmax(g[["chronological_age", "predicted_age"]].to_numpy(float)) + 5]
                if np.all(np.isfinite(lim)):
                    ax.plot(lim, lim, "k--", lw=0.8)
                ax.set_xlabel("chronological age (years)")
                ax.set_title(f"{model} {suffix}: {title}")
            axes[0].set_ylabel("predicted brain age (years)")
            axes[0].legend(fontsize=8)
            fig.tight_layout()
            self.save(fig, self.fig_dir / f"scatter_{slug(model, suffix)}.png")
            plt.close(fig)

    def roc(self, x: pd.DataFrame, label: str, key: tuple, cutoff: dict | None = None) -> None:
        """ROC curve of the gap for EDSS worsening (``x``: ``gap``, ``event``), with the cut-off."""
        try:
            plt = _pyplot()
            from ..stats.roc import roc_curve_points

            pts = roc_curve_points(x, "gap", "event")
            fig, ax = plt.subplots(figsize=(4.2, 4.2))
            ax.plot(pts["fpr"], pts["tpr"], "-")
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            if cutoff is not None and cutoff.get("sensitivity") is not None:
                ax.plot(1 - cutoff["specificity"], cutoff["sensitivity"], "o",
                        label=f"gap > {cutoff['estimate']:.1f}")
                ax.legend(loc="lower right", fontsize=8)
            ax.set_xlabel("1 - specificity")
            ax.set_ylabel("sensitivity")
            ax.set_title(f"{' '.join(key)}: gap for EDSS worsening\n{label}", fontsize=10)
            fig.tight_layout()
            self.save(fig, self.fig_dir / f"roc_worsening_{slug(*key, label)}.png")
            plt.close(fig)
        except Exception as exc:  # a figure must not cost the table
            LOG.warning("ROC figure for %s failed: %s", label, exc)

    def kaplan_meier(self, x: pd.DataFrame, key: tuple, label: str) -> None:
        """Kaplan-Meier curves of ``x`` (``time``, ``event``) per ``gap_group``."""
        path = self.fig_dir / f"km_worsening_{slug(*key, label)}.png"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            plot_kaplan_meier(x, "time", "event", "gap_group", str(path))
            self.written.append(path)
        except Exception as exc:  # a figure must not cost the table
            LOG.warning("Kaplan-Meier figure %s failed: %s", path, exc)

    def lesion_agreement(self, pairs: pd.DataFrame, table: pd.DataFrame, model: str,
                         suffix: str) -> None:
        """Bland-Altman figure of raw against lesion-filled brain age of one (model, suffix)."""
        try:
            plt = _pyplot()
            fig = bland_altman_figure(pairs, table, f"{model} {suffix}: raw vs lesion-filled "
                                                    "brain age")
            self.save(fig, self.fig_dir / f"lesion_agreement_{slug(model, suffix)}.png")
            plt.close(fig)
        except Exception as exc:  # a figure must not cost the table
            LOG.warning("Bland-Altman figure for %s/%s failed: %s", model, suffix, exc)

    def contrast_agreement(self, pairs: pd.DataFrame, table: pd.DataFrame, a: str,
                           b: str) -> None:
        """Bland-Altman figure of the ages of the same sessions read in contrasts ``a`` and
        ``b`` (``pairs``: ``age_a``, ``age_b``)."""
        try:
            plt = _pyplot()
            fig = bland_altman_figure(pairs.rename(columns={"age_a": "raw", "age_b": "filled"}),
                                      table, f"brain age from {b} against {a} (same sessions)")
            for ax, (x, y) in zip(fig.axes, ((f"{a} brain age (years)", f"{b} brain age (years)"),
                                             (f"mean of {a} and {b} (years)",
                                              f"{b} - {a} (years)"))):
                ax.set_xlabel(x)
                ax.set_ylabel(y)
            self.save(fig, self.fig_dir / f"contrast_agreement_{slug(a, b)}.png")
            plt.close(fig)
        except Exception as exc:  # a figure must not cost the table
            LOG.warning("Bland-Altman figure for %s/%s failed: %s", a, b, exc)


def plot_kaplan_meier(df: pd.DataFrame, duration: str, event: str, group: str | None,
                      path: str | Path, *, title: str | None = None,
                      xlabel: str = "years") -> Path:
    """Kaplan-Meier curves (with 95 % CI bands and censoring marks), one per level of ``group``,
    written as a PNG to ``path``; returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter

    from ..stats.survival import _complete, _event, _groups

    cols = [duration, event] + ([group] if group else [])
    d = _complete(df, cols)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    try:
        for lvl, g in _groups(d, group):
            kmf = KaplanMeierFitter().fit(g[duration].astype(float), _event(g[event]),
                                          label=f"{lvl} (n={len(g)})")
            kmf.plot_survival_function(ax=ax, show_censors=True, ci_show=True)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("event-free probability")
        ax.set_ylim(0, 1.05)
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def bland_altman_figure(pairs: pd.DataFrame, table: pd.DataFrame, title: str):
    """Filled against raw brain age (identity line, r and R2) and the Bland-Altman plot
    (difference against mean, bias and 95 % limits with their CIs). Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    est = table.set_index("term")
    raw = pairs["raw"].to_numpy(float)
    filled = pairs["filled"].to_numpy(float)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 4.2))
    ax1.scatter(raw, filled, s=16, alpha=0.75)
    lim = [min(raw.min(), filled.min()) - 2, max(raw.max(), filled.max()) + 2]
    ax1.plot(lim, lim, "k--", lw=0.8)
    ax1.set_xlim(lim)
    ax1.set_ylim(lim)
    r = est.loc["pearson_r", "estimate"]
    ax1.set_title(f"r = {r:.3f}, R² = {r * r:.3f}" if np.isfinite(r) else "r: n/a", fontsize=10)
    ax1.set_xlabel("raw brain age (years)")
    ax1.set_ylabel("lesion-filled brain age (years)")
    mean = (raw + filled) / 2.0
    ax2.scatter(mean, filled - raw, s=16, alpha=0.75)
    for term, style, label in (("loa_upper", "--", "upper 95 % limit"),
                               ("mean_difference", "-", "mean difference"),
                               ("loa_lower", "--", "lower 95 % limit")):
        row = est.loc[term]
        ax2.axhline(row["estimate"], color="C3", ls=style, lw=1.2,
                    label=f"{label} {row['estimate']:.2f}")
        if np.isfinite(row["ci_low"]):
            ax2.axhspan(row["ci_low"], row["ci_high"], lw=0, alpha=0.15,
                        color="C3" if term == "mean_difference" else "0.5")
    ax2.axhline(0, color="k", lw=0.6)
    ax2.set_xlabel("mean of raw and lesion-filled (years)")
    ax2.set_ylabel("lesion-filled - raw (years)")
    ax2.set_title(f"Bland-Altman (n = {len(pairs)}; bands: 95 % CI)", fontsize=10)
    ax2.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
