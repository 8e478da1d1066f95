"""The participant workflow graph, built but not run."""
from __future__ import annotations

import pytest
from nipype.interfaces.base import isdefined
from nipype.interfaces.utility import IdentityInterface

from brainage_bids.interfaces.bids import DerivativesSink
from brainage_bids.models.zoo import resolve_request
from brainage_bids.utils.bids import collect_scans
from brainage_bids.utils.templates import get_template
from brainage_bids.workflows.outputs import derivative_paths
from brainage_bids.workflows.participant import crash_dir, init_brainage_wf
from brainage_bids.workflows.predict import init_predict_wf
from brainage_bids.workflows.preproc import init_preproc_wf

RUN_ID = "20240101-120000_abcdef12"


@pytest.fixture(scope="module")
def template():
    return get_template()


@pytest.fixture(scope="module")
def scans(synthetic_bids):
    scans = collect_scans(synthetic_bids, participant_labels=["01", "03"])
    assert len(scans) == 2
    return scans


def _build(scans, tmp_path, template, model_file):
    models = None if model_file is None else [resolve_request(str(model_file))]
    return init_brainage_wf(
        scans=scans, output_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"),
        run_id=RUN_ID, template=str(template.brain), template_mask=str(template.mask),
        models=models, skull_strip="deepbet", device="cpu", omp_nthreads=1)


def _flat(wf):
    graph = wf._create_flat_graph()
    nodes = {n.fullname: n for n in graph.nodes()}
    edges = {(u.fullname, v.fullname): d["connect"] for u, v, d in graph.edges(data=True)}
    return nodes, edges


def _scan_prefix(scan):
    return f"brainage_wf.single_subject_{scan.subject}_wf.scan_sub_{scan.subject}_T1w"


def test_participant_graph(scans, tmp_path, template, random_model):
    wf = _build(scans, tmp_path, template, random_model)
    assert wf.name == "brainage_wf"
    assert wf.base_dir == str(tmp_path / "work")
    nodes, edges = _flat(wf)
    out = tmp_path / "out"

    for scan in scans:
        p = _scan_prefix(scan)
        expected = {f"{p}.preproc_wf.{n}" for n in
                    ("inputnode", "validate", "skull_strip", "n4", "register", "outputnode")}
        expected |= {f"{p}.predict_wf.{n}" for n in ("inputnode", "predict", "outputnode")}
        expected |= {f"{p}.ds_preproc_wf.{n}" for n in ("inputnode", "ds_preproc", "ds_mask")}
        expected |= {f"{p}.ds_brainage_wf.{n}" for n in ("inputnode", "ds_brainage",
                                                         "ds_distribution")}
        assert expected == {n for n in nodes if n.startswith(p + ".")}

        # the pipeline order, and what flows along it
        chain = [("preproc_wf.inputnode", "preproc_wf.validate", ("in_file", "in_file")),
                 ("preproc_wf.validate", "preproc_wf.skull_strip", ("out_file", "in_file")),
                 ("preproc_wf.skull_strip", "preproc_wf.n4", ("out_file", "in_file")),
                 ("preproc_wf.skull_strip", "preproc_wf.n4", ("out_mask", "mask_file")),
                 ("preproc_wf.n4", "preproc_wf.register", ("out_file", "in_file")),
                 ("preproc_wf.skull_strip", "preproc_wf.register", ("out_mask", "mask_file")),
                 ("preproc_wf.register", "preproc_wf.outputnode", ("out_file", "preproc")),
                 ("preproc_wf.outputnode", "predict_wf.inputnode", ("preproc", "preproc")),
                 ("preproc_wf.outputnode", "predict_wf.inputnode", ("mask", "mask")),
                 ("predict_wf.inputnode", "predict_wf.predict", ("preproc", "preproc_file")),
                 ("predict_wf.predict", "predict_wf.outputnode", ("out_tsv", "out_tsv")),
                 ("predict_wf.outputnode", "ds_brainage_wf.inputnode", ("out_tsv", "out_tsv")),
                 ("predict_wf.outputnode", "ds_brainage_wf.inputnode", ("out_json", "out_json")),
                 ("ds_brainage_wf.inputnode", "ds_brainage_wf.ds_brainage", ("out_tsv", "in_file")),
                 ("preproc_wf.outputnode", "ds_preproc_wf.inputnode", ("preproc", "preproc")),
                 ("ds_preproc_wf.inputnode", "ds_preproc_wf.ds_preproc", ("preproc", "in_file")),
                 ("ds_preproc_wf.inputnode", "ds_preproc_wf.ds_mask", ("mask", "in_file"))]
        for src, dst, conn in chain:
            assert conn in edges[(f"{p}.{src}", f"{p}.{dst}")], (src, dst, conn)

        # inputs fixed at build time
        assert nodes[f"{p}.preproc_wf.inputnode"].inputs.in_file == scan.path
        assert nodes[f"{p}.preproc_wf.skull_strip"].inputs.method == "deepbet"
        assert nodes[f"{p}.preproc_wf.skull_strip"].inputs.source_file == scan.path
        assert nodes[f"{p}.preproc_wf.register"].inputs.template == str(template.brain)
        predict = nodes[f"{p}.predict_wf.predict"].inputs
        assert predict.model_files == [str(random_model.resolve())]
        assert predict.model_names == ["random-sfcn"]
        assert predict.participant_id == scan.participant_id
        assert predict.source_file == scan.relpath
        if scan.age is None:
            assert not isdefined(predict.chronological_age)
        else:
            assert predict.chronological_age == scan.age
        paths = derivative_paths(scan, str(out))
        assert nodes[f"{p}.ds_preproc_wf.ds_preproc"].inputs.out_path == paths["preproc"]
        assert nodes[f"{p}.ds_preproc_wf.ds_mask"].inputs.out_path == paths["mask"]
        assert nodes[f"{p}.ds_brainage_wf.ds_brainage"].inputs.out_path == paths["brainage"]

    # every sink is named ds_* and every ds_* node (not a workflow's inputnode) is a sink
    for name, node in nodes.items():
        leaf = name.rsplit(".", 1)[1]
        if isinstance(node.interface, DerivativesSink):
            assert leaf.startswith("ds_")
            assert node.inputs.out_path.startswith(str(out) + "/")
        elif leaf.startswith("ds_"):
            pytest.fail(f"{name} is named like a sink but is not one")

    # crash files of each participant go to OUTPUT/sub-<l>/log/<run_id>
    for name, node in nodes.items():
        subject = name.split(".")[1][len("single_subject_"):-len("_wf")]
        expected_dir = crash_dir(str(out), f"sub-{subject}", RUN_ID)
        assert expected_dir == str(out / f"sub-{subject}" / "log" / RUN_ID)
        assert node.config["execution"]["crashdump_dir"] == expected_dir
        assert node.config["execution"]["crashfile_format"] == "txt"


def test_preproc_only_graph(scans, tmp_path, template):
    nodes, _ = _flat(_build(scans, tmp_path, template, None))
    assert not [n for n in nodes if ".predict_wf." in n or ".ds_brainage_wf." in n]
    sinks = sorted(n.rsplit(".", 1)[1] for n, node in nodes.items()
                   if isinstance(node.interface, DerivativesSink))
    assert sinks == ["ds_mask", "ds_mask", "ds_preproc", "ds_preproc"]


def test_factories_have_input_and_output_nodes(template, random_model):
    pre = init_preproc_wf(template=str(template.brain), template_mask=str(template.mask))
    pred = init_predict_wf(models=[resolve_request(str(random_model))], participant_id="sub-01",
                           session_id=None,
                           source_file="sub-01/anat/sub-01_T1w.nii.gz", suffix="T1w", age=None)
    for wf, name, outputs in ((pre, "preproc_wf", {"preproc", "mask", "transform",
                                                   "registration_correlation", "mask_volume_ml", "registration_dice",
                                                   "registration_report", "head"}),
                              (pred, "predict_wf", {"out_tsv", "out_json", "out_distribution",
                                                    "out_saliency"})):
        assert wf.name == name
        assert isinstance(wf.get_node("inputnode").interface, IdentityInterface)
        out = wf.get_node("outputnode")
        assert isinstance(out.interface, IdentityInterface)
        assert set(out.interface._fields) == outputs


def test_sessions_get_separate_branches(synthetic_bids, tmp_path, template, random_model):
    scans = collect_scans(synthetic_bids, participant_labels=["04"])
    nodes, _ = _flat(_build(scans, tmp_path, template, random_model))
    branches = sorted({n.split(".")[2] for n in nodes})
    assert branches == ["scan_sub_04_ses_A_T1w", "scan_sub_04_ses_B_T1w"]
    outs = sorted(node.inputs.out_path for node in nodes.values()
                  if isinstance(node.interface, DerivativesSink))
    assert len(set(outs)) == len(outs) == 8
    assert all("/sub-04/ses-" in o for o in outs)
