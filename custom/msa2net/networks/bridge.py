"""MSConvBridge: SACM refinement of the skip connections of MSA2-Net.

The paper's bridge processes the CSWin feature maps with "a combination of multi-scale
adaptive convolutions" to remove the striated texture that stripe attention leaves, before
the decoder sees them. Our reading (design choice): per skip, a stack of residual blocks
``x + BN(PW(DW-SACM(x)))``, with a depthwise SACM doing the spatial filtering and a
pointwise convolution mixing channels, which keeps the bridge light at every width.

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

__all__ = ["BridgeBlock", "MSConvBridge"]


class BridgeBlock(nn.Module):
    """Residual depthwise-SACM block: ``x + BN(Conv1x1(GELU(BN(DW-SACM(x)))))``.

    Shapes: ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(
        self, channels: int, kernel_sizes: Sequence[int] = SACM_KERNEL_SIZES, norm: str | tuple = "batch", sacm_form: str = "kernel"
    ) -> None:
        super().__init__()
        self.spatial = SACM(channels, channels, kernel_sizes, groups=channels, norm=norm, act="gelu", form=sacm_form)
        self.mix = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = get_norm_layer(norm, spatial_dims=2, channels=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.mix(self.spatial(x)))


class MSConvBridge(nn.Module):
    """One stack of :class:`BridgeBlock` per skip connection.

    Args:
        channels: channels of each skip, shallow to deep.
        depth: blocks per skip.
        kernel_sizes: SACM candidate kernels.

    Shapes: list of ``(B, channels[i], H_i, W_i)`` -> list of the same shapes.
    """

    def __init__(
        self, channels: Sequence[int], depth: int, kernel_sizes: Sequence[int] = SACM_KERNEL_SIZES, norm: str | tuple = "batch", sacm_form: str = "kernel"
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"bridge depth must be at least 1, got {depth}.")
        self.levels = nn.ModuleList(
            nn.Sequential(*(BridgeBlock(c, kernel_sizes, norm, sacm_form) for _ in range(depth))) for c in channels
        )

    def forward(self, skips: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(skips) != len(self.levels):
            raise ValueError(f"MSConvBridge expects {len(self.levels)} skips, got {len(skips)}.")
        return [level(s) for level, s in zip(self.levels, skips)]
