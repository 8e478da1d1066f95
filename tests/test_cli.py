"""Exit codes of the command line (DESIGN.md, draft BIDS execution spec).

Every case here fails (or is stopped) before a workflow is built, so these tests are fast.
"""
from __future__ import annotations

import json
import logging

import pytest

from brainage_bids import __version__
from brainage_bids.cli import parser as P
from brainage_bids.cli.run import main

from conftest import listing


def _run(argv, tmp_path):
    """main() with a private work dir; returns the exit code."""
    return main([str(a) for a in argv] + ["-w", str(tmp_path / "work")])


def test_exit_code_constants_follow_design():
    assert (P.EXIT_OK, P.EXIT_PARTICIPANT_FAILED, P.EXIT_VALIDATION, P.EXIT_UNKNOWN_LEVEL,
            P.EXIT_NO_MATCH, P.EXIT_USAGE, P.EXIT_DATA, P.EXIT_NO_INPUT,
            P.EXIT_CANT_CREATE) == (0, 1, 16, 17, 18, 64, 65, 66, 73)


def test_unknown_level(synthetic_bids, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run([synthetic_bids, out, "subject"], tmp_path) == 17
    assert "unknown analysis level" in capsys.readouterr().err
    assert not out.exists()


def test_output_inside_bids_dir(make_dataset, tmp_path, random_model):
    bids = make_dataset()
    before = listing(bids)
    code = main([str(bids), str(bids / "derivatives" / "brainage"), "participant",
                 "--model", str(random_model), "-w", str(tmp_path / "work")])
    assert code == 64
    assert listing(bids) == before


def test_work_dir_inside_bids_dir(make_dataset, tmp_path, random_model):
    bids = make_dataset()
    before = listing(bids)
    code = main([str(bids), str(tmp_path / "out"), "participant", "--model", str(random_model),
                 "-w", str(bids / "work")])
    assert code == 64
    assert listing(bids) == before


def test_output_dir_that_cannot_be_created(synthetic_bids, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    assert _run([synthetic_bids, blocker / "out", "participant"], tmp_path) == 73


def test_bids_dir_missing(tmp_path):
    assert _run([tmp_path / "no_such_dataset", tmp_path / "out", "participant"], tmp_path) == 66


def test_absent_participant(synthetic_bids, tmp_path, random_model, caplog):
    with caplog.at_level(logging.ERROR, logger="brainage_bids"):
        code = _run([synthetic_bids, tmp_path / "out", "participant", "--participant-label",
                     "sub-01", "99", "--model", random_model], tmp_path)
    assert code == 66
    assert "99" in caplog.text


def test_filter_matching_nothing(synthetic_bids, tmp_path, random_model):
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"t1w": {"acquisition": "doesnotexist"}}))
    code = _run([synthetic_bids, tmp_path / "out", "participant", "--bids-filter-file", filt,
                 "--model", random_model], tmp_path)
    assert code == 18


def test_session_label_matching_nothing(synthetic_bids, tmp_path, random_model):
    code = _run([synthetic_bids, tmp_path / "out", "participant", "--session-label", "Z",
                 "--model", random_model], tmp_path)
    assert code == 18


def test_unreadable_filter_file(synthetic_bids, tmp_path):
    filt = tmp_path / "filter.json"
    filt.write_text("{not json")
    assert _run([synthetic_bids, tmp_path / "out", "participant", "--bids-filter-file", filt],
                tmp_path) == 64


def test_invalid_bids_names(make_dataset, tmp_path, caplog):
    bids = make_dataset()
    bad = bids / "sub-01" / "anat" / "sub-01_T1weighted.nii.gz"
    bad.write_bytes((bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz").read_bytes())
    with caplog.at_level(logging.ERROR, logger="brainage_bids"):
        code = _run([bids, tmp_path / "out", "participant"], tmp_path)
    assert code == 16
    assert "sub-01_T1weighted.nii.gz" in caplog.text

    # With --skip-bids-validation the dataset is accepted: the run gets past indexing and stops
    # at the next check (here a missing model file, 66), not at validation.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="brainage_bids"):
        code = _run([bids, tmp_path / "out", "participant", "--skip-bids-validation",
                     "--model", tmp_path / "missing.pt"], tmp_path)
    assert code == 66
    assert "missing.pt: neither a zoo model" in caplog.text
    assert "BIDS validation failed" not in caplog.text


def test_missing_dataset_description(make_dataset, tmp_path):
    bids = make_dataset()
    (bids / "dataset_description.json").unlink()
    assert _run([bids, tmp_path / "out", "participant"], tmp_path) == 16


@pytest.mark.parametrize("extra", [["--no-such-option"], ["--nprocs", "0"], ["--nprocs", "two"],
                                   ["--omp-nthreads", "0"], ["--skull-strip", "bet"],
                                   ["--plugin-args", "{not json"]])
def test_usage_errors(synthetic_bids, tmp_path, extra):
    out = tmp_path / "out"
    assert main([str(synthetic_bids), str(out), "participant", *extra,
                 "-w", str(tmp_path / "work")]) == 64


def test_missing_positional_arguments(tmp_path):
    assert main([str(tmp_path)]) == 64


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code in (0, None)
    captured = capsys.readouterr()
    assert __version__ in captured.out + captured.err
    assert "brainage-bids" in captured.out + captured.err


def test_group_without_participant_outputs(synthetic_bids, tmp_path):
    assert _run([synthetic_bids, tmp_path / "out", "group"], tmp_path) == 66


def test_progress_callback_counts_finished_and_failed_nodes(caplog):
    import logging
    from types import SimpleNamespace

    from brainage_bids.cli.run import Progress

    progress = Progress(3)
    with caplog.at_level(logging.INFO, logger="brainage_bids"):
        progress(SimpleNamespace(fullname="brainage_wf.a"), "start")
        progress(SimpleNamespace(fullname="brainage_wf.a"), "end")
        progress(SimpleNamespace(fullname="brainage_wf.b"), "exception")
    assert progress.done == 2
    assert "[1/3] a" in caplog.text and "[2/3] FAILED brainage_wf.b" in caplog.text


# ---------------------------------------------------------------------------------------------
# one-line errors before anything is written (issue 16)
def _one_line_error(caplog, *needles):
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    msg = errors[0].getMessage()
    assert "\n" not in msg and "Traceback" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_non_utf8_participants_tsv(make_dataset, tmp_path, random_model, caplog):
    bids = make_dataset()
    f = bids / "participants.tsv"
    f.write_bytes(f.read_bytes().replace(b"F", b"\xff", 1))
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        code = _run([bids, out, "participant", "--model", random_model], tmp_path)
    assert code == 65
    _one_line_error(caplog, str(f), "not UTF-8")
    assert not out.exists()


def test_model_file_that_is_plain_text(synthetic_bids, tmp_path, caplog):
    notes = tmp_path / "notes.pt"
    notes.write_text("these are my notes, not a checkpoint\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        code = _run([synthetic_bids, out, "participant", "--model", notes], tmp_path)
    assert code == 65
    _one_line_error(caplog, str(notes))
    assert not out.exists()


@pytest.mark.parametrize("args", ['{"n_procs": "lots"}', '{"n_procs": 0}',
                                  '{"memory_gb": "much"}'])
def test_plugin_args_with_bad_values(synthetic_bids, tmp_path, random_model, caplog, args):
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        code = _run([synthetic_bids, out, "participant", "--model", random_model,
                     "--plugin-args", args], tmp_path)
    assert code == 64
    _one_line_error(caplog, "--plugin-args", args.split('"')[1])
    assert not out.exists()


def test_default_work_dir_is_unique_per_output_dir(tmp_path):
    from brainage_bids.cli.run import default_work_dir

    a, b = default_work_dir(tmp_path / "out-a"), default_work_dir(tmp_path / "out-b")
    assert a != b and a == default_work_dir(tmp_path / "out-a")
    assert a == tmp_path / "out-a" / "work"  # inside the output's scope (issue 17)


def test_second_run_on_a_locked_output_dir(synthetic_bids, tmp_path, random_model, caplog):
    """Another run holding OUT's lock: a one-line error, exit 73, nothing written."""
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".brainage-bids.lock", "a+") as held:  # the name documented in the README
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = listing(out)
        with caplog.at_level(logging.ERROR):
            code = _run([synthetic_bids, out, "participant", "--model", random_model], tmp_path)
        assert code == 73
        _one_line_error(caplog, f"another run is using {out}")
        assert listing(out) == before
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert _run([synthetic_bids, out, "group"], tmp_path) == 73
        _one_line_error(caplog, "another run is using")
    # the lock is released with its holder: the next run gets past it (to "no tables", 66)
    assert _run([synthetic_bids, out, "group"], tmp_path) == 66
