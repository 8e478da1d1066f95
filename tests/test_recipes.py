"""Preprocessing recipes carried by the zoo entries and written into the sidecars."""
from __future__ import annotations

import logging

import pytest

from brainage_bids.interfaces.predict import brainage_sidecar, model_warnings
from brainage_bids.models import zoo
from brainage_bids.models.checkpoint import IRV2_FLAIR_INPUT, LoadedModel, load_model, published_card
from brainage_bids.models.recipes import FSL_BRAIN, FSL_HEAD, OURS


def test_every_zoo_entry_carries_its_recipe():
    for entry in zoo.REGISTRY.values():
        r = entry.preprocessing
        assert r.image == entry.input.image
        assert entry.summary()["preprocessing"]["Template"] == r.template
    head = zoo.get_entry("flair-brain-age-densenet-flair").preprocessing
    assert (head.template, head.image, head.n4) == ("MNI152NLin6Asym", "head", FSL_HEAD.n4)
    assert "whole head to the whole-head template" in head.registration
    for name in ("ukb-sfcn", "flair-brain-age-sfcn-t1w", "flair-brain-age-sfcn-flair"):
        r = zoo.get_entry(name).preprocessing
        assert (r.template, r.image, r.registration) == ("MNI152NLin6Asym", "brain",
                                                         FSL_BRAIN.registration)
    assert "whole 182x218x182" in zoo.get_entry("ukb-sfcn").preprocessing.normalisation
    assert zoo.get_entry("ixi-sfcn-2mm").preprocessing.template == OURS.template


def _published(name):
    entry = zoo.get_entry(name)
    return LoadedModel(name=name, arch=entry.arch, network=None, input=entry.input,
                       centres=None, sha256="0", path="x", card=published_card(entry, True),
                       modality=entry.modality)


def test_sidecar_records_recipe_and_what_was_done(random_model):
    ours = load_model(random_model)
    pub = _published("flair-brain-age-densenet-t1w")
    # the participant level reads each model's image from the branch of its own recipe
    meta = brainage_sidecar([ours, pub], branches=[("MNI152NLin2009aSym", "brain"),
                                                   ("MNI152NLin6Asym", "head")])
    m_ours, m_pub = meta["Models"]
    assert m_ours["Recipe"]["Template"] == "MNI152NLin2009aSym" and m_ours["RecipeFollowed"]
    assert m_pub["Recipe"]["Image"] == "head" and m_pub["Recipe"]["N4"] == FSL_HEAD.n4
    assert m_pub["AppliedPreprocessing"]["Template"] == "MNI152NLin6Asym"
    assert m_pub["AppliedPreprocessing"]["N4"] == FSL_HEAD.n4
    assert m_pub["RecipeFollowed"] is True
    assert meta["Templates"] == ["MNI152NLin2009aSym", "MNI152NLin6Asym"]
    # an image from another branch is said, not hidden
    meta = brainage_sidecar([pub], branches=[("MNI152NLin2009aSym", "head")])
    assert meta["Model"]["AppliedPreprocessing"]["Template"] == "MNI152NLin2009aSym"
    assert meta["Model"]["AppliedPreprocessing"]["N4"] == OURS.n4
    assert meta["Model"]["RecipeFollowed"] is False


def test_warnings_for_age_contrast_and_recipe(random_model):
    ours = load_model(random_model)  # card age_range 20-80, T1w
    assert model_warnings(ours, 50.0, "T1w", "a.nii.gz") == []
    msgs = model_warnings(ours, 85.0, "FLAIR", "a.nii.gz")
    assert any("outside the training ages 20-80" in m for m in msgs)
    assert any("trained on T1w, not FLAIR" in m for m in msgs)
    ukb = _published("ukb-sfcn")  # 42-82
    msgs = model_warnings(ukb, 30.0, "T1w", "b.nii.gz")
    assert any("42-82" in m for m in msgs) and not any("registered to" in m for m in msgs)
    msgs = model_warnings(ukb, 50.0, "T1w", "b.nii.gz", ("MNI152NLin2009aSym", "brain"))
    assert any("trained on MNI152NLin6Asym" in m and "registered to MNI152NLin2009aSym" in m
               for m in msgs)
