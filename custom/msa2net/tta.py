"""Test-time augmentation by flips: the mean of the class probabilities over flipped copies of each slice."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["FlipTTAInferer"]


class FlipTTAInferer:
    """Wrap an inferer so that the network sees each input and its flips, and their probabilities are averaged.

    Returns the logarithm of the mean softmax probabilities, so postprocessing that applies softmax gets
    exactly the averaged probabilities back. With no flips the wrapped inferer runs unchanged.

    Args:
        inferer: the inferer to wrap (the bundle's ``SliceInferer``); it calls the network on patches
            ``(B, C, H, W)``.
        flips: spatial dimensions of the network's input to flip, one entry per extra pass, e.g.
            ``[[2], [3], [2, 3]]`` for the 4-flip TTA of a 2D network (dims count the batch and channel axes).
    """

    def __init__(self, inferer: Callable, flips: Sequence[Sequence[int]] = ()) -> None:
        self.inferer = inferer
        self.flips = [tuple(int(d) for d in f) for f in flips]
        for f in self.flips:
            if not f or min(f) < 2:
                raise ValueError(f"flips must name spatial dims (>= 2) of (B, C, H, W) inputs, got {list(flips)}.")

    def _averaged(self, network: Callable) -> Callable:
        def run(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            probs = network(x, *args, **kwargs).float().softmax(1)
            for dims in self.flips:
                probs += network(x.flip(dims), *args, **kwargs).float().softmax(1).flip(dims)
            return (probs / (1 + len(self.flips))).clamp_min(1e-8).log()

        return run

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> torch.Tensor:
        if not self.flips:
            return self.inferer(inputs, network, *args, **kwargs)
        return self.inferer(inputs, self._averaged(network), *args, **kwargs)
