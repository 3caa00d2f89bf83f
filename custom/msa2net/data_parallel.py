"""Data parallelism for a trainer whose network runs from CUDA graphs.

``DistributedDataParallel`` all-reduces gradients from autograd hooks while the backward pass runs;
those hooks cannot live inside a replayed CUDA graph. :class:`GradientAllReduce` gives the same
training step another way, for networks wrapped in :class:`msa2net.cuda_graphs.GraphedForward`:

* when the trainer starts, every process takes the parameters and buffers of process 0 (as DDP does
  when it is built);
* after each backward pass (MONAI's ``IterationEvents.BACKWARD_COMPLETED``, before the optimiser and
  the gradient scaler's step), the gradients are averaged over all processes with one all-reduce of
  one flat buffer, kept from step to step: gathered by one ``torch.cat``, averaged, and copied back
  by one multi-tensor copy (a copy per parameter would be hundreds of kernel launches, host time
  on every iteration).

BatchNorm statistics stay per process, as under DDP without ``SyncBatchNorm``. Without an
initialised process group both steps do nothing, so one config serves one and several GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from torch import nn
from torch._utils import _unflatten_dense_tensors

__all__ = ["GradientAllReduce"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GradientAllReduce:
    """Ignite handler: broadcast the initial weights, then average gradients after every backward pass.

    Args:
        network: the trained module itself (not a wrapper that copies it).
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self._flat: torch.Tensor | None = None
        self._views: list[torch.Tensor] = []
        self._shapes: list = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.broadcast)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.all_reduce)

    def broadcast(self, engine: Engine | None = None) -> None:
        if not _active():
            return
        with torch.no_grad():
            for t in [*self.network.parameters(), *self.network.buffers()]:
                dist.broadcast(t, src=0)

    def all_reduce(self, engine: Engine | None = None) -> None:
        if not _active():
            return
        grads = [p.grad for p in self.network.parameters() if p.grad is not None]
        if not grads:
            return
        shapes = [(g.shape, g.dtype) for g in grads]
        if shapes != self._shapes:
            self._flat = grads[0].new_empty(sum(g.numel() for g in grads))
            self._views = list(_unflatten_dense_tensors(self._flat, grads))
            self._shapes = shapes
        torch.cat([g.reshape(-1) for g in grads], out=self._flat)
        dist.all_reduce(self._flat)
        self._flat.div_(dist.get_world_size())
        torch._foreach_copy_(grads, self._views)
