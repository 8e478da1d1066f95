"""SIGTERM/SIGINT of a participant run: workers, forkserver and resource tracker are shut down,
the message says what was interrupted, the exit code is 128 + the signal (issue 16)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_bids


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_run_and_its_workers(tmp_path, random_model, signum):
    bids, out, work = tmp_path / "bids", tmp_path / "out", tmp_path / "work"
    make_bids(bids, {"01": {"age": 40.0}, "02": {"age": 50.0}})
    proc = subprocess.Popen(
        [sys.executable, "-m", "brainage_bids.cli.run", str(bids), str(out), "participant",
         "--model", str(random_model), "--skull-strip", "none", "--nprocs", "2",
         "--omp-nthreads", "1", "-w", str(work), "-v"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        # wait until a worker runs a node (nipype writes its _node.pklz into the work dir)
        while time.time() < deadline and not list(work.glob("brainage_wf/**/_node.pklz")):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        time.sleep(2)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum, err[-3000:]
    name = signal.Signals(signum).name
    assert f"interrupted by {name} after" in err and "to resume" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    # nothing of the run's session is left: workers, forkserver and resource tracker are gone
    for _ in range(20):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        left = subprocess.run(["ps", "-o", "pid,args", "--no-headers", "-s", str(proc.pid)],
                              capture_output=True, text=True).stdout
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"processes left after {name}:\n{left}")
