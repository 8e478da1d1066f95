"""Command-line parser (BIDS-Apps convention)."""
from __future__ import annotations

import argparse
import os

from .. import __version__

LEVELS = ("participant", "group", "train")
PLUGINS = ("MultiProc", "Linear", "SLURM", "SLURMGraph", "SGE", "SGEGraph", "PBS", "PBSGraph",
           "LSF", "Condor", "OAR")

# Exit codes of the draft BIDS execution specification.
EXIT_OK = 0
EXIT_PARTICIPANT_FAILED = 1
EXIT_VALIDATION = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_MATCH = 18
EXIT_USAGE = 64
EXIT_DATA = 65
EXIT_NO_INPUT = 66
EXIT_CANT_CREATE = 73


class UsageError(Exception):
    """Bad command line; carries the exit code to use."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2; the BIDS spec says 64 for usage errors
        self.print_usage()
        raise UsageError(f"{self.prog}: error: {message}", EXIT_USAGE)


def _label(value: str, prefix: str) -> str:
    return value[len(prefix):] if value.startswith(prefix) else value


def build_parser(defaults: dict | None = None) -> argparse.ArgumentParser:
    """The parser; ``defaults`` (a ``--config`` file) become the defaults, so options given on
    the command line override them, and the positional arguments may come from it."""
    defaults = defaults or {}
    p = _Parser(
        prog="brainage-bids",
        description="Brain age from T1w and T2-FLAIR MRI as a BIDS App: participant -> group, or train "
                    "a model. Manage models with `brainage-bids models list|install`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, text in (("bids_dir", "the input BIDS dataset (read only)"),
                       ("output_dir", "where derivatives are written (never inside bids_dir)"),
                       ("analysis_level", f"one of {', '.join(LEVELS)}")):
        if name in defaults:  # from --config: optional on the command line
            p.add_argument(name, nargs="?", help=text)
        else:
            p.add_argument(name, help=text)
    p.add_argument("--config", metavar="FILE",
                   help="replay a run: the config.json of OUTPUT_DIR/logs/<run-id>/ (JSON or "
                        "YAML of option names); options on the command line override it")
    p.add_argument("--version", action="version", version=f"brainage-bids {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")

    sel = p.add_argument_group("selecting data")
    sel.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                     type=lambda s: _label(s, "sub-"), help="participants to process (sub- optional)")
    sel.add_argument("--session-label", nargs="+", metavar="LABEL", type=lambda s: _label(s, "ses-"),
                     help="sessions to process (ses- optional)")
    sel.add_argument("--bids-filter-file", metavar="FILE",
                     help='JSON of PyBIDS filters for the "t1w" and "flair" queries, as in fMRIPrep')
    sel.add_argument("--modalities", nargs="+", choices=("T1w", "FLAIR", "T2w"), default=["T1w"],
                     help="image types to process (train: the modality of the model; T2w is "
                          "read by the contrast-agnostic ixi-synth-sfcn-2mm only)")
    sel.add_argument("--skip-bids-validation", action="store_true",
                     help="do not check file names and dataset_description.json")

    run = p.add_argument_group("execution")
    run.add_argument("-w", "--work-dir", metavar="DIR",
                     help="intermediate files (default: brainage-bids-work-<hash of OUTPUT_DIR> "
                          "in the system temp folder)")
    run.add_argument("--nprocs", type=int, default=os.cpu_count() or 1,
                     help="processes run in parallel (MultiProc)")
    run.add_argument("--omp-nthreads", type=int, default=None,
                     help="threads per process (default: nprocs, at most 8)")
    run.add_argument("--mem", "--mem-gb", dest="mem_gb", type=float, default=None, metavar="GB",
                     help="memory the parallel nodes may use together (MultiProc memory_gb; "
                          "default: 90 %% of the machine's)")
    run.add_argument("--plugin", default="MultiProc", choices=PLUGINS, help="Nipype execution plugin")
    run.add_argument("--plugin-args", metavar="JSON|FILE",
                     help='plugin arguments as JSON, e.g. \'{"sbatch_args": "-p short"}\', or a '
                          "JSON/YAML file")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where networks run")

    proc = p.add_argument_group("processing")
    proc.add_argument("--model", nargs="+", metavar="NAME|FILE[:MODALITY]",
                      help="zoo models (`brainage-bids models list`) or checkpoint files; each runs "
                           "on the scans of its modality, a contrast-agnostic one on each it reads "
                           "(append :T1w, :FLAIR or :T2w to override); with several, a row "
                           "model=ensemble is added (default: ixi-sfcn-2mm-ens, 5 CV members, for T1w; "
                           "flair-brain-age-flair for FLAIR, else ixi-synth-sfcn-2mm when that is "
                           "installed and the published one is not; ixi-synth-sfcn-2mm for T2w)")
    proc.add_argument("--precision", choices=("fast", "fp32", "bf16"), default="fast",
                      help="fast: float32 (channels_last_3d on CPU, same ages; plain on CUDA); "
                           "bf16: bfloat16 autocast (CPU: 2-4x faster, ages move up to "
                           "~0.15 year); fp32: plain float32")
    proc.add_argument("--skull-strip", choices=("auto", "deepbet", "hd-bet", "none"), default="auto",
                      help="auto: HD-BET when the hdbet extra is installed and networks run on "
                           "CUDA, else deepbet; none: inputs are already brain-extracted")
    proc.add_argument("--hd-bet-mode", choices=("fast", "accurate"), default=None,
                      help="HD-BET: fast (one network, no test-time mirroring) or accurate (5 "
                           "networks x 8 mirrorings, as published); default accurate on CUDA, "
                           "fast on CPU")
    proc.add_argument("--saliency", action=argparse.BooleanOptionalAction, default=None,
                      help="write SmoothGrad saliency maps (25 noisy samples; default: on when "
                           "networks run on CUDA, off on CPU, where it takes ~15 s per scan)")
    proc.add_argument("--lesion-masks", metavar="DIR",
                      help="BIDS derivatives dataset of lesion masks (sub-<l>[_ses-<l>][...]"
                           "_label-lesion_mask.nii.gz, in the space of the image they were "
                           "drawn on; mod-T1w/mod-FLAIR restricts one to a modality): scans with "
                           "a mask get lesion-filled rows besides the raw ones, a filled image "
                           "and the MNI lesion mask")
    proc.add_argument("--reports-only", action="store_true",
                      help="participant/group: only regenerate the HTML reports from existing "
                           "outputs")
    proc.add_argument("--preproc-only", action="store_true",
                      help="participant level: write the MNI images and masks only (for `train`)")

    grp = p.add_argument_group("group level")
    grp.add_argument("--stats-spec", metavar="YAML",
                     help="statistics specification: column names, control labels, covariates, "
                          "bias method, ... (see brainage_bids/data/stats_spec_example.yml)")
    grp.add_argument("--bias-fit-file", metavar="TSV",
                     help="healthy-control predictions to fit the age-bias correction on "
                          "(participant_id, session_id, suffix, model, chronological_age, "
                          "predicted_age); default: OUTPUT_DIR/models/*/oof_predictions.tsv, "
                          "else the controls of the group table")
    grp.add_argument("--bias-method", choices=("cole", "beheshti"),
                     help="age-bias correction (overrides bias.method of --stats-spec; default cole)")

    tr = p.add_argument_group("train level")
    tr.add_argument("--model-name", default="brainage-sfcn", help="name of the trained model")
    tr.add_argument("--arch", choices=("sfcn", "irv2"), default="sfcn",
                    help="SFCN (soft-label bins) or 3D Inception-ResNet-V2 (scalar age, MSE)")
    tr.add_argument("--ensemble-size", type=int, default=1, metavar="K",
                    help="train K members and write an ensemble")
    tr.add_argument("--ensemble-mode", choices=("seeds", "cv"), default="cv",
                    help="cv: members trained on K cross-validation folds of the training "
                         "participants, out-of-fold predictions kept; seeds: same data, seeds "
                         "seed..seed+K-1")
    tr.add_argument("--epochs", type=int, default=60)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--learning-rate", type=float, default=1e-3)
    tr.add_argument("--weight-decay", type=float, default=1e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--split-seed", type=int, metavar="S",
                    help="seed of the participant splits (test, validation or cross-validation "
                         "folds; default: --seed); the same --split-seed with another --seed "
                         "trains more members on the same folds")
    tr.add_argument("--voxel-size", type=float, default=2.0, help="input grid of the model, mm")
    tr.add_argument("--channels", type=int, nargs=6, default=[16, 32, 64, 128, 128, 32],
                    metavar="C", help="SFCN channel widths (32 64 128 256 256 64 is the full SFCN)")
    tr.add_argument("--age-bins", type=float, nargs=2, default=[6.0, 90.0], metavar=("LO", "HI"),
                    help="soft-label age range, one-year bins")
    tr.add_argument("--val-fraction", type=float, default=0.15,
                    help="validation share of the training participants")
    tr.add_argument("--test-fraction", type=float, default=None,
                    help="held-out test share, never used for training or model selection "
                         "(default 0 for --ensemble-mode cv, whose out-of-fold predictions are "
                         "the held-out figures, else 0.2)")
    tr.add_argument("--augment", nargs="+", default=["all"], metavar="FAMILY",
                    help="training augmentation families: all (default), none, legacy (shifts "
                         "and flips only, the recipe before 0.2), or any of affine gamma bias "
                         "noise blur slices histogram")
    tr.add_argument("--loss", choices=("kl", "kl+l1"), default="kl",
                    help="SFCN loss: KL divergence to Gaussian soft labels (as published), or "
                         "that plus 0.1 x the absolute error of the expected age in years")
    tr.add_argument("--dropout", type=float, default=None,
                    help="dropout before the output layer while training (default: 0.5 for "
                         "SFCN, as published, 0.2 for IRV2)")
    tr.add_argument("--augment-probability", type=float, default=0.5, metavar="P",
                    help="probability of each augmentation family per training image")
    tr.add_argument("--synth", action="store_true",
                    help="train a contrast-agnostic model (for T1w, FLAIR and T2w) on images "
                         "synthesised on the fly from each training T1w scan's tissue maps, with "
                         "random contrast, 1-6 mm slices, bias, noise and affine (models/synth.py; "
                         "tissue maps cached in the work dir, ~30 s per scan once); --augment is "
                         "not used; validation, out-of-fold and test figures are on the real T1w "
                         "images")
    tr.add_argument("--members", type=int, nargs="+", metavar="K",
                    help="train only these members (1-based), e.g. one per cluster job, each "
                         "with its own -w; the ensemble is written by a run without --members "
                         "once every member's train_<name>/ folder is in its work directory "
                         "(finished members are then only reloaded)")
    tr.add_argument("--init-from", metavar="CARD",
                    help="start each member from the weights of the same member of a trained "
                         "model: its _card.json (member files beside it) or a bundled model's "
                         "name; with --ensemble-mode cv its members must have held out the same "
                         "folds, so the out-of-fold figures stay honest (e.g. --synth fine-tuned "
                         "from the T1w ensemble)")
    tr.add_argument("--synth-real-probability", type=float, default=0.0, metavar="P",
                    help="--synth: probability that a training sample is the scan's real T1w "
                         "image (through the same resolution, bias, noise and affine steps)")
    return p


def _config_defaults(argv) -> dict:
    """The options of the ``--config`` file named in ``argv`` (empty without one)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return {}
    from ..utils.provenance import load_config

    try:
        cfg = load_config(known.config)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--config {known.config}: {exc}") from exc
    dests = {a.dest for a in build_parser({"bids_dir": 1, "output_dir": 1,
                                           "analysis_level": 1})._actions}
    unknown = sorted(set(cfg) - dests)
    if unknown:
        raise UsageError(f"--config {known.config}: unknown option(s) {', '.join(unknown)}")
    cfg.pop("config", None)
    return cfg


def parse_args(argv=None) -> argparse.Namespace:
    defaults = _config_defaults(argv)
    parser = build_parser(defaults)
    parser.set_defaults(**defaults)
    opts = parser.parse_args(argv)
    if opts.analysis_level not in LEVELS:
        raise UsageError(f"unknown analysis level {opts.analysis_level!r}; choose from "
                         f"{', '.join(LEVELS)}", EXIT_UNKNOWN_LEVEL)
    if opts.nprocs < 1:
        raise UsageError("--nprocs must be at least 1")
    if opts.omp_nthreads is None:
        opts.omp_nthreads = min(opts.nprocs, 8)
    if opts.omp_nthreads < 1:
        raise UsageError("--omp-nthreads must be at least 1")
    if opts.mem_gb is not None and opts.mem_gb <= 0:
        raise UsageError("--mem must be a positive number of GB")
    if opts.ensemble_size < 1:
        raise UsageError("--ensemble-size must be at least 1")
    if opts.ensemble_size == 1:
        opts.ensemble_mode = "single"
    if opts.test_fraction is None:
        opts.test_fraction = 0.0 if opts.ensemble_mode == "cv" else 0.2
    opts.augment = resolve_augment(opts.augment)
    if not 0 <= opts.synth_real_probability <= 1:
        raise UsageError("--synth-real-probability must lie in [0, 1]")
    return opts


def resolve_augment(names: list[str]) -> tuple[str, ...]:
    """The augmentation families of ``--augment`` (``("legacy",)`` for shifts and flips only)."""
    from ..models.augment import FAMILIES

    names = list(dict.fromkeys(names))
    if names == ["all"]:
        return FAMILIES
    if names == ["none"]:
        return ()
    if names == ["legacy"]:
        return ("legacy",)
    bad = [n for n in names if n not in FAMILIES]
    if bad:
        raise UsageError(f"--augment: unknown famil{'y' if len(bad) == 1 else 'ies'} "
                         f"{', '.join(bad)}; use all, none, legacy or any of {' '.join(FAMILIES)}")
    return tuple(n for n in FAMILIES if n in names)


def build_models_parser() -> argparse.ArgumentParser:
    """``brainage-bids models list | install NAME --from FILE | predict NAME|FILE IMAGE...``."""
    p = _Parser(prog="brainage-bids models", description="List, install and run brain-age models. "
                "Weights are never downloaded by the app: fetch them from the URL `list` shows.")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="zoo models and whether they are installed")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ins = sub.add_parser("install", help="check a downloaded weights file and copy it to the cache")
    ins.add_argument("name", help="zoo model name")
    ins.add_argument("--from", dest="source", required=True, metavar="FILE",
                     help="the downloaded weights file")
    ins.add_argument("--sha256", help="expected digest, when the entry records none")
    pr = sub.add_parser(
        "predict", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="run a model on images already on its template grid (published models: the FSL "
             "MNI152 1 mm grid, 182x218x182), with the model's own normalisation")
    pr.add_argument("model", metavar="NAME|FILE", help="zoo name, checkpoint file or ensemble "
                    "manifest (files of the shared SFCN layout run by their zoo name)")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="NIfTI images on the model's grid "
                    "(the brain or the whole head, as the model's recipe says)")
    pr.add_argument("--mask", nargs="+", metavar="MASK", help="brain masks, one per image, for "
                    "models normalised in the brain mask (default: the non-zero voxels)")
    pr.add_argument("--json", action="store_true", help="print a JSON list of objects with "
                    "image, model, predicted_age, predicted_age_sd")
    pr.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    pr.add_argument("--precision", choices=("fast", "fp32", "bf16"), default="fp32",
                    help="fp32 (reference) reproduces the publishers' numbers")
    return p
