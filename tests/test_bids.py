"""BIDS indexing, per-scan age and sex, filters, derivative naming and description."""
from __future__ import annotations

import csv
import json
import logging
import shutil

import pytest

from brainage_bids import __version__
from brainage_bids.utils.bids import (
    BIDSInputError,
    collect_scans,
    load_filters,
    write_derivative_description,
)
from brainage_bids.workflows.outputs import derivative_paths

from conftest import listing, write_tsv


def _read_tsv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_collect_synthetic(synthetic_bids):
    scans = collect_scans(synthetic_bids)
    by_rel = {s.relpath: s for s in scans}
    assert sorted(by_rel) == [
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-02/anat/sub-02_T1w.nii.gz",
        "sub-03/anat/sub-03_T1w.nii.gz",
        "sub-04/ses-A/anat/sub-04_ses-A_T1w.nii.gz",
        "sub-04/ses-B/anat/sub-04_ses-B_T1w.nii.gz",
    ]
    participants = {r["participant_id"]: r for r in _read_tsv(synthetic_bids / "participants.tsv")}
    for s in scans:
        assert s.path == str(synthetic_bids / s.relpath)
        assert s.suffix == "T1w"
        assert s.participant_id == f"sub-{s.subject}"
        assert s.sex == participants[s.participant_id]["sex"]
    s1 = by_rel["sub-01/anat/sub-01_T1w.nii.gz"]
    assert s1.age == float(participants["sub-01"]["age"])
    assert s1.session is None and s1.session_id is None
    assert s1.prefix == "sub-01" and s1.anat_dir == "sub-01/anat"
    assert by_rel["sub-02/anat/sub-02_T1w.nii.gz"].age == float(participants["sub-02"]["age"])


def test_participant_without_age(synthetic_bids):
    (scan,) = collect_scans(synthetic_bids, participant_labels=["03"])
    assert scan.age is None
    assert scan.sex == "F"


def test_session_age_and_fallback(synthetic_bids):
    scans = {s.session: s for s in collect_scans(synthetic_bids, participant_labels=["sub-04"])}
    sessions = {r["session_id"]: r["age"] for r in _read_tsv(
        synthetic_bids / "sub-04" / "sub-04_sessions.tsv")}
    participants = {r["participant_id"]: r for r in _read_tsv(synthetic_bids / "participants.tsv")}
    # ses-A: sessions.tsv has an age, which wins over participants.tsv
    assert scans["A"].age == float(sessions["ses-A"])
    assert scans["A"].age != float(participants["sub-04"]["age"])
    # ses-B: n/a in sessions.tsv and no days_since_baseline: n/a, not the participants.tsv age
    assert sessions["ses-B"] == "n/a"
    assert scans["B"].age is None and "sub-04_sessions.tsv" in scans["B"].age_note
    assert scans["A"].session_id == "ses-A"
    assert scans["A"].prefix == "sub-04_ses-A"
    assert scans["A"].anat_dir == "sub-04/ses-A/anat"


def test_sessions_tsv_without_age_column(make_dataset):
    bids = make_dataset({"01": {"age": 40.0, "sessions": {"1": 41.0}}})
    (bids / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tacq_time\nses-1\t2020-01-01\n")
    (scan,) = collect_scans(bids)
    assert scan.age == 40.0


def test_session_labels(synthetic_bids):
    scans = collect_scans(synthetic_bids, session_labels=["ses-B"])
    assert [s.relpath for s in scans] == ["sub-04/ses-B/anat/sub-04_ses-B_T1w.nii.gz"]


def test_longitudinal_ms_dataset(shared_data):
    root = shared_data("ms-lesjak2016-longitudinal")
    scans = collect_scans(root)
    expected = sorted(p.relative_to(root).as_posix() for p in root.glob("sub-*/ses-*/anat/*_T1w.nii*"))
    assert sorted(s.relpath for s in scans) == expected
    participants = {r["participant_id"]: r for r in _read_tsv(root / "participants.tsv")}
    for s in scans:
        assert s.session is not None
        sessions_tsv = root / s.participant_id / f"{s.participant_id}_sessions.tsv"
        ses_age = None
        if sessions_tsv.exists():
            rows = {r["session_id"]: r for r in _read_tsv(sessions_tsv)}
            value = rows.get(s.session_id, {}).get("age", "n/a")
            ses_age = None if value in ("", "n/a") else float(value)
        assert ses_age is not None  # every session of this dataset has its age in sessions.tsv
        assert s.age == pytest.approx(ses_age)
        assert s.sex == participants[s.participant_id]["sex"]
    # a concrete value: sub-patient01 ses-2 is 20.56 in its sessions.tsv (participants.tsv says 20)
    (s,) = [s for s in scans if s.subject == "patient01" and s.session == "2"]
    assert s.age == 20.56
    assert participants["sub-patient01"]["age"] == "20"
    assert s.prefix == "sub-patient01_ses-2"


def test_participant_with_flair_only_matches_nothing(shared_data):
    root = shared_data("ms-lesjak2016-longitudinal")
    if list(root.glob("sub-patient09/ses-*/anat/*_T1w.nii*")):
        pytest.skip("sub-patient09 has a T1w here")
    with pytest.raises(BIDSInputError) as exc:
        collect_scans(root, participant_labels=["patient09"])
    assert exc.value.exit_code == 18


def test_absent_participant(synthetic_bids):
    with pytest.raises(BIDSInputError) as exc:
        collect_scans(synthetic_bids, participant_labels=["01", "zz"])
    assert exc.value.exit_code == 66
    assert "zz" in str(exc.value)


def test_empty_dataset(tmp_path):
    (tmp_path / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    with pytest.raises(BIDSInputError) as exc:
        collect_scans(tmp_path)
    assert exc.value.exit_code == 66


def test_validation(make_dataset):
    bids = make_dataset()
    extra = bids / "sub-02" / "anat" / "T1.nii.gz"
    shutil.copy(bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz", extra)
    with pytest.raises(BIDSInputError) as exc:
        collect_scans(bids)
    assert exc.value.exit_code == 16
    assert "/sub-02/anat/T1.nii.gz" in str(exc.value)
    assert len(collect_scans(bids, validate=False)) == 2


def test_filter_file_narrows_query(make_dataset, tmp_path):
    bids = make_dataset({"01": {"age": 30}, "02": {"age": 40}})
    anat = bids / "sub-01" / "anat"
    shutil.copy(anat / "sub-01_T1w.nii.gz", anat / "sub-01_acq-mprage_run-01_T1w.nii.gz")
    assert len(collect_scans(bids)) == 3

    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"t1w": {"acquisition": "mprage"}}))
    filters = load_filters(str(filt))
    assert filters["t1w"]["suffix"] == "T1w" and filters["t1w"]["acquisition"] == "mprage"
    (scan,) = collect_scans(bids, filters=filters)
    assert scan.relpath == "sub-01/anat/sub-01_acq-mprage_run-01_T1w.nii.gz"
    assert scan.prefix == "sub-01_acq-mprage_run-01"
    assert scan.entities == (("sub", "01"), ("acq", "mprage"), ("run", "01"))

    # pybids' null: images without an acq entity only
    filt.write_text(json.dumps({"t1w": {"acquisition": None}}))
    scans = collect_scans(bids, filters=load_filters(str(filt)))
    assert sorted(s.relpath for s in scans) == ["sub-01/anat/sub-01_T1w.nii.gz",
                                                "sub-02/anat/sub-02_T1w.nii.gz"]

    filt.write_text(json.dumps({"t1w": {"subject": "02"}}))
    # the participant selection is applied on top of the filter file
    scans = collect_scans(bids, filters=load_filters(str(filt)))
    assert [s.subject for s in scans] == ["02"]
    with pytest.raises(BIDSInputError) as exc:
        collect_scans(bids, participant_labels=["01"], filters=load_filters(str(filt)))
    assert exc.value.exit_code == 18

    filt.write_text(json.dumps({"t1w": {"acquisition": "none-such"}}))
    with pytest.raises(BIDSInputError) as exc:
        collect_scans(bids, filters=load_filters(str(filt)))
    assert exc.value.exit_code == 18


def test_load_filters_errors(tmp_path):
    assert load_filters(None)["t1w"]["suffix"] == "T1w"
    f = tmp_path / "f.json"
    f.write_text(json.dumps({"bold": {"task": "rest"}}))
    with pytest.raises(BIDSInputError) as exc:
        load_filters(str(f))
    assert exc.value.exit_code == 64 and "bold" in str(exc.value)
    with pytest.raises(BIDSInputError) as exc:
        load_filters(str(tmp_path / "absent.json"))
    assert exc.value.exit_code == 64


def test_derivative_paths(synthetic_bids, tmp_path):
    scans = {s.relpath: s for s in collect_scans(synthetic_bids)}
    s = scans["sub-04/ses-A/anat/sub-04_ses-A_T1w.nii.gz"]
    paths = derivative_paths(s, str(tmp_path))
    base = tmp_path / "sub-04" / "ses-A" / "anat"
    assert paths == {
        "preproc": str(base / "sub-04_ses-A_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz"),
        "mask": str(base / "sub-04_ses-A_space-MNI152NLin2009aSym_desc-brain_mask.nii.gz"),
        "brainage": str(base / "sub-04_ses-A_desc-brainage_T1w.tsv"),
        "distribution": str(base / "sub-04_ses-A_desc-agedist_T1w.tsv"),
        "filled": str(base / "sub-04_ses-A_space-MNI152NLin2009aSym_desc-lesionfilled_T1w.nii.gz"),
        "lesion": str(base / "sub-04_ses-A_space-MNI152NLin2009aSym_desc-lesion_mask.nii.gz"),
        "saliency": str(base / "sub-04_ses-A_space-MNI152NLin2009aSym_desc-saliency_T1w.nii.gz"),
        # the publishers' recipes, apart in MNI152NLin6Asym: the brain and the whole head
        "fsl_brain": str(base / "sub-04_ses-A_space-MNI152NLin6Asym_desc-preproc_T1w.nii.gz"),
        "fsl_mask": str(base / "sub-04_ses-A_space-MNI152NLin6Asym_desc-brain_mask.nii.gz"),
        "fsl_head": str(base / "sub-04_ses-A_space-MNI152NLin6Asym_desc-head_T1w.nii.gz"),
    }


def test_collect_flair_and_t1w(make_dataset, tmp_path):
    """--modalities selects FLAIR and T1w scans; the filter file has a "flair" query."""
    import shutil

    bids = make_dataset()
    anat = bids / "sub-01" / "anat"
    shutil.copy(anat / "sub-01_T1w.nii.gz", anat / "sub-01_FLAIR.nii.gz")
    both = collect_scans(bids, participant_labels=["01"], modalities=("T1w", "FLAIR"))
    assert sorted(s.suffix for s in both) == ["FLAIR", "T1w"]
    flair = collect_scans(bids, modalities=("FLAIR",))
    assert [s.relpath for s in flair] == ["sub-01/anat/sub-01_FLAIR.nii.gz"]
    f = tmp_path / "filters.json"
    f.write_text(json.dumps({"flair": {"acquisition": "none"}}))
    with pytest.raises(BIDSInputError) as err:
        collect_scans(bids, filters=load_filters(str(f)), modalities=("FLAIR",))
    assert err.value.exit_code == 18
    f.write_text(json.dumps({"dwi": {}}))
    with pytest.raises(BIDSInputError, match="unknown query 'dwi'"):
        load_filters(str(f))


def test_write_derivative_description(make_dataset, tmp_path):
    bids = make_dataset()
    desc = json.loads((bids / "dataset_description.json").read_text())
    desc["DatasetDOI"] = "10.0000/example"
    (bids / "dataset_description.json").write_text(json.dumps(desc))
    before = listing(bids)
    out = tmp_path / "derivatives"
    write_derivative_description(bids, out)
    d = json.loads((out / "dataset_description.json").read_text())
    assert d["DatasetType"] == "derivative"
    assert d["BIDSVersion"]
    assert d["Name"]
    assert d["GeneratedBy"][0]["Name"] == "brainage-bids"
    assert d["GeneratedBy"][0]["Version"] == __version__
    assert d["SourceDatasets"][0]["URL"] == bids.resolve().as_uri()
    assert d["SourceDatasets"][0]["DOI"] == "10.0000/example"
    assert (out / ".bidsignore").exists()
    assert listing(bids) == before
    # idempotent, and no temporary files left
    write_derivative_description(bids, out)
    assert sorted(p.name for p in out.iterdir()) == [".bidsignore", "dataset_description.json"]


# ---------------------------------------------------------------------------------------------
# demographics (issue 16)
def _ages_dataset(make_dataset, ages: list, sexes=None):
    bids = make_dataset({f"{i:02d}": {"age": 30, "sex": "F"} for i in range(1, len(ages) + 1)})
    sexes = sexes or ["F"] * len(ages)
    write_tsv(bids / "participants.tsv", ["participant_id", "age", "sex"],
              [[f"sub-{i:02d}", a, x] for i, (a, x) in enumerate(zip(ages, sexes), 1)])
    return bids


def test_ages_parsed_or_refused_with_file_line_and_value(make_dataset, caplog):
    bids = _ages_dataset(make_dataset, ["40.5", "45Y", "forty", "-5", "300", "89+", "018M"])
    with caplog.at_level(logging.WARNING):
        scans = {s.subject: s for s in collect_scans(bids)}
    f = bids / "participants.tsv"
    assert scans["01"].age == 40.5 and scans["01"].age_note is None
    assert scans["02"].age == 45.0  # a DICOM age string, read with a warning naming it
    assert f"{f} line 3 (sub-02): age '45Y' read as 45 years" in caplog.text
    assert scans["07"].age == 1.5
    for label, line, why in [("03", 4, "age 'forty' is not a number of years"),
                             ("04", 5, "age '-5' is outside 0-120 years"),
                             ("05", 6, "age '300' is outside 0-120 years"),
                             ("06", 7, "age '89+' is censored")]:
        assert scans[label].age is None
        assert scans[label].age_note.startswith(f"{f} line {line} (sub-{label}): {why}")


def test_duplicate_participant_rows(make_dataset, caplog):
    bids = make_dataset({"01": {"age": 30}, "02": {"age": 30}})
    write_tsv(bids / "participants.tsv", ["participant_id", "age", "sex"],
              [["sub-01", 40, "F"], ["sub-02", 55, "M"], ["sub-01", 70, "M"], ["sub-02", 55, "M"]])
    with caplog.at_level(logging.WARNING):
        scans = {s.subject: s for s in collect_scans(bids)}
    # identical rows: one kept, with a warning
    assert scans["02"].age == 55.0 and scans["02"].sex == "M"
    assert "sub-02 is on lines 3, 5 (identical rows); one is kept" in caplog.text
    # conflicting rows: the conflicting values are n/a and the warning names lines and values
    assert scans["01"].age is None and scans["01"].sex is None
    assert "sub-01 is on lines 2, 4 with conflicting values (age 40, 70; sex F, M)" in caplog.text


def test_session_ages_rules(make_dataset):
    bids = make_dataset({"01": {"age": 40.0, "sessions": {"1": None, "2": None, "3": None}},
                         "02": {"age": 60.0, "sessions": {"1": None, "2": None}},
                         "03": {"age": 30.0, "sessions": {"a": None, "b": None}},
                         "04": {"age": 50.0, "sessions": {"1": None}}})
    # sub-01: ses-1 has an age, ses-2 only days since baseline, ses-3 is not in sessions.tsv
    write_tsv(bids / "sub-01" / "sub-01_sessions.tsv", ["session_id", "age", "days_since_baseline"],
              [["ses-1", 40.0, 0], ["ses-2", None, 730.5]])
    # sub-02: days since baseline only: participants.tsv age is the age at day 0
    write_tsv(bids / "sub-02" / "sub-02_sessions.tsv", ["session_id", "days_since_baseline"],
              [["ses-1", 0], ["ses-2", 365.25]])
    # sub-03: acq_time, one session with an age
    write_tsv(bids / "sub-03" / "sub-03_sessions.tsv", ["session_id", "age", "acq_time"],
              [["ses-a", 30.0, "2020-01-01T10:00:00"], ["ses-b", None, "2021-01-01T10:00:00"]])
    # sub-04: one session whose sessions.tsv has no age: the participants.tsv age applies
    (bids / "sub-04" / "sub-04_sessions.tsv").write_text("session_id\tacq_time\nses-1\tn/a\n")
    scans = {(s.subject, s.session): s for s in collect_scans(bids)}
    assert scans[("01", "1")].age == 40.0
    assert scans[("01", "2")].age == pytest.approx(42.0)
    assert scans[("01", "3")].age is None
    assert "ses-3 is not in" in scans[("01", "3")].age_note
    assert "participants.tsv age is not used" in scans[("01", "3")].age_note
    assert scans[("02", "1")].age == 60.0 and scans[("02", "2")].age == pytest.approx(61.0)
    assert scans[("03", "b")].age == pytest.approx(30.0 + 366 / 365.25)
    assert scans[("04", "1")].age == 50.0
