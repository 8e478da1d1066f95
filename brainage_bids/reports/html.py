"""The jinja2 environment of the reports and the value formatting they share.

Templates live in ``brainage_bids/reports/templates/`` so that they ship inside the package
(wheel, container) with the code that fills them.
"""
from __future__ import annotations

import math
import os
from datetime import datetime, timezone
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).resolve().parent / "templates"


def fmt(value, digits: int = 2, column: str = "") -> str:
    """A table cell: n/a for missing, p-values with 2 significant digits (< 0.0001 below),
    counts as integers, other numbers of a named ``column`` with ``digits`` decimals (without a
    column, whole numbers print without decimals)."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value if value.strip() else "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(f):
        return "n/a"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    col = column.lower()
    if col in ("p_value", "p", "p_adj", "pvalue") or col.startswith("p_"):
        return "< 0.0001" if f < 1e-4 else f"{f:.2g}" if f < 0.01 else f"{f:.3f}"
    if col in ("n", "voxels", "events", "n_events") or col.startswith("n_"):
        return f"{f:.0f}" if f.is_integer() else f"{f:.{digits}f}"
    if not col and f.is_integer() and abs(f) < 1e6:
        return f"{f:.0f}"
    if f != 0 and abs(f) < 10 ** (-digits):
        return f"{f:.2e}"
    return f"{f:.{digits}f}"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(["html"]),
                             trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = fmt
    return env


def render(template: str, **context) -> str:
    """Render ``template`` with ``context`` plus ``generated`` (UTC time) and ``version``."""
    from .. import __version__

    context.setdefault("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    context.setdefault("version", __version__)
    return environment().get_template(template).render(**context)


def relpath(path, start) -> str:
    """``path`` relative to folder ``start``, with forward slashes (for src/href)."""
    return Path(os.path.relpath(str(path), str(start))).as_posix()
