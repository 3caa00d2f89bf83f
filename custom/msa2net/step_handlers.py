"""Handlers that act on every optimiser step: gradient clipping and an exponential moving average of the weights."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from timm.utils import ModelEmaV3

__all__ = ["GradientClipping", "EMAUpdate", "model_ema"]


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

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.max_norm)


class EMAUpdate:
    """Update an exponential moving average of the weights after every iteration.

    Args:
        ema: the averaged model (``timm.utils.ModelEmaV3``, which also sets the decay's warm-up from the step).
        network: the trained module.
        enabled: ``False`` attaches nothing (the bundle's ``use_ema``).
    """

    def __init__(self, ema: torch.nn.Module, network: torch.nn.Module, enabled: bool = True) -> None:
        self.ema, self.network, self.enabled = ema, network, bool(enabled)

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.ema.update(_unwrap(self.network), step=engine.state.iteration)


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel``/``DataParallel`` wrapper (state-dict keys without ``module.``)."""
    return network.module if isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else network


def model_ema(network: torch.nn.Module, decay: float = 0.999) -> torch.nn.Module:
    """A ``timm.utils.ModelEmaV3`` of ``network`` (unwrapped from data parallelism) with decay warm-up."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must lie in (0, 1), got {decay}.")
    return ModelEmaV3(_unwrap(network), decay=decay, use_warmup=True)
