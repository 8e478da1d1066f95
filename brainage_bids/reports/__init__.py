"""HTML reports of the participant and group levels, and the QC flags they explain.

- :func:`write_participant_report` -> ``OUTPUT_DIR/sub-<label>.html`` (figures in
  ``sub-<label>/figures/``);
- :func:`write_group_report` -> ``OUTPUT_DIR/group/report.html`` (figures in
  ``group/report_figures/``);
- :func:`write_reports` regenerates all of them from existing outputs (``--reports-only``).

Templates (jinja2) are in ``templates/`` next to this file so they ship with the package.
"""
from .group import write_group_report, write_reports
from .participant import write_participant_report

__all__ = ["write_group_report", "write_participant_report", "write_reports"]
