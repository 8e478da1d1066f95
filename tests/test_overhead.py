"""What keeps the participant level's overhead down (issue 17, point 7; the figures are
scripts/benchmark_participant.py's): no full garbage collection of the start-up's objects at
every Nipype step, the workers' imports in the forkserver, no unused whole-head N4 image."""
from __future__ import annotations

import gc
from types import SimpleNamespace

from brainage_bids.cli import run as cli_run
from brainage_bids.utils.templates import get_template
from brainage_bids.workflows.preproc import init_preproc_wf


def test_run_workflow_freezes_the_startup_objects(monkeypatch):
    seen = {}

    class FakeWorkflow:
        def run(self, **plugin):
            seen["frozen"] = gc.get_freeze_count()

    opts = SimpleNamespace(plugin="Linear")
    before = gc.get_freeze_count()
    code = cli_run.run_workflow(FakeWorkflow(), {"plugin": "Linear", "plugin_args": {}},
                                cli_run.Progress(0), opts, "/nonexistent")
    assert code is None
    assert seen["frozen"] > 0, "gc.freeze() before the workflow runs"
    assert gc.get_freeze_count() == before, "and gc.unfreeze() after it"


def test_local_runs_poll_the_scheduler_every_50_ms(tmp_path):
    """A workflow built before the run keeps Nipype's 2 s poll in its own config, which wins over
    the global one: each of a chain of quick nodes then waited up to 2 s."""
    import time

    from nipype import Node, Workflow
    from nipype.interfaces.utility import Function

    def passthrough(x):
        return x

    from nipype import config as ncfg

    saved = ncfg.get("execution", "poll_sleep_duration")
    ncfg.set("execution", "poll_sleep_duration", "2")  # as in a fresh process
    try:
        wf = Workflow(name="chain", base_dir=str(tmp_path))
    finally:
        ncfg.set("execution", "poll_sleep_duration", saved)
    nodes = [Node(Function(input_names=["x"], output_names=["x"], function=passthrough),
                  name=f"n{i}") for i in range(4)]
    nodes[0].inputs.x = 1
    for a, b in zip(nodes, nodes[1:]):
        wf.connect(a, "x", b, "x")
    assert wf.config["execution"]["poll_sleep_duration"] == "2"  # Nipype's default, copied
    opts = SimpleNamespace(plugin="MultiProc")
    t0 = time.time()
    cli_run.run_workflow(wf, {"plugin": "MultiProc", "plugin_args": {"n_procs": 1}},
                         cli_run.Progress(0), opts, str(tmp_path))
    assert wf.config["execution"]["poll_sleep_duration"] == "0.05"
    assert time.time() - t0 < 6, "four chained nodes must not wait 2 s each"


def test_worker_preload_starts_with_the_run_log():
    assert cli_run.WORKER_PRELOAD[0] == "brainage_bids.utils.worker_logging"
    assert {"torch", "deepbet", "ants", "brainage_bids.interfaces.skullstrip"} <= set(
        cli_run.WORKER_PRELOAD)


def test_start_workers_only_for_multiproc():
    cli_run._WORKERS_STARTED.clear()
    cli_run.start_workers(SimpleNamespace(plugin="Linear"))
    assert not cli_run._WORKERS_STARTED


def test_n4_writes_the_whole_head_only_when_read():
    template = get_template()
    for head in (False, True):
        wf = init_preproc_wf(template=str(template.brain), template_mask=str(template.mask),
                             head=head)
        assert wf.get_node("n4").inputs.write_head is head


def test_templateflow_files_found_by_name_without_indexing(tmp_path):
    from brainage_bids.utils import templates as T

    folder = tmp_path / "tpl-X"
    folder.mkdir()
    (folder / "tpl-X_res-01_T1w.nii.gz").write_bytes(b"fetched")
    (folder / "tpl-X_res-01_desc-brain_mask.nii.gz").write_bytes(b"")  # a stub, not fetched
    assert T._direct(tmp_path, "X", "T1w", None) == (True, folder / "tpl-X_res-01_T1w.nii.gz")
    assert T._direct(tmp_path, "X", "mask", "brain") == (True, None)
    assert T._direct(tmp_path, "X", "T1w", "brain") == (True, None)  # absent, no cohorts
    (folder / "cohort-1").mkdir()
    assert T._direct(tmp_path, "X", "T1w", "brain") is None  # the client must look
    (folder / "tpl-X_res-1_T1w.nii.gz").write_bytes(b"x")
    assert T._direct(tmp_path, "X", "T1w", None) is None  # two names: the client decides


def test_forkserver_exits_without_tearing_down_its_imports():
    """utils.worker_logging registers os._exit only in the forkserver (a child of the process
    named in BRAINAGE_BIDS_FORKSERVER_PARENT); in a subprocess, as its import sets up logging."""
    import os
    import subprocess
    import sys

    code = ("import atexit, os; seen = []; atexit.register = lambda *a: seen.append(a); "
            "import brainage_bids.utils.worker_logging; print((os._exit, 0) in seen)")
    for parent, expected in ((os.getpid(), "True"), (0, "False")):
        env = dict(os.environ, BRAINAGE_BIDS_FORKSERVER_PARENT=str(parent))
        env.pop("BRAINAGE_BIDS_LOG_FILE", None)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=120)
        assert out.stdout.strip() == expected, out.stderr
