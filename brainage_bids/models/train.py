"""The ``train`` level: fit an SFCN on the healthy controls of a BIDS dataset.

Training reads the participant-level outputs (MNI image and brain mask per scan), so the model sees
exactly the preprocessing it will be applied to. Participants are split once, with a fixed seed and
stratified by age, into train / validation / test; the test split is only scored after training.

``--synth`` trains a contrast-agnostic model: every training batch is synthesised on the fly
(:mod:`~brainage_bids.models.synth`, random contrast, resolution and artefacts) from the tissue
maps of the training scans (:mod:`~brainage_bids.models.anatomy`, cached in the work dir), and
BatchNorm statistics come from one fixed synthetic image per training scan. Validation, epoch
selection, out-of-fold and test figures are always on the REAL T1w images.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .. import __version__
from ..utils.bids import Scan, collect_scans, load_filters, read_participants
from ..utils.images import atomic_save_npy, atomic_write_text
from ..utils.templates import TEMPLATE
from .augment import augment_batch
from .checkpoint import InputSpec, build_sfcn, mni_box_grid, save_checkpoint
from .inference import model_input, resolve_device
from .sfcn import bin_centres, soft_label_loss

LOG = logging.getLogger("brainage_bids.train")


@dataclass
class Example:
    participant_id: str
    path: str
    mask: str
    age: float
    session_id: str | None = None


def healthy_controls(participants: pd.DataFrame, spec: dict | None = None) -> set[str] | None:
    """Participant ids that are healthy controls by the stats spec (its ``controls`` labels in its
    ``columns.diagnosis`` column, as the group level counts them); None when there is no such
    column (train on everyone)."""
    from ..stats.collect import is_control
    from ..stats.spec import DEFAULTS

    spec = spec or DEFAULTS
    column = spec["columns"]["diagnosis"]
    if column not in participants:
        return None
    return set(participants.index[is_control(participants[column], spec["controls"])])


def stratified_split(ids: list[str], ages: list[float], fraction: float, seed: int):
    """Pick about ``fraction`` of participants, one at random from each run of similar ages.

    Returns (picked, rest) as sorted lists. Deterministic for a given seed.
    """
    if fraction <= 0:
        return [], sorted(ids)
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in np.argsort(ages, kind="stable")]
    k = max(2, int(round(1 / fraction)))
    picked = []
    for start in range(0, len(order), k):
        chunk = order[start:start + k]
        if len(chunk) == k or rng.random() < len(chunk) / k:
            picked.append(chunk[int(rng.integers(len(chunk)))])
    rest = sorted(set(ids) - set(picked))
    return sorted(picked), rest


def metrics(y_true, y_pred) -> dict:
    """MAE, R2 (1 - SSres/SStot), Pearson r and mean error, as the group level's evaluation
    computes them (:func:`brainage_bids.stats.evaluate.accuracy`), and the slope of predicted on
    true age."""
    from ..stats.evaluate import accuracy

    y_true = np.asarray(y_true, float)
    y_pred = np.asarray(y_pred, float)
    acc = accuracy(y_true, y_pred)
    ss_tot = float(((y_true - y_true.mean()) ** 2).sum())
    slope = (float(np.polyfit(y_true, y_pred, 1)[0]) if len(y_true) > 1 and ss_tot > 0
             else float("nan"))
    return {"n": int(len(y_true)), "mae": acc["mae"], "r2": acc["r2"],
            "pearson_r": acc["pearson_r"], "mean_error": acc["mean_error"], "slope": slope}


def uncertainty_figures(y_true, y_pred, sds) -> dict | None:
    """Whether the predicted SD tracks the error: mean SD, MAE and Spearman rho of SD with |error|."""
    sds = np.asarray(sds, float)
    if not len(sds) or not np.isfinite(sds).all():
        return None
    err = np.abs(np.asarray(y_pred, float) - np.asarray(y_true, float))
    rho = stats.spearmanr(sds, err) if len(sds) > 2 else None
    return {"mean_sd": float(sds.mean()), "mae": float(err.mean()),
            "spearman_sd_abs_error": float(rho.statistic) if rho is not None else float("nan"),
            "spearman_p": float(rho.pvalue) if rho is not None else float("nan")}


def augment(x: torch.Tensor, rng: np.random.Generator, max_shift: int = 2, flip_axis: int = 2):
    """Random integer shifts (zero filled, up to ``max_shift`` voxels per axis) and left-right
    flips of a batch [B, 1, X, Y, Z] (x is the left-right axis of our RAS grids)."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        s = [int(v) for v in rng.integers(-max_shift, max_shift + 1, size=3)]
        src = [slice(max(0, -d), n - max(0, d)) for d, n in zip(s, x.shape[2:])]
        dst = [slice(max(0, d), n - max(0, -d)) for d, n in zip(s, x.shape[2:])]
        out[b, :, dst[0], dst[1], dst[2]] = x[b, :, src[0], src[1], src[2]]
        if rng.random() < 0.5:
            out[b] = out[b].flip(flip_axis - 1)
    return out


def find_examples(bids_dir: Path, output_dir: Path, opts) -> list[Example]:
    """Healthy-control scans (of ``opts.modalities``) with an age and participant-level outputs in ``output_dir``."""
    from ..workflows.outputs import derivative_paths

    scans: list[Scan] = collect_scans(bids_dir, opts.participant_label, opts.session_label,
                                      load_filters(opts.bids_filter_file),
                                      validate=not opts.skip_bids_validation,
                                      modalities=opts.modalities)
    hc = healthy_controls(read_participants(bids_dir), _stats_spec(opts))
    examples, no_age, no_preproc = [], [], []
    for scan in scans:
        if hc is not None and scan.participant_id not in hc:
            continue
        if scan.age is None:
            no_age.append(scan.relpath)
            continue
        paths = derivative_paths(scan, str(output_dir))
        if not (os.path.exists(paths["preproc"]) and os.path.exists(paths["mask"])):
            no_preproc.append(scan.relpath)
            continue
        examples.append(Example(scan.participant_id, paths["preproc"], paths["mask"], float(scan.age),
                                scan.session_id))
    if no_age:
        LOG.warning("%d scan(s) without an age are not used: %s", len(no_age), ", ".join(no_age[:10]))
    if no_preproc:
        LOG.warning("%d scan(s) have no participant-level outputs in %s (run the participant level "
                    "first, e.g. with --preproc-only): %s", len(no_preproc), output_dir,
                    ", ".join(no_preproc[:10]))
    return examples


def load_arrays(examples: list[Example], spec: InputSpec, cache_dir: Path) -> np.ndarray:
    """Model-grid arrays of every example, cached as .npy under ``cache_dir``."""
    from tqdm import tqdm

    cache_dir.mkdir(parents=True, exist_ok=True)
    key = f"{spec.voxel_size:g}mm_{'x'.join(map(str, spec.shape))}_{spec.normalisation}"
    arrays = []
    for ex in tqdm(examples, desc="loading images", unit="scan", disable=None):
        stamp = int(os.path.getmtime(ex.path))
        f = cache_dir / f"{Path(ex.path).name[:-7]}_{key}_{stamp}.npy"
        if f.exists():
            arrays.append(np.load(f))
            continue
        arr = model_input(ex.path, ex.mask, spec)
        atomic_save_npy(f, arr)
        arrays.append(arr)
    return np.stack(arrays)[:, None]


@torch.no_grad()
def recompute_batchnorm(net, x: np.ndarray, device: str, batch: int = 8) -> None:
    """Set BatchNorm running statistics to their exact averages over ``x`` (no augmentation).

    The exponential running averages kept during training follow the last few noisy batches; with
    ~100 training scans that made validation error swing by several years between epochs.
    """
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    # near-equal chunks: a last chunk of one image has a single value per channel at the 1x1x1
    # output of small grids, which BatchNorm refuses in training mode
    for chunk in np.array_split(np.arange(len(x)), max(1, math.ceil(len(x) / batch))):
        net(torch.from_numpy(x[chunk]).to(device))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    net.eval()


def _card_markdown(card: dict) -> str:
    def fmt(m):
        if not m.get("n"):
            return "| 0 | n/a | n/a | n/a | n/a | n/a |"
        return (f"| {m['n']} | {m['mae']:.2f} | {m['r2']:.3f} | {m['pearson_r']:.3f} | "
                f"{m['mean_error']:+.2f} | {m.get('slope', float('nan')):.2f} |")

    if card["arch"] == "sfcn":
        model = (f"SFCN (Peng et al. 2021) with a soft-label output over {card['age_bins'][0]:g}-"
                 f"{card['age_bins'][1]:g} years (one-year bins, Gaussian soft labels sigma 1, "
                 "KL-divergence loss); brain age is the expectation of the output distribution.")
        size = f"- Channels {card['channels']}, {card['parameters']:,} parameters."
    else:
        model = ("3D Inception-ResNet-V2 (the FLAIR-Brain-Age architecture) regressing age with an "
                 "MSE loss; dropout 0.2 before the linear head during training.")
        size = f"- {card['parameters']:,} parameters."
    ens = card["ensemble"]
    sp = card["splits"]
    if ens["mode"] == "cv":
        split_text = (f"- n = {sp['train_validation_pool']} for training in {ens['size']} "
                      f"cross-validation folds (each member trains on {ens['size'] - 1} folds and "
                      f"selects its epoch on the remaining one), {sp['test']} test; split by "
                      f"participant, stratified by age, seed {card.get('split_seed', card['seed'])}")
    else:
        split_text = (f"- n = {sp['train']} train, {sp['validation']} validation, {sp['test']} test "
                      f"(split by participant, stratified by age, seed {card.get('split_seed', card['seed'])})")
    val_label = ("out-of-fold (each scan predicted by the member that did not train on it; also "
                 "used for epoch selection)" if ens["mode"] == "cv" else "validation")
    lines = [
        f"# Model card: {card['name']}", "",
        model, "",
        *([f"Ensemble of {ens['size']} members ({'cross-validation folds' if ens['mode'] == 'cv' else 'different seeds'}); "
           "the ensemble age is the members' mean."] if ens["size"] > 1 else []), "",
        "## Training data",
        f"- Dataset: {card['training_data']['dataset']} ({card['training_data']['bids_dir']}), "
        f"{card['modality'] if not card.get('synthesis') else 'T1w'} images",
        *_synthesis_lines(card),
        f"- Participants: {card['training_data']['selection']}",
        f"{split_text}; ages {card['age_range'][0]:.1f}-{card['age_range'][1]:.1f} years",
        "",
        "## Input",
        f"- MNI152NLin2009aSym, affine registration, brain extracted, {card['input']['voxel_size']:g} mm "
        f"grid {'x'.join(map(str, card['input']['shape']))}, intensities divided by the mean inside "
        "the brain mask.",
        size, "",
        "## Performance (uncorrected for age bias)", "",
        "| split | n | MAE (y) | R2 | Pearson r | mean error (y) | slope |",
        "|---|---|---|---|---|---|---|",
        f"| {val_label} " + fmt(card["validation"]),
        *([f"| {'out-of-fold' if ens['mode'] == 'cv' else 'validation'}, last epoch (no epoch "
           "selection on these scans) " + fmt(card["validation"]["last_epoch"])]
          if card["validation"].get("last_epoch") else []),
        "| test (held out, never used for selection) " + fmt(card["test"]), "",
        *[line for u in [card["validation"].get("uncertainty")] if u for line in (
            f"Uncertainty ({'out-of-fold' if ens['mode'] == 'cv' else 'validation'}): mean "
            f"predicted SD {u['mean_sd']:.2f} years against an MAE of {u['mae']:.2f}; Spearman "
            f"rho of SD with |error| {u['spearman_sd_abs_error']:.2f} (p = {u['spearman_p']:.2g}). "
            "QC flags `predicted_age_sd_high` above 1.5 x the mean SD.", "")],
        *([ "| member | best epoch | validation n | MAE | R2 | r | mean error | slope | last-epoch MAE | test MAE |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *[f"| {m['name']} | {m['best_epoch']} | {m['validation']['n']} | "
              f"{m['validation']['mae']:.2f} | {m['validation']['r2']:.3f} | "
              f"{m['validation']['pearson_r']:.3f} | {m['validation']['mean_error']:+.2f} | "
              f"{m['validation'].get('slope', float('nan')):.2f} | "
              f"{m.get('validation_last_epoch', {}).get('mae', float('nan')):.2f} | "
              f"{m['test']['mae']:.2f} |" for m in card["members"]], ""]
          if ens["size"] > 1 else []),
        "## Training", f"- {card['epochs']} epochs per member (best validation epoch kept), "
        f"batch {card['batch_size']}, AdamW lr {card['learning_rate']:g} (cosine), weight decay "
        f"{card['weight_decay']:g}, augmentation: "
        f"{'the synthesis above' if card.get('synthesis') else _augmentation_text(card.get('augmentation'))}; "
        f"BatchNorm statistics recomputed over the training scans{' (one fixed synthetic image each)' if card.get('synthesis') else ''} before each evaluation; the epoch "
        "is selected among the second half of training.",
        *([f"- Each member started from the weights of the same member of `{card['initialised_from']}` "
           "(`--init-from`; that member held out the same fold, so the out-of-fold figures are "
           "of scans neither network trained on)."] if card.get("initialised_from") else []),
        f"- Device: {card['device']}; training time {card['training_seconds'] / 60:.1f} min.",
        f"- Command: `{card['command']}`", "",
        *_out_of_site_lines(card),
        *_limits_lines(card),
        f"brainage-bids {card['software_version']}; weights sha256 in the JSON card.",
    ]
    if card.get("notes"):
        lines[-1:-1] = ["## Notes", *[f"- {n}" for n in card["notes"]], ""]
    return "\n".join(lines) + "\n"


def _limits_lines(card: dict) -> list[str]:
    """Markdown of what a model trained on one site's controls cannot do."""
    return [
        "## Limits",
        "- Trained on a single site and scanner; expect larger errors and an age bias on other "
        "scanners: fit the group level's bias correction on your own healthy controls.",
        f"- Ages outside {card['age_range'][0]:.0f}-{card['age_range'][1]:.0f} years are "
        "extrapolation.",
        "- Small training set: individual predictions carry several years of error; use for "
        "group-level comparisons.", ""]


def rewrite_card(card_file: Path, card: dict) -> None:
    """Write a model card again, JSON and Markdown (``<name>_card.md`` beside it), atomically."""
    card_file = Path(card_file)
    if card.get("combined_from"):  # several CV ensembles combined (models/combine.py)
        from .combine import write_combined_card

        return write_combined_card(card_file, card)
    atomic_write_text(card_file, json.dumps(card, indent=2) + "\n")
    atomic_write_text(card_file.with_name(card_file.name.replace("_card.json", "_card.md")),
                      _card_markdown(card))


def _out_of_site_lines(card: dict) -> list[str]:
    """Markdown of the check on scans from other sites (``scripts/out_of_site_check.py --card``)."""
    o = card.get("out_of_site")
    if not o:
        return []
    return [
        "## Scans from other sites (not used for training or selection)",
        f"- Healthy {o['mprage_age']:.0f}-year-old, 1 mm Siemens MPRAGE: predicted "
        f"{o['mprage_predicted']:.1f} (gap {o['mprage_gap']:+.1f} years).",
        f"- MS patients, T1w: {o['ms_scans']} scans of {o['ms_participants']} patients, mean gap "
        f"{o['ms_mean_gap']:+.1f} years (first session per patient {o['ms_mean_gap_baseline']:+.1f}), "
        f"Pearson r of predicted with chronological age {o['ms_pearson_r']:.2f} "
        f"(p = {o['ms_pearson_p']:.2g}), mean predicted SD {o['ms_mean_sd']:.1f} years.",
        "- Command: `python scripts/out_of_site_check.py --model NAME OUT_MPRAGE OUT_MS2018 "
        "OUT_MS2016 --card CARD` (participant runs in the script's docstring).", ""]


def _synthesis_lines(card: dict) -> list[str]:
    """Markdown lines of a model trained on synthetic images (``--synth``)."""
    s = card.get("synthesis")
    if not s:
        return []
    return [
        "- **Trained on synthetic images** (`--synth`): every training image was synthesised on "
        "the fly from the tissue maps (CSF, GM, WM, deep GM; prior-guided Atropos) of the "
        "training scans, with random contrast (T1w-, T2w-, FLAIR-like or random tissue "
        "intensities, weights " + "/".join(f"{w:g}" for w in s["contrast_weights"]) + "), "
        f"partial-volume mixing, {s['thickness_mm'][0]:g}-{s['thickness_mm'][1]:g} mm slices "
        f"along a random axis (probability {s['resolution_probability']:g}), bias field "
        f"({s['bias_probability']:g}), noise ({s['noise_probability']:g}) and a small affine "
        f"({s['affine_probability']:g}); real T1w images mixed in with probability "
        f"{s['real_probability']:g} (see `brainage_bids/models/synth.py`).",
        f"- Applies to: {', '.join(card['modalities'])} (contrast-agnostic).",
        f"- Every figure below is on {s['evaluated_on']}.",
    ]


def _augmentation_text(aug: dict | None) -> str:
    families = (aug or {}).get("families", ["legacy"])
    if families == ["legacy"]:
        return "random shifts of up to 2 voxels and left-right flips"
    if not families:
        return "none"
    return (f"{', '.join(families)} (each with probability {aug['probability']:g} per image; see "
            "`brainage_bids/models/augment.py`), then division by the brain mean")


def kfold_split(ids: list[str], ages: list[float], k: int, seed: int) -> list[list[str]]:
    """``k`` folds of participants, stratified by age (runs of k similar ages dealt at random)."""
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in np.argsort(ages, kind="stable")]
    folds: list[list[str]] = [[] for _ in range(k)]
    for start in range(0, len(order), k):
        chunk = order[start:start + k]
        for f, pid in zip(rng.permutation(k)[:len(chunk)], chunk):
            folds[int(f)].append(pid)
    return [sorted(f) for f in folds]


def build_trainable(arch: str, config: dict, mean_age: float, dropout: float | None = None):
    """A network to train; IRV2's final bias starts at the mean training age. ``dropout`` before
    the output (default 0.2 for IRV2, 0.5 for SFCN as published)."""
    from .checkpoint import build_network

    if arch == "irv2":
        net = build_network("irv2", config, dropout=0.2 if dropout is None else dropout)
        with torch.no_grad():
            net.linear[1].bias.fill_(float(mean_age))
        return net
    return build_sfcn(config, 0.5 if dropout is None else dropout)


LOSSES = ("kl", "kl+l1")
L1_WEIGHT = 0.1  # per year of absolute error, against a KL term of about 2 early in training


def loss_fn(arch: str, out: torch.Tensor, ages: torch.Tensor, centres, loss: str = "kl") -> torch.Tensor:
    """IRV2: MSE on age. SFCN: KL divergence to Gaussian soft labels (``kl``), plus, for
    ``kl+l1``, 0.1 x the absolute error of the distribution's mean in years, which pulls the
    expected age to the true one while the KL term shapes the distribution."""
    if arch == "irv2":
        return torch.nn.functional.mse_loss(out.reshape(-1), ages)
    kl = soft_label_loss(out, ages, centres, sigma=1.0)
    if loss == "kl":
        return kl
    mean = (out.exp() * centres[None, :]).sum(1)
    return kl + L1_WEIGHT * (mean - ages).abs().mean()


@torch.no_grad()
def predict_net(arch: str, net, x: np.ndarray, centres, device: str, batch: int = 8):
    """(ages, sds) of model-grid arrays [N, 1, ...]; SDs are NaN for scalar outputs."""
    from .inference import predict_network

    age, sd, _ = predict_network(net, list(x[:, 0]), None if arch == "irv2" else centres.cpu().numpy(),
                                 device=device, precision="fp32", batch_size=batch)
    return age, sd


def augment_train_batch(x: torch.Tensor, rng: np.random.Generator, families, probability: float,
                        voxel_mm: float) -> torch.Tensor:
    """The training batch as augmented by ``--augment`` (``("legacy",)``: shifts and flips)."""
    if tuple(families) == ("legacy",):
        return augment(x, rng)
    if not families:
        return x
    return augment_batch(x, rng, families, probability=probability, voxel_mm=voxel_mm)


def first_selection_epoch(epochs: int) -> int:
    """0-based first epoch whose weights may be selected: the second half of training. Earlier
    epochs are neither evaluated nor selectable (BatchNorm recomputation and validation cost
    about a third of an epoch)."""
    return epochs // 2


def synth_options(opts):
    """The :class:`~brainage_bids.models.synth.SynthOptions` of ``--synth`` (None without it)."""
    if not getattr(opts, "synth", False):
        return None
    from .synth import SynthOptions

    return SynthOptions(real_probability=float(getattr(opts, "synth_real_probability", 0.0)))


def fit_member(arch: str, config: dict, x_train, y_train, x_val, y_val, *, opts, seed: int,
               run_dir: Path, device: str, centres, label: str, probs_train=None,
               init: dict | None = None):
    """Train one network, keep the epoch of the second half with the lowest validation MAE;
    resumable.

    With ``probs_train`` (tissue maps of the training scans, ``--synth``) every batch is
    synthesised from them instead of augmenting ``x_train`` (the real images, which enter a
    synthetic batch only through ``--synth-real-probability``). ``init`` (from
    :func:`initial_weights`) gives the weights training starts from.

    Returns (network with the best weights, best epoch (1-based), history, validation predictions
    of the last epoch (ages, SDs): the figures of a member whose epoch was not selected on them).
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dropout = getattr(opts, "dropout", None)
    net = build_trainable(arch, config, float(np.mean(y_train)), dropout)
    if init is not None:
        net.load_state_dict(init["state_dict"])
    net = net.to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=opts.learning_rate,
                                  weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=opts.epochs)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_file, best_file = run_dir / "last.pt", run_dir / "best.pt"
    signature = {"arch": arch, "config": config, "seed": seed, "epochs": opts.epochs,
                 "batch_size": opts.batch_size, "lr": opts.learning_rate, "voxel": opts.voxel_size,
                 "weight_decay": opts.weight_decay, "n_train": len(y_train),
                 "train_ages": float(np.sum(y_train)), "val_ages": float(np.sum(y_val)),
                 "dropout": dropout, "loss": getattr(opts, "loss", "kl"),
                 "augment": list(getattr(opts, "augment", ("legacy",))),
                 "augment_probability": float(getattr(opts, "augment_probability", 0.5)),
                 "recipe": "drop-last, channels_last_3d, batchnorm recomputed and validation "
                           "from the second half"}
    # keys absent when unused, so that checkpoints of runs from before they existed still resume
    if synth_options(opts) is not None:
        signature["synth"] = synth_options(opts).as_dict()
    if init is not None:
        signature["init_from"] = init["sha256"]
    families = tuple(getattr(opts, "augment", ("legacy",)))
    probability = float(getattr(opts, "augment_probability", 0.5))
    first_eval = first_selection_epoch(opts.epochs)
    synth = synth_options(opts) if probs_train is not None else None
    x_norm = x_train  # images BatchNorm statistics are recomputed over
    if synth is not None:
        from .synth import synth_batch

        # one fixed synthetic image per training scan (its own seed: resuming draws the same)
        x_norm = synth_batch(probs_train, np.random.default_rng(seed + 10_000), synth,
                             opts.voxel_size, real=x_train).numpy()
    start_epoch, best, history = 0, {"mae": math.inf, "epoch": -1}, []
    last_pred = (np.full(len(y_val), np.nan), np.full(len(y_val), np.nan))
    if state_file.exists():
        st = torch.load(state_file, map_location=device, weights_only=True)
        if st.get("signature") == signature:
            net.load_state_dict(st["model"])
            optimiser.load_state_dict(st["optimiser"])
            scheduler.load_state_dict(st["scheduler"])
            rng.bit_generator.state = st["rng"]
            torch.set_rng_state(st["torch_rng"])
            start_epoch, best, history = st["epoch"] + 1, st["best"], st["history"]
            last_pred = (np.asarray(st["last_pred"][0]), np.asarray(st["last_pred"][1]))
            LOG.warning("resuming %s from epoch %d", label, start_epoch)
        else:
            LOG.warning("%s holds a run with other settings; starting afresh", state_file)
    n_train = len(x_train)
    if device == "cpu":  # 3D convolutions train several times faster in this layout on CPU
        net = net.to(memory_format=torch.channels_last_3d)
    for epoch in range(start_epoch, opts.epochs):
        net.train()
        order = rng.permutation(n_train)
        losses = []
        bar = tqdm(range(0, n_train, opts.batch_size), desc=f"{label} epoch {epoch + 1}/{opts.epochs}",
                   unit="batch", leave=False, disable=None)
        for i in bar:
            idx = order[i:i + opts.batch_size]
            if len(idx) < min(opts.batch_size, n_train):  # drop the incomplete last batch
                continue
            if synth is not None:
                xb = synth_batch(probs_train[idx], rng, synth, opts.voxel_size,
                                 real=x_train[idx]).to(device)
            else:
                xb = augment_train_batch(torch.from_numpy(x_train[idx]), rng, families,
                                         probability, opts.voxel_size).to(device)
            if device == "cpu":
                xb = xb.contiguous(memory_format=torch.channels_last_3d)
            yb = torch.from_numpy(y_train[idx]).to(device)
            loss = loss_fn(arch, net(xb), yb, centres, getattr(opts, "loss", "kl"))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        scheduler.step()
        entry = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                 "val_mae": None}
        if epoch >= first_eval:
            recompute_batchnorm(net, x_norm, device)
            pred, sd = predict_net(arch, net, x_val, centres, device)
            entry["val_mae"] = metrics(y_val, pred)["mae"]
            if epoch == opts.epochs - 1:
                last_pred = (np.asarray(pred, float), np.asarray(sd, float))
            if entry["val_mae"] < best["mae"]:
                best = {"mae": entry["val_mae"], "epoch": epoch}
                torch.save(net.state_dict(), best_file)
            LOG.warning("%s epoch %d/%d loss %.3f validation MAE %.2f (best %.2f at %d)", label,
                        epoch + 1, opts.epochs, entry["loss"], entry["val_mae"], best["mae"],
                        best["epoch"] + 1)
        else:
            LOG.warning("%s epoch %d/%d loss %.3f", label, epoch + 1, opts.epochs, entry["loss"])
        history.append(entry)
        torch.save({"signature": signature, "model": net.state_dict(),
                    "optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                    "epoch": epoch, "best": best, "history": history,
                    "last_pred": [last_pred[0].tolist(), last_pred[1].tolist()]},
                   str(state_file) + ".tmp")
        os.replace(str(state_file) + ".tmp", state_file)
    net.load_state_dict(torch.load(best_file, map_location=device, weights_only=True))
    net = net.to(memory_format=torch.contiguous_format)
    return net.eval(), best["epoch"] + 1, history, last_pred


def _mean_sd(sds) -> float | None:
    """Mean predicted-age SD (None for scalar outputs, whose SDs are NaN)."""
    sds = np.asarray(sds, dtype=float)
    return float(np.mean(sds)) if len(sds) and np.isfinite(sds).all() else None


def _nan_metrics() -> dict:
    return {"n": 0, "mae": float("nan"), "r2": float("nan"), "pearson_r": float("nan"),
            "mean_error": float("nan")}


def initial_weights(init_from: str, plan: list[dict], arch: str, config: dict) -> list[dict]:
    """The weights each member starts from with ``--init-from`` (a trained model's card JSON,
    member files beside it, or a bundled model's name): one dict per member of ``plan`` with
    ``state_dict``, ``file`` and ``sha256``. UsageError when the model's architecture, channels
    or bins differ, or when a cross-validation member held out other participants than the
    member it would start (the out-of-fold figures would then be of scans it was trained on)."""
    import hashlib

    from ..cli.parser import UsageError
    from .zoo import PACKAGE_MODELS

    card_file = Path(init_from)
    if not card_file.is_file():
        card_file = PACKAGE_MODELS / f"{init_from}_card.json"
    if not card_file.is_file():
        raise UsageError(f"--init-from {init_from}: neither a model card file nor a bundled "
                         f"model (no {card_file.name} in {PACKAGE_MODELS})")
    try:
        card = json.loads(card_file.read_text())
        card_members = card["members"]
        splits = card["split_participants"]["members"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--init-from {card_file}: not a model card of the train level ({exc})") \
            from None
    if len(card_members) != len(plan):
        raise UsageError(f"--init-from {card_file}: {len(card_members)} member(s), this run "
                         f"trains {len(plan)} (--ensemble-size)")
    out = []
    for k, (m, cm, split) in enumerate(zip(plan, card_members, splits)):
        if m["fold"] is not None and sorted(split["validation"]) != sorted(m["validation"]):
            raise UsageError(f"--init-from {card_file}: member {k + 1} held out other "
                             f"participants than fold {m['fold']} of this run (use the same "
                             "dataset, --ensemble-size and --seed)")
        f = card_file.parent / f"{cm['name']}.pt"
        try:
            blob = f.read_bytes()
            payload = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
            raise UsageError(f"--init-from: cannot read member {f}: {exc}") from None
        got = (payload.get("arch"), payload.get("config"))
        if got != (arch, config):
            raise UsageError(f"--init-from: {f} is {got[0]} {got[1]}, this run trains {arch} "
                             f"{config}")
        out.append({"state_dict": payload["state_dict"], "file": str(f),
                    "sha256": hashlib.sha256(blob).hexdigest()})
    return out


def split_seed(opts) -> int:
    """Seed of the participant splits (``--split-seed``, default ``--seed``): the test split uses
    it, the validation or cross-validation split it + 1."""
    seed = getattr(opts, "split_seed", None)
    return opts.seed if seed is None else int(seed)


def _member_plan(pids: list[str], ages: list[float], opts) -> list[dict]:
    """Train/validation participants of each member (single, seeds or cv folds)."""
    fold_seed = split_seed(opts) + 1
    if opts.ensemble_mode == "cv":
        folds = kfold_split(pids, ages, opts.ensemble_size, fold_seed)
        if min(len(f) for f in folds) < 2:
            from ..cli.parser import EXIT_NO_INPUT, UsageError
            raise UsageError(f"{opts.ensemble_size} folds of {len(pids)} participants leave a fold "
                             "with fewer than 2", EXIT_NO_INPUT)
        return [{"train": sorted(set(pids) - set(f)), "validation": f, "seed": opts.seed + k,
                 "fold": k + 1} for k, f in enumerate(folds)]
    val_ids, train_ids = stratified_split(pids, ages, opts.val_fraction, fold_seed)
    return [{"train": train_ids, "validation": val_ids, "seed": opts.seed + k, "fold": None}
            for k in range(opts.ensemble_size)]


def train_from_bids(bids_dir: Path, output_dir: Path, work_dir: Path, opts, command: str) -> dict:
    """Train a model or an ensemble, select on validation, score on test, write weights, the
    model card and the out-of-fold (or validation) predictions of the healthy controls."""
    from .zoo import write_ensemble_manifest

    t0 = time.time()
    device = resolve_device(opts.device)
    torch.set_num_threads(opts.omp_nthreads)
    if len(opts.modalities) != 1:
        from ..cli.parser import UsageError
        raise UsageError("train one modality at a time: --modalities T1w or --modalities FLAIR")
    modality = opts.modalities[0]
    arch = getattr(opts, "arch", "sfcn")
    synth = synth_options(opts)
    if synth is not None and modality != "T1w":
        from ..cli.parser import UsageError
        raise UsageError("--synth reads the T1w scans (tissue maps to synthesise from, real images "
                         "to validate on): use --modalities T1w")

    examples = find_examples(bids_dir, output_dir, opts)
    by_pid: dict[str, list[Example]] = {}
    for ex in examples:
        by_pid.setdefault(ex.participant_id, []).append(ex)
    if len(by_pid) < 10:
        from ..cli.parser import EXIT_NO_INPUT, UsageError

        raise UsageError(f"only {len(by_pid)} participants with {modality} outputs usable for "
                         "training (need at least 10)", EXIT_NO_INPUT)
    pids = sorted(by_pid)
    mean_age = {p: float(np.mean([e.age for e in by_pid[p]])) for p in pids}
    test_ids, rest = stratified_split(pids, [mean_age[p] for p in pids], opts.test_fraction,
                                      split_seed(opts))
    plan = _member_plan(rest, [mean_age[p] for p in rest], opts)
    LOG.info("%s %s, %d member(s) (%s): %d test participants, %d for training/validation", arch,
             modality, len(plan), opts.ensemble_mode, len(test_ids), len(rest))

    config = ({"channels": list(opts.channels), "bins": [opts.age_bins[0], opts.age_bins[1], 1.0]}
              if arch == "sfcn" else {})
    # checked before the arrays and tissue maps are loaded (minutes)
    init_from = getattr(opts, "init_from", None)
    inits = initial_weights(init_from, plan, arch, config) if init_from else [None] * len(plan)
    only = sorted(set(getattr(opts, "members", None) or []))
    if only and not set(only) <= set(range(1, len(plan) + 1)):
        from ..cli.parser import UsageError
        raise UsageError(f"--members {' '.join(map(str, only))}: this run has members 1-"
                         f"{len(plan)}")
    affine, shape = mni_box_grid(opts.voxel_size)
    if min(shape) < 32:
        from ..cli.parser import UsageError

        raise UsageError(f"--voxel-size {opts.voxel_size} gives a {shape} grid; the networks' five "
                         "2x reductions need at least 32 voxels per axis (voxel size <= 5 mm)")
    spec = InputSpec(affine, shape, "mask_mean")
    cache = work_dir / "train_cache"
    rows = lambda ids: [e for p in ids for e in by_pid[p]]  # noqa: E731
    pool = rows(rest)
    x_pool = load_arrays(pool, spec, cache)
    probs_pool = None
    if synth is not None:
        from .anatomy import load_anatomy

        probs_pool = load_anatomy(pool, x_pool, spec, cache, threads=opts.omp_nthreads)
    y_pool = np.array([e.age for e in pool], dtype=np.float32)
    index = {id(e): i for i, e in enumerate(pool)}
    test = rows(test_ids)
    x_test = load_arrays(test, spec, cache) if test else None
    y_test = np.array([e.age for e in test], dtype=np.float32)

    centres = (torch.as_tensor(bin_centres(*config["bins"]), dtype=torch.float32, device=device)
               if arch == "sfcn" else None)
    out_dir = output_dir / "models" / opts.model_name
    members, oof, test_preds = [], [], []
    for k, m in enumerate(plan):
        label = opts.model_name if len(plan) == 1 else f"{opts.model_name}-m{k + 1}"
        if only and k + 1 not in only:
            continue
        tr = [index[id(e)] for e in rows(m["train"])]
        va = [index[id(e)] for e in rows(m["validation"])]
        net, best_epoch, history, (last_pred, last_sd) = fit_member(
            arch, config, x_pool[tr], y_pool[tr], x_pool[va], y_pool[va], opts=opts, seed=m["seed"],
            run_dir=work_dir / f"train_{label}", device=device, centres=centres, label=label,
            probs_train=None if probs_pool is None else probs_pool[tr], init=inits[k])
        val_pred, val_sd = predict_net(arch, net, x_pool[va], centres, device)
        for j, p, sd, lp in zip(va, val_pred, val_sd, last_pred):
            e = pool[j]
            oof.append({"participant_id": e.participant_id, "session_id": e.session_id,
                        "suffix": modality, "model": label, "chronological_age": e.age,
                        "predicted_age": float(p),
                        "predicted_age_sd": float(sd) if np.isfinite(sd) else None,
                        "fold": m["fold"] if m["fold"] is not None else "validation",
                        "last_epoch_predicted_age": float(lp)})
        member = {"name": label, "seed": m["seed"], "fold": m["fold"], "best_epoch": best_epoch,
                  "initialised_from": None if inits[k] is None else
                  {"file": Path(inits[k]["file"]).name, "sha256": inits[k]["sha256"]},
                  "history": history, "splits": {"train": len(m["train"]),
                                                 "validation": len(m["validation"])},
                  "validation": dict(metrics(y_pool[va], val_pred), mean_sd=_mean_sd(val_sd)),
                  "validation_last_epoch": metrics(y_pool[va], last_pred)}
        if x_test is not None:
            tp, tsd = predict_net(arch, net, x_test, centres, device)
            test_preds.append((tp, tsd))
            member["test"] = dict(metrics(y_test, tp), mean_sd=_mean_sd(tsd))
        else:
            member["test"] = _nan_metrics()
        member["net"] = net.cpu()
        members.append(member)

    if only and len(only) < len(plan):
        LOG.warning("trained member(s) %s of %d in %s; a run without --members writes the "
                    "ensemble once every member's train_<name>/ folder is there",
                    ", ".join(map(str, only)), len(plan), work_dir)
        return {"weights": None, "members_trained": [m["name"] for m in members]}
    oof_age = [r["chronological_age"] for r in oof]
    results = {"validation": metrics(oof_age, [r["predicted_age"] for r in oof]) if oof
               else _nan_metrics()}
    if oof:
        results["validation"]["uncertainty"] = uncertainty_figures(
            oof_age, [r["predicted_age"] for r in oof],
            [np.nan if r["predicted_age_sd"] is None else r["predicted_age_sd"] for r in oof])
        results["validation"]["last_epoch"] = metrics(oof_age,
                                                      [r["last_epoch_predicted_age"] for r in oof])
        results["validation"]["predictions"] = [
            {k: r[k] for k in ("participant_id", "session_id", "model", "fold", "chronological_age",
                               "predicted_age", "predicted_age_sd", "last_epoch_predicted_age")}
            for r in oof]
    if test_preds:
        from .inference import ensemble

        ens = [ensemble([tp[i] for tp, _ in test_preds], [ts[i] for _, ts in test_preds])
               for i in range(len(y_test))]
        results["test"] = dict(metrics(y_test, [a for a, _ in ens]),
                               mean_sd=_mean_sd([sd for _, sd in ens]))
        results["test"]["predictions"] = [
            {"participant_id": e.participant_id, "age": e.age, "predicted_age": float(a),
             "members": [float(tp[i]) for tp, _ in test_preds]}
            for i, (e, (a, _)) in enumerate(zip(test, ens))]
    else:
        results["test"] = _nan_metrics()

    all_ages = y_pool
    net0 = members[0]["net"]
    from .synth import APPLIES_TO

    weights_modality = "+".join(APPLIES_TO) if synth is not None else modality
    card = {
        "name": opts.model_name, "architecture": "SFCN" if arch == "sfcn" else
        "3D Inception-ResNet-V2", "arch": arch, "modality": weights_modality,
        "modalities": list(APPLIES_TO) if synth is not None else [modality],
        "trained_on": "synthetic" if synth is not None else "real",
        "software_version": __version__,
        "training_data": {"dataset": _dataset_name(bids_dir), "bids_dir": str(bids_dir),
                          "selection": _selection_text(bids_dir, opts)},
        "ensemble": {"size": len(plan), "mode": opts.ensemble_mode},
        "splits": ({"train_validation_pool": len(rest), "test": len(test_ids)}
                   if opts.ensemble_mode == "cv" else
                   {"train": len(plan[0]["train"]), "validation": len(plan[0]["validation"]),
                    "test": len(test_ids)}),
        "split_participants": {
            "test": test_ids,
            **({"train": plan[0]["train"], "validation": plan[0]["validation"]}
               if opts.ensemble_mode != "cv" else {}),
            "members": [{"train": m["train"], "validation": m["validation"]} for m in plan]},
        "age_range": [float(all_ages.min()), float(all_ages.max())],
        "age_bins": config.get("bins", [None, None])[:2], "channels": config.get("channels"),
        "parameters": int(sum(p.numel() for p in net0.parameters())),
        "input": {"space": TEMPLATE, "voxel_size": opts.voxel_size, "shape": list(shape),
                  "normalisation": "mean inside the brain mask"},
        "validation": results["validation"], "test": results["test"],
        "members": [{k: v for k, v in m.items() if k != "net"} for m in members],
        "augmentation": {"families": list(getattr(opts, "augment", ("legacy",))),
                         "probability": float(getattr(opts, "augment_probability", 0.5))},
        "synthesis": None if synth is None else {
            **synth.as_dict(), "tissue_maps": "models/anatomy.py (prior-guided Atropos; CSF, GM, "
            "WM, deep GM)", "evaluated_on": f"real {modality} images (no synthesis)"},
        "initialised_from": init_from and str(init_from),
        "dropout": getattr(opts, "dropout", None), "loss": getattr(opts, "loss", "kl"),
        "epochs": opts.epochs, "best_epoch": members[0]["best_epoch"],
        "batch_size": opts.batch_size, "learning_rate": opts.learning_rate,
        "weight_decay": opts.weight_decay, "seed": opts.seed, "split_seed": split_seed(opts),
        "device": device,
        "training_seconds": time.time() - t0, "history": members[0]["history"], "command": command,
    }
    small_card = {k: card[k] for k in ("name", "age_range", "age_bins", "training_data", "modality",
                                       "modalities", "trained_on")}
    small_card["test_mae"] = results["test"]["mae"]
    files = []
    for m in members:
        f = out_dir / f"{m['name']}.pt"
        # held-out figures of the member travel with its weights (QC uses test.mean_sd)
        m_card = dict(small_card, name=m["name"],
                      test={k: v for k, v in m["test"].items() if k != "predictions"},
                      validation=m["validation"])
        digest = save_checkpoint(f, m["net"], m["name"], config, spec, m_card, arch=arch,
                                 modality=weights_modality)
        files.append(f)
        card["members"][members.index(m)]["sha256"] = digest
    if len(members) == 1:
        card["sha256"] = card["members"][0]["sha256"]
        card["weights"] = str(files[0])
    else:
        manifest = out_dir / f"{opts.model_name}.json"
        write_ensemble_manifest(manifest, opts.model_name, weights_modality, files)
        card["weights"] = str(manifest)
    oof_df = pd.DataFrame(oof, columns=["participant_id", "session_id", "suffix", "model",
                                        "chronological_age", "predicted_age", "predicted_age_sd",
                                        "fold"])
    atomic_write_text(out_dir / "oof_predictions.tsv", oof_df.to_csv(sep="\t", index=False,
                                                                      na_rep="n/a"))
    atomic_write_text(out_dir / f"{opts.model_name}_card.json", json.dumps(card, indent=2) + "\n")
    atomic_write_text(out_dir / f"{opts.model_name}_card.md", _card_markdown(card))
    LOG.warning("test MAE %.2f, R2 %.3f, r %.3f (n=%d); weights %s", results["test"]["mae"],
                results["test"]["r2"], results["test"]["pearson_r"], results["test"]["n"],
                card["weights"])
    return card


def _stats_spec(opts) -> dict:
    """The ``--stats-spec`` of the run (its ``controls`` define who is a healthy control)."""
    from ..stats.spec import load_spec

    return load_spec(getattr(opts, "stats_spec", None))


def _selection_text(bids_dir: Path, opts) -> str:
    spec = _stats_spec(opts)
    if healthy_controls(read_participants(bids_dir), spec) is None:
        return "all participants"
    return (f"participants with {spec['columns']['diagnosis']} "
            f"{' or '.join(map(str, spec['controls']))}")


def _dataset_name(bids_dir: Path) -> str:
    try:
        return json.loads((bids_dir / "dataset_description.json").read_text()).get("Name", bids_dir.name)
    except (OSError, json.JSONDecodeError):
        return bids_dir.name

