"""A network whose output is a fixed function of intensity and position, for geometry tests of the Deploy app.

Shipped into the test bundle folder (``deploy_bundle(extra_files=...)``) and named by its
``network_def``; exported to TorchScript like the real network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PositionThresholdNet(nn.Module):
    """Label 2 where the input exceeds ``high``; label 1 where it exceeds ``low`` in the first half of the
    last axis; 0 elsewhere. Logits are 10 x one-hot, so the argmax never ties.

    The position term makes the output depend on how the slice is laid out, not only on intensities,
    so a flipped or transposed input gives a different label map, not a flipped copy of the same one.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3, low: float = 0.3, high: float = 0.6) -> None:
        super().__init__()
        if num_classes < 3:
            raise ValueError("PositionThresholdNet needs at least 3 classes (background, low, high).")
        self.num_classes = num_classes
        self.register_buffer("thresholds", torch.tensor([low, high]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :1]
        first_half = torch.arange(x.shape[-1], device=x.device).view(1, 1, 1, -1) < x.shape[-1] // 2
        high = x > self.thresholds[1]
        low = (x > self.thresholds[0]) & first_half & ~high
        labels = (high.long() * 2 + low.long())[:, 0]
        return F.one_hot(labels, self.num_classes).permute(0, 3, 1, 2).float() * 10.0
