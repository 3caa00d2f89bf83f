"""Handlers that act on every optimiser step: gradient clipping, an exponential moving average of the
weights, and no loss scaling under bfloat16."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from timm.utils import ModelEmaV3

__all__ = ["GradientClipping", "EMAUpdate", "NoLossScalingForBF16", "model_ema"]


class GradientClipping:
    """Clip the global gradient norm after the backward pass and before the optimiser step.

    Attached to MONAI's ``IterationEvents.BACKWARD_COMPLETED``; with a gradient scaler (``amp``) the
    gradients are unscaled first, so ``max_norm`` is in true gradient units.

    Args:
        network: the module whose parameters are clipped.
        max_norm: largest global L2 norm (nnU-Net uses 12).
    """

    def __init__(self, network: torch.nn.Module, max_norm: float = 12.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}.")
        self.network, self.max_norm = network, float(max_norm)
        self._params = list(network.parameters())

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return
        if len({(g.device, g.dtype) for g in grads}) > 1 or grads[0].is_sparse:
            torch.nn.utils.clip_grad_norm_(self._params, self.max_norm)
            return
        # clip_grad_norm_'s arithmetic for one device and dtype, without its per-tensor
        # regrouping and device moves: a few hundred host calls on every step for this network
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_mul_(grads, torch.clamp(self.max_norm / (total + 1e-6), max=1.0))


class EMAUpdate:
    """Update an exponential moving average of the weights after every iteration.

    The decay (with its warm-up) is the EMA's own (``ema.get_decay(step)``); the update is one
    ``torch._foreach_lerp_`` over floating-point weights and buffers and a copy of the others, as
    ``timm.utils.ModelEmaV3.update`` does, but over tensor lists gathered once instead of two state
    dicts rebuilt every step (host time that otherwise recurs on every iteration). Weights loaded
    later (a resumed run) are copied in place, so the gathered tensors stay the live ones.

    Args:
        ema: the averaged model (``timm.utils.ModelEmaV3``).
        network: the trained module.
        enabled: ``False`` attaches nothing (the bundle's ``use_ema``).
    """

    def __init__(self, ema: torch.nn.Module, network: torch.nn.Module, enabled: bool = True) -> None:
        self.ema, self.network, self.enabled = ema, network, bool(enabled)
        self._floats: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._others: list[tuple[torch.Tensor, torch.Tensor]] = []

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _gather(self) -> None:
        pairs = list(zip(self.ema.module.state_dict().values(), _unwrap(self.network).state_dict().values()))
        self._floats = ([e for e, _ in pairs if e.is_floating_point()], [m for e, m in pairs if e.is_floating_point()])
        self._others = [(e, m) for e, m in pairs if not e.is_floating_point()]

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        if self._floats is None:
            self._gather()
        decay = self.ema.get_decay(engine.state.iteration)
        torch._foreach_lerp_(self._floats[0], self._floats[1], 1.0 - decay)
        for ema_v, model_v in self._others:
            ema_v.copy_(model_v)


class NoLossScalingForBF16:
    """Switch MONAI's gradient scaler off when the trainer autocasts to bfloat16.

    MONAI's trainers create a ``GradScaler`` whenever ``amp`` is on. bfloat16 has float32's exponent
    range, so scaling the loss buys nothing, and the scaler's overflow check reads a flag back from
    the GPU at every step, which stops the host from queueing work ahead of it. A disabled scaler
    passes the loss and the optimiser step through unchanged. Float16 autocast keeps its scaler.
    """

    def attach(self, engine: Engine) -> None:
        # after Trainer.run() has created the scaler
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        dtype = getattr(engine, "amp_kwargs", {}).get("dtype")
        if getattr(engine, "amp", False) and dtype == torch.bfloat16:
            engine.scaler = torch.amp.GradScaler("cuda", enabled=False)


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel``/``DataParallel`` wrapper (state-dict keys without ``module.``)."""
    return network.module if isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else network


def model_ema(network: torch.nn.Module, decay: float = 0.999) -> torch.nn.Module:
    """A ``timm.utils.ModelEmaV3`` of ``network`` (unwrapped from data parallelism) with decay warm-up."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must lie in (0, 1), got {decay}.")
    return ModelEmaV3(_unwrap(network), decay=decay, use_warmup=True)
