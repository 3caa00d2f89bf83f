"""Auxiliary ResNet encoder of MSA2-Net, built from SACM bottleneck blocks.

The paper pairs the CSWin encoder with "ResNet equipped with adaptive convolution
modules" whose features keep fine detail. Block type (bottleneck), widths and depths are
design choices of this project, chosen so the auxiliary branch stays light next to CSWin.

Reference: Chao Deng, Xiaosen Li, Xiao Qin, "MSA2-Net: Utilizing Self-Adaptive Convolution
Module to Extract Multi-Scale Information in Medical Image Segmentation", arXiv:2509.01498, 2025.
Choices the text leaves open: ``bundle/docs/design.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.utils import get_norm_layer
from torch import nn

from .sacm import SACM, SACM_KERNEL_SIZES

__all__ = ["SACMBottleneck", "AuxResNetEncoder"]


def conv_norm(in_channels: int, out_channels: int, norm: str | tuple, stride: int = 1) -> nn.Sequential:
    """1x1 convolution followed by a norm layer."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
        get_norm_layer(norm, spatial_dims=2, channels=out_channels),
    )


class SACMBottleneck(nn.Module):
    """ResNet bottleneck whose spatial convolution is a SACM.

    ``1x1 reduce -> SACM (stride) -> 1x1 expand`` plus a projected shortcut, then ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the SACM (and of the shortcut).
        kernel_sizes: SACM candidate kernels.
        reduction: bottleneck width is ``out_channels // reduction``.
        norm: MONAI norm name.

    Shapes: ``(B, in, H, W)`` -> ``(B, out, H / stride, W / stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        kernel_sizes: Sequence[int] = SACM_KERNEL_SIZES,
        reduction: int = 4,
        norm: str | tuple = "batch",
        sacm_form: str = "kernel",
    ) -> None:
        super().__init__()
        mid = max(out_channels // reduction, 8)
        self.body = nn.Sequential(
            conv_norm(in_channels, mid, norm),
            nn.ReLU(inplace=True),
            SACM(mid, mid, kernel_sizes, stride=stride, norm=norm, act="relu", form=sacm_form),
            conv_norm(mid, out_channels, norm),
        )
        self.shortcut = (
            nn.Identity() if stride == 1 and in_channels == out_channels else conv_norm(in_channels, out_channels, norm, stride)
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class AuxResNetEncoder(nn.Module):
    """Four-stage SACM ResNet at strides 4, 8, 16, 32.

    Args:
        in_channels: image channels.
        channels: output channels of the four stages.
        depths: bottleneck blocks per stage.
        kernel_sizes: SACM candidate kernels.
        norm: MONAI norm name.

    Shapes: ``(B, in, H, W)`` -> four maps ``(B, channels[i], H / 2**(i+2), W / 2**(i+2))``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        depths: Sequence[int],
        kernel_sizes: Sequence[int] = SACM_KERNEL_SIZES,
        norm: str | tuple = "batch",
        sacm_form: str = "kernel",
    ) -> None:
        super().__init__()
        if len(channels) != 4 or len(depths) != 4 or min(depths) < 1:
            raise ValueError(f"channels and depths need 4 positive entries, got {channels}, {depths}.")
        stem_width = max(channels[0] // 2, 8)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, 3, 2, 1, bias=False),
            get_norm_layer(norm, spatial_dims=2, channels=stem_width),
            nn.ReLU(inplace=True),
            SACM(stem_width, channels[0], kernel_sizes, stride=2, norm=norm, act="relu", form=sacm_form),
        )
        self.stages = nn.ModuleList()
        prev = channels[0]
        for i, (width, depth) in enumerate(zip(channels, depths)):
            blocks = [
                SACMBottleneck(prev if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1, kernel_sizes, norm=norm, sacm_form=sacm_form)
                for j in range(depth)
            ]
            self.stages.append(nn.Sequential(*blocks))
            prev = width

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats
