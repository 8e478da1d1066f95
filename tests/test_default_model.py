"""The model shipped with the package: loadable, small, described by its card."""
from __future__ import annotations

import json

import numpy as np
import pytest

from brainage_bids.cli.parser import parse_args
from brainage_bids.cli.run import DEFAULT_MODEL, resolve_models
from brainage_bids.models.checkpoint import sha256sum
from brainage_bids.models import zoo
from brainage_bids.models.zoo import REGISTRY
from brainage_bids.models.checkpoint import load_model, mni_box_grid
from brainage_bids.models.train import metrics

CARD = DEFAULT_MODEL.with_name(DEFAULT_MODEL.stem + "_card.json")


ENSEMBLE = zoo.PACKAGE_MODELS / f"{zoo.T1W_MODEL}_card.json"
#: every ensemble bundled with the package (its members' files in data/models)
BUNDLED_CV = sorted(n for n, e in REGISTRY.items() if e.arch == "ensemble" and e.members
                    and all(REGISTRY[m].bundled for m in e.members))


def test_default_model_is_used_without_model_option(tmp_path):
    opts = parse_args([str(tmp_path), str(tmp_path / "out"), "participant"])
    (request,) = resolve_models(opts)
    assert request.name == zoo.T1W_MODEL and request.modality == "T1w" and request.ensemble
    assert request.members == [(m.name, str(zoo.PACKAGE_MODELS / m.bundled), "T1w")
                               for m in zoo.members(zoo.T1W_MODEL)]
    assert len(request.members) >= 5
    # the model of 0.1 stays installable by name
    (old,) = resolve_models(parse_args([str(tmp_path), str(tmp_path / "out"), "participant",
                                        "--model", "ixi-sfcn-2mm"]))
    assert old.members == [("ixi-sfcn-2mm", str(DEFAULT_MODEL), "T1w")]


def test_default_ensemble_is_small():
    files = [zoo.PACKAGE_MODELS / e.bundled for e in zoo.members(zoo.T1W_MODEL)]
    assert sum(f.stat().st_size for f in files) < 30 * 1024 * 1024


@pytest.mark.parametrize("name", BUNDLED_CV)
def test_bundled_ensemble_members_carry_their_digests(name):
    assert zoo.T1W_MODEL in BUNDLED_CV and zoo.SYNTH_MODEL in BUNDLED_CV
    card = json.loads((zoo.PACKAGE_MODELS / f"{name}_card.json").read_text())
    entries = zoo.members(name)
    assert [m["name"] for m in card["members"]] == [e.name for e in entries]
    for e, m in zip(entries, card["members"]):
        assert sha256sum(zoo.PACKAGE_MODELS / e.bundled) == e.sha256 == m["sha256"]
        assert e.mae == round(m["validation"]["mae"], 2)
    assert REGISTRY[name].mae == round(card["validation"]["mae"], 2)


@pytest.mark.parametrize("name", BUNDLED_CV)
def test_bundled_ensemble_card_is_honest_out_of_fold(name):
    """Each control is predicted once, by the member(s) that held out its fold; the card's
    figures are those of its predictions; a combined card's predictions are its components'
    combined; the member's held-out SD reaches the QC threshold."""
    from brainage_bids.models.inference import ensemble
    from brainage_bids.models.train import uncertainty_figures
    from brainage_bids.reports import qc

    card_file = zoo.PACKAGE_MODELS / f"{name}_card.json"
    card = json.loads(card_file.read_text())
    preds = card["validation"]["predictions"]
    ids = [p["participant_id"] for p in preds]
    assert len(ids) == len(set(ids)) == card["splits"]["train_validation_pool"] >= 140
    for k, split in enumerate(card["split_participants"]["members"], start=1):
        mine = [p for p in preds if p["fold"] == k]
        assert sorted(p["participant_id"] for p in mine) == sorted(split["validation"])
        assert not set(split["validation"]) & set(split["train"])
        held_out_by = "+".join(m["name"] for m in card["members"] if m["fold"] == k)
        assert {p["model"] for p in mine} == {held_out_by}
        if not card.get("combined_from"):
            rec = metrics([p["chronological_age"] for p in mine],
                          [p["predicted_age"] for p in mine])
            (m,) = [m for m in card["members"] if m["fold"] == k]
            for key in ("mae", "r2", "pearson_r", "mean_error", "slope"):
                assert rec[key] == pytest.approx(m["validation"][key])
    for component in card.get("combined_from", []):
        assert component in BUNDLED_CV  # its card and members ship too
    if card.get("combined_from"):
        parts = [{p["participant_id"]: p for p in json.loads(
            (zoo.PACKAGE_MODELS / f"{c}_card.json").read_text())["validation"]["predictions"]}
            for c in card["combined_from"]]
        for p in preds:
            age, sd = ensemble([q[p["participant_id"]]["predicted_age"] for q in parts],
                               [q[p["participant_id"]]["predicted_age_sd"] for q in parts])
            assert (p["predicted_age"], p["predicted_age_sd"]) == pytest.approx((age, sd))
    rec = metrics([p["chronological_age"] for p in preds], [p["predicted_age"] for p in preds])
    for key in ("mae", "r2", "pearson_r", "mean_error", "slope"):
        assert rec[key] == pytest.approx(card["validation"][key])
    unc = uncertainty_figures([p["chronological_age"] for p in preds],
                              [p["predicted_age"] for p in preds],
                              [p["predicted_age_sd"] for p in preds])
    for key, value in unc.items():
        assert value == pytest.approx(card["validation"]["uncertainty"][key])
    md = card_file.with_suffix(".md").read_text()
    assert f"{card['validation']['mae']:.2f}" in md and card["command"] in md
    member = load_model(zoo.PACKAGE_MODELS / zoo.members(name)[0].bundled)
    assert qc.sd_threshold(qc.reference_sd(member.card)) == pytest.approx(
        1.5 * card["members"][0]["validation"]["mean_sd"])


def test_zoo_records_the_digest_of_the_shipped_weights():
    assert sha256sum(DEFAULT_MODEL) == REGISTRY["ixi-sfcn-2mm"].sha256


def test_default_model_loads_and_matches_its_card():
    assert DEFAULT_MODEL.stat().st_size < 15 * 1024 * 1024
    model = load_model(DEFAULT_MODEL)
    card = json.loads(CARD.read_text())
    assert model.sha256 == card["sha256"]
    assert model.name == card["name"]
    affine, shape = mni_box_grid(card["input"]["voxel_size"])
    assert model.input.shape == tuple(shape)
    np.testing.assert_allclose(np.asarray(model.input.affine), np.asarray(affine))
    assert model.centres[0] == pytest.approx(card["age_bins"][0] + 0.5)
    assert model.centres[-1] == pytest.approx(card["age_bins"][1] - 0.5)


def test_default_model_card_reports_held_out_test_metrics():
    card = json.loads(CARD.read_text())
    test = card["test"]
    # the test participants are disjoint from those the model was fitted or selected on
    split = card["split_participants"]
    assert not set(split["test"]) & (set(split["train"]) | set(split["validation"]))
    assert test["n"] == len(test["predictions"]) >= 20
    recomputed = metrics([p["age"] for p in test["predictions"]],
                         [p["predicted_age"] for p in test["predictions"]])
    for key in ("mae", "r2", "pearson_r"):
        assert recomputed[key] == pytest.approx(test[key])
    md = CARD.with_suffix(".md").read_text()
    assert f"{test['mae']:.2f}" in md and card["command"] in md


def test_loaded_card_carries_the_reference_sd_for_qc():
    """The held-out SD of the card next to the weights reaches the QC threshold."""
    from brainage_bids.reports import qc

    model = load_model(DEFAULT_MODEL)
    card = json.loads(CARD.read_text())
    assert model.card["test"]["mean_sd"] == pytest.approx(card["test"]["mean_sd"])
    assert "predictions" not in model.card["test"]
    assert qc.sd_threshold(qc.reference_sd(model.card)) == pytest.approx(1.5 * card["test"]["mean_sd"])
