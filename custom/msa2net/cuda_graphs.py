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
  as MONAI's trainers do by default). :func:`own_gradients` hooks give each parameter a copy instead.
  A trainer that sets gradients to ``None`` before every backward pass (``optim_set_to_none``, no
  gradient accumulation) may pass ``copy_gradients=False``: each ``.grad`` is then the replay's
  buffer itself, consumed before the next replay, which saves a copy per parameter and step;
* inference (eval mode, no gradients): one graph per input shape and dtype, up to ``max_graphs``;
  a batch smaller than one already captured with the same per-sample shape is zero-padded to it and
  the padding cut from the output (the last, short batch of a sliding window reuses the full batch's
  graph instead of capturing another: valid because an eval-mode network treats samples
  independently); replays are serialised by a lock, so threads (a MONAI Label server) never share
  the static buffers;
* anything else (CPU tensors, gradients in eval mode, ...): the eager module.

Captures run under the caller's autocast state with autocast's weight-cast cache switched off: a
graph must cast the weights itself, not read casts cached outside its memory pool.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable

import torch
from monai.inferers import Inferer
from torch import nn

__all__ = ["GraphedForward", "GraphedInferer", "own_gradients"]


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
        copy_gradients: give each parameter its own gradient copy (:func:`own_gradients`); ``False``
            only for a trainer that sets gradients to ``None`` every step (see the module docstring).

    Shapes: as ``module``.
    """

    def __init__(self, module: nn.Module, warmup: int = 3, max_graphs: int = 8, enabled: bool = True, copy_gradients: bool = True) -> None:
        super().__init__()
        if warmup < 1 or max_graphs < 0:
            raise ValueError(f"warmup must be >= 1 and max_graphs >= 0, got {warmup}, {max_graphs}.")
        self.module = module
        self.warmup, self.max_graphs, self.enabled = warmup, max_graphs, bool(enabled)
        self.copy_gradients = bool(copy_gradients)
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
            self._train.update(key=key, call=call, hooks=own_gradients(self.module) if self.copy_gradients else [])
        if key != self._train["key"]:
            return self.module(x)
        return self._train["call"](x)

    def _infer_forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._infer_lock:
            return self._infer_locked(x)

    def _padded_key(self, x: torch.Tensor) -> tuple | None:
        """The key of the smallest captured batch that ``x`` fits when zero-padded along the batch."""
        shape, dtype, amp = self._key(x)
        fits = [k for k in self._infer if k[0][1:] == shape[1:] and k[0][0] > shape[0] and k[1:] == (dtype, amp)]
        return min(fits, key=lambda k: k[0][0]) if fits else None

    def _infer_locked(self, x: torch.Tensor) -> torch.Tensor:
        key = self._key(x)
        entry = self._infer.get(key)
        if entry is None and (padded := self._padded_key(x)) is not None:
            entry = self._infer[padded]
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
                # thread-local: reader and writer threads may use the GPU while a later shape is captured
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    static_out = self.module(static_in)
            entry = self._infer[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        n = len(x)
        static_in[:n].copy_(x)
        static_in[n:].zero_()  # the padding of a smaller batch (nothing for an exact fit)
        graph.replay()
        # The next replay overwrites static_out; callers keep their own copy.
        return static_out[:n].clone()


class GraphedInferer(Inferer):
    """Run a MONAI inferer with the network replayed from CUDA graphs (:class:`GraphedForward`).

    The network handed to :meth:`__call__` stays as it is (weights are loaded into it as usual); a
    :class:`GraphedForward` around it is kept per network and used for CUDA inputs in eval mode without
    gradients. CPU inputs and ``enabled=False`` call ``inferer`` with the network itself.

    Args:
        inferer: the inferer to run (e.g. MONAI's ``SliceInferer``).
        enabled: replay from CUDA graphs where possible.
        warmup: eager passes before each capture.
        max_graphs: graphs kept per network (one per batch shape).
    """

    def __init__(self, inferer: Callable, enabled: bool = True, warmup: int = 2, max_graphs: int = 8) -> None:
        super().__init__()
        self.inferer, self.enabled = inferer, bool(enabled)
        self.warmup, self.max_graphs = warmup, max_graphs
        self._graphed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs):
        use = self.enabled and isinstance(network, nn.Module) and inputs.is_cuda and not torch.is_grad_enabled() and not network.training
        if not use:
            return self.inferer(inputs, network, *args, **kwargs)
        graphed = self._graphed.get(network)
        if graphed is None:
            graphed = self._graphed[network] = GraphedForward(network, warmup=self.warmup, max_graphs=self.max_graphs)
        return self.inferer(inputs, graphed, *args, **kwargs)
