"""Ignite handlers of the bundle: metric summaries and the training log."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from msa2net.atomic import atomic_torch_save, atomic_write_text

__all__ = ["MetricSummaryWriter", "TrainingLogWriter"]


def _finite_mean(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


class MetricSummaryWriter:
    """At the end of an evaluation, write per-class and overall means of each metric's per-case details to JSON.

    The per-case values come from ``engine.state.metric_details`` (MONAI metric handlers with
    ``save_details=True``); cases where a class is absent (NaN/inf) are left out of that
    class's mean, and the number of cases used is reported.

    Args:
        output_file: the JSON file.
        class_names: names of the foreground classes in metric column order.
    """

    def __init__(self, output_file: str, class_names: list[str] | None = None) -> None:
        self.output_file = output_file
        self.class_names = class_names

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        summary: dict = {"num_cases": None, "metrics": {}}
        for name, details in engine.state.metric_details.items():
            values = torch.as_tensor(details).float().cpu().numpy().reshape(len(details), -1)
            summary["num_cases"] = int(values.shape[0])
            names = self.class_names or [f"class_{i + 1}" for i in range(values.shape[1])]
            per_class = {n: _finite_mean(values[:, i]) for i, n in enumerate(names[: values.shape[1]])}
            case_means = np.array([_finite_mean(row) if _finite_mean(row) is not None else math.nan for row in values])
            summary["metrics"][name] = {"mean": _finite_mean(case_means), "per_class": per_class}
        atomic_write_text(self.output_file, json.dumps(summary, indent=2) + "\n")


class TrainingLogWriter:
    """Append one row per epoch (epoch, mean loss, learning rate, validation metric, seconds since the run
    started) to a CSV file; in data-parallel runs only the first process writes.

    Args:
        output_file: the CSV file (rewritten atomically each epoch).
        optimizer: to read the learning rate from.
        validator: the evaluator whose key metric is logged (optional).
    """

    def __init__(self, output_file: str, optimizer: torch.optim.Optimizer, validator: Engine | None = None) -> None:
        self.output_file = output_file
        self.optimizer = optimizer
        self.validator = validator
        self._losses: list[float] = []
        self._t0 = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _start(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        loss = out[0]["loss"] if isinstance(out, list) else out["loss"]
        # kept on the device: a float() here would synchronise the GPU every iteration
        self._losses.append(torch.as_tensor(loss).detach())

    def __call__(self, engine: Engine) -> None:
        val = None
        if self.validator is not None and self.validator.state.epoch == engine.state.epoch:
            val = self.validator.state.metrics.get(self.validator.state.key_metric_name)
        rows = []
        if Path(self.output_file).is_file():
            with open(self.output_file, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < engine.state.epoch]
        rows.append(
            {
                "epoch": engine.state.epoch,
                "loss": float(torch.stack(self._losses).float().mean()) if self._losses else "",
                "lr": self.optimizer.param_groups[0]["lr"],
                "val_metric": "" if val is None else float(val),
                # a resumed run counts from its own start
                "elapsed_s": round(time.perf_counter() - self._t0, 3),
            }
        )
        self._losses = []
        if not _is_main_process():
            return
        cols = ["epoch", "loss", "lr", "val_metric", "elapsed_s"]
        lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
        atomic_write_text(self.output_file, "\n".join(lines) + "\n")


def _is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


class BestMetricState:
    """Exposes an evaluator's best key metric and its epoch as a state dict, so resuming keeps them."""

    def __init__(self, evaluator: Engine) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict:
        return {"best_metric": float(self.evaluator.state.best_metric), "best_metric_epoch": int(self.evaluator.state.best_metric_epoch)}

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]


class BestModelSaver:
    """Save ``{"model": weights}`` atomically whenever the evaluator's key metric reaches a new best.

    Attach to the evaluator; MONAI's evaluator updates ``best_metric_epoch`` before this runs.
    """

    def __init__(self, network: torch.nn.Module, output_file: str) -> None:
        self.network = network
        self.output_file = output_file

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.best_metric_epoch == engine.state.epoch and _is_main_process():
            atomic_torch_save({"model": _unwrap(self.network).state_dict()}, self.output_file)


class ResumeCheckpoint:
    """Resumable training: save everything needed every few epochs, reload it when the same run starts again.

    After every ``interval``-th and the last epoch, and after any epoch in which a
    :class:`BestMetricState` of ``save_dict`` reached a new best, the objects of ``save_dict`` (model,
    optimizer, scheduler, best-metric state, ...) and the trainer it is attached to (key ``trainer``)
    are written atomically to ``checkpoint_file``. Saving at each new best keeps the resume state in
    step with the best model on disk: a resumed run never forgets a best metric and lets a worse model
    overwrite the best one. When training starts and that file exists, they are restored, so a killed
    run restarted with the same command continues after the last saved epoch (up to ``interval - 1``
    epochs are done again) and ends at ``max_epochs``. The file is read with ``weights_only=True``.
    """

    def __init__(self, checkpoint_file: str, save_dict: dict, map_location=None, interval: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"interval must be a positive number of epochs, got {interval}.")
        self.checkpoint_file = Path(checkpoint_file)
        self.save_dict = save_dict
        self.map_location = map_location
        self.interval = interval

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.resume)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def _objects(self, engine: Engine) -> dict:
        return {**{k: _unwrap(v) if isinstance(v, torch.nn.Module) else v for k, v in self.save_dict.items()}, "trainer": engine}

    def save(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        new_best = any(
            isinstance(v, BestMetricState) and v.evaluator.state.best_metric_epoch == epoch for v in self.save_dict.values()
        )
        if _is_main_process() and (epoch % self.interval == 0 or epoch >= engine.state.max_epochs or new_best):
            atomic_torch_save({k: v.state_dict() for k, v in self._objects(engine).items()}, self.checkpoint_file)

    def resume(self, engine: Engine) -> None:
        if not self.checkpoint_file.is_file():
            return
        state = torch.load(self.checkpoint_file, map_location=self.map_location, weights_only=True)
        max_epochs = engine.state.max_epochs
        for key, obj in self._objects(engine).items():
            obj.load_state_dict(state[key])
        engine.state.max_epochs = max_epochs
        engine.logger.info(f"resumed from {self.checkpoint_file} after epoch {engine.state.epoch}")
