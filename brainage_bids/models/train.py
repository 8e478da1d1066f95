"""The ``train`` level: fit an SFCN on the healthy controls of a BIDS dataset.

Training reads the participant-level outputs (MNI image and brain mask per scan), so the model sees
exactly the preprocessing it will be applied to. Participants are split once, with a fixed seed and
stratified by age, into train / validation / test; the test split is only scored after training.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .. import __version__
from ..utils.bids import Scan, collect_scans, load_filters, read_participants
from ..utils.images import atomic_write_text
from .checkpoint import InputSpec, build_sfcn, mni_box_grid, save_checkpoint
from .inference import model_input, resolve_device
from .sfcn import bin_centres, expected_age, soft_label_loss

LOG = logging.getLogger("brainage_bids.train")
HEALTHY = {"hc", "healthy", "control", "healthy control", "healthy_control"}


@dataclass
class Example:
    participant_id: str
    path: str
    mask: str
    age: float


def healthy_controls(participants: pd.DataFrame) -> set[str] | None:
    """Participant ids with diagnosis HC; None when there is no diagnosis column (use everyone)."""
    if "diagnosis" not in participants:
        return None
    diag = participants["diagnosis"].fillna("").astype(str).str.strip().str.lower()
    return set(participants.index[diag.isin(HEALTHY)])


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
    """MAE, R2 (1 - SSres/SStot) and Pearson r of predictions against ages, in years."""
    y_true = np.asarray(y_true, float)
    y_pred = np.asarray(y_pred, float)
    err = y_pred - y_true
    ss_tot = float(((y_true - y_true.mean()) ** 2).sum())
    r = float(stats.pearsonr(y_true, y_pred)[0]) if len(y_true) > 2 else float("nan")
    return {"n": int(len(y_true)), "mae": float(np.abs(err).mean()),
            "r2": 1.0 - float((err ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
            "pearson_r": r, "mean_error": float(err.mean())}


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
    """Healthy-control T1w scans with an age and participant-level outputs in ``output_dir``."""
    from ..workflows.outputs import derivative_paths

    scans: list[Scan] = collect_scans(bids_dir, opts.participant_label, opts.session_label,
                                      load_filters(opts.bids_filter_file),
                                      validate=not opts.skip_bids_validation)
    hc = healthy_controls(read_participants(bids_dir))
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
        examples.append(Example(scan.participant_id, paths["preproc"], paths["mask"], float(scan.age)))
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
        np.save(f, arr)
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
    for i in range(0, len(x), batch):
        net(torch.from_numpy(x[i:i + batch]).to(device))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    net.eval()


@torch.no_grad()
def predict_batches(net, x: np.ndarray, centres: torch.Tensor, device: str, batch: int = 8):
    net.eval()
    means, sds = [], []
    for i in range(0, len(x), batch):
        logp = net(torch.from_numpy(x[i:i + batch]).to(device))
        m, s = expected_age(logp, centres)
        means.append(m.cpu().numpy())
        sds.append(s.cpu().numpy())
    return np.concatenate(means), np.concatenate(sds)


def _card_markdown(card: dict) -> str:
    def fmt(m):
        return (f"| {m['n']} | {m['mae']:.2f} | {m['r2']:.3f} | {m['pearson_r']:.3f} | "
                f"{m['mean_error']:+.2f} |")

    lines = [
        f"# Model card: {card['name']}", "",
        f"SFCN (Peng et al. 2021) with a soft-label output over {card['age_bins'][0]:g}-"
        f"{card['age_bins'][1]:g} years (one-year bins, Gaussian soft labels sigma 1, KL-divergence "
        "loss); brain age is the expectation of the output distribution.", "",
        "## Training data",
        f"- Dataset: {card['training_data']['dataset']} ({card['training_data']['bids_dir']})",
        f"- Participants: {card['training_data']['selection']}",
        f"- n = {card['splits']['train']} train, {card['splits']['validation']} validation, "
        f"{card['splits']['test']} test (split by participant, stratified by age, seed "
        f"{card['seed']}); ages {card['age_range'][0]:.1f}-{card['age_range'][1]:.1f} years",
        "",
        "## Input",
        f"- MNI152NLin2009aSym, affine registration, brain extracted, {card['input']['voxel_size']:g} mm "
        f"grid {'x'.join(map(str, card['input']['shape']))}, intensities divided by the mean inside "
        "the brain mask.",
        f"- Channels {card['channels']}, {card['parameters']:,} parameters.", "",
        "## Performance (uncorrected for age bias)", "",
        "| split | n | MAE (y) | R2 | Pearson r | mean error (y) |", "|---|---|---|---|---|---|",
        "| validation " + fmt(card["validation"]),
        "| test (held out, never used for selection) " + fmt(card["test"]), "",
        "## Training", f"- {card['epochs']} epochs (best validation epoch {card['best_epoch']}), "
        f"batch {card['batch_size']}, AdamW lr {card['learning_rate']:g} (cosine), weight decay "
        f"{card['weight_decay']:g}, augmentation: random shifts of up to 2 voxels and left-right flips; "
        "BatchNorm statistics recomputed over the training scans after every epoch; the epoch with "
        "the lowest validation MAE is kept.",
        f"- Device: {card['device']}; training time {card['training_seconds'] / 60:.1f} min.",
        f"- Command: `{card['command']}`", "",
        "## Limits",
        "- Trained on a single site and scanner; expect larger errors and an age bias on other "
        "scanners: fit the group level's bias correction on your own healthy controls.",
        f"- Ages outside {card['age_range'][0]:.0f}-{card['age_range'][1]:.0f} years are extrapolation.",
        "- Small training set: individual predictions carry several years of error; use for "
        "group-level comparisons.", "",
        f"brainage-bids {card['software_version']}; weights sha256 in the JSON card.",
    ]
    if card.get("notes"):
        lines[-1:-1] = ["## Notes", *[f"- {n}" for n in card["notes"]], ""]
    return "\n".join(lines) + "\n"


def train_from_bids(bids_dir: Path, output_dir: Path, work_dir: Path, opts, command: str) -> dict:
    """Train, select on validation, score on test, write weights and the model card."""
    from tqdm import tqdm

    t0 = time.time()
    device = resolve_device(opts.device)
    torch.set_num_threads(opts.omp_nthreads)
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)

    examples = find_examples(bids_dir, output_dir, opts)
    by_pid: dict[str, list[Example]] = {}
    for ex in examples:
        by_pid.setdefault(ex.participant_id, []).append(ex)
    if len(by_pid) < 10:
        from ..cli.parser import EXIT_NO_INPUT, UsageError

        raise UsageError(f"only {len(by_pid)} participants usable for training (need at least 10)",
                         EXIT_NO_INPUT)
    pids = sorted(by_pid)
    mean_age = [float(np.mean([e.age for e in by_pid[p]])) for p in pids]
    test_ids, rest = stratified_split(pids, mean_age, opts.test_fraction, opts.seed)
    rest_age = [float(np.mean([e.age for e in by_pid[p]])) for p in rest]
    val_ids, train_ids = stratified_split(rest, rest_age, opts.val_fraction, opts.seed + 1)
    split = {"train": train_ids, "validation": val_ids, "test": test_ids}
    LOG.info("participants: %d train, %d validation, %d test", *map(len, split.values()))

    affine, shape = mni_box_grid(opts.voxel_size)
    if min(shape) < 32:
        from ..cli.parser import UsageError

        raise UsageError(f"--voxel-size {opts.voxel_size} gives a {shape} grid; SFCN's five 2x "
                         "poolings need at least 32 voxels per axis (voxel size <= 5 mm)")
    spec = InputSpec(affine, shape, "mask_mean")
    cache = work_dir / "train_cache"
    data = {k: [e for p in v for e in by_pid[p]] for k, v in split.items()}
    xs = {k: load_arrays(v, spec, cache) if v else None for k, v in data.items()}
    ys = {k: np.array([e.age for e in v], dtype=np.float32) for k, v in data.items()}

    config = {"channels": list(opts.channels), "bins": [opts.age_bins[0], opts.age_bins[1], 1.0]}
    centres = torch.as_tensor(bin_centres(*config["bins"]), dtype=torch.float32, device=device)
    net = build_sfcn(config).to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=opts.learning_rate,
                                  weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=opts.epochs)

    run_dir = work_dir / f"train_{opts.model_name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    state_file = run_dir / "last.pt"
    best_file = run_dir / "best.pt"
    signature = {"split": split, "config": config, "seed": opts.seed, "epochs": opts.epochs,
                 "batch_size": opts.batch_size, "lr": opts.learning_rate, "voxel": opts.voxel_size,
                 "weight_decay": opts.weight_decay, "recipe": "drop-last, batchnorm recomputed per epoch"}
    start_epoch, best = 0, {"mae": math.inf, "epoch": -1}
    history = []
    if state_file.exists():
        st = torch.load(state_file, map_location=device, weights_only=False)
        if st.get("signature") == signature:
            net.load_state_dict(st["model"])
            optimiser.load_state_dict(st["optimiser"])
            scheduler.load_state_dict(st["scheduler"])
            rng.bit_generator.state = st["rng"]
            torch.set_rng_state(st["torch_rng"])
            start_epoch, best, history = st["epoch"] + 1, st["best"], st["history"]
            LOG.warning("resuming %s from epoch %d", opts.model_name, start_epoch)
        else:
            LOG.warning("%s holds a run with other settings; starting afresh", state_file)

    n_train = len(xs["train"])
    for epoch in range(start_epoch, opts.epochs):
        net.train()
        order = rng.permutation(n_train)
        losses = []
        bar = tqdm(range(0, n_train, opts.batch_size), desc=f"epoch {epoch + 1}/{opts.epochs}",
                   unit="batch", leave=False, disable=None)
        for i in bar:
            idx = order[i:i + opts.batch_size]
            if len(idx) < min(opts.batch_size, n_train):  # drop the incomplete last batch
                continue
            xb = augment(torch.from_numpy(xs["train"][idx]), rng).to(device)
            yb = torch.from_numpy(ys["train"][idx]).to(device)
            loss = soft_label_loss(net(xb), yb, centres, sigma=1.0)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        scheduler.step()
        recompute_batchnorm(net, xs["train"], device)
        pred, _ = predict_batches(net, xs["validation"], centres, device)
        val = metrics(ys["validation"], pred)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_mae": val["mae"]})
        if val["mae"] < best["mae"]:
            best = {"mae": val["mae"], "epoch": epoch}
            torch.save(net.state_dict(), best_file)
        LOG.warning("epoch %d/%d loss %.3f validation MAE %.2f (best %.2f at %d)", epoch + 1,
                    opts.epochs, history[-1]["loss"], val["mae"], best["mae"], best["epoch"] + 1)
        torch.save({"signature": signature, "model": net.state_dict(),
                    "optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                    "epoch": epoch, "best": best, "history": history}, str(state_file) + ".tmp")
        os.replace(str(state_file) + ".tmp", state_file)

    net.load_state_dict(torch.load(best_file, map_location=device, weights_only=True))
    results = {}
    for k in ("validation", "test"):
        if xs[k] is None:
            results[k] = {"n": 0, "mae": float("nan"), "r2": float("nan"), "pearson_r": float("nan"),
                          "mean_error": float("nan")}
            continue
        pred, sd = predict_batches(net, xs[k], centres, device)
        results[k] = metrics(ys[k], pred)
        results[k]["mean_sd"] = float(np.mean(sd))
        results[k]["predictions"] = [
            {"participant_id": e.participant_id, "age": e.age, "predicted_age": float(p)}
            for e, p in zip(data[k], pred)]
    all_ages = np.concatenate([ys[k] for k in ("train", "validation")])
    card = {
        "name": opts.model_name, "architecture": "SFCN", "software_version": __version__,
        "training_data": {"dataset": _dataset_name(bids_dir), "bids_dir": str(bids_dir),
                          "selection": "participants with diagnosis HC" if healthy_controls(
                              read_participants(bids_dir)) is not None else "all participants"},
        "splits": {k: len(v) for k, v in split.items()}, "split_participants": split,
        "age_range": [float(all_ages.min()), float(all_ages.max())],
        "age_bins": config["bins"][:2], "channels": config["channels"],
        "parameters": int(sum(p.numel() for p in net.parameters())),
        "input": {"space": "MNI152NLin2009aSym", "voxel_size": opts.voxel_size, "shape": list(shape),
                  "normalisation": "mean inside the brain mask"},
        "validation": results["validation"], "test": results["test"],
        "epochs": opts.epochs, "best_epoch": best["epoch"] + 1, "batch_size": opts.batch_size,
        "learning_rate": opts.learning_rate, "weight_decay": opts.weight_decay, "seed": opts.seed,
        "device": device, "training_seconds": time.time() - t0, "history": history,
        "command": command,
    }
    out_dir = output_dir / "models" / opts.model_name
    weights = out_dir / f"{opts.model_name}.pt"
    small_card = {k: card[k] for k in ("name", "age_range", "age_bins", "training_data")}
    small_card["test_mae"] = results["test"]["mae"]
    card["sha256"] = save_checkpoint(weights, net.cpu(), opts.model_name, config, spec, small_card)
    card["weights"] = str(weights)
    atomic_write_text(out_dir / f"{opts.model_name}_card.json", json.dumps(card, indent=2) + "\n")
    atomic_write_text(out_dir / f"{opts.model_name}_card.md", _card_markdown(card))
    LOG.warning("test MAE %.2f, R2 %.3f, r %.3f (n=%d); weights %s", results["test"]["mae"],
                results["test"]["r2"], results["test"]["pearson_r"], results["test"]["n"], weights)
    return card


def _dataset_name(bids_dir: Path) -> str:
    try:
        return json.loads((bids_dir / "dataset_description.json").read_text()).get("Name", bids_dir.name)
    except (OSError, json.JSONDecodeError):
        return bids_dir.name

