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


def branch_recipe(template: str, image: str) -> Recipe:
    """The recipe the participant workflow's branch for (``template``, ``image``) implements
    (workflows/preproc.py), before the model's normalisation: the MNI152NLin2009aSym path (N4
    in the mask, brain to brain; the head follows with the brain's affine) or one of the two
    MNI152NLin6Asym branches (:data:`FSL_BRAIN`, :data:`FSL_HEAD`)."""
    from ..utils.templates import FSL_TEMPLATE

    if template == FSL_TEMPLATE:
        return FSL_HEAD if image == "head" else FSL_BRAIN
    return replace(OURS, image=image)


def input_key(spec) -> tuple[str, str]:
    """(template, image) of the image a model reading ``spec`` needs: the branch that makes it."""
    from ..utils.templates import template_for

    return template_for(spec), spec.image


def applied(recipe: Recipe, branch: tuple[str, str] | None = None) -> Recipe:
    """What the participant level did for a model of ``recipe`` whose image came from the
    workflow branch ``branch`` = (template, image): that branch's recipe with the normalisation
    the predictor applied (the model's own). ``None``: the branch of the model's own recipe,
    which the participant workflow builds for every model it runs."""
    template, image = branch or (recipe.template, recipe.image)
    return replace(branch_recipe(template, image), normalisation=recipe.normalisation)


#: The tools the participant level carries each recipe out with (the publishers used niftk's N4
#: and NiftyReg's reg_aladin for FLAIR-Brain-Age, FSL FLIRT for UK Biobank).
TOOLS = {"N4": "antspyx n4_bias_field_correction",
         "Registration": "antspyx registration AffineFast (mutual information), fixed seed",
         "Interpolation": "linear"}
