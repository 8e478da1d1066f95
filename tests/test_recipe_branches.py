"""The publishers' recipes in the participant workflow: the MNI152NLin6Asym branches are built
only for models that need them, the predictor reads each model's own image, and the sidecar
says which recipe was followed."""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from brainage_bids.cli.run import main
from brainage_bids.interfaces.bids import DerivativesSink
from brainage_bids.interfaces.lesion_filling import fill_like
from brainage_bids.interfaces.predict import PredictAge
from brainage_bids.models import zoo
from brainage_bids.models.densenet import build_densenet169
from brainage_bids.models.recipes import FSL_BRAIN, FSL_HEAD
from brainage_bids.models.zoo import resolve_request
from brainage_bids.utils import templates
from brainage_bids.utils.bids import collect_scans
from brainage_bids.utils.templates import FSL_TEMPLATE, TEMPLATE, get_template
from brainage_bids.workflows.outputs import derivative_paths
from brainage_bids.workflows.participant import init_brainage_wf
from brainage_bids.workflows.predict import fsl_images

from conftest import REFERENCE, make_bids, template_image, write_fsl_template_stand_in

DENSENET = "flair-brain-age-densenet-flair"
SFCN = "flair-brain-age-sfcn-flair"
GOLDEN = REFERENCE / "golden"


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """A model cache holding a random DenseNet169 and the FLAIR study's SFCN (the random-weight
    golden file when ../shared is there, else random weights), both in the published layout."""
    root = tmp_path_factory.mktemp("published")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(zoo.CACHE_ENV, str(root / "cache"))
        torch.manual_seed(7)
        densenet = root / "best_model_densenet_flair.pth"
        torch.save(build_densenet169().state_dict(), densenet)
        zoo.install(DENSENET, densenet)
        sfcn = GOLDEN / "flair_brain_age_sfcn_random_seed1.pth"
        if not sfcn.is_file():
            from brainage_bids.models.sfcn import SFCN as Net, UKB_CHANNELS

            sfcn = root / "best_SFCN_model_flair.pth"
            torch.save({"module." + k: v for k, v in Net(UKB_CHANNELS, n_bins=40)
                        .state_dict().items()}, sfcn)
        zoo.install(SFCN, sfcn)
    return root / "cache"


@pytest.fixture
def published(model_cache, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV, str(model_cache))
    return model_cache


@pytest.fixture(scope="module")
def fsl_template(tmp_path_factory):
    home = write_fsl_template_stand_in(tmp_path_factory.mktemp("tf") / "templateflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(home.parent / "xdg"))
        templates._client.cache_clear()
        return get_template(FSL_TEMPLATE, home=home)


@pytest.fixture(scope="module")
def flair_scan(tmp_path_factory):
    bids = make_bids(tmp_path_factory.mktemp("flair") / "bids", {"01": {"age": 45.0}})
    anat = bids / "sub-01" / "anat"
    (anat / "sub-01_T1w.nii.gz").rename(anat / "sub-01_FLAIR.nii.gz")
    scans = collect_scans(bids, modalities=["FLAIR"])
    assert [s.suffix for s in scans] == ["FLAIR"]
    return scans


def _nodes(scans, tmp_path, models, fsl_template=None):
    tpl = get_template()
    wf = init_brainage_wf(scans=scans, output_dir=str(tmp_path / "out"),
                          work_dir=str(tmp_path / "work"), run_id="r", template=str(tpl.brain),
                          template_mask=str(tpl.mask), models=models, fsl_template=fsl_template)
    graph = wf._create_flat_graph()
    nodes = {n.fullname: n for n in graph.nodes()}
    edges = {(u.fullname, v.fullname): d["connect"] for u, v, d in graph.edges(data=True)}
    return nodes, edges


def test_our_models_build_no_fsl_branch(synthetic_bids, tmp_path, random_model, fsl_template):
    scans = collect_scans(synthetic_bids, participant_labels=["01"])
    nodes, _ = _nodes(scans, tmp_path, [resolve_request(str(random_model))], fsl_template)
    assert not [n for n in nodes if "fsl" in n or "n4_head" in n]
    assert not [n for n, node in nodes.items() if isinstance(node.interface, DerivativesSink)
                and FSL_TEMPLATE in node.inputs.out_path]


def test_published_models_get_their_recipes_branch(flair_scan, tmp_path, published,
                                                   fsl_template):
    models = [resolve_request(DENSENET), resolve_request(SFCN)]
    nodes, edges = _nodes(flair_scan, tmp_path, models, fsl_template)
    p = "brainage_wf.single_subject_01_wf.scan_sub_01_FLAIR"
    pre = f"{p}.preproc_wf"
    # shared: one validation, one skull strip, one N4 in the mask
    for leaf in ("validate", "skull_strip", "n4"):
        assert len([n for n in nodes if n.endswith(f".{leaf}")]) == 1, leaf
    head, brain = f"{pre}.fsl_head_wf", f"{pre}.fsl_brain_wf"
    assert nodes[f"{head}.n4_head"].interface.__class__.__name__ == "N4WholeHead"
    assert nodes[f"{head}.register_head"].inputs.template == str(fsl_template.head)
    assert nodes[f"{brain}.register"].inputs.template == str(fsl_template.brain)
    assert nodes[f"{brain}.register"].inputs.template_mask == str(fsl_template.mask)
    # whole-head N4 reads the validated image, not the skull-stripped one
    assert ("out_file", "in_file") in edges[(f"{pre}.validate", f"{head}.inputnode")]
    assert ("in_file", "in_file") in edges[(f"{head}.inputnode", f"{head}.n4_head")]
    assert ("out_file", "in_file") in edges[(f"{head}.n4_head", f"{head}.register_head")]
    # the predictor gets both images
    conn = edges[(f"{pre}.outputnode", f"{p}.predict_wf.inputnode")]
    assert ("fsl_head_image", "fsl_head_image") in conn
    assert ("fsl_brain_image", "fsl_brain_image") in conn
    assert ("fsl_head_image", "fsl_head_image") in edges[
        (f"{p}.predict_wf.inputnode", f"{p}.predict_wf.predict")]
    # written apart, in space-MNI152NLin6Asym, after the prediction
    paths = derivative_paths(flair_scan[0], str(tmp_path / "out"))
    sinks = {node.inputs.out_path for node in nodes.values()
             if isinstance(node.interface, DerivativesSink)}
    assert {paths["fsl_head"], paths["fsl_brain"], paths["fsl_mask"]} <= sinks
    assert paths["fsl_head"].endswith(f"sub-01_space-{FSL_TEMPLATE}_desc-head_FLAIR.nii.gz")
    assert paths["fsl_brain"].endswith(f"sub-01_space-{FSL_TEMPLATE}_desc-preproc_FLAIR.nii.gz")
    assert paths["preproc"].endswith(f"sub-01_space-{TEMPLATE}_desc-preproc_FLAIR.nii.gz")
    assert ("out_tsv", "after") in edges[(f"{p}.predict_wf.outputnode",
                                          f"{p}.ds_fsl_head_wf.inputnode")]
    assert ("after", "after") in edges[(f"{p}.ds_fsl_head_wf.inputnode",
                                        f"{p}.ds_fsl_head_wf.ds_fsl_head")]
    # only the branch a model needs
    nodes, _ = _nodes(flair_scan, tmp_path / "2", [resolve_request(DENSENET)], fsl_template)
    assert [n for n in nodes if ".fsl_head_wf." in n] and not [
        n for n in nodes if ".fsl_brain_wf." in n]


def test_predictor_reads_the_image_of_each_models_recipe(tmp_path, published):
    """The FLAIR study's SFCN run on the golden FSL-grid brain gives the publisher's age only
    when the predictor reads the MNI152NLin6Asym brain, not the MNI152NLin2009aSym one."""
    golden_input = GOLDEN / "input_fsl_mni152_1mm.nii.gz"
    if not golden_input.is_file():
        pytest.skip(f"../shared/reference not present ({golden_input} missing)")
    golden = json.loads((GOLDEN / "golden.json").read_text())
    ours = tmp_path / "ours.nii.gz"
    nib.save(template_image(2), str(ours))  # some other brain on another grid
    mask = tmp_path / "mask.nii.gz"
    img = template_image(2)
    nib.save(nib.Nifti1Image((img.get_fdata() > 0).astype(np.uint8), img.affine), str(mask))
    (_, path, _), = resolve_request(SFCN).members
    node = PredictAge(model_files=[path], model_names=[SFCN], model_modalities=["FLAIR"],
                      participant_id="sub-01", source_file="sub-01/anat/sub-01_FLAIR.nii.gz",
                      suffix="FLAIR", preproc_file=str(ours), mask_file=str(mask),
                      fsl_brain_image=str(golden_input), fsl_brain_mask=str(mask),
                      fsl_brain_registration_dice=0.95, chronological_age=50.0)
    node.base_dir = None
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = node.run()
    finally:
        os.chdir(cwd)
    expected = golden["flair_brain_age_sfcn_random_seed1"]["age"]  # 87.6211
    assert res.outputs.predicted_age == pytest.approx(expected, rel=1e-4)
    meta = json.loads(open(res.outputs.out_json).read())
    m = meta["Model"]
    assert m["Recipe"]["Template"] == FSL_TEMPLATE and m["Recipe"]["Image"] == "brain"
    assert m["AppliedPreprocessing"]["Template"] == FSL_TEMPLATE
    assert m["AppliedPreprocessing"]["Registration"] == FSL_BRAIN.registration
    assert m["RecipeFollowed"] is True
    assert m["Registration"] == {"Space": FSL_TEMPLATE, "RegistrationMaskDice": 0.95}
    assert meta["Templates"] == [FSL_TEMPLATE]

    # without the image of its recipe the model does not run on another one
    bare = PredictAge(model_files=[path], model_names=[SFCN], participant_id="sub-01",
                      source_file="x", suffix="FLAIR", preproc_file=str(ours),
                      mask_file=str(mask))
    os.chdir(tmp_path)
    try:
        with pytest.raises(Exception, match=f"reads the brain on {FSL_TEMPLATE}"):
            bare.run()
    finally:
        os.chdir(cwd)


def test_fill_is_carried_into_the_whole_head_correction(tmp_path):
    """A fill made on the N4-in-mask brain, moved into the whole-head N4 image, keeps its
    relation to the tissue: value x (whole-head field ratio) at each lesion voxel."""
    rng = np.random.default_rng(0)
    shape = (12, 12, 12)
    raw = rng.uniform(50, 150, shape).astype(np.float32)
    x = np.linspace(0.8, 1.2, shape[0])[:, None, None] * np.ones(shape)
    field_mask, field_head = x, 1.1 * x ** 2  # two smooth bias fields
    brain, head = raw / field_mask, raw / field_head
    lesion = np.zeros(shape, bool)
    lesion[4:7, 4:7, 4:7] = True
    filled = brain.copy()
    filled[lesion] = 80.0
    files = {}
    for name, arr in (("head", head), ("brain", brain), ("filled", filled), ("lesion", lesion)):
        files[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(arr.astype(np.float32), np.eye(4)), files[name])
    out = str(tmp_path / "out.nii.gz")
    assert fill_like(files["head"], files["brain"], files["filled"], files["lesion"], out) == 27
    got = nib.load(out).get_fdata()
    np.testing.assert_allclose(got[lesion], (80.0 * field_mask / field_head)[lesion], rtol=1e-5)
    np.testing.assert_allclose(got[~lesion], head[~lesion], rtol=1e-6)


def test_recipes_of_the_branches():
    assert (FSL_HEAD.template, FSL_HEAD.image, FSL_HEAD.n4) == (FSL_TEMPLATE, "head",
                                                                "whole head, no mask")
    assert (FSL_BRAIN.template, FSL_BRAIN.image) == (FSL_TEMPLATE, "brain")


def test_whole_head_model_without_the_fsl_template_is_exit_66(
        tmp_path, monkeypatch, published, flair_scan, caplog):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "empty-templateflow"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    templates._client.cache_clear()
    bids = flair_scan[0].path.split("/sub-01/")[0]
    out, work = tmp_path / "out", tmp_path / "work"
    code = main([bids, str(out), "participant", "--modalities", "FLAIR", "--model", DENSENET,
                 "-w", str(work)])
    assert code == 66
    assert FSL_TEMPLATE in caplog.text
    assert f"from templateflow.api import get; [get('{FSL_TEMPLATE}', resolution=1" in caplog.text
    assert not out.exists() and not work.exists()
    shutil.rmtree(tmp_path / "xdg", ignore_errors=True)


@pytest.mark.integration
def test_participant_run_follows_the_publishers_recipes(tmp_path, monkeypatch, published,
                                                         shared_data):
    """A clinical whole-head FLAIR run with the FLAIR study's DenseNet169 (whole-head recipe) and
    SFCN (brain recipe), random weights in the published layout, on a stand-in MNI152NLin6Asym:
    both branches run, their images are written in space-MNI152NLin6Asym on the FSL grid, each
    model read its own (the ages are recomputed from the written images) and the sidecar
    records each recipe as followed."""
    from brainage_bids.models.checkpoint import FSL_MNI_1MM_AFFINE, load_model
    from brainage_bids.models.direct import predict_images

    src = shared_data("ms-lesjak2016-longitudinal") / "sub-patient01" / "ses-1" / "anat" \
        / "sub-patient01_ses-1_FLAIR.nii.gz"
    bids = make_bids(tmp_path / "bids", {"01": {"age": 20.0}})
    anat = bids / "sub-01" / "anat"
    (anat / "sub-01_T1w.nii.gz").unlink()
    shutil.copyfile(src, anat / "sub-01_FLAIR.nii.gz")
    home = write_fsl_template_stand_in(tmp_path / "templateflow")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    templates._client.cache_clear()
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "--modalities", "FLAIR", "--model",
                 DENSENET, SFCN, "--skull-strip", "deepbet", "--device", "cpu", "--nprocs", "2",
                 "--omp-nthreads", "1", "--no-saliency", "-w", str(tmp_path / "work")])
    assert code == 0
    a = out / "sub-01" / "anat"
    head = a / f"sub-01_space-{FSL_TEMPLATE}_desc-head_FLAIR.nii.gz"
    brain = a / f"sub-01_space-{FSL_TEMPLATE}_desc-preproc_FLAIR.nii.gz"
    mask = a / f"sub-01_space-{FSL_TEMPLATE}_desc-flairbrain_mask.nii.gz"
    for f in (head, brain, mask, a / f"sub-01_space-{TEMPLATE}_desc-preproc_FLAIR.nii.gz",
              a / f"sub-01_space-{TEMPLATE}_desc-flairbrain_mask.nii.gz"):
        assert f.exists(), f
        assert _sidecar(f).exists(), _sidecar(f)
    # the published grid as FSL stores it (TemplateFlow's RAS copy reordered, not resampled)
    for f in (head, brain, mask):
        img = nib.load(str(f))
        assert img.shape == (182, 218, 182)
        np.testing.assert_allclose(img.affine, np.asarray(FSL_MNI_1MM_AFFINE), atol=1e-4)
    h = nib.load(str(head)).get_fdata()
    b = nib.load(str(brain)).get_fdata()
    m = np.asarray(nib.load(str(mask)).dataobj) > 0
    assert not b[~m].any()  # the brain image is skull-stripped
    assert (h[~m] > 0.05 * h.max()).sum() > 50_000  # the head image is not
    head_meta = json.loads(_sidecar(head).read_text())
    assert head_meta["SkullStripped"] is False and head_meta["SpatialReference"] == FSL_TEMPLATE
    assert head_meta["BiasCorrection"].endswith("whole head, no mask")
    assert head_meta["Registration"].startswith(FSL_HEAD.registration)
    assert head_meta["Template"] == FSL_TEMPLATE and "FSL's stored order" in \
        head_meta["TemplateSource"]
    assert head_meta["RegistrationMaskDice"] > 0.8  # the head landed on the stand-in's brain
    brain_meta = json.loads(_sidecar(brain).read_text())
    assert brain_meta["SkullStripped"] is True
    assert brain_meta["Registration"].startswith(FSL_BRAIN.registration)

    table = a / "sub-01_desc-brainage_FLAIR.tsv"
    import pandas as pd

    rows = pd.read_csv(table, sep="\t").set_index("model")
    meta = json.loads(_sidecar(table).read_text())
    by_name = {d["Name"]: d for d in meta["Models"]}
    for name, recipe in ((DENSENET, FSL_HEAD), (SFCN, FSL_BRAIN)):
        d = by_name[name]
        assert d["Recipe"]["Template"] == FSL_TEMPLATE and d["Recipe"]["Image"] == recipe.image
        assert d["RecipeFollowed"] is True
        applied = {k: v for k, v in d["AppliedPreprocessing"].items() if k != "Tools"}
        assert applied == d["Recipe"]
        assert d["Registration"]["Space"] == FSL_TEMPLATE
        assert meta["MAE"][name]["Value"] == zoo.get_entry(name).mae
    # each model read its own recipe's image: its age again from the written file
    for name, image in ((DENSENET, head), (SFCN, brain)):
        (_, path, _), = resolve_request(name).members
        again = predict_images([load_model(path, name=name)], [str(image)])[0]
        assert again["predicted_age"] == pytest.approx(rows.loc[name, "predicted_age"], abs=1e-3)


def _sidecar(path):
    """The JSON sidecar of a derivative."""
    return path.with_name(path.name.replace(".nii.gz", ".json").replace(".tsv", ".json"))


def test_methods_describe_the_publishers_recipes(published, random_model):
    from brainage_bids.utils.provenance import participant_methods

    def methods(models):
        text, _ = participant_methods(
            skull_strip="deepbet", template=TEMPLATE, template_source="nilearn", models=models,
            modalities=["FLAIR"], omp_nthreads=1, seed=1, tools={},
            fsl_images=fsl_images(models), fsl_template_source="TemplateFlow /tf")
        return " ".join(text)

    head = methods([resolve_request(DENSENET)])
    assert "N4 on the whole head without a mask" in head and "TemplateFlow /tf" in head
    assert "published SFCNs" not in head
    assert "published SFCNs, the N4-corrected brain" in methods([resolve_request(SFCN)])
    assert FSL_TEMPLATE not in methods([resolve_request(str(random_model))])
