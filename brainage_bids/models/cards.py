"""Model cards: where they are found and how they are read, for the checkpoint loader (the card
beside the weights), the group statistics (which participants a model was trained on) and the
reports (the card of a model by name).

A card is ``<name>_card.json``: in ``OUTPUT_DIR/models/<name>/`` for models trained by
``brainage-bids train``, in ``data/models/`` for the packaged ones, and next to a checkpoint's
weights (``<stem>_card.json``).
"""
from __future__ import annotations

import json
from pathlib import Path

PACKAGED_CARDS = Path(__file__).resolve().parent.parent / "data" / "models"


def packaged_cards_dir() -> Path:
    return PACKAGED_CARDS


def read_card(path) -> dict:
    """A card, or any JSON object: {} when absent, unreadable or not an object."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def card_beside(weights) -> dict:
    """The card written next to a checkpoint (``<stem>_card.json``), {} when there is none."""
    return read_card(Path(weights).with_name(f"{Path(weights).stem}_card.json"))


def card_files(output_dir) -> list[Path]:
    """Every card of the outputs (``OUTPUT_DIR/models/*/``), then every packaged one."""
    return (sorted(Path(output_dir).glob("models/*/*_card.json"))
            + sorted(PACKAGED_CARDS.glob("*_card.json")))


def model_card(output_dir, name: str) -> dict:
    """Model card of ``name``: OUTPUT_DIR/models/<name>/<name>_card.json, else the packaged one,
    else a summary from the model zoo registry ({} when unknown)."""
    for path, where in ((Path(output_dir) / "models" / name / f"{name}_card.json",
                         f"models/{name}/{name}_card.json in the outputs"),
                        (PACKAGED_CARDS / f"{name}_card.json",
                         f"{name}_card.json shipped with brainage-bids")):
        card = read_card(path)
        if card:
            card.setdefault("_source", where)
            return card
    try:
        from .zoo import REGISTRY
    except Exception:  # pragma: no cover - the zoo is part of the package
        return {}
    entry = REGISTRY.get(name)
    if entry is None:
        return {}
    return {"name": name, "architecture": entry.arch, "modality": entry.modality,
            "citation": entry.citation, "notes": entry.notes, "_source": "model zoo registry"}


def card_covers(card: dict, model: str) -> bool:
    """Whether a card describes ``model``: its own name, one of its ensemble members, or any card
    for ``ensemble`` rows (which average whichever members ran)."""
    names = {card.get("name")} | {m.get("name") for m in card.get("members") or []
                                  if isinstance(m, dict)}
    return model == "ensemble" or model in names


def trained_on_dataset(card: dict, bids_dir) -> bool:
    """Whether the card says its model was trained on the dataset at ``bids_dir`` (the same
    folder, or a dataset_description.json Name equal to the card's ``training_data.dataset``)."""
    td = card.get("training_data") or {}
    if td.get("bids_dir") and Path(td["bids_dir"]).resolve() == Path(bids_dir).resolve():
        return True
    desc = Path(bids_dir) / "dataset_description.json"
    if td.get("dataset") and desc.is_file():
        try:
            return json.loads(desc.read_text()).get("Name") == td["dataset"]
        except ValueError:
            return False
    return False


def training_participants(bids_dir, output_dir, model: str) -> set[str]:
    """Participants of this dataset that ``model`` was trained or selected on, when a model card
    (``OUTPUT_DIR/models/*/<name>_card.json`` or a packaged one) naming the model (or one of its
    ensemble members) says it was trained on this dataset: the train and validation lists of
    ``split_participants``, of its ``members`` and of any ``folds``. Their predictions are
    in-sample: they are kept out of the accuracy figures and of a bias fit on the table's own
    controls. Rows ``model=ensemble`` get the union over every such card."""
    ids: set[str] = set()
    for card_file in card_files(output_dir):
        card = read_card(card_file)
        if not card_covers(card, model) or not trained_on_dataset(card, bids_dir):
            continue
        sp = card.get("split_participants") or {}
        splits = [sp] + list(sp.get("members") or []) + list(card.get("folds") or [])
        for part in splits:
            if isinstance(part, dict):
                for k in ("train", "validation"):
                    if isinstance(part.get(k), list):
                        ids |= {str(i) for i in part[k]}
    return ids
