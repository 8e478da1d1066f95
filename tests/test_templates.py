"""Templates through the TemplateFlow client, offline, with stand-in files in TemplateFlow's layout."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from brainage_bids.cli.run import main
from brainage_bids.models import zoo
from brainage_bids.models.checkpoint import FSL_MNI_1MM_AFFINE, UKB_INPUT
from brainage_bids.models.sfcn import SFCN, UKB_CHANNELS
from brainage_bids.utils import templates
from brainage_bids.utils.templates import FSL_TEMPLATE, TEMPLATE, TemplateMissing, get_template

from conftest import listing


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """An empty TEMPLATEFLOW_HOME and our own cache (XDG_CACHE_HOME), both under tmp_path."""
    tf = tmp_path / "templateflow"
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tf))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    templates._client.cache_clear()
    return tf


def _write(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _stand_in_2009a(tf):
    """TemplateFlow's real MNI152NLin2009aSym layout: whole head res-1_T1w and desc-brain_mask,
    no brain T1w; other files as TemplateFlow's empty stubs."""
    folder = tf / f"tpl-{TEMPLATE}"
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-10, -12, -10]
    head = np.full((20, 24, 20), 30.0, np.float32)
    head[5:15, 6:18, 5:15] = 100.0
    mask = np.zeros(head.shape, np.uint8)
    mask[5:15, 6:18, 5:15] = 1
    _write(folder / f"tpl-{TEMPLATE}_res-1_T1w.nii.gz", head, affine)
    _write(folder / f"tpl-{TEMPLATE}_res-1_desc-brain_mask.nii.gz", mask, affine)
    for stub in ("res-1_T2w", "res-2_T1w", "res-1_label-GM_probseg"):
        (folder / f"tpl-{TEMPLATE}_{stub}.nii.gz").touch()
    (tf / "dataset_description.json").write_text('{"Name": "TemplateFlow", "BIDSVersion": "1.1.0"}')
    return head, mask


def _stand_in_fsl(tf, stubs_only=False):
    """MNI152NLin6Asym as TemplateFlow lays it out (res-01, head, brain and mask)."""
    folder = tf / f"tpl-{FSL_TEMPLATE}"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"tpl-{FSL_TEMPLATE}_res-01_{s}.nii.gz" for s in ("T1w", "desc-brain_T1w",
                                                               "desc-brain_mask")]
    (tf / "dataset_description.json").write_text('{"Name": "TemplateFlow", "BIDSVersion": "1.1.0"}')
    if stubs_only:
        for n in names:
            (folder / n).touch()
        return names
    data = np.zeros((18, 22, 18), np.float32)
    data[4:14, 5:17, 4:14] = 1
    for n in names:
        _write(folder / n, data * (1 if "mask" in n else 50), np.asarray(FSL_MNI_1MM_AFFINE))
    return names


def test_real_2009a_layout_masks_the_head_into_our_own_cache(homes, tmp_path):
    head, mask = _stand_in_2009a(homes)
    before = listing(homes)
    tpl = get_template()
    assert tpl.name == TEMPLATE and tpl.head.name == f"tpl-{TEMPLATE}_res-1_T1w.nii.gz"
    assert tpl.mask.name == f"tpl-{TEMPLATE}_res-1_desc-brain_mask.nii.gz"
    brain = np.asarray(nib.load(str(tpl.brain)).dataobj)
    np.testing.assert_array_equal(brain, np.where(mask > 0, head, 0))  # not the whole head
    assert str(tpl.brain).startswith(str(tmp_path / "xdg" / "brainage-bids" / "templates"))
    assert listing(homes) == before  # nothing written into TEMPLATEFLOW_HOME
    assert get_template().brain == tpl.brain  # derived once


def test_nilearn_stands_in_for_2009a_outside_templateflow(homes, tmp_path):
    tpl = get_template()
    assert "nilearn" in tpl.source and tpl.head is None
    assert str(tpl.brain).startswith(str(tmp_path / "xdg"))
    assert f"tpl-{TEMPLATE}" not in tpl.brain.name
    assert not homes.exists()  # TemplateFlow's cache is left alone
    assert np.asarray(nib.load(str(tpl.mask)).dataobj).any()


def test_fsl_template_from_templateflow(homes):
    _stand_in_fsl(homes)
    tpl = get_template(FSL_TEMPLATE)
    assert tpl.name == FSL_TEMPLATE
    assert tpl.brain.name == f"tpl-{FSL_TEMPLATE}_res-01_desc-brain_T1w.nii.gz"
    assert tpl.head.name == f"tpl-{FSL_TEMPLATE}_res-01_T1w.nii.gz"
    np.testing.assert_allclose(nib.load(str(tpl.brain)).affine, np.asarray(FSL_MNI_1MM_AFFINE))


@pytest.mark.parametrize("stubs_only", [True, False], ids=["stubs", "absent"])
def test_missing_fsl_template_names_the_fetch_command(homes, stubs_only):
    if stubs_only:
        _stand_in_fsl(homes, stubs_only=True)  # TemplateFlow's empty stubs: not fetched yet
    with pytest.raises(TemplateMissing) as err:
        get_template(FSL_TEMPLATE)
    msg = str(err.value)
    assert FSL_TEMPLATE in msg and str(homes) in msg
    assert f"from templateflow.api import get; [get('{FSL_TEMPLATE}', resolution=1" in msg
    assert all(p.stat().st_size == 0 for p in homes.rglob("*.nii.gz"))  # nothing fetched


def test_templates_of_models(random_model):
    from brainage_bids.models.checkpoint import load_model

    assert templates.template_for(UKB_INPUT) == FSL_TEMPLATE
    assert templates.template_for(load_model(random_model).input) == TEMPLATE


def test_participant_with_a_published_model_needs_the_fsl_template(
        homes, tmp_path, monkeypatch, synthetic_bids, caplog):
    cache = tmp_path / "models"
    monkeypatch.setenv(zoo.CACHE_ENV, str(cache))
    sfcn = tmp_path / "sfcn.p"
    torch.save({"module." + k: v for k, v in SFCN(UKB_CHANNELS, n_bins=40).state_dict().items()},
               sfcn)
    zoo.install("ukb-sfcn", sfcn)
    out = tmp_path / "out"
    code = main([str(synthetic_bids), str(out), "participant", "--model", "ukb-sfcn",
                 "-w", str(tmp_path / "w"), "--participant-label", "01"])
    assert code == 66
    assert FSL_TEMPLATE in caplog.text and "from templateflow.api import get" in caplog.text
    assert not (out / "sub-01").exists() and not (tmp_path / "w" / "brainage_wf").exists()
