"""Scans that fail publish nothing: bad inputs are failed scans with a message naming the file,
and the MNI outputs of a scan whose prediction fails are never written (issue 16)."""
from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from brainage_bids.cli.run import main
from brainage_bids.interfaces.predict import PredictAge

from conftest import make_bids, template_image


@pytest.mark.integration  # one participant-level run: about a minute, two under load
def test_failed_scans_publish_nothing(tmp_path, random_model, monkeypatch, caplog):
    bids, out = tmp_path / "bids", tmp_path / "out"
    make_bids(bids, {"tiny": {"age": 40.0}, "huge": {"age": 50.0}, "failpred": {"age": 60.0}})
    tpl = template_image(2)
    # a 4 cm cube cut from the template, and the template as float64 x 1e30
    crop = np.asarray(tpl.dataobj)[35:55, 45:65, 35:55]
    nib.save(nib.Nifti1Image(crop, tpl.affine), str(bids / "sub-tiny/anat/sub-tiny_T1w.nii.gz"))
    huge = nib.Nifti1Image(np.asarray(tpl.dataobj, np.float64) * 1e30, tpl.affine)
    huge.set_data_dtype(np.float64)
    nib.save(huge, str(bids / "sub-huge/anat/sub-huge_T1w.nii.gz"))

    run = PredictAge._run_interface

    def failing(self, runtime):
        if self.inputs.participant_id == "sub-failpred":
            raise RuntimeError("prediction failed on purpose")
        return run(self, runtime)

    monkeypatch.setattr(PredictAge, "_run_interface", failing)
    with caplog.at_level(logging.ERROR):
        code = main([str(bids), str(out), "participant", "--model", str(random_model),
                     "--skull-strip", "none", "--plugin", "Linear", "--omp-nthreads", "1",
                     "-w", str(tmp_path / "work")])
    assert code == 1
    for label in ("tiny", "huge", "failpred"):
        anat = out / f"sub-{label}" / "anat"
        assert not anat.exists() or not list(anat.iterdir()), list(anat.iterdir())
    text = caplog.text
    assert "sub-tiny failed" in text and "too small to hold a brain" in text
    assert "sub-huge failed" in text and "values overflow float32" in text
    assert "sub-failpred failed" in text and "prediction failed on purpose" in text
