"""One cross-validation ensemble from several trained by the train level on the same folds.

Two recipes (or two seeds, ``--split-seed``) trained as ``--ensemble-mode cv`` with the same K
folds give K x R members; each control is then predicted out-of-fold by the R members that held
out its fold, combined as at inference (:func:`~brainage_bids.models.inference.ensemble`: mean
age, SD by the law of total variance). The combined card keeps every component's card and recipe,
recomputes its figures from the combined out-of-fold predictions, and lists every member.

    python scripts/combine_cv_ensembles.py --name NAME OUT_DIR CARD_A CARD_B [...]
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils.images import atomic_write_bytes, atomic_write_text
from .cards import read_card

#: keys every component must share: same data, folds, grid and output
SHARED_KEYS = ("modality", "age_bins", "input", "splits")


class CombineError(ValueError):
    """The cards cannot be combined (not cross-validated, other folds, grid or output)."""


def _folds(card: dict) -> list[list[str]]:
    return [sorted(m["validation"]) for m in card["split_participants"]["members"]]


def check_components(cards: list[dict], files: list[Path]) -> None:
    """Raise :class:`CombineError` unless every card is a CV ensemble on the same folds."""
    if len(cards) < 2:
        raise CombineError("give at least two model cards to combine")
    for card, f in zip(cards, files):
        if not card:
            raise CombineError(f"{f}: not a model card (missing or unreadable JSON)")
        if (card.get("ensemble") or {}).get("mode") != "cv":
            raise CombineError(f"{f}: {card.get('name')} is not a cross-validation ensemble "
                               "(train --ensemble-mode cv)")
        if not (card.get("validation") or {}).get("predictions"):
            raise CombineError(f"{f}: the card holds no out-of-fold predictions")
    first = cards[0]
    for card, f in zip(cards[1:], files[1:]):
        if _folds(card) != _folds(first):
            raise CombineError(f"{f}: {card['name']} was trained on other folds than "
                               f"{first['name']} (train both with the same --split-seed)")
        for key in SHARED_KEYS:
            if card.get(key) != first.get(key):
                raise CombineError(f"{f}: {key} of {card['name']} ({card.get(key)}) differs from "
                                   f"{first['name']}'s ({first.get(key)})")


def combined_predictions(cards: list[dict]) -> list[dict]:
    """One out-of-fold row per scan: the members (one per card) that held out its fold, combined."""
    from .inference import ensemble

    rows: dict[tuple, list[dict]] = {}
    for card in cards:
        for p in card["validation"]["predictions"]:
            rows.setdefault((p["participant_id"], p.get("session_id")), []).append(p)
    out = []
    for (pid, ses), preds in sorted(rows.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        if len(preds) != len(cards) or len({p["fold"] for p in preds}) != 1:
            raise CombineError(f"{pid}: out-of-fold in {len(preds)} of {len(cards)} cards, or in "
                               "different folds")
        sds = [np.nan if p.get("predicted_age_sd") is None else p["predicted_age_sd"] for p in preds]
        age, sd = ensemble([p["predicted_age"] for p in preds], sds)
        out.append({"participant_id": pid, "session_id": ses,
                    "model": "+".join(p["model"] for p in preds), "fold": preds[0]["fold"],
                    "chronological_age": preds[0]["chronological_age"], "predicted_age": age,
                    "predicted_age_sd": None if not np.isfinite(sd) else sd,
                    "last_epoch_predicted_age": float(np.mean(
                        [p["last_epoch_predicted_age"] for p in preds]))})
    return out


def _component(card: dict, card_file: Path) -> dict:
    keys = ("name", "augmentation", "epochs", "batch_size", "learning_rate", "weight_decay",
            "loss", "dropout", "seed", "split_seed", "initialised_from", "command")
    return {**{k: card.get(k) for k in keys}, "card": card_file.name,
            "validation": {k: v for k, v in card["validation"].items() if k != "predictions"}}


def combine_cv_ensembles(card_files: list, name: str, output_dir, command: str) -> dict:
    """Write ensemble ``name`` (members, manifest, card JSON/Markdown, component cards,
    ``oof_predictions.tsv``) into OUTPUT_DIR/models/<name>/; returns its card."""
    from .train import metrics, uncertainty_figures
    from .zoo import write_ensemble_manifest

    files = [Path(f) for f in card_files]
    cards = [read_card(f) for f in files]
    check_components(cards, files)
    members, sources = [], []
    for card, f in zip(cards, files):
        for m in card["members"]:
            src = f.with_name(f"{m['name']}.pt")
            if not src.is_file():
                raise CombineError(f"{src}: weights of member {m['name']} of {card['name']} not "
                                   f"found beside its card")
            members.append({**m, "component": card["name"]})
            sources.append(src)
    preds = combined_predictions(cards)
    y = [p["chronological_age"] for p in preds]
    validation = metrics(y, [p["predicted_age"] for p in preds])
    validation["uncertainty"] = uncertainty_figures(
        y, [p["predicted_age"] for p in preds],
        [np.nan if p["predicted_age_sd"] is None else p["predicted_age_sd"] for p in preds])
    validation["last_epoch"] = metrics(y, [p["last_epoch_predicted_age"] for p in preds])
    validation["predictions"] = preds
    validation["components"] = {c["name"]: c["validation"]["mae"] for c in cards}
    first = cards[0]
    out_dir = Path(output_dir) / "models" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in [*sources, *files]:  # the members, then the component cards, as they are
        dst = out_dir / src.name
        if src.resolve() != dst.resolve():
            atomic_write_bytes(dst, src.read_bytes())
    targets = [out_dir / src.name for src in sources]
    manifest = out_dir / f"{name}.json"
    write_ensemble_manifest(manifest, name, first["modality"], targets)
    card = {
        **{k: first.get(k) for k in ("architecture", "arch", "modality", "modalities",
                                      "trained_on", "software_version", "training_data",
                                      "splits", "split_participants", "age_range", "age_bins",
                                      "channels", "input", "device", "trained_on_hardware")},
        "name": name,
        "ensemble": {"size": len(members), "mode": "cv", "folds": len(first["members"]),
                     "members_per_fold": len(cards)},
        "combined_from": [c["name"] for c in cards],
        "components": [_component(c, f) for c, f in zip(cards, files)],
        "parameters": sum(int(c.get("parameters") or 0) for c in cards),
        "seed": first.get("seed"), "split_seed": first.get("split_seed", first.get("seed")),
        "validation": validation, "test": first.get("test"), "members": members,
        "command": command, "weights": str(manifest),
    }
    oof = pd.DataFrame([{**p, "suffix": first["modality"]} for p in preds],
                       columns=["participant_id", "session_id", "suffix", "model",
                                "chronological_age", "predicted_age", "predicted_age_sd", "fold"])
    atomic_write_text(out_dir / "oof_predictions.tsv", oof.to_csv(sep="\t", index=False,
                                                                  na_rep="n/a"))
    write_combined_card(out_dir / f"{name}_card.json", card)
    return card


def write_combined_card(card_file, card: dict) -> None:
    """The card as JSON and Markdown (``<name>_card.md`` beside it), atomically."""
    card_file = Path(card_file)
    atomic_write_text(card_file, json.dumps(card, indent=2) + "\n")
    atomic_write_text(card_file.with_name(card_file.name.replace("_card.json", "_card.md")),
                      combined_markdown(card))


def combined_markdown(card: dict) -> str:
    """Markdown of a combined cross-validation ensemble's card."""
    from .train import _augmentation_text, _limits_lines, _out_of_site_lines

    def row(label, m):
        return (f"| {label} | {m['n']} | {m['mae']:.2f} | {m['r2']:.3f} | {m['pearson_r']:.3f} | "
                f"{m['mean_error']:+.2f} | {m.get('slope', float('nan')):.2f} |")

    v, ens = card["validation"], card["ensemble"]
    u = v.get("uncertainty")
    lines = [
        f"# Model card: {card['name']}", "",
        f"SFCN ensemble of {ens['size']} members: {ens['members_per_fold']} recipes "
        f"({', '.join(f'`{c}`' for c in card['combined_from'])}), each trained by the train level "
        f"as {ens['folds']} cross-validation folds of the same participants. The ensemble age is "
        "the members' mean and its SD combines the members' SDs and their spread.", "",
        "## Training data",
        f"- Dataset: {card['training_data']['dataset']} ({card['training_data']['bids_dir']}), "
        f"{card['modality']} images; participants: {card['training_data']['selection']}",
        f"- n = {card['splits']['train_validation_pool']} in {ens['folds']} folds, stratified by "
        f"age, split seed {card['split_seed']}; ages {card['age_range'][0]:.1f}-"
        f"{card['age_range'][1]:.1f} years", "",
        "## Input",
        f"- MNI152NLin2009aSym, affine registration, brain extracted, {card['input']['voxel_size']:g}"
        f" mm grid {'x'.join(map(str, card['input']['shape']))}, intensities divided by the mean "
        "inside the brain mask.", "",
        "## Performance (uncorrected for age bias)", "",
        f"Out-of-fold: each control predicted by the {ens['members_per_fold']} members that did "
        "not train on it (each selected its epoch on that fold).", "",
        "| predictions | n | MAE (y) | R2 | Pearson r | mean error (y) | slope |",
        "|---|---|---|---|---|---|---|",
        row("combined, out-of-fold", v), row("combined, last epoch (no epoch selection)",
                                             v["last_epoch"]),
        *[row(f"`{c['name']}` alone", c["validation"]) for c in card["components"]], "",
        *([f"Uncertainty (out-of-fold): mean predicted SD {u['mean_sd']:.2f} years against an MAE "
           f"of {u['mae']:.2f}; Spearman rho of SD with |error| {u['spearman_sd_abs_error']:.2f} "
           f"(p = {u['spearman_p']:.2g}).", ""] if u else []),
        "| member | recipe | fold | best epoch | MAE on its fold |", "|---|---|---|---|---|",
        *[f"| {m['name']} | {m['component']} | {m['fold']} | {m['best_epoch']} | "
          f"{m['validation']['mae']:.2f} |" for m in card["members"]], "",
        "## Recipes",
        *[f"- `{c['name']}` (card `{c['card']}`): {c['epochs']} epochs, batch {c['batch_size']}, "
          f"AdamW lr {c['learning_rate']:g} (cosine), weight decay {c['weight_decay']:g}, loss "
          f"{c['loss']}, augmentation: {_augmentation_text(c.get('augmentation'))}"
          + (f"; started from `{c['initialised_from']}`" if c.get("initialised_from") else "")
          + f". Command: `{c['command']}`" for c in card["components"]],
        f"- Combined by: `{card['command']}`", "",
        *_out_of_site_lines(card),
        *_limits_lines(card),
    ]
    if card.get("notes"):
        lines += ["## Notes", *[f"- {n}" for n in card["notes"]], ""]
    lines.append(f"brainage-bids {card['software_version']}; weights sha256 in the JSON card.")
    return "\n".join(lines) + "\n"
