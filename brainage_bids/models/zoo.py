"""The model zoo: named models, where their weights come from, and the local cache.

Nothing is downloaded at run time. Published weights are fetched by the user from the URL of the
entry and registered with ``brainage-bids models install NAME --from FILE``, which checks the
file's layout by strict loading (and its sha256 when the entry records one) and copies it into the
cache: ``$BRAINAGE_BIDS_MODELS`` if set, else ``$XDG_CACHE_HOME/brainage-bids/models`` (default
``~/.cache/brainage-bids/models``).

An entry's ``modality`` is the contrast its weights were trained on, or several joined by ``+``
for a contrast-agnostic model trained on synthetic images (``T1w+FLAIR+T2w``, see
:func:`~brainage_bids.models.checkpoint.contrasts_of`). The default model of a contrast is
:func:`default_model`'s: for FLAIR the published ensemble when installed, else our
contrast-agnostic ensemble when installed.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import (
    CONTRASTS,
    FLAIR_BRAIN_AGE_SFCN_BINS,
    FLAIR_BRAIN_AGE_SFCN_INPUT,
    FORMAT,
    IRV2_FLAIR_INPUT,
    UKB_BINS,
    UKB_INPUT,
    InputSpec,
    contrasts_of,
    mni_box_grid,
    read_checkpoint,
    sha256sum,
)

PACKAGE_MODELS = Path(__file__).resolve().parent.parent / "data" / "models"
CACHE_ENV = "BRAINAGE_BIDS_MODELS"

FLAIR_BRAIN_AGE_URL = "https://drive.google.com/drive/folders/1yp8r0ssYllz11cT-fDTNmC2vSXR5f7II"
FLAIR_BRAIN_AGE_CITATION = ("Brain age estimation on T2-FLAIR scans for application to multiple "
                            "sclerosis. Human Brain Mapping (2026); code: "
                            "github.com/jordan-colman/FLAIR-Brain-Age")
FLAIR_BRAIN_AGE_RECIPE = ("N4; affine to the whole-head FSL MNI152 1 mm template, no skull "
                          "stripping; z-score over non-zero voxels; trilinear resize to "
                          "121x145x121; min-max to [0, 1]; centre crop 118x142x118")
FLAIR_BRAIN_AGE_SFCN_RECIPE = ("skull strip; affine to the FSL MNI152 1 mm template; brain on the "
                               "182x218x182 grid; z-score over non-zero voxels; min-max to [0, 1]; "
                               "centre crop 160x192x160")
FLAIR_BRAIN_AGE_TEST_SET = "FLAIR-Brain-Age held-out test set (n=174)"
IXI_GRID = mni_box_grid(2.0)
SYNTH_MODEL = "ixi-synth-sfcn-2mm"
SYNTH_MODALITY = "T1w+FLAIR+T2w"
SYNTH_MEMBERS = 5
SYNTH_RECIPE = ("skull strip (deepbet); N4 in the mask; affine to MNI152NLin2009aSym; divided by "
                "the mean in the brain mask; 2 mm 80x96x80 grid; any of T1w, FLAIR, T2w")


class ModelNotInstalled(LookupError):
    """A zoo model whose weights are not in the cache; the message says how to install them."""


@dataclass(frozen=True)
class ZooEntry:
    name: str
    arch: str                 # sfcn | irv2 | densenet169 | ensemble
    modality: str             # T1w | FLAIR | T2w, or several joined by "+" (contrast-agnostic)
    output: str               # bins | scalar | ensemble
    recipe: str               # preprocessing the weights expect
    input: InputSpec | None
    licence: str
    citation: str
    url: str = ""
    filename: str = ""        # the file name the publisher uses
    sha256: str | None = None  # None: the publisher gives no digest
    bundled: str = ""         # file inside the package
    members: tuple = ()       # ensembles: names of member entries
    notes: str = ""
    bins: tuple = ()          # published SFCNs: (lo, hi, width) of the age bins
    age_range: tuple = ()     # ages the model covers (QC flags outside it)
    mae: float | None = None  # the publisher's test MAE of this model, years
    mae_test_set: str = ""    # where that MAE was measured

    @property
    def preprocessing(self):
        """The entry's :class:`~.recipes.Recipe` (template, image, N4, registration, ...)."""
        from .recipes import recipe_for

        return None if self.input is None else recipe_for(self.input)

    def summary(self) -> dict:
        d = asdict(self)
        d["input"] = None if self.input is None else self.input.as_dict()
        d["members"] = list(self.members)
        d["bins"] = list(self.bins)
        d["age_range"] = list(self.age_range)
        d["preprocessing"] = None if self.input is None else self.preprocessing.as_dict()
        d["contrasts"] = list(self.contrasts)
        return d

    @property
    def contrasts(self) -> tuple[str, ...]:
        """The image contrasts the entry applies to."""
        return contrasts_of(self.modality)


def _flair_member(epoch: int) -> ZooEntry:
    return ZooEntry(
        name=f"flair-brain-age-flair-e{epoch}", arch="irv2", modality="FLAIR", output="scalar",
        recipe=FLAIR_BRAIN_AGE_RECIPE, input=IRV2_FLAIR_INPUT, licence="MIT",
        citation=FLAIR_BRAIN_AGE_CITATION, url=FLAIR_BRAIN_AGE_URL,
        filename=f"best_MSE_model_inception_flair_r2_e{epoch}.pth", mae=3.31,
        mae_test_set=FLAIR_BRAIN_AGE_TEST_SET,
        notes="one member of the published 5-model FLAIR ensemble (test MAE 3.31 single)")


def _flair_study_model(arch: str, modality: str, filename: str, mae: float) -> ZooEntry:
    """The FLAIR study's SFCN and DenseNet169 files (T1w and FLAIR)."""
    sfcn = arch == "sfcn"
    label = "sfcn" if sfcn else "densenet"
    return ZooEntry(
        name=f"flair-brain-age-{label}-{modality.lower()}", arch=arch, modality=modality,
        output="bins" if sfcn else "scalar",
        recipe=FLAIR_BRAIN_AGE_SFCN_RECIPE if sfcn else FLAIR_BRAIN_AGE_RECIPE,
        input=FLAIR_BRAIN_AGE_SFCN_INPUT if sfcn else IRV2_FLAIR_INPUT, licence="MIT",
        citation=FLAIR_BRAIN_AGE_CITATION, url=FLAIR_BRAIN_AGE_URL, filename=filename,
        bins=FLAIR_BRAIN_AGE_SFCN_BINS if sfcn else (),
        age_range=FLAIR_BRAIN_AGE_SFCN_BINS[:2] if sfcn else (), mae=mae,
        mae_test_set=FLAIR_BRAIN_AGE_TEST_SET,
        notes=(f"FLAIR study {'SFCN, 40 bins 15-95 y' if sfcn else 'DenseNet169 (MONAI)'}, "
               f"{modality}; test MAE {mae}"))


FLAIR_EPOCHS = (3, 4, 6, 7, 10)


#: sha256 of the bundled members of SYNTH_MODEL (train --synth --init-from the T1w ensemble)
SYNTH_MEMBER_SHA256 = {
    1: "80a5e4d3ea957edc157a6f82619cbda1aea0d435569518ecea9bb411a58fc6fb",
    2: "195c8f9bfb4ee8f6ba12f2a0d496671f04eead0a79a2ea1b1dbe5b998143aa68",
    3: "23e304ab1075c3aac6ccfcfe9ec874e62acfbb5a9b960f105dfd7653d5fcf77c",
    4: "9c2cf74e5893f4b8a997561018bea0a55146ed0bb1607b7b9f205f8a35974235",
    5: "9e4e36bd7208157c6a5dec37c13596346f88e680a83df70a1b61d234c8b3b560",
}
#: out-of-fold MAE on the REAL IXI T1w images (no synthesis), per member and for all 144
SYNTH_MEMBER_MAE = {1: 9.33, 2: 6.92, 3: 7.44, 4: 8.71, 5: 6.79}
SYNTH_OOF_MAE = 7.83


def _cv_member(model: str, k: int, modality: str, recipe: str, licence: str, citation: str,
               sha256: dict, mae: dict, fold_set: str) -> ZooEntry:
    """Member ``k`` of one of our bundled cross-validation ensembles (file ``<model>-m<k>.pt``)."""
    return ZooEntry(
        name=f"{model}-m{k}", arch="sfcn", modality=modality, output="bins", recipe=recipe,
        input=InputSpec(*IXI_GRID, normalisation="mask_mean"), licence=licence,
        citation=citation, bundled=f"{model}-m{k}.pt", sha256=sha256.get(k), mae=mae.get(k),
        mae_test_set=f"{fold_set} of CV fold {k} (held out)",
        notes=f"cross-validation fold {k} of {model}")


def _cv_ensemble(model: str, *, modality: str, recipe: str, licence: str, citation: str,
                 sha256: dict, mae: dict, fold_set: str, oof_mae: float | None,
                 mae_test_set: str, notes: str, components: tuple = ()) -> list[ZooEntry]:
    """One of our bundled cross-validation ensembles: an entry per member (file
    ``<model>-m<k>.pt``, keys of ``sha256``) and the ensemble's; with ``components`` (names of
    ensembles listed before it), an ensemble of their members instead (models/combine.py)."""
    own = [_cv_member(model, k, modality, recipe, licence, citation, sha256, mae, fold_set)
           for k in sorted(sha256)]
    member_names = (tuple(m.name for m in own) if not components else
                    tuple(m for c in components for m in REGISTRY[c].members))
    return [*own, ZooEntry(
        name=model, arch="ensemble", modality=modality, output="ensemble", recipe=recipe,
        input=InputSpec(*IXI_GRID, normalisation="mask_mean"), licence=licence,
        citation=citation, members=member_names, mae=oof_mae, mae_test_set=mae_test_set,
        notes=notes)]


#: T1W_ALL_MODEL and T1W_LIGHT_MODEL combined (10 members, 2 per fold); not the default: its MS
#: gap (+14.9) is more than twice the default's (+6.4), see its card
T1W_ENS10_MODEL = "ixi-sfcn-2mm-ens10"
T1W_ENS10_OOF_MAE = 5.97
#: 5 CV folds, all augmentation families (p 0.3), 50 epochs: the default T1w model
T1W_ALL_MODEL = T1W_MODEL = "ixi-sfcn-2mm-ens"
#: the same folds, slice and histogram augmentation only (p 0.3), 25 epochs
T1W_LIGHT_MODEL = "ixi-sfcn-2mm-ens-light"
T1W_RECIPE = ("skull strip (deepbet); N4 in the mask; affine to MNI152NLin2009aSym; divided by "
              "the mean in the brain mask; 2 mm 80x96x80 grid")
T1W_LICENCE = "Apache-2.0 (weights trained on IXI, CC BY-SA 3.0)"
#: sha256 of the bundled members of T1W_ALL_MODEL (train level, 5-fold CV on the 144 IXI controls)
T1W_ALL_SHA256 = {
    1: "4d0170543a4393333fdcab4d570ee6488a2087397f4dcf5ebddcd57462d896a5",
    2: "b6d0cb9c883ff7668b44e42c9d8942c832ff8645099f45c6b1051bfe80f3a99b",
    3: "cdb0a55d4d7d8db87243909c1ab4ad651d004ab091f9146202555a99717c9ef2",
    4: "bdcd0975a1517a8765671bacb488606f35423c35c28208165075b0f0658b18a5",
    5: "3ca8774fc0c29daa60eeeef1995f01b81bf35d69aa52695c2cb386ae498b797f",
}
#: out-of-fold MAE of each member on its held-out fold, and of the ensemble (all 144 controls,
#: each predicted by the member that did not train on it), from the bundled card
T1W_ALL_MAE = {1: 8.63, 2: 6.23, 3: 4.72, 4: 7.07, 5: 5.64}
T1W_ALL_OOF_MAE = 6.44
T1W_LIGHT_SHA256 = {
    1: "de1cef71d54e757eb593f34f0a129c0854c1486acbd4896ebe1917e7cf5df5ba",
    2: "643cfcf57c96ba1f83997a240645387c6da47adb80440de7c7a290baaa85ffe8",
    3: "3b92fddfee3a79dec784e0ee4e1f135a4b137ad293d60d56a0927dfcc94b9c11",
    4: "76ea6e4c80fe3010dbb269cc05cf8e113b3da9825815b034551bc4110f7b76b5",
    5: "9cf9a30374048987bce0a527ae46ba8447c6b2d96fea669a6d0d5f65f512d99d",
}
T1W_LIGHT_MAE = {1: 7.08, 2: 6.56, 3: 6.95, 4: 5.89, 5: 5.58}
T1W_LIGHT_OOF_MAE = 6.41
T1W_MAE_SET = "IXI controls, out-of-fold (5-fold cross-validation, n=144; same site as training)"


T1W_CITATION = "brainage-bids; IXI dataset (brain-development.org)"


REGISTRY: dict[str, ZooEntry] = {}
_T1W = dict(modality="T1w", recipe=T1W_RECIPE, licence=T1W_LICENCE, citation=T1W_CITATION,
            fold_set="IXI controls", mae_test_set=T1W_MAE_SET)
REGISTRY.update((e.name, e) for e in _cv_ensemble(
    T1W_ALL_MODEL, sha256=T1W_ALL_SHA256, mae=T1W_ALL_MAE, oof_mae=T1W_ALL_OOF_MAE, **_T1W,
    notes="default T1w model: SFCN ensemble of 5 cross-validation folds of the 144 IXI "
          "controls, trained with every scanner-invariance augmentation family; out-of-fold MAE "
          "and the check on other sites in its model card"))
REGISTRY.update((e.name, e) for e in _cv_ensemble(
    T1W_LIGHT_MODEL, sha256=T1W_LIGHT_SHA256, mae=T1W_LIGHT_MAE, oof_mae=T1W_LIGHT_OOF_MAE,
    **_T1W, notes="SFCN ensemble on the same 5 folds, slice and histogram augmentation only; "
                  "half of ixi-sfcn-2mm-ens10"))
REGISTRY.update((e.name, e) for e in _cv_ensemble(
    T1W_ENS10_MODEL, sha256={}, mae={}, oof_mae=T1W_ENS10_OOF_MAE, components=(T1W_ALL_MODEL, T1W_LIGHT_MODEL),
    **_T1W, notes="the 10 SFCN members of ixi-sfcn-2mm-ens and "
                  "ixi-sfcn-2mm-ens-light (2 recipes x 5 cross-validation folds of the 144 IXI "
                  "controls); out-of-fold MAE and the check on other sites in its model card"))
REGISTRY.update((e.name, e) for e in [
    ZooEntry(
        name="ixi-sfcn-2mm", arch="sfcn", modality="T1w", output="bins",
        recipe="skull strip (deepbet); N4 in the mask; affine to MNI152NLin2009aSym; divided by "
               "the mean in the brain mask; 2 mm 80x96x80 grid",
        input=InputSpec(*IXI_GRID, normalisation="mask_mean"), licence="Apache-2.0 (weights "
        "trained on IXI, CC BY-SA 3.0)", citation="brainage-bids; IXI dataset (brain-development.org)",
        bundled="ixi-sfcn-2mm.pt",
        sha256="a6078bc345fe6ce57f63bf17b3dcf63a27786e1f9e3c19cedad5fd8173371fd7",
        notes="the T1w default of 0.1 (99 training scans, shifts and flips only); held-out "
              "test MAE 7.04 years on IXI, far off on other scanners (see its model card)"),
    ZooEntry(
        name="ukb-sfcn", arch="sfcn", modality="T1w", output="bins",
        recipe="skull strip; affine to the FSL MNI152 1 mm grid; divided by the whole-volume "
               "mean; crop [11:-11, 13:-13, 11:-11] -> 160x192x160",
        input=UKB_INPUT, licence="MIT",
        citation="Peng H, et al. Accurate brain age prediction with lightweight deep neural "
                 "networks. Medical Image Analysis 68 (2021) 101871",
        url="https://github.com/ha-ha-ha-han/UKBiobank_deep_pretrain/raw/4e56dc15/brain_age/"
            "run_20190719_00_epoch_best_mae.p",
        filename="run_20190719_00_epoch_best_mae.p", bins=UKB_BINS, age_range=UKB_BINS[:2],
        mae=2.14, mae_test_set="UK Biobank test set (Peng et al. 2021)",
        notes="UK Biobank, ages 44-80 (40 one-year bins 42-82); test MAE 2.14 there"),
    *[_flair_member(e) for e in FLAIR_EPOCHS],
    _flair_study_model("sfcn", "T1w", "best_SFCN_model_t1.pth", 3.45),
    _flair_study_model("sfcn", "FLAIR", "best_SFCN_model_flair.pth", 4.12),
    _flair_study_model("densenet169", "T1w", "best_model_densenet_t1.pth", 3.43),
    _flair_study_model("densenet169", "FLAIR", "best_model_densenet_flair.pth", 3.74),
    ZooEntry(
        name="flair-brain-age-flair", arch="ensemble", modality="FLAIR", output="ensemble",
        recipe=FLAIR_BRAIN_AGE_RECIPE, input=IRV2_FLAIR_INPUT, licence="MIT",
        citation=FLAIR_BRAIN_AGE_CITATION, url=FLAIR_BRAIN_AGE_URL,
        members=tuple(f"flair-brain-age-flair-e{e}" for e in FLAIR_EPOCHS), mae=2.81,
        mae_test_set=FLAIR_BRAIN_AGE_TEST_SET, notes="default FLAIR model: the published 5-model ensemble (test MAE 2.81)"),
])
REGISTRY.update((e.name, e) for e in _cv_ensemble(
    SYNTH_MODEL, modality=SYNTH_MODALITY, recipe=SYNTH_RECIPE,
    licence="Apache-2.0 (weights trained on images synthesised from IXI, CC BY-SA 3.0)",
    citation="brainage-bids; IXI dataset (brain-development.org); domain randomisation after "
             "SynthSeg (Billot et al. 2023) and SynthBA (Puglisi et al. 2024)",
    sha256=SYNTH_MEMBER_SHA256, mae=SYNTH_MEMBER_MAE, fold_set="real IXI T1w",
    oof_mae=SYNTH_OOF_MAE, mae_test_set="real IXI T1w, out-of-fold (5-fold cross-validation, "
    "n=144); no FLAIR or T2w figure (no healthy scans of those contrasts)",
    notes="contrast-agnostic SFCN ensemble (5 CV folds) trained on synthetic images of random "
          "contrast made from the IXI controls' anatomy (train --synth); default for T2w, and "
          "for FLAIR when flair-brain-age-flair is not installed; CV MAE on real IXI T1w in its "
          "model card"))

#: The default model of each contrast; FLAIR falls back to SYNTH_MODEL (see default_model).
DEFAULT_MODELS = {"T1w": T1W_MODEL, "FLAIR": "flair-brain-age-flair", "T2w": SYNTH_MODEL}


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "brainage-bids" / "models"


def get_entry(name: str) -> ZooEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def installed_path(entry: ZooEntry) -> Path | None:
    """The weights of a single-model entry when present (package or cache), else None."""
    if entry.bundled and (PACKAGE_MODELS / entry.bundled).exists():
        return PACKAGE_MODELS / entry.bundled
    path = cache_dir() / f"{entry.name}.pt"
    return path if path.exists() else None


def is_installed(name: str) -> bool:
    """Whether every weights file of a zoo model (each member of an ensemble) is present."""
    return all(installed_path(e) is not None for e in members(name))


def default_model(modality: str) -> str:
    """The zoo model run on ``modality`` images when no ``--model`` covers them:
    :data:`DEFAULT_MODELS`, except FLAIR without the published ensemble installed, which gets
    the contrast-agnostic :data:`SYNTH_MODEL` when that is installed."""
    if modality not in DEFAULT_MODELS:
        raise KeyError(f"no default model for {modality!r} (known: {', '.join(DEFAULT_MODELS)})")
    name = DEFAULT_MODELS[modality]
    if modality == "FLAIR" and not is_installed(name) and is_installed(SYNTH_MODEL):
        return SYNTH_MODEL
    return name


def default_request(modality: str) -> "ModelRequest":
    """The default model of ``modality`` as a request run on that contrast only (a
    contrast-agnostic default of FLAIR does not also run on the T1w scans). ModelNotInstalled
    names what to install."""
    name = default_model(modality)
    try:
        return resolve_request(f"{name}:{modality}")
    except ModelNotInstalled as exc:
        if modality != "FLAIR" or name == SYNTH_MODEL:
            raise
        raise ModelNotInstalled(
            f"{exc}; or, without the published weights, install the contrast-agnostic "
            f"{SYNTH_MODEL} (its members {SYNTH_MODEL}-m1..m{SYNTH_MEMBERS}, `brainage-bids "
            f"models install {SYNTH_MODEL}-m1 --from FILE`, ...), which then becomes the FLAIR "
            "default") from None


def install_hint(entry: ZooEntry) -> str:
    src = entry.filename or f"{entry.name}.pt"
    return (f"model {entry.name!r} is not installed: download {src} from {entry.url or 'its publisher'}"
            f" and run `brainage-bids models install {entry.name} --from /path/to/{src}` "
            f"(cache: {cache_dir()}, set ${CACHE_ENV} to change it)")


def members(name: str) -> list[ZooEntry]:
    """The single-model entries a name stands for (itself, or an ensemble's members)."""
    entry = get_entry(name)
    return [get_entry(m) for m in entry.members] if entry.members else [entry]


def resolve(name: str) -> list[tuple[ZooEntry, Path]]:
    """(entry, weights path) of every member of a zoo model; ModelNotInstalled names what is
    missing and how to install it."""
    out, missing = [], []
    for entry in members(name):
        path = installed_path(entry)
        if path is None:
            missing.append(entry)
        else:
            out.append((entry, path))
    if len(missing) == 1 and not get_entry(name).members:
        raise ModelNotInstalled(install_hint(missing[0]))
    if missing:
        first = missing[0]
        raise ModelNotInstalled(
            f"ensemble {name!r} lacks {len(missing)} of its {len(members(name))} members: download "
            f"{', '.join(m.filename for m in missing)} from {first.url} and install each, e.g. "
            f"`brainage-bids models install {first.name} --from /path/to/{first.filename}` "
            f"(members: {', '.join(m.name for m in missing)}; cache: {cache_dir()}, set "
            f"${CACHE_ENV} to change it)")
    return out


def install(name: str, source: str | os.PathLike, sha256: str | None = None) -> Path:
    """Check a downloaded weights file and copy it into the cache; return the cached path.

    The sha256 is checked against the entry's (or the ``sha256`` argument); the layout is checked
    by loading the file strictly into the entry's architecture. The record written beside the
    cached file names the entry, so files of a shared layout (the SFCNs) run with its recipe.
    """
    from .checkpoint import load_model

    entry = get_entry(name)
    if entry.members:
        raise ValueError(f"{name} is an ensemble; install each member: {', '.join(entry.members)}")
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"no such file: {source}")
    digest = sha256sum(source)
    expected = sha256 or entry.sha256
    if expected and digest != expected.lower():
        raise ValueError(f"{source}: sha256 {digest} does not match {expected} recorded for {name}")
    obj, layout = read_checkpoint(source)
    arch = obj.get("arch", "sfcn") if layout == FORMAT else layout
    kind = "our checkpoint format" if layout == FORMAT else "published layout"
    if arch != entry.arch:
        raise ValueError(f"{source}: holds a {arch} network ({kind}), but {name} is "
                         f"{entry.arch}")
    # strict loading: raises on any key or shape mismatch
    load_model(source, entry=None if layout == FORMAT else name)
    dest_dir = cache_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{name}.pt"
    tmp = dest_dir / f".{name}.pt.part"
    shutil.copyfile(source, tmp)
    os.replace(tmp, dest)
    record = {"name": name, "sha256": digest, "source": str(source.resolve()),
              "verified_sha256": bool(expected)}
    (dest_dir / f"{name}.json").write_text(json.dumps(record, indent=2))
    return dest


def listing() -> list[dict]:
    """One dict per zoo entry with its install state."""
    rows = []
    for entry in REGISTRY.values():
        if entry.members:
            state = "installed" if all(installed_path(m) for m in members(entry.name)) else "missing"
        else:
            path = installed_path(entry)
            state = "bundled" if entry.bundled and path else ("installed" if path else "missing")
        rows.append({"name": entry.name, "arch": entry.arch, "modality": entry.modality,
                     "output": entry.output, "state": state, "licence": entry.licence,
                     "url": entry.url, "notes": entry.notes})
    return rows


@dataclass
class ModelRequest:
    """One ``--model`` argument resolved.

    ``modality`` is the scans it runs on (None: every selected modality; ``T1w+FLAIR+T2w``:
    each of those); ``members`` are (row name, weights path, modality the weights were trained
    on or "" when unknown).
    """

    name: str
    modality: str | None
    members: list = field(default_factory=list)
    ensemble: bool = False


def resolve_request(value: str) -> ModelRequest:
    """A ``--model`` value: a zoo name, or a checkpoint file, optionally ``:T1w``/``:FLAIR``/
    ``:T2w`` to set the modality it is run on."""
    modality = None
    base, sep, tail = value.rpartition(":")
    if sep and tail in CONTRASTS:
        value, modality = base, tail
    if value in REGISTRY:
        entry = get_entry(value)
        found = resolve(value)
        return ModelRequest(name=value, modality=modality or entry.modality,
                            members=[(e.name, str(p), e.modality) for e, p in found],
                            ensemble=bool(entry.members))
    path = Path(value)
    if path.suffix == ".json" and path.is_file():
        return _ensemble_manifest(path, modality)
    if not path.is_file():
        raise FileNotFoundError(f"--model {value}: neither a zoo model ({', '.join(sorted(REGISTRY))})"
                                " nor an existing file")
    obj, layout = read_checkpoint(path, f"--model {value}")
    if layout == FORMAT:
        declared, name = obj.get("modality", "T1w"), obj.get("name") or path.stem
    else:
        from .checkpoint import published_entry
        entry, named = published_entry(path, layout)  # ValueError naming the file
        declared, name = (entry.modality, entry.name) if named else (None, path.stem)
    return ModelRequest(name=name, modality=modality or declared,
                        members=[(name, str(path.resolve()), declared or "")])


ENSEMBLE_FORMAT = "brainage-bids-ensemble"


def write_ensemble_manifest(path: str | os.PathLike, name: str, modality: str,
                            member_files: list) -> None:
    """An ensemble of checkpoint files (paths stored relative to the manifest)."""
    from ..utils.images import atomic_write_text

    path = Path(path)
    rel = [os.path.relpath(Path(f).resolve(), path.resolve().parent) for f in member_files]
    atomic_write_text(path, json.dumps({"format": ENSEMBLE_FORMAT, "name": name,
                                        "modality": modality, "members": rel}, indent=2) + "\n")


def _ensemble_manifest(path: Path, modality: str | None) -> ModelRequest:
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model {path}: not JSON ({exc})") from None
    if d.get("format") != ENSEMBLE_FORMAT:
        raise ValueError(f"--model {path}: not a brainage-bids ensemble manifest")
    members = []
    for rel in d["members"]:
        f = (path.parent / rel).resolve()
        if not f.is_file():
            raise FileNotFoundError(f"--model {path}: member {f} not found")
        members.append((f.stem, str(f), d.get("modality", "")))
    return ModelRequest(name=d.get("name", path.stem), modality=modality or d.get("modality"),
                        members=members, ensemble=True)
