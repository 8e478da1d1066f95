"""DenseNet169 of the FLAIR-Brain-Age study: MONAI's 3D ``densenet169`` followed by ``Linear(1, 1)``.

Built exactly as the publisher's ``densenet_evaluation.py`` builds it, so the published files
(keys ``0.*`` and ``1.*``) load strictly.
"""
from __future__ import annotations

import torch


def build_densenet169() -> torch.nn.Sequential:
    """``Sequential(monai.networks.nets.densenet169(spatial_dims=3, in_channels=1,
    out_channels=1), Linear(1, 1))``; a scalar age per image."""
    try:
        from monai.networks.nets import densenet169
    except ImportError as exc:  # pragma: no cover - monai is a dependency
        raise RuntimeError("the DenseNet169 models need MONAI: pip install monai") from exc
    return torch.nn.Sequential(densenet169(spatial_dims=3, in_channels=1, out_channels=1),
                               torch.nn.Linear(1, 1))
