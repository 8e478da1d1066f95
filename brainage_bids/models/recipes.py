"""Preprocessing recipes: how each model's input image is made from a raw scan.

A :class:`Recipe` names the template, whether the model reads the brain or the whole head, where
N4 is fitted, what is registered to what, the interpolation and the intensity normalisation.
Zoo entries carry theirs (``ZooEntry.preprocessing``); models of our own format get
:data:`OURS` with the normalisation of their input specification.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

NORMALISATION_TEXT = {
    "mask_mean": "divided by the mean inside the brain mask",
    "volume_mean": "divided by the mean of the model grid",
    "ukb_sfcn": "divided by the mean of the whole 182x218x182 grid (zeros included), then centre "
                "crop [11:-11, 13:-13, 11:-11] -> 160x192x160",
    "flair_brain_age": "z-score over non-zero voxels; trilinear resize to 121x145x121; min-max "
                       "to [0, 1]; centre crop 118x142x118",
    "flair_brain_age_sfcn": "z-score over non-zero voxels; min-max to [0, 1]; centre crop "
                            "160x192x160",
}


@dataclass(frozen=True)
class Recipe:
    """What a model's input is: see the module docstring."""

    template: str        # TemplateFlow name, res-1
    image: str           # brain | head
    n4: str              # where the N4 bias field is fitted
    registration: str    # what is registered to what
    interpolation: str
    grid: str
    normalisation: str

    def as_dict(self) -> dict:
        return {k[0].upper() + k[1:]: v for k, v in asdict(self).items()}


OURS = Recipe(template="MNI152NLin2009aSym", image="brain", n4="inside the brain mask",
              registration="affine (antspyx AffineFast, mutual information), skull-stripped "
                           "brain to the template brain",
              interpolation="linear", grid="the model's box of MNI152NLin2009aSym",
              normalisation=NORMALISATION_TEXT["mask_mean"])
FSL_BRAIN = Recipe(template="MNI152NLin6Asym", image="brain", n4="inside the brain mask",
                   registration="affine, skull-stripped brain to the template brain "
                                "(template T1w x its desc-brain_mask)",
                   interpolation="linear",
                   grid="FSL MNI152 1 mm, 182x218x182, FSL's stored voxel order",
                   normalisation="")
FSL_HEAD = Recipe(template="MNI152NLin6Asym", image="head", n4="whole head, no mask",
                  registration="affine, whole head to the whole-head template T1w",
                  interpolation="linear",
                  grid="FSL MNI152 1 mm, 182x218x182, FSL's stored voxel order",
                  normalisation="")


def recipe_for(spec) -> Recipe:
    """The recipe of a model reading ``spec`` (checkpoint.InputSpec): the FSL recipes for the
    full FSL MNI152 1 mm grid (published models), ours otherwise."""
    from .direct import needs_exact_grid

    norm = NORMALISATION_TEXT.get(spec.normalisation, spec.normalisation)
    if needs_exact_grid(spec):
        return replace(FSL_HEAD if spec.image == "head" else FSL_BRAIN, normalisation=norm)
    return replace(OURS, image=spec.image, normalisation=norm)


def applied(recipe: Recipe) -> Recipe:
    """What the participant level does now for a model of ``recipe``: every scan is registered
    brain to brain to MNI152NLin2009aSym with N4 in the mask, then resampled onto the model grid
    (the head follows with the brain's affine)."""
    return replace(OURS, image=recipe.image, grid=recipe.grid,
                   normalisation=recipe.normalisation)
