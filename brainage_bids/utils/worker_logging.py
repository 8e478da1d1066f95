"""Imported by the multiprocessing forkserver before it forks Nipype's workers (see
cli.run.run_workflow): Nipype's node messages of every worker go to the run's log file
(``BRAINAGE_BIDS_LOG_FILE``) and reach the console only at ``BRAINAGE_BIDS_CONSOLE_LEVEL``."""
from __future__ import annotations

import logging
import os
import sys


def configure() -> None:
    log_file = os.environ.get("BRAINAGE_BIDS_LOG_FILE")
    level = int(os.environ.get("BRAINAGE_BIDS_CONSOLE_LEVEL", logging.WARNING))
    from nipype import logging as nlogging  # noqa: F401 - installs nipype's stdout handler

    root = logging.getLogger("nipype")
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler):
            handler.setStream(sys.stderr)
            handler.setLevel(level)
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setLevel(logging.INFO)
        from .provenance import LOG_FORMAT

        handler.setFormatter(LOG_FORMAT)
        root.addHandler(handler)
        lib = logging.getLogger("brainage_bids")
        lib.addHandler(handler)
        lib.setLevel(logging.INFO)
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).propagate = True


def exit_fast_in_forkserver() -> None:
    """In the forkserver (the child of the process that started it: cli.run.start_workers names
    that process in ``BRAINAGE_BIDS_FORKSERVER_PARENT``), leave with ``os._exit`` once the exit
    handlers ran: tearing down the PyTorch, deepbet and antspyx it preloads would take seconds
    while the run waits for it. Its workers leave with ``os._exit`` anyway."""
    if os.environ.get("BRAINAGE_BIDS_FORKSERVER_PARENT") == str(os.getppid()):
        import atexit

        atexit.register(os._exit, 0)


configure()
exit_fast_in_forkserver()
