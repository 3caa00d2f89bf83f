"""MSADecoder (multi-scale amalgamation decoder) of MSA2-Net, and the plain decoder of its ablation.

The paper's decoder upsamples step by step and refines each scale with "recursive nested
adaptive convolution groups". Our reading (design choice): a Res2Net-like chain in which
SACM_j sees its own channel group plus the output of SACM_{j-1}, so later members see
ever larger receptive fields; the outputs are concatenated and fused by a 1x1 convolution
with a residual path.

Reference: Chao Deng, Xiaosen Li, Xiao Qin, "MSA2-Net: Utilizing Self-Adaptive Convolution
Module to Extract Multi-Scale Information in Medical Image Segmentation", arXiv:2509.01498, 2025.
Choices the text leaves open: ``bundle/docs/design.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from .sacm import SACM, SACM_KERNEL_SIZES

__all__ = ["NestedSACMGroup", "MSADecoder", "PlainDecoder"]


class NestedSACMGroup(nn.Module):
    """Recursive nested SACM group.

    The input is split into ``scales`` channel groups ``x_1..x_s``; ``y_1 = x_1`` and
    ``y_j = SACM_j(x_j + y_{j-1})``; ``out = ReLU(x + BN(Conv1x1(cat(y_1..y_s))))``.

    Shapes: ``(B, C, H, W)`` -> ``(B, C, H, W)``; ``scales`` must divide ``C``.
    """

    def __init__(self, channels: int, scales: int, kernel_sizes: Sequence[int] = SACM_KERNEL_SIZES, norm="batch", sacm_form="kernel") -> None:
        super().__init__()
        if scales < 2 or channels % scales:
            raise ValueError(f"scales={scales} must be >= 2 and divide channels={channels}.")
        width = channels // scales
        self.scales = scales
        self.convs = nn.ModuleList(
            SACM(width, width, kernel_sizes, norm=norm, act="relu", form=sacm_form) for _ in range(scales - 1)
        )
        self.fuse = Convolution(2, channels, channels, kernel_size=1, norm=norm, act=None, bias=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.chunk(self.scales, dim=1)
        outs = [groups[0]]
        for conv, g in zip(self.convs, groups[1:]):
            outs.append(conv(g + outs[-1]))
        return self.act(x + self.fuse(torch.cat(outs, dim=1)))


class _UpMerge(nn.Module):
    """Upsample the deeper map x2 (bilinear), concatenate the skip, fuse to ``out_channels``."""

    def __init__(self, deep_channels: int, skip_channels: int, out_channels: int, norm="batch") -> None:
        super().__init__()
        self.fuse = Convolution(2, deep_channels + skip_channels, out_channels, kernel_size=1, norm=norm, act="relu", bias=False)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if deep.is_cuda:
            # PyTorch's NCHW bilinear CUDA kernel loops over batch x channels inside each output pixel's
            # thread; its channels-last kernel is parallel over all outputs (~10x faster at batch 64).
            deep = deep.contiguous(memory_format=torch.channels_last)
        up = F.interpolate(deep, size=skip.shape[-2:], mode="bilinear", align_corners=False).contiguous()
        return self.fuse(torch.cat([up, skip], dim=1))


class _Decoder(nn.Module):
    """Deepest map up to stride 4: at each scale, :class:`_UpMerge` then that scale's ``refine`` block."""

    def __init__(self, channels: Sequence[int], refine: Sequence[nn.Module], norm) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"a decoder needs at least two scales, got channels={channels}.")
        self.merges = nn.ModuleList(_UpMerge(channels[i + 1], channels[i], channels[i], norm) for i in range(len(channels) - 1))
        self.refine = nn.ModuleList(refine)

    def forward(self, feats: Sequence[torch.Tensor], all_scales: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """The refined stride-4 map; with ``all_scales``, every scale's refined map, shallow to deep."""
        x, outs = feats[-1], []
        for i in reversed(range(len(feats) - 1)):
            x = self.refine[i](self.merges[i](x, feats[i]))
            outs.append(x)
        return outs[::-1] if all_scales else x


class MSADecoder(_Decoder):
    """Decoder from the deepest map up to stride 4, nested SACM groups at each scale.

    Args:
        channels: encoder channels, shallow to deep.
        scales: channel groups of each :class:`NestedSACMGroup`.
        depth: nested groups per scale.
        kernel_sizes: SACM candidate kernels.

    Shapes: maps ``(B, channels[i], H_i, W_i)`` -> ``(B, channels[0], H_0, W_0)``; with
    ``all_scales=True`` the refined maps ``(B, channels[i], H_i, W_i)`` of every scale but the deepest.
    """

    def __init__(self, channels: Sequence[int], scales: int, depth: int, kernel_sizes=SACM_KERNEL_SIZES, norm="batch", sacm_form="kernel") -> None:
        refine = [
            nn.Sequential(*(NestedSACMGroup(c, scales, kernel_sizes, norm, sacm_form) for _ in range(depth)))
            for c in channels[:-1]
        ]
        super().__init__(channels, refine, norm)


class PlainDecoder(_Decoder):
    """U-Net style decoder (two 3x3 conv-norm-ReLU per scale), the "without MSADecoder" ablation.

    Shapes: as :class:`MSADecoder`.
    """

    def __init__(self, channels: Sequence[int], norm="batch") -> None:
        refine = [
            nn.Sequential(
                Convolution(2, c, c, kernel_size=3, norm=norm, act="relu", bias=False),
                Convolution(2, c, c, kernel_size=3, norm=norm, act="relu", bias=False),
            )
            for c in channels[:-1]
        ]
        super().__init__(channels, refine, norm)
