"""scripts/out_of_site_check.py: the figures it records in a model card are those of the rows."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_train import ARGS, trained_inputs  # noqa: F401 - the fixture

from brainage_bids.cli.run import main

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("out_of_site_check",
                                                  ROOT / "scripts" / "out_of_site_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _table(folder: Path, rows: list[tuple]) -> None:
    """Participant-level T1w tables: (participant, session, age, predicted, sd) of model m."""
    for pid, ses, age, pred, sd in rows:
        anat = folder / f"sub-{pid}" / (f"ses-{ses}" if ses else "") / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([{"participant_id": f"sub-{pid}", "session_id": f"ses-{ses}" if ses else "n/a",
                       "model": "m", "lesion_filled": False, "chronological_age": age,
                       "predicted_age": pred, "predicted_age_sd": sd,
                       "brain_age_gap": pred - age},
                      {"participant_id": f"sub-{pid}", "session_id": "n/a", "model": "other",
                       "lesion_filled": False, "chronological_age": age, "predicted_age": 0.0,
                       "predicted_age_sd": 1.0, "brain_age_gap": -age}]).to_csv(
            anat / f"sub-{pid}{'_ses-' + ses if ses else ''}_desc-brainage_T1w.tsv", sep="\t",
            index=False)


def test_out_of_site_figures_recorded_in_the_card(tmp_path, trained_inputs):  # noqa: F811
    bids, out, work = trained_inputs
    assert main([str(bids), str(out), "train", "--model-name", "oos", "--epochs", "1",
                 "-w", str(work), *ARGS]) == 0
    hc, ms1, ms2 = tmp_path / "mprage", tmp_path / "ms2018", tmp_path / "ms2016"
    _table(hc, [("hc", None, 39.0, 44.0, 9.0)])
    ms_rows = [("a", None, 40.0, 52.0, 10.0), ("b", None, 47.0, 55.0, 11.0),
               ("c", "01", 30.0, 41.0, 12.0), ("c", "02", 31.0, 40.0, 12.0)]
    _table(ms1, ms_rows[:2])
    _table(ms2, ms_rows[2:])
    card = tmp_path / "x_card.json"
    shutil.copy(out / "models" / "oos" / "oos_card.json", card)
    assert _script().main(["--model", "m", str(hc), str(ms1), str(ms2), "--card", str(card)]) == 0
    o = json.loads(card.read_text())["out_of_site"]
    ages = np.array([r[2] for r in ms_rows])
    pred = np.array([r[3] for r in ms_rows])
    assert o["mprage_predicted"] == 44.0 and o["mprage_gap"] == pytest.approx(5.0)
    assert o["ms_scans"] == 4 and o["ms_participants"] == 3
    assert o["ms_mean_gap"] == pytest.approx(np.mean(pred - ages))
    assert o["ms_mean_gap_baseline"] == pytest.approx(np.mean([12.0, 8.0, 11.0]))
    assert o["ms_pearson_r"] == pytest.approx(stats.pearsonr(ages, pred).statistic)
    md = (tmp_path / "x_card.md").read_text()
    assert "Scans from other sites" in md and f"mean gap {np.mean(pred - ages):+.1f} years" in md
