"""Combining cross-validation ensembles trained on the same folds (models/combine.py)."""
import json

import numpy as np
import pandas as pd
import pytest

from brainage_bids.models.combine import CombineError, combine_cv_ensembles
from brainage_bids.models.train import kfold_split, metrics, rewrite_card

IDS = [f"sub-{i:03d}" for i in range(20)]
AGES = list(np.linspace(20, 80, 20))


def _card(tmp_path, name, offset, folds, mode="cv"):
    """A train-level CV card with member files beside it; member k predicts age + offset + k."""
    d = tmp_path / name
    d.mkdir()
    preds, members = [], []
    for k, fold in enumerate(folds, 1):
        (d / f"{name}-m{k}.pt").write_bytes(f"{name}{k}".encode())
        members.append({"name": f"{name}-m{k}", "fold": k, "best_epoch": 3, "sha256": str(k),
                        "validation": {"mae": abs(offset + k)}})
        for pid in fold:
            age = AGES[IDS.index(pid)]
            preds.append({"participant_id": pid, "session_id": None, "model": f"{name}-m{k}",
                          "fold": k, "chronological_age": age, "predicted_age": age + offset + k,
                          "predicted_age_sd": 2.0 + 0.1 * IDS.index(pid), "last_epoch_predicted_age": age + offset})
    y = [p["chronological_age"] for p in preds]
    card = {"name": name, "arch": "sfcn", "architecture": "SFCN", "modality": "T1w",
            "modalities": ["T1w"], "trained_on": "real", "software_version": "0",
            "training_data": {"dataset": "synthetic", "bids_dir": "/data", "selection": "all"},
            "ensemble": {"size": len(folds), "mode": mode},
            "splits": {"train_validation_pool": 20, "test": 0},
            "split_participants": {"test": [], "members": [{"train": [], "validation": f}
                                                           for f in folds]},
            "age_range": [20, 80], "age_bins": [6, 90], "channels": [8, 16, 32, 64, 64, 32],
            "parameters": 10, "input": {"space": "MNI152NLin2009aSym", "voxel_size": 2.0,
                                        "shape": [80, 96, 80]},
            "validation": dict(metrics(y, [p["predicted_age"] for p in preds]), predictions=preds),
            "test": {"n": 0}, "members": members, "augmentation": {"families": [], "probability": 0.3},
            "epochs": 5, "batch_size": 8, "learning_rate": 0.005, "weight_decay": 0.001,
            "loss": "kl+l1", "seed": 0, "command": f"train {name}"}
    f = d / f"{name}_card.json"
    f.write_text(json.dumps(card))
    return f


def test_each_control_is_predicted_by_every_member_that_held_out_its_fold(tmp_path):
    folds = kfold_split(IDS, AGES, 4, seed=1)
    a, b = _card(tmp_path, "rec-a", 0.0, folds), _card(tmp_path, "rec-b", -6.0, folds)
    card = combine_cv_ensembles([a, b], "both", tmp_path / "out", "combine a b")
    preds = card["validation"]["predictions"]
    assert sorted(p["participant_id"] for p in preds) == IDS  # each out-of-fold exactly once
    for p in preds:
        k = p["fold"]
        # member k of a predicts age + k, of b age - 6 + k: the mean, and the SD by total
        # variance (the members' own SD, and 3 years between them)
        assert p["predicted_age"] == pytest.approx(p["chronological_age"] - 3 + k)
        own = 2.0 + 0.1 * IDS.index(p["participant_id"])
        assert p["predicted_age_sd"] == pytest.approx(np.hypot(own, 3.0))
        assert p["model"] == f"rec-a-m{k}+rec-b-m{k}"
    ref = metrics([p["chronological_age"] for p in preds], [p["predicted_age"] for p in preds])
    assert card["validation"]["mae"] == pytest.approx(ref["mae"])
    assert card["validation"]["components"] == {
        "rec-a": pytest.approx(json.loads(a.read_text())["validation"]["mae"]),
        "rec-b": pytest.approx(json.loads(b.read_text())["validation"]["mae"])}
    out = tmp_path / "out" / "models" / "both"
    manifest = json.loads((out / "both.json").read_text())
    assert sorted(manifest["members"]) == sorted(f"rec-{r}-m{k}.pt" for r in "ab" for k in range(1, 5))
    assert (out / "rec-b-m3.pt").read_bytes() == b"rec-b3"
    tsv = pd.read_csv(out / "oof_predictions.tsv", sep="\t")
    assert len(tsv) == 20
    assert tsv["predicted_age"].tolist() == pytest.approx([p["predicted_age"] for p in preds])
    md = (out / "both_card.md").read_text()
    assert "`rec-a` alone" in md and "`rec-b` alone" in md and "combine a b" in md
    # the off-site check rewrites a card: a combined one keeps its own Markdown
    card["out_of_site"] = {"mprage_age": 39.0, "mprage_predicted": 40.0, "mprage_gap": 1.0,
                           "ms_scans": 2, "ms_participants": 2, "ms_mean_gap": 5.0,
                           "ms_mean_gap_baseline": 5.0, "ms_pearson_r": 0.5, "ms_pearson_p": 0.1,
                           "ms_mean_sd": 9.0}
    rewrite_card(out / "both_card.json", card)
    md = (out / "both_card.md").read_text()
    assert "`rec-a` alone" in md and "predicted 40.0 (gap +1.0 years)" in md


def test_cards_on_other_folds_or_not_cross_validated_are_refused(tmp_path):
    folds = kfold_split(IDS, AGES, 4, seed=1)
    a = _card(tmp_path, "rec-a", 0.0, folds)
    other = _card(tmp_path, "rec-c", 0.0, kfold_split(IDS, AGES, 4, seed=7))
    with pytest.raises(CombineError, match="rec-c_card.json: rec-c was trained on other folds"):
        combine_cv_ensembles([a, other], "x", tmp_path / "out", "")
    seeds = _card(tmp_path, "rec-s", 0.0, folds, mode="seeds")
    with pytest.raises(CombineError, match="not a cross-validation ensemble"):
        combine_cv_ensembles([a, seeds], "x", tmp_path / "out", "")
    (tmp_path / "rec-a" / "rec-a-m2.pt").unlink()
    b = _card(tmp_path, "rec-b", 1.0, folds)
    with pytest.raises(CombineError, match="rec-a-m2.pt: weights of member rec-a-m2"):
        combine_cv_ensembles([a, b], "x", tmp_path / "out", "")
    assert not (tmp_path / "out" / "models" / "x" / "x.json").exists()
