"""Entry point: one function per analysis level."""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import uuid
from datetime import datetime
from pathlib import Path

from .parser import (
    EXIT_CANT_CREATE,
    EXIT_DATA,
    EXIT_NO_INPUT,
    EXIT_OK,
    EXIT_PARTICIPANT_FAILED,
    EXIT_USAGE,
    UsageError,
    parse_args,
)

LOG = logging.getLogger("brainage_bids")
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "data" / "models" / "ixi-sfcn-2mm.pt"


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def default_work_dir(output_dir: Path) -> Path:
    """``OUTPUT_DIR/work``: inside the output's scope, so each output dir (and user) has its own,
    and rerunning the same command resumes from it (``.bidsignore`` lists it)."""
    return Path(output_dir) / "work"


def check_paths(opts, create: bool = True) -> tuple[Path, Path, Path]:
    """Resolve and check bids_dir, output_dir and work_dir before any work starts; with
    ``create``, also create them (see :func:`create_dirs`)."""
    bids_dir = Path(opts.bids_dir).resolve()
    output_dir = Path(opts.output_dir).resolve()
    if not bids_dir.is_dir():
        raise UsageError(f"BIDS directory not found: {bids_dir}", EXIT_NO_INPUT)
    if _is_within(output_dir, bids_dir):
        raise UsageError(f"output directory {output_dir} is inside the BIDS dataset {bids_dir}; "
                         "nothing may be written into the input dataset", EXIT_USAGE)
    work_dir = Path(opts.work_dir).resolve() if opts.work_dir else default_work_dir(output_dir)
    if _is_within(work_dir, bids_dir):
        raise UsageError(f"work directory {work_dir} is inside the BIDS dataset {bids_dir}",
                         EXIT_USAGE)
    if create:
        create_dirs(output_dir, work_dir)
    return bids_dir, output_dir, work_dir


LOCK_NAME = ".brainage-bids.lock"
_LOCKS: list = []  # open lock files, held until release_locks()


def lock_dirs(*dirs: Path) -> None:
    """Take an exclusive lock (``LOCK_NAME``, flock) in each directory, held until
    :func:`release_locks` or the process ends (also on SIGKILL); a directory another run holds
    is a UsageError, exit 73."""
    import fcntl

    for d in dict.fromkeys(dirs):
        path = Path(d) / LOCK_NAME
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            raise UsageError(f"another run is using {d}" + (f" ({holder})" if holder else "")
                             + f"; wait for it to finish or choose another directory (lock "
                             f"{path})", EXIT_CANT_CREATE) from exc
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename} since "
                 f"{datetime.now().isoformat(timespec='seconds')}\n")
        fh.flush()
        _LOCKS.append(fh)


def release_locks() -> None:
    while _LOCKS:
        _LOCKS.pop().close()


def create_dirs(*dirs: Path) -> None:
    """Create and probe each directory, then lock it against a concurrent run (see
    :func:`lock_dirs`); a failure is exit 73."""
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"cannot create or write {d}: {exc}", EXIT_CANT_CREATE) from exc
    lock_dirs(*dirs)


def plugin_settings(opts) -> dict:
    """Nipype plugin and its arguments from --plugin/--plugin-args/--nprocs."""
    args: dict = {}
    if opts.plugin_args:
        text = opts.plugin_args
        if os.path.isfile(text):
            text = Path(text).read_text()
            try:
                args = json.loads(text)
            except json.JSONDecodeError:
                import yaml

                args = yaml.safe_load(text) or {}
        else:
            try:
                args = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UsageError(f"--plugin-args is neither JSON nor a file: {exc}") from exc
        if not isinstance(args, dict):
            raise UsageError("--plugin-args must be a JSON object")
        check_plugin_args(args)
    if opts.plugin not in ("MultiProc", "Linear"):
        # nipype's cluster plugins read LOGNAME (unset in some batch and container environments)
        import getpass

        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # a UID without a passwd entry (containers)
            user = f"uid{os.getuid()}"
        os.environ.setdefault("LOGNAME", user)
    if opts.plugin == "MultiProc":
        args.setdefault("n_procs", opts.nprocs)
        if getattr(opts, "mem_gb", None):
            args.setdefault("memory_gb", float(opts.mem_gb))
        args.setdefault("raise_insufficient", False)
        # Workers forked from a process that already ran PyTorch can deadlock in its OpenMP pool.
        args.setdefault("mp_context", "forkserver")
    return {"plugin": opts.plugin, "plugin_args": args}


#: Typed arguments of nipype's local plugins: (type, smallest value).
PLUGIN_ARG_TYPES = {"n_procs": (int, 1), "memory_gb": (float, 0.01), "n_gpu_procs": (int, 0),
                    "maxtasksperchild": (int, 1), "raise_insufficient": (bool, None)}


def check_plugin_args(args: dict) -> None:
    """A UsageError naming the key and value of a --plugin-args entry of the wrong type or
    range (numbers for n_procs, memory_gb, n_gpu_procs, maxtasksperchild; a boolean for
    raise_insufficient)."""
    for key, (kind, low) in PLUGIN_ARG_TYPES.items():
        if key not in args:
            continue
        value = args[key]
        ok = isinstance(value, bool) if kind is bool else (
            not isinstance(value, bool) and isinstance(value, (int, float) if kind is float
                                                       else int) and value >= low)
        if not ok:
            want = ("true or false" if kind is bool else
                    f"{'an integer' if kind is int else 'a number'} >= {low:g}")
            raise UsageError(f"--plugin-args: {key} must be {want}, not {json.dumps(value)}")


def local_poll_seconds(plugin: str) -> str:
    """Scheduler poll interval: short for local plugins (nipype's 2 s default would idle the CPUs
    between the many short nodes), nipype's default for cluster schedulers."""
    return "0.05" if plugin in ("MultiProc", "Linear") else "2"


PROGRESS = logging.getLogger("brainage_bids.progress")


class Progress:
    """Nipype status callback: one console line per scan when it finishes or fails (every node
    with ``-v``), and the nodes that are running (for the message of an interrupted run).

    ``scans``: name of each scan's sub-workflow -> (label, number of nodes)."""

    def __init__(self, total: int, scans: dict | None = None):
        self.total, self.done = total, 0
        self.running: dict[str, None] = {}
        self.scans = dict(scans or {})
        self.left = {k: n for k, (_, n) in self.scans.items()}
        self.started: dict[str, float] = {}
        self.finished: dict[str, str] = {}  # scan key -> "ok" or the failed step

    def _scan(self, name: str) -> str | None:
        return next((part for part in name.split(".") if part in self.scans), None)

    def __call__(self, node, status):
        import time

        name = node.fullname.replace("brainage_wf.", "")
        key = self._scan(name)
        if status == "start":
            self.running[name] = None
            if key:
                self.started.setdefault(key, time.monotonic())
            return
        if status not in ("end", "exception"):
            return
        self.done += 1
        self.running.pop(name, None)
        if status == "end":
            LOG.info("[%d/%d] %s", self.done, self.total, name)
        else:
            LOG.error("[%d/%d] FAILED %s", self.done, self.total, node.fullname)
        if not key or key in self.finished:
            return
        self.left[key] -= 1
        if status == "exception" or self.left[key] <= 0:
            self.finished[key] = "ok" if status == "end" else name.rsplit(".", 1)[-1]
            secs = max(0.0, time.monotonic() - self.started.get(key, time.monotonic()))
            state = ("done" if status == "end" else
                     f"FAILED at {self.finished[key]} (see the crash file)")
            PROGRESS.info("[%d/%d scans] %s: %s in %.0f s", len(self.finished), len(self.scans),
                          self.scans[key][0], state, secs)


def scan_progress(wf, scans) -> tuple[int, dict]:
    """Nodes to run in ``wf`` and, per scan sub-workflow name, (scan label, its number of
    nodes)."""
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    from ..workflows.participant import _safe

    def jobs(w) -> int:
        return sum(not isinstance(n.interface, IdentityInterface) for n in w._get_all_nodes())

    names = {f"scan_{_safe(s.prefix)}_{s.suffix}": s.relpath for s in scans}
    per_scan = {}
    for sub in wf._graph.nodes():
        for scan_wf in sub._graph.nodes() if isinstance(sub, pe.Workflow) else []:
            if isinstance(scan_wf, pe.Workflow) and scan_wf.name in names:
                per_scan[scan_wf.name] = (names[scan_wf.name], jobs(scan_wf))
    return jobs(wf), per_scan


#: Peak memory (GB) of the heavy nodes, measured on a 1 mm whole-head MPRAGE (176x256x256,
#: 2 threads; scripts/benchmark_participant.py), with ~20 % headroom; the MultiProc plugin
#: keeps the sum of the running nodes' mem_gb under its memory_gb (--mem).
#: Measured peak RSS of a process running the step alone: deepbet 1.25 GB, N4 0.85 GB,
#: AffineFast 1.05 GB, prediction with ixi-sfcn-2mm 0.38 GB (the 1 mm published models more).
#: skull_strip is set per method in workflows/preproc.py (interfaces.skullstrip.MEM_GB).
#: n4_head and register_head (the whole-head recipe) are taken as n4 and register, unmeasured.
NODE_MEM_GB = {"n4": 1.0, "register": 1.25, "head_to_mni": 0.8, "n4_head": 1.0,
               "register_head": 1.25,
               "fill_lesions": 1.5, "lesion_to_mni": 0.8, "predict": 1.0}


def set_node_resources(wf, mem_gb: dict | None = None) -> None:
    """Set ``mem_gb`` on the heavy nodes of ``wf`` (by node name, see :data:`NODE_MEM_GB`)."""
    table = NODE_MEM_GB if mem_gb is None else mem_gb
    for node in wf._get_all_nodes():
        if node.name in table:
            node._mem_gb = float(table[node.name])


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived while the workflow ran."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise RunInterrupted(signum)


def shutdown_workers() -> None:
    """Stop this process's worker processes and the multiprocessing forkserver (nipype's
    MultiProc pool); the resource tracker then exits with this process, so nothing outlives an
    interrupted run."""
    import multiprocessing as mp

    # the pool's futures fail as their workers stop: that is expected, not worth a traceback
    logging.getLogger("concurrent.futures").disabled = True
    children = mp.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join(1)
    _stop_forkserver()


def _stop_forkserver() -> None:
    forkserver = sys.modules.get("multiprocessing.forkserver")
    try:
        forkserver._forkserver._stop()
    except Exception:  # noqa: BLE001 - not started, or already gone
        pass


class StderrHandler(logging.StreamHandler):
    """A stream handler writing to whatever ``sys.stderr`` is at the time of the record."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def console_level(verbose: int) -> int:
    """Console: warnings only by default (plus one progress line per scan), INFO with -v (every
    node, Nipype's node messages), DEBUG with -vv."""
    return logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG


def setup_logging(verbose: int) -> None:
    """Console handlers at :func:`console_level`; the loggers themselves pass INFO on, so the
    run's log file (utils.provenance.RunLog) gets Nipype's node messages at any verbosity."""
    level = console_level(verbose)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # ours (basicConfig), not pytest's capture
            handler.setLevel(level)
    logging.getLogger("brainage_bids").setLevel(min(level, logging.INFO))
    if not PROGRESS.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.setLevel(logging.INFO)
        PROGRESS.addHandler(handler)
        PROGRESS.propagate = False
    from nipype import config as ncfg
    from nipype import logging as nlogging

    ncfg.set("execution", "check_version", "false")
    ncfg.set("execution", "remove_unnecessary_outputs", "true")
    ncfg.set("logging", "workflow_level", "DEBUG" if verbose > 1 else "INFO")
    ncfg.set("logging", "interface_level", "DEBUG" if verbose > 1 else "INFO")
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        nlog = nlogging.getLogger(name)
        nlog.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
        nlog.propagate = True
    logging.getLogger("nipype").propagate = False  # its own handler prints; not twice
    nipype_root = logging.getLogger("nipype")
    for handler in list(nipype_root.handlers):  # nipype's own, on stdout: ours, on stderr
        if type(handler) in (logging.StreamHandler, StderrHandler):
            nipype_root.removeHandler(handler)
            console = StderrHandler()
            console.setFormatter(handler.formatter)
            console.setLevel(level)
            nipype_root.addHandler(console)
    os.environ["BRAINAGE_BIDS_CONSOLE_LEVEL"] = str(level)


def start_run_log(opts, output_dir: Path, work_dir, level: str, run_id: str | None = None):
    """Open ``OUTPUT_DIR/logs/<run-id>/`` (see utils.provenance.RunLog) and start logging to it."""
    from ..utils.provenance import RunLog, new_run_id

    log = RunLog(output_dir, run_id or new_run_id(), level)
    log.write_start(opts, getattr(opts, "argv", []), work_dir)
    log.start_log()
    PROGRESS.addHandler(log._handler)
    os.environ["BRAINAGE_BIDS_LOG_FILE"] = str(log.dir / "nipype.log")
    return log


def stop_run_log(log) -> None:
    if log is None:
        return
    if log._handler is not None:
        PROGRESS.removeHandler(log._handler)
    log.stop_log()
    os.environ.pop("BRAINAGE_BIDS_LOG_FILE", None)


def resolve_models(opts) -> list:
    """The models to run (zoo.ModelRequest), checked before any work starts.

    Every selected modality needs a model: the ``--model`` ones that read it (of that modality,
    contrast-agnostic or of unknown modality), else the zoo default of the modality
    (``zoo.default_request``, run on that modality only). A missing model is a usage error
    naming the URL and the install command.
    """
    from ..models.checkpoint import contrasts_of, reads_contrast
    from ..models.zoo import ModelNotInstalled, default_request, resolve_request

    try:
        requests = [resolve_request(v) for v in (opts.model or [])]
        for modality in opts.modalities:
            if not any(reads_contrast(r.modality, modality) for r in requests):
                requests.append(default_request(modality))
    except (ModelNotInstalled, FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc), EXIT_NO_INPUT) from exc
    except Exception as exc:  # noqa: BLE001 - e.g. a text file given as a checkpoint
        bad = next((v for v in opts.model or [] if not _loads(resolve_request, v)), None)
        what = f"--model {bad}" if bad else "--model"
        raise UsageError(f"{what}: not a readable model checkpoint ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split()) or 'unreadable'})", EXIT_DATA) from exc
    for r in requests:
        if r.modality and not set(contrasts_of(r.modality)) & set(opts.modalities):
            LOG.warning("model %s (%s) has no %s scans to run on; add --modalities %s", r.name,
                        r.modality, r.modality, " ".join(contrasts_of(r.modality)))
    return requests


def _loads(resolve, value) -> bool:
    try:
        resolve(value)
        return True
    except Exception:  # noqa: BLE001
        return False


def required_templates(models: list) -> dict:
    """Every template the run needs (the registration target MNI152NLin2009aSym, and
    MNI152NLin6Asym for published models) by name; a missing one is exit 66 naming it and the
    command that fetches it, before any work."""
    from ..utils.templates import TEMPLATE, TemplateMissing, get_template, template_for
    from ..workflows.predict import input_spec

    names = [TEMPLATE]
    for request in models:
        for member in request.members:
            name = template_for(input_spec(member[1]))
            if name not in names:
                names.append(name)
    try:
        return {name: get_template(name) for name in names}
    except TemplateMissing as exc:
        raise UsageError(str(exc), EXIT_NO_INPUT) from exc


def crash_messages(log_dir: str) -> list[str]:
    """The last error line of every crash file in a participant's log folder."""
    messages = []
    for f in sorted(glob.glob(os.path.join(log_dir, "crash-*"))):
        try:
            lines = [ln.strip() for ln in Path(f).read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            continue
        errors = [ln for ln in lines if ln.startswith(("brainage_bids.", "InputImageError", "ValueError",
                                                       "RuntimeError", "FileNotFoundError"))
                  or "Error:" in ln]
        messages.append(f"{errors[-1] if errors else lines[-1]} [{f}]")
    return messages


def _device_is_cuda(device: str) -> bool:
    from ..models.inference import resolve_device

    try:
        return resolve_device(device) == "cuda"
    except RuntimeError:
        return False


def _report(write, what: str) -> None:
    """Write a report; a failure is logged and never changes the exit code."""
    try:
        path = write()
        LOG.info("report: %s", path)
    except Exception as exc:  # noqa: BLE001 - reports must not fail a run
        LOG.error("could not write the report of %s: %s: %s", what, type(exc).__name__, exc)


def run_reports_only(opts) -> int:
    """``--reports-only``: regenerate the HTML reports from existing outputs."""
    from ..reports import write_reports

    bids_dir, output_dir, _ = check_paths(opts)
    labels = [f"sub-{p}" for p in opts.participant_label] if opts.participant_label else None
    paths = write_reports(output_dir, participant_ids=labels, bids_dir=bids_dir)
    print(f"brainage-bids: wrote {len(paths)} report(s)", file=sys.stderr)
    return EXIT_OK if paths else EXIT_NO_INPUT


def run_participant(opts) -> int:
    from ..utils.bids import collect_scans, load_filters
    from ..utils.provenance import new_run_id
    from ..utils.templates import FSL_TEMPLATE, TEMPLATE

    plugin = plugin_settings(opts)  # a bad --plugin-args is a usage error: report it before any work
    # Every input is checked before the output and work directories are created.
    bids_dir, output_dir, work_dir = check_paths(opts, create=False)
    scans = collect_scans(bids_dir, opts.participant_label, opts.session_label,
                          load_filters(opts.bids_filter_file), validate=not opts.skip_bids_validation,
                          modalities=opts.modalities)
    if opts.skull_strip == "hd-bet":  # before any directory is made
        from ..interfaces.skullstrip import HDBetNotInstalled, require_hdbet

        try:
            require_hdbet()
        except HDBetNotInstalled as exc:
            raise UsageError(str(exc), EXIT_USAGE) from exc
    models = [] if opts.preproc_only else resolve_models(opts)
    templates = required_templates(models)
    template = templates[TEMPLATE]
    lesion_masks = None
    if opts.lesion_masks:
        from ..utils.lesion_masks import match_lesion_masks

        lesion_dir = Path(opts.lesion_masks).resolve()  # not a folder: BIDSInputError (66)
        matched = match_lesion_masks(lesion_dir, scans, complete_selection=not (
            opts.participant_label or opts.session_label or opts.bids_filter_file))
        lesion_masks = {**matched.empty, **matched.by_scan}
        LOG.info("lesion masks: %d scan(s) filled, %d with an empty mask, %d without a mask",
                 len(matched.by_scan), len(matched.empty),
                 len(scans) - len(matched.by_scan) - len(matched.empty))
    create_dirs(output_dir, work_dir)
    run_id = new_run_id()
    log = start_run_log(opts, output_dir, work_dir, "participant", run_id)
    try:
        start_workers(opts)  # its imports overlap the building of the workflow
        return _participant(opts, log, scans, models, template, lesion_masks, plugin, bids_dir,
                            output_dir, work_dir, fsl_template=templates.get(FSL_TEMPLATE))
    finally:
        if _WORKERS_STARTED:  # started, but no workflow ran (e.g. a usage error)
            _WORKERS_STARTED.clear()
            _stop_forkserver()
        stop_run_log(log)


def _participant(opts, log, scans, models, template, lesion_masks, plugin, bids_dir, output_dir,
                 work_dir, fsl_template=None) -> int:
    import time

    from ..interfaces.ants import REGISTRATION_SEED
    from ..interfaces.skullstrip import (HDBetNotInstalled, cpu_cost_note, resolve_hd_bet_mode,
                                         resolve_method)
    from ..reports import write_participant_report
    from ..utils.bids import write_derivative_description
    from ..utils.provenance import participant_methods, sidecar_provenance, versions
    from ..workflows.outputs import add_sidecar_metadata, derivative_paths
    from ..workflows.participant import crash_dir, init_brainage_wf, models_for
    from ..workflows.predict import fsl_images

    started = time.monotonic()
    run_id = log.run_id
    for scan in scans:
        if scan.age is None and models:
            LOG.warning("%s: no age (%s); it is predicted and its brain_age_gap is n/a",
                        scan.relpath, scan.age_note or "none in sessions.tsv or participants.tsv")
    try:
        skull_strip = resolve_method(opts.skull_strip, opts.device)
    except HDBetNotInstalled as exc:
        raise UsageError(str(exc), EXIT_USAGE) from exc
    hd_bet_mode = resolve_hd_bet_mode(getattr(opts, "hd_bet_mode", None),
                                      _device_is_cuda(opts.device))
    if skull_strip == "hd-bet" and not _device_is_cuda(opts.device):
        LOG.warning(cpu_cost_note(hd_bet_mode))
    saliency = bool(models) and (opts.saliency if opts.saliency is not None
                                 else _device_is_cuda(opts.device))
    n_participants = len({s.subject for s in scans})
    PROGRESS.info("brainage-bids participant: %d scan(s) of %d participant(s); skull strip: %s; "
                  "run %s (log: %s)", len(scans), n_participants, skull_strip, run_id, log.dir)
    LOG.info("template: %s", template.source)
    if fsl_template is not None:
        LOG.info("template for the published models' recipes: %s %s", fsl_template.name,
                 fsl_template.source)
    tools = versions()
    paragraphs, refs = participant_methods(
        skull_strip=skull_strip, template=template.name, template_source=template.source,
        models=models, modalities=opts.modalities, omp_nthreads=opts.omp_nthreads,
        seed=REGISTRATION_SEED, lesion_filling=bool(lesion_masks),
        preproc_only=opts.preproc_only, tools=tools,
        fsl_images=fsl_images(models) if models else (),
        fsl_template_source=fsl_template.source if fsl_template is not None else None)
    log.write_boilerplate(paragraphs, refs)
    write_derivative_description(bids_dir, output_dir)
    wf = init_brainage_wf(
        scans=scans, output_dir=str(output_dir), work_dir=str(work_dir), run_id=run_id,
        template=str(template.brain), template_mask=str(template.mask), models=models,
        skull_strip=skull_strip, device=opts.device, omp_nthreads=opts.omp_nthreads,
        precision=opts.precision, saliency=saliency, lesion_masks=lesion_masks,
        hd_bet_mode=hd_bet_mode, fsl_template=fsl_template)
    add_sidecar_metadata(wf, sidecar_provenance(
        template=template.name, template_source=template.source, omp_nthreads=opts.omp_nthreads,
        seed=REGISTRATION_SEED, tools=tools))
    set_node_resources(wf)
    n_jobs, per_scan = scan_progress(wf, scans)
    progress = Progress(n_jobs, per_scan)
    code = run_workflow(wf, plugin, progress, opts, work_dir)
    if code is not None:
        return code
    failed = []
    for scan in scans:
        paths = derivative_paths(scan, str(output_dir))
        lesion = (lesion_masks or {}).get(scan.path)
        expected = [paths["preproc"], paths["mask"]] + (
            [paths["brainage"]] if models_for(scan, models) else []) + (
            [paths["filled"], paths["lesion"]] if lesion is not None and not lesion.empty
            else []) + [paths[k] for image in fsl_images(models_for(scan, models))
                        for k in ({"brain": ("fsl_brain", "fsl_mask"),
                                   "head": ("fsl_head",)}[image])]
        if not all(os.path.exists(p) for p in expected) or _stale(expected, run_id):
            failed.append(scan)
    failed_subjects = sorted({s.participant_id for s in failed})
    for pid in failed_subjects:
        msgs = crash_messages(crash_dir(str(output_dir), pid, run_id)) or ["no crash file written"]
        for m in msgs:
            LOG.error("%s failed: %s", pid, m)
    for pid in sorted({s.participant_id for s in scans}):
        _report(lambda: write_participant_report(output_dir, pid, run_id=run_id,
                                                 bids_dir=bids_dir), pid)
    n_ok = n_participants - len(failed_subjects)
    PROGRESS.info("brainage-bids participant: %d participant(s) completed, %d failed%s; %d of %d "
                  "scan(s) written in %.0f s; outputs in %s, log in %s", n_ok,
                  len(failed_subjects), f" ({', '.join(failed_subjects)})" if failed else "",
                  len(scans) - len(failed), len(scans), time.monotonic() - started, output_dir,
                  log.dir)
    return EXIT_PARTICIPANT_FAILED if failed else EXIT_OK


#: What the multiprocessing forkserver imports once, before it forks Nipype's workers: the run's
#: logging (utils.worker_logging, first) and what the nodes import (Nipype's engine, the
#: interfaces, PyTorch, deepbet, antspyx; several seconds), so that no worker pays for them
#: inside its first node. Importing starts no OpenMP pool (running PyTorch does), so forking
#: stays safe; a module that is not installed is skipped (multiprocessing ignores ImportError).
WORKER_PRELOAD = ["brainage_bids.utils.worker_logging", "nipype.pipeline.engine",
                  "brainage_bids.interfaces.bids", "brainage_bids.interfaces.skullstrip",
                  "brainage_bids.interfaces.ants", "brainage_bids.interfaces.predict",
                  "brainage_bids.interfaces.lesion_filling", "torch", "deepbet", "ants"]
_WORKERS_STARTED: list[bool] = []  # a forkserver started for this run by start_workers()


def start_workers(opts) -> None:
    """Start the forkserver of the MultiProc workers now (a fresh one, with this run's
    environment: its log file), so that its imports (:data:`WORKER_PRELOAD`) overlap the
    building of the workflow; :func:`run_workflow` then uses it. Nothing for other plugins."""
    if opts.plugin != "MultiProc":
        return
    import multiprocessing as mp
    from multiprocessing import forkserver

    _stop_forkserver()
    mp.set_forkserver_preload(WORKER_PRELOAD)
    os.environ["BRAINAGE_BIDS_FORKSERVER_PARENT"] = str(os.getpid())  # utils.worker_logging
    try:
        forkserver.ensure_running()
    except Exception as exc:  # noqa: BLE001 - run_workflow starts it on the first job instead
        LOG.debug("forkserver not started early: %s", exc)
        return
    _WORKERS_STARTED.append(True)


def run_workflow(wf, plugin: dict, progress: Progress, opts, work_dir) -> int | None:
    """Run ``wf`` with ``plugin``; None when it ran (failed nodes included), 128+signal when
    interrupted. The forkserver preloads utils.worker_logging, so the workers log to the run's
    file (and :data:`WORKER_PRELOAD`), and is stopped afterwards, so the next run's workers start
    from its settings; one :func:`start_workers` started for this run is used as it is.

    The objects alive before the run are frozen out of the garbage collector (``gc.freeze``)
    while it runs: Nipype calls ``gc.collect()`` before every submission and after every node
    it runs in this process, and with PyTorch, pandas and pybids loaded each full collection
    walks some 350,000 objects (0.1-0.6 s, over and over); what the run allocates is still
    collected."""
    import gc
    import multiprocessing as mp

    from nipype import config as ncfg

    poll = local_poll_seconds(opts.plugin)
    ncfg.set("execution", "poll_sleep_duration", poll)
    # the workflow's own config, copied from the global one when it was built, wins over it
    if isinstance(getattr(wf, "config", None), dict):
        wf.config.setdefault("execution", {})["poll_sleep_duration"] = poll
    plugin["plugin_args"].setdefault("status_callback", progress)
    if opts.plugin == "MultiProc" and not _WORKERS_STARTED:
        _stop_forkserver()
        mp.set_forkserver_preload(WORKER_PRELOAD)
        os.environ["BRAINAGE_BIDS_FORKSERVER_PARENT"] = str(os.getpid())
    _WORKERS_STARTED.clear()
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
    gc.collect()
    gc.freeze()
    try:
        wf.run(**plugin)
    except RuntimeError as exc:  # nipype raises once at the end when any node failed
        LOG.debug("workflow reported failures: %s", exc)
    except RunInterrupted as exc:
        for s in previous:  # a second signal during the shutdown must not interrupt it
            signal.signal(s, signal.SIG_IGN)
        shutdown_workers()
        running = sorted(progress.running)
        LOG.error("interrupted by %s after %d of %d steps; stopped: %s. Outputs already written "
                  "are complete; rerun the same command (same -w %s) to resume",
                  signal.Signals(exc.signum).name, progress.done, progress.total,
                  ", ".join(running) if running else "nothing was running", work_dir)
        return 128 + exc.signum
    finally:
        gc.unfreeze()
        for s, handler in previous.items():
            if signal.getsignal(s) in (_raise_interrupted, signal.SIG_IGN):
                signal.signal(s, handler)
    if opts.plugin == "MultiProc":
        _stop_forkserver()
    return None


def _stale(paths: list[str], run_id: str) -> bool:
    """True when an output predates this run (left over from an earlier one)."""
    started = datetime.strptime(run_id[:15], "%Y%m%d-%H%M%S").timestamp()
    return any(os.path.getmtime(p) < started - 1 for p in paths)


def run_group(opts) -> int:
    """Bias correction, accuracy, model comparison and clinical statistics (group/)."""
    from ..stats.group import run_group_analyses
    from ..stats.spec import load_spec

    spec = load_spec(opts.stats_spec)  # a bad spec is a usage error before any work
    if opts.bias_method:
        spec["bias"]["method"] = opts.bias_method
    fit_file = opts.bias_fit_file or spec["bias"]["fit_file"]
    if fit_file and not Path(fit_file).is_file():
        raise UsageError(f"--bias-fit-file not found: {fit_file}", EXIT_NO_INPUT)
    bids_dir, output_dir, _ = check_paths(opts)
    from ..utils.provenance import group_methods

    log = start_run_log(opts, output_dir, None, "group")
    try:
        log.write_boilerplate(*group_methods(bias_method=spec["bias"]["method"]))
        return _group(opts, spec, fit_file, bids_dir, output_dir, log)
    finally:
        stop_run_log(log)


def _group(opts, spec, fit_file, bids_dir, output_dir, log) -> int:
    from ..stats.group import run_group_analyses

    try:
        summary = run_group_analyses(bids_dir, output_dir, spec, bias_fit_file=fit_file)
    except (ValueError, KeyError) as exc:  # unreadable participant tables or clinical files
        raise UsageError(f"group level: {exc}", EXIT_DATA) from exc
    fitted = [f"{b['model']}/{b['suffix']}" for b in summary["bias"] if b["status"] == "fitted"]
    print(f"brainage-bids group: wrote {summary['brainage']}; bias correction "
          f"{'fitted for ' + ', '.join(fitted) if fitted else 'not fitted'}; "
          f"{len(summary['tables'])} table(s) in {Path(summary['brainage']).parent / 'stats'}, "
          f"{len(summary['skipped'])} analysis/analyses skipped (see stats/skipped.tsv); log in "
          f"{log.dir}", file=sys.stderr)
    from ..models.saliency import group_saliency
    from ..reports import write_group_report

    column = spec["columns"]["diagnosis"]
    _report(lambda: group_saliency(output_dir, bids_dir=bids_dir, group_column=column),
            "group saliency")
    _report(lambda: write_group_report(output_dir, bids_dir=bids_dir, group_column=column),
            "group")
    return EXIT_OK


def run_train(opts) -> int:
    from ..models.train import train_from_bids

    from ..utils.provenance import train_methods

    bids_dir, output_dir, work_dir = check_paths(opts)
    log = start_run_log(opts, output_dir, work_dir, "train")
    try:
        log.write_boilerplate(*train_methods(opts))
        card = train_from_bids(bids_dir, output_dir, work_dir, opts,
                               command=" ".join(["brainage-bids", *opts.argv]))
    finally:
        stop_run_log(log)
    if card["weights"] is None:
        print(f"brainage-bids train: trained {', '.join(card['members_trained'])} in {work_dir} "
              f"(no ensemble written: --members); log in {log.dir}", file=sys.stderr)
        return EXIT_OK
    print(f"brainage-bids train: wrote {card['weights']}; log in {log.dir}", file=sys.stderr)
    return EXIT_OK


def run_models_predict(opts) -> int:
    """``brainage-bids models predict``: one row per image on stdout."""
    from ..models import direct, zoo
    from ..models.inference import resolve_device

    prog = "brainage-bids models predict"
    try:
        direct.check_images(opts.images + (opts.mask or []))
        request = zoo.resolve_request(opts.model)
        device = resolve_device(opts.device)
        members = direct.load_request(request, device=device)
        rows = direct.predict_images(members, opts.images, name=request.name, masks=opts.mask,
                                     device=device, precision=opts.precision)
    except (zoo.ModelNotInstalled, FileNotFoundError) as exc:
        print(f"{prog}: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return EXIT_NO_INPUT
    except KeyError as exc:
        print(f"{prog}: {exc.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, RuntimeError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_DATA
    if opts.json:
        print(json.dumps(rows, indent=2))
    else:
        print("image\tmodel\tpredicted_age\tpredicted_age_sd")
        for r in rows:
            sd = "n/a" if r["predicted_age_sd"] is None else f"{r['predicted_age_sd']:.4f}"
            print(f"{r['image']}\t{r['model']}\t{r['predicted_age']:.4f}\t{sd}")
    return EXIT_OK


def run_models(argv: list[str]) -> int:
    """``brainage-bids models list | install | predict``."""
    from ..models import zoo
    from .parser import build_models_parser

    try:
        opts = build_models_parser().parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    if opts.command == "list":
        rows = zoo.listing()
        if opts.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'name':28} {'arch':9} {'modality':8} {'state':10} notes")
            for r in rows:
                print(f"{r['name']:28} {r['arch']:9} {r['modality']:8} {r['state']:10} {r['notes']}")
            print(f"\ncache: {zoo.cache_dir()} (set ${zoo.CACHE_ENV} to change it)")
        return EXIT_OK
    if opts.command == "predict":
        return run_models_predict(opts)
    try:
        dest = zoo.install(opts.name, opts.source, sha256=opts.sha256)
    except (KeyError, FileNotFoundError) as exc:
        print(f"brainage-bids models install: {exc.args[0]}", file=sys.stderr)
        return EXIT_NO_INPUT if isinstance(exc, FileNotFoundError) else EXIT_USAGE
    except (ValueError, RuntimeError) as exc:
        print(f"brainage-bids models install: {exc}", file=sys.stderr)
        return EXIT_DATA
    print(f"installed {opts.name} -> {dest}", file=sys.stderr)
    return EXIT_OK


def main(argv=None) -> int:
    from ..utils.bids import BIDSInputError

    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["models"]:
        return run_models(raw[1:])
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    opts.argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging(opts.verbose)
    runner = {"participant": run_participant, "group": run_group, "train": run_train}
    if opts.reports_only and opts.analysis_level != "train":
        runner = {opts.analysis_level: run_reports_only}
    try:
        return runner[opts.analysis_level](opts)
    except (UsageError, BIDSInputError) as exc:
        LOG.error("%s", exc)
        return exc.exit_code
    finally:
        release_locks()


if __name__ == "__main__":
    sys.exit(main())
