"""3D Inception-ResNet-V2 regressing age, in the layout of the FLAIR-Brain-Age checkpoints.

Module names, kernel sizes, strides and paddings follow the published FLAIR-Brain-Age model
(Inception-v4 stem, 5 x block A, reduction A, 10 x block B, reduction B, 5 x block C with the last
one linear and unscaled, a 2144->1536 conv, global average pooling, then Linear(1536, 1) and
Linear(1, 1)), so its ``.pth`` state_dicts load strictly. Every convolution has a bias and is
followed by BatchNorm (eps 1e-3) and ReLU, except the residual projections (``conv``), which have
no normalisation.
"""
from __future__ import annotations

import torch
from torch import nn

BN_EPS = 1e-3
RESIDUAL_SCALE = 0.2


class ConvBN(nn.Module):
    """Conv3d (with bias) -> BatchNorm3d (eps 1e-3) -> ReLU, as ``conv`` and ``bn`` submodules."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=1):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, bias=True)
        self.bn = nn.BatchNorm3d(cout, eps=BN_EPS, momentum=0.1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def _factorised(cin: int, mid: int, widths: tuple[int, int, int], k: int) -> list[nn.Module]:
    """1x1x1 then k-long convolutions along the last, middle and first spatial axis."""
    p = k // 2
    a, b, c = widths
    return [ConvBN(cin, mid, 1, padding=0),
            ConvBN(mid, a, (1, 1, k), padding=(0, 0, p)),
            ConvBN(a, b, (1, k, 1), padding=(0, p, 0)),
            ConvBN(b, c, (k, 1, 1), padding=(p, 0, 0))]


class Stem(nn.Module):
    """1 -> 384 channels, spatial size / 8."""

    def __init__(self, cin: int = 1):
        super().__init__()
        self.features = nn.Sequential(ConvBN(cin, 32, 3, stride=2), ConvBN(32, 32, 3),
                                      ConvBN(32, 64, 3))
        self.branch_a = ConvBN(64, 96, 3, stride=2)
        self.branch_b = nn.MaxPool3d(3, stride=2, padding=1)
        self.branch_0 = nn.Sequential(ConvBN(160, 64, 1, padding=0), ConvBN(64, 96, 3))
        self.branch_1 = nn.Sequential(*_factorised(160, 64, (64, 64, 64), 7), ConvBN(64, 96, 3))
        self.branch_2 = ConvBN(192, 192, 3, stride=2)
        self.branch_3 = nn.MaxPool3d(3, stride=2, padding=1)

    def forward(self, x):
        x = self.features(x)
        x = torch.cat((self.branch_a(x), self.branch_b(x)), dim=1)
        x = torch.cat((self.branch_0(x), self.branch_1(x)), dim=1)
        return torch.cat((self.branch_2(x), self.branch_3(x)), dim=1)


class _Residual(nn.Module):
    """x + scale * conv(cat(branches)), followed by ReLU unless ``activation`` is False."""

    def __init__(self, scale: float, activation: bool = True):
        super().__init__()
        self.scale = scale
        self.activation = activation
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        res = self.conv(torch.cat([b(x) for b in self.branches()], dim=1))
        out = x + self.scale * res
        return self.relu(out) if self.activation else out


class BlockA(_Residual):
    def __init__(self, cin: int = 384, scale: float = RESIDUAL_SCALE):
        super().__init__(scale)
        self.branch_0 = ConvBN(cin, 32, 1, padding=0)
        self.branch_1 = nn.Sequential(ConvBN(cin, 32, 1, padding=0), ConvBN(32, 32, 3))
        self.branch_2 = nn.Sequential(ConvBN(cin, 32, 1, padding=0), ConvBN(32, 48, 3),
                                      ConvBN(48, 64, 3))
        self.conv = nn.Conv3d(128, cin, 1)

    def branches(self):
        return self.branch_0, self.branch_1, self.branch_2


class BlockB(_Residual):
    def __init__(self, cin: int = 1152, scale: float = RESIDUAL_SCALE):
        super().__init__(scale)
        self.branch_0 = ConvBN(cin, 192, 1, padding=0)
        self.branch_1 = nn.Sequential(*_factorised(cin, 128, (160, 160, 192), 7))
        self.conv = nn.Conv3d(384, cin, 1)

    def branches(self):
        return self.branch_0, self.branch_1


class BlockC(_Residual):
    def __init__(self, cin: int = 2144, scale: float = RESIDUAL_SCALE, activation: bool = True):
        super().__init__(scale, activation)
        self.branch_0 = ConvBN(cin, 192, 1, padding=0)
        self.branch_1 = nn.Sequential(*_factorised(cin, 192, (224, 224, 256), 3))
        self.conv = nn.Conv3d(448, cin, 1)

    def branches(self):
        return self.branch_0, self.branch_1


class ReductionA(nn.Module):
    """384 -> 1152 channels, spatial size / 2."""

    def __init__(self, cin: int = 384, k: int = 256, l: int = 256, m: int = 384, n: int = 384):
        super().__init__()
        self.branch_0 = ConvBN(cin, n, 3, stride=2)
        self.branch_1 = nn.Sequential(ConvBN(cin, k, 1, padding=0), ConvBN(k, l, 3),
                                      ConvBN(l, m, 3, stride=2))
        self.branch_2 = nn.MaxPool3d(3, stride=2, padding=1)

    def forward(self, x):
        return torch.cat((self.branch_0(x), self.branch_1(x), self.branch_2(x)), dim=1)


class ReductionB(nn.Module):
    """1152 -> 2144 channels, spatial size / 2."""

    def __init__(self, cin: int = 1152):
        super().__init__()
        self.branch_0 = nn.Sequential(ConvBN(cin, 256, 1, padding=0), ConvBN(256, 384, 3, stride=2))
        self.branch_1 = nn.Sequential(ConvBN(cin, 256, 1, padding=0), ConvBN(256, 288, 3, stride=2))
        self.branch_2 = nn.Sequential(ConvBN(cin, 256, 1, padding=0), ConvBN(256, 288, 3),
                                      ConvBN(288, 320, 3, stride=2))
        self.branch_3 = nn.MaxPool3d(3, stride=2, padding=1)

    def forward(self, x):
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x), self.branch_3(x)],
                         dim=1)


class InceptionResNetV2(nn.Module):
    """Age regression network; returns [B, 1] ages in years.

    ``dropout`` applies after global pooling (0 for inference, as the published checkpoints are
    loaded). Input size must be at least ~64 voxels per axis (five stride-2 stages).
    """

    def __init__(self, in_channels: int = 1, dropout: float = 0.0):
        super().__init__()
        blocks: list[nn.Module] = [Stem(in_channels)]
        blocks += [BlockA() for _ in range(5)]
        blocks.append(ReductionA())
        blocks += [BlockB() for _ in range(10)]
        blocks.append(ReductionB())
        blocks += [BlockC() for _ in range(4)]
        blocks.append(BlockC(scale=1.0, activation=False))
        self.features = nn.Sequential(*blocks)
        self.conv = ConvBN(2144, 1536, 1, padding=0)
        self.global_average_pooling = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Dropout(p=dropout))
        self.linear = nn.Sequential(nn.Linear(1536, 1), nn.Linear(1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.global_average_pooling(self.conv(self.features(x)))
        return self.linear(x.flatten(1).float())
