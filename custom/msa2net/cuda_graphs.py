"""Replay a network's CUDA work from CUDA graphs, to take the CPU's kernel-launch cost off the critical path.

MSA2-Net launches thousands of small kernels per pass (stripe attention, per-sample SACM kernels);
at batch sizes of a few dozen slices a GPU finishes them faster than Python and the dispatcher
issue them. A CUDA graph records one pass and replays it with a single launch.

:class:`GraphedForward` wraps a module without changing it (state dict, parameters and optimiser
stay those of the wrapped module):

* training with gradients: the first input shape seen is captured once with
  :func:`torch.cuda.make_graphed_callables` (forward and backward); other shapes run eagerly.
  Capture runs ``warmup`` extra steps on that batch, which moves BatchNorm running statistics
  by those steps (gradients of the warm-up are discarded). The graph hands out its gradients in
  buffers it rewrites on every replay; autograd may keep such a buffer as ``param.grad`` and then
  add the next replay's gradient to itself (twice the gradient once gradients are zeroed in place,
  as MONAI's trainers do by default). :func:`own_gradients` hooks give each parameter a copy instead;
* inference (eval mode, no gradients): one graph per input shape and dtype, up to ``max_graphs``;
  replays are serialised by a lock, so threads (a MONAI Label server) never share the static buffers;
* anything else (CPU tensors, gradients in eval mode, ...): the eager module.

Captures run under the caller's autocast state with autocast's weight-cast cache switched off: a
graph must cast the weights itself, not read casts cached outside its memory pool.
"""

from __future__ import annotations

import functools
import threading

import torch
from torch import nn

__all__ = ["GraphedForward", "own_gradients"]


def _own_copy(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    # Autograd adopts the incoming tensor only when .grad is None; later gradients are added in place.
    return grad.clone() if param.grad is None else grad


def own_gradients(module: nn.Module) -> list:
    """Hook every trainable parameter so that a ``.grad`` it adopts is its own copy, never a buffer
    that a CUDA graph rewrites on its next replay; returns the hook handles. A copy is made only when
    ``.grad`` is ``None`` (the first step, or every step if gradients are set to ``None``)."""
    return [p.register_hook(functools.partial(_own_copy, p)) for p in module.parameters() if p.requires_grad]


class _Call(nn.Module):
    """Shell whose forward :func:`torch.cuda.make_graphed_callables` may replace, leaving ``net`` untouched."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GraphedForward(nn.Module):
    """Run ``module`` from CUDA graphs where shapes repeat (see the module docstring).

    Args:
        module: the network; its outputs must be a single tensor.
        warmup: eager passes before each capture (cuDNN autotuning, allocator warm-up).
        max_graphs: inference graphs kept (one per input shape); later shapes run eagerly.
        enabled: ``False`` always runs ``module`` eagerly (so a config can switch graphs off in place).

    Shapes: as ``module``.
    """

    def __init__(self, module: nn.Module, warmup: int = 3, max_graphs: int = 8, enabled: bool = True) -> None:
        super().__init__()
        if warmup < 1 or max_graphs < 0:
            raise ValueError(f"warmup must be >= 1 and max_graphs >= 0, got {warmup}, {max_graphs}.")
        self.module = module
        self.warmup, self.max_graphs, self.enabled = warmup, max_graphs, bool(enabled)
        # Plain dicts, so the graphed shell is not registered as a second copy of the module.
        self._train: dict[str, object] = {}
        self._infer: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._infer_lock = threading.Lock()

    @staticmethod
    def _uncached_autocast() -> torch.autocast:
        """The caller's CUDA autocast state, with the cast cache off."""
        enabled = torch.is_autocast_enabled("cuda")
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=enabled, cache_enabled=False)

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        return tuple(x.shape), x.dtype, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not x.is_cuda or torch.jit.is_tracing() or torch.jit.is_scripting():
            return self.module(x)
        # The wrapped module's mode decides (it may be switched without the wrapper, e.g. by an evaluator).
        if self.module.training and torch.is_grad_enabled():
            return self._train_forward(x)
        if not self.module.training and not torch.is_grad_enabled():
            return self._infer_forward(x)
        return self.module(x)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        key = self._key(x)
        if not self._train:
            with self._uncached_autocast():
                call = torch.cuda.make_graphed_callables(_Call(self.module), (x,), num_warmup_iters=self.warmup)
            self._train.update(key=key, call=call, hooks=own_gradients(self.module))
        if key != self._train["key"]:
            return self.module(x)
        return self._train["call"](x)

    def _infer_forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._infer_lock:
            return self._infer_locked(x)

    def _infer_locked(self, x: torch.Tensor) -> torch.Tensor:
        key = self._key(x)
        entry = self._infer.get(key)
        if entry is None:
            if len(self._infer) >= self.max_graphs:
                return self.module(x)
            static_in = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with self._uncached_autocast():
                with torch.cuda.stream(side):
                    for _ in range(self.warmup):
                        self.module(static_in)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self.module(static_in)
            entry = self._infer[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        # The next replay overwrites static_out; callers keep their own copy.
        return static_out.clone()
