"""Ignite handlers of the bundle: metric summaries and the training log."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

__all__ = ["MetricSummaryWriter", "TrainingLogWriter", "atomic_write_text"]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so no half-written file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    """Append one row per epoch (epoch, mean loss, learning rate, validation metric) to a CSV file.

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

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        loss = out[0]["loss"] if isinstance(out, list) else out["loss"]
        self._losses.append(float(loss))

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
                "loss": float(np.mean(self._losses)) if self._losses else "",
                "lr": self.optimizer.param_groups[0]["lr"],
                "val_metric": "" if val is None else float(val),
            }
        )
        self._losses = []
        lines = ["epoch,loss,lr,val_metric"] + [f"{r['epoch']},{r['loss']},{r['lr']},{r['val_metric']}" for r in rows]
        atomic_write_text(self.output_file, "\n".join(lines) + "\n")
