"""Training length and learning rate per iteration: a schedule that ends when the run does.

:class:`IterationLR` sets the learning rate before every iteration from the fraction of the run done:
linear warm-up, then polynomial (nnU-Net's ``poly``, power 0.9) or cosine decay to the end of the
run's last epoch. :class:`TimeBudget` sets that last epoch from the measured speed, so that a run given
``time_budget_s`` seconds finishes its schedule inside them instead of being cut off with the learning
rate still high.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from ignite.engine import Engine, Events

__all__ = ["IterationLR", "TimeBudget", "lr_factor"]

logger = logging.getLogger("msa2net.schedule")


def lr_factor(iteration: int, total: int, schedule: str = "poly", warmup_iters: int = 0, power: float = 0.9) -> float:
    """Multiplier of the base learning rate at 0-based ``iteration`` of ``total``.

    Linear warm-up over ``warmup_iters`` iterations, then ``(1 - t) ** power`` (``"poly"``) or
    ``(1 + cos(pi t)) / 2`` (``"cosine"``) with ``t`` the fraction of the post-warm-up iterations done.
    """
    if iteration < warmup_iters:
        return (iteration + 1) / warmup_iters
    t = min(1.0, (iteration - warmup_iters) / max(1, total - warmup_iters))
    if schedule == "poly":
        return (1.0 - t) ** power
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"schedule must be 'poly' or 'cosine', got {schedule!r}.")


class IterationLR:
    """Set every parameter group's learning rate before each iteration (see :func:`lr_factor`).

    The run's length is read from the engine at each iteration (``max_epochs * epoch_length``), so a
    :class:`TimeBudget` that changes ``max_epochs`` reshapes the rest of the schedule. Each group's base
    learning rate is kept in the group as ``initial_lr``, so it survives a resume through the optimizer's
    state dict.

    Args:
        optimizer: the optimizer.
        schedule: ``"poly"`` or ``"cosine"``.
        warmup_iters: iterations of linear warm-up.
        power: exponent of the poly schedule.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: str = "poly", warmup_iters: int = 0, power: float = 0.9) -> None:
        if schedule not in ("poly", "cosine"):
            raise ValueError(f"schedule must be 'poly' or 'cosine', got {schedule!r}.")
        if warmup_iters < 0 or power <= 0:
            raise ValueError(f"warmup_iters must be >= 0 and power > 0, got {warmup_iters}, {power}.")
        self.optimizer, self.schedule, self.warmup_iters, self.power = optimizer, schedule, int(warmup_iters), float(power)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        total = engine.state.max_epochs * engine.state.epoch_length
        f = lr_factor(engine.state.iteration - 1, total, self.schedule, self.warmup_iters, self.power)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f


class TimeBudget:
    """Fit the run into ``budget_s`` seconds by setting ``max_epochs`` from the measured time per epoch.

    Time counts from the trainer's start (data already cached). The first ``warmup_epochs`` epochs
    (CUDA graph capture, cuDNN autotuning, compilation) are left out of the speed estimate; after each
    later epoch the seconds per epoch since warm-up, validations included, give the epochs that still
    fit. ``max_epochs`` never drops below the epochs done plus one, and a run past its budget stops
    after the epoch in progress. The last epoch is validated (when ``validator`` is given and did not
    run on it), so the best model and the resume state reflect all the training done.

    Args:
        budget_s: seconds for the whole training (``None``: the configured ``max_epochs`` stands).
        warmup_epochs: epochs left out of the estimate.
        validator: the evaluator to run on the last epoch, as MONAI's ``ValidationHandler`` runs it.
    """

    def __init__(self, budget_s: float | None, warmup_epochs: int = 1, validator: Engine | None = None) -> None:
        if budget_s is not None and budget_s <= 0:
            raise ValueError(f"budget_s must be positive or None, got {budget_s}.")
        if warmup_epochs < 1:
            raise ValueError(f"warmup_epochs must be >= 1, got {warmup_epochs}.")
        self.budget_s, self.warmup_epochs, self.validator = budget_s, int(warmup_epochs), validator
        self._t0 = self._warm = None
        self._done_here = 0

    def attach(self, engine: Engine) -> None:
        if self.budget_s is None:
            return
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._validate_last)

    def _validate_last(self, engine: Engine) -> None:
        if self.validator is not None and self.validator.state.epoch != engine.state.epoch:
            self.validator.run(engine.state.epoch)

    def _start(self, engine: Engine) -> None:
        self._t0, self._warm, self._done_here = time.perf_counter(), None, 0

    def __call__(self, engine: Engine) -> None:
        elapsed = time.perf_counter() - self._t0
        epoch = engine.state.epoch
        self._done_here += 1  # epochs of this process (a resumed run starts at a later epoch)
        if elapsed >= self.budget_s:
            logger.info("time budget of %.0f s used after epoch %d: training ends", self.budget_s, epoch)
            engine.state.max_epochs = epoch
            return
        if self._warm is None:
            if self._done_here >= self.warmup_epochs:
                self._warm = (elapsed, epoch)
            return
        per_epoch = (elapsed - self._warm[0]) / max(1, epoch - self._warm[1])
        fits = epoch + max(1, int((self.budget_s - elapsed) / per_epoch))
        if fits != engine.state.max_epochs:
            logger.info("time budget: %.2f s per epoch, %d epochs in %.0f s", per_epoch, fits, self.budget_s)
        engine.state.max_epochs = fits
