"""SFCN (Peng et al., Medical Image Analysis 2021) with a soft-label age output.

The module names follow the published UK Biobank code (``feature_extractor.conv_<i>``,
``classifier.conv_6``) so its checkpoint loads strictly once the ``module.`` prefix is removed.
The final average pool is global, which equals the published ``AvgPool3d([5, 6, 5])`` at the
published 160x192x160 input and lets smaller inputs (e.g. 2 mm grids) use the same network.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

UKB_CHANNELS = (32, 64, 128, 256, 256, 64)


def _conv_block(cin: int, cout: int, pool: bool, kernel: int, padding: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv3d(cin, cout, kernel, padding=padding), nn.BatchNorm3d(cout)]
    if pool:
        layers.append(nn.MaxPool3d(2, stride=2))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SFCN(nn.Module):
    """Simple fully convolutional network returning log-probabilities over age bins.

    Parameters
    ----------
    channels : six channel widths; the UK Biobank model uses 32-64-128-256-256-64.
    n_bins : number of output bins.
    dropout : dropout before the classifier (0.5 in the published model).
    """

    def __init__(self, channels=UKB_CHANNELS, n_bins: int = 40, dropout: float = 0.5):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 6:
            raise ValueError("SFCN needs six channel widths")
        self.feature_extractor = nn.Sequential()
        cin = 1
        for i, cout in enumerate(channels):
            last = i == len(channels) - 1
            self.feature_extractor.add_module(
                f"conv_{i}",
                _conv_block(cin, cout, pool=not last, kernel=1 if last else 3, padding=0 if last else 1),
            )
            cin = cout
        self.classifier = nn.Sequential()
        self.classifier.add_module("average_pool", nn.AdaptiveAvgPool3d(1))
        if dropout > 0:
            self.classifier.add_module("dropout", nn.Dropout(dropout))
        self.classifier.add_module("conv_6", nn.Conv3d(cin, n_bins, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.classifier(self.feature_extractor(x))
        return F.log_softmax(x.flatten(1).float(), dim=1)


def bin_centres(lo: float, hi: float, width: float = 1.0) -> np.ndarray:
    """Centres of the bins covering [lo, hi) with the given width, e.g. 6-90 -> 6.5 ... 89.5."""
    n = int(round((hi - lo) / width))
    return lo + width * (np.arange(n) + 0.5)


def soft_labels(ages: torch.Tensor, centres: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian soft labels: probability mass of N(age, sigma) in each bin, renormalised.

    Computed from the normal CDF at the bin edges, as in the published SFCN ``num2vect``.
    """
    centres = centres.to(ages.dtype)
    width = float(centres[1] - centres[0]) if len(centres) > 1 else 1.0
    lo = centres - width / 2
    hi = centres + width / 2
    dist = torch.distributions.Normal(ages[:, None], sigma)
    p = dist.cdf(hi[None, :]) - dist.cdf(lo[None, :])
    return p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)


def soft_label_loss(log_probs: torch.Tensor, ages: torch.Tensor, centres: torch.Tensor,
                    sigma: float = 1.0) -> torch.Tensor:
    """KL divergence between the Gaussian soft labels and the predicted distribution (batch mean)."""
    target = soft_labels(ages, centres, sigma)
    return F.kl_div(log_probs, target, reduction="batchmean")


def expected_age(log_probs: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the predicted age distribution, in years."""
    p = log_probs.float().exp()
    c = centres.to(p.dtype)[None, :]
    mean = (p * c).sum(1)
    var = (p * (c - mean[:, None]) ** 2).sum(1)
    return mean, var.clamp_min(0).sqrt()
