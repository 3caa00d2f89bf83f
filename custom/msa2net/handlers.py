"""Ignite handlers of the bundle: metric summaries and the training log."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from ignite.metrics import RunningAverage

from msa2net.atomic import atomic_torch_save, atomic_write_text
from msa2net.weights import describe_mismatch

__all__ = [
    "MetricSummaryWriter", "TrainingLogWriter", "per_class_means", "EpochProgressBar", "BestMetricState",
    "BestModelSaver", "ResumeCheckpoint", "ResumeMismatchError",
]


def _finite_mean(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def _per_class(details, class_names: list[str] | None) -> tuple[np.ndarray, dict[str, float | None]]:
    """Per-case values ``(cases, classes)`` of a metric's details and each class's mean over the cases where it is defined."""
    values = torch.as_tensor(details).float().cpu().numpy().reshape(len(details), -1)
    names = class_names or [f"class_{i + 1}" for i in range(values.shape[1])]
    return values, {n: _finite_mean(values[:, i]) for i, n in enumerate(names[: values.shape[1]])}


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
            values, per_class = _per_class(details, self.class_names)
            summary["num_cases"] = int(values.shape[0])
            case_means = np.array([_finite_mean(row) if _finite_mean(row) is not None else math.nan for row in values])
            summary["metrics"][name] = {"mean": _finite_mean(case_means), "per_class": per_class}
        atomic_write_text(self.output_file, json.dumps(summary, indent=2) + "\n")


def per_class_means(evaluator: Engine, class_names: list[str] | None = None) -> dict[str, float | None]:
    """Mean over cases of each class of the evaluator's key metric (from MONAI's ``metric_details``)."""
    details = getattr(evaluator.state, "metric_details", {}).get(evaluator.state.key_metric_name)
    return {} if details is None else _per_class(details, class_names)[1]


def _loss(output):
    """The loss of a step's output: MONAI's trainers give a list of per-sample dicts (decollated), plain engines a dict."""
    return (output[0] if isinstance(output, list) else output)["loss"]


def _drop_info(pattern: str) -> logging.Filter:
    """A filter dropping INFO records whose message starts with ``pattern``; warnings and errors always pass."""
    regex = re.compile(pattern)
    drop = logging.Filter()
    drop.filter = lambda r: r.levelno > logging.INFO or not regex.match(r.getMessage())
    return drop


class TrainingLogWriter:
    """After every epoch, log one line (loss, validation Dice per class, time) and append a row to a CSV file.

    The CSV has epoch, mean loss, learning rate, validation metric, seconds since the run started and,
    after each validation, the metric per class (``val_<class>``); in data-parallel runs only the first
    process writes.

    Args:
        output_file: the CSV file (rewritten atomically each epoch).
        optimizer: to read the learning rate from.
        validator: the evaluator whose key metric is logged (optional).
        class_names: names of the foreground classes, for the per-class columns.
    """

    def __init__(
        self,
        output_file: str,
        optimizer: torch.optim.Optimizer,
        validator: Engine | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        self.output_file = output_file
        self.optimizer = optimizer
        self.validator = validator
        self.class_names = class_names
        self._losses: list[float] = []
        self._t0 = self._epoch_t0 = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        # this line says per epoch what ignite's and the evaluator's own INFO lines say in pieces
        engine.logger.addFilter(_drop_info(r"Epoch\[\d+\] Complete|Engine run resuming from iteration 0,"))
        if self.validator is not None:
            self.validator.logger.addFilter(_drop_info(r""))
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_STARTED, self._start_epoch)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _start(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def _start_epoch(self, engine: Engine) -> None:
        self._epoch_t0 = time.perf_counter()

    def _collect(self, engine: Engine) -> None:
        # kept on the device: a float() here would synchronise the GPU every iteration
        self._losses.append(torch.as_tensor(_loss(engine.state.output)).detach())

    def __call__(self, engine: Engine) -> None:
        val, per_class = None, {}
        if self.validator is not None and self.validator.state.epoch == engine.state.epoch:
            val = self.validator.state.metrics.get(self.validator.state.key_metric_name)
            per_class = per_class_means(self.validator, self.class_names)
        loss = float(torch.stack(self._losses).float().mean()) if self._losses else None
        self._losses = []
        now = time.perf_counter()
        parts = [] if loss is None else [f"loss {loss:.4f}"]
        if val is not None:
            classes = ", ".join(f"{n} {v:.4f}" if v is not None else f"{n} -" for n, v in per_class.items())
            best = self.validator.state
            parts.append(f"validation Dice {float(val):.4f} ({classes}; best {best.best_metric:.4f} at epoch {best.best_metric_epoch})")
        parts.append(f"{now - self._epoch_t0:.1f} s (total {now - self._t0:.0f} s)")
        if _is_main_process():
            engine.logger.info(f"epoch {engine.state.epoch}/{engine.state.max_epochs}: " + ", ".join(parts))
        rows = []
        if Path(self.output_file).is_file():
            with open(self.output_file, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < engine.state.epoch]
        rows.append(
            {
                "epoch": engine.state.epoch,
                "loss": "" if loss is None else loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "val_metric": "" if val is None else float(val),
                # a resumed run counts from its own start
                "elapsed_s": round(now - self._t0, 3),
                **{f"val_{n}": "" if v is None else round(v, 6) for n, v in per_class.items()},
            }
        )
        if not _is_main_process():
            return
        cols = list(dict.fromkeys(["epoch", "loss", "lr", "val_metric", "elapsed_s"] + [c for r in rows for c in r]))
        lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
        atomic_write_text(self.output_file, "\n".join(lines) + "\n")


class EpochProgressBar:
    """ignite's progress bar over each epoch's iterations, showing the running mean of the loss.

    Only a terminal gets the bar (and only from the first process), so logs written to files stay
    one line per epoch. Without a bar nothing is attached: the running loss reads the loss back from
    the GPU every iteration (and all-reduces it across processes in data-parallel runs), a wait that
    would keep the host from queueing the next steps ahead of the GPU. Data-parallel runs show the
    bar without the running loss for the same reason.

    Args:
        alpha: smoothing of the running loss (ignite's ``RunningAverage``).
        terminal: whether a terminal shows the bar; ``None`` asks whether standard error is one.
    """

    def __init__(self, alpha: float = 0.98, terminal: bool | None = None) -> None:
        self.alpha, self.terminal = alpha, terminal

    def attach(self, engine: Engine) -> None:
        terminal = sys.stderr.isatty() if self.terminal is None else self.terminal
        if not terminal or not _is_main_process():
            return
        names = None
        if not torch.distributed.is_initialized():
            RunningAverage(output_transform=_loss, alpha=self.alpha).attach(engine, "running_loss")
            names = ["running_loss"]
        ProgressBar(persist=False, disable=False).attach(engine, metric_names=names)


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


def _difference(key: str, saved, now) -> str:
    """``key 'a' saved vs 'b' now``; long lists (training images) by count and first difference."""
    if isinstance(saved, list) and isinstance(now, list) and max(len(saved), len(now)) > 4:
        new = sorted(set(now) - set(saved))
        example = f", e.g. {new[0]!r} was not in it" if new else ""
        return f"{key}: {len(saved)} saved vs {len(now)} now{example}"
    return f"{key} {saved!r} saved vs {now!r} now"


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

    The file also holds ``run`` (network settings and training data, e.g. preset, classes, channels,
    image names). A file saved for another run is not resumed: training stops before it starts with
    one line saying what differs and how to start fresh (:class:`ResumeMismatchError`, a ``SystemExit``,
    so no traceback).

    Args:
        checkpoint_file: the resume state file.
        save_dict: objects with ``state_dict``/``load_state_dict`` (``model`` is compared with the saved weights).
        map_location: where saved tensors are loaded.
        interval: save every this many epochs (and at the end, at a new best and when training is stopped).
        run: what the saved state must match to be resumed (plain values).
    """

    def __init__(
        self, checkpoint_file: str, save_dict: dict, map_location=None, interval: int = 1, run: dict | None = None
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be a positive number of epochs, got {interval}.")
        self.checkpoint_file = Path(checkpoint_file)
        self.save_dict = save_dict
        self.map_location = map_location
        self.interval = interval
        self.run = run or {}
        self._state: dict | None = None

    def attach(self, engine: Engine) -> None:
        self._state = self._load_matching_state()
        engine.add_event_handler(Events.STARTED, self.resume)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def _refuse(self, why: str) -> None:
        raise ResumeMismatchError(
            f"{self.checkpoint_file}: not resumed: {why}. To start fresh, choose another --output_dir "
            f"(or delete {self.checkpoint_file.name}); to resume, run with the settings it was saved with."
        )

    def _load_matching_state(self) -> dict | None:
        """The saved state if it belongs to this run; stops with one line otherwise."""
        if not self.checkpoint_file.is_file():
            return None
        try:
            state = torch.load(self.checkpoint_file, map_location=self.map_location, weights_only=True)
        except Exception as e:  # truncated or foreign file: say so, never dump it
            self._refuse(f"the file is not a readable resume state ({str(e).splitlines()[0][:200]})")
        saved_run = state.get("run", {})
        differ = [_difference(k, saved_run[k], v) for k, v in self.run.items() if k in saved_run and saved_run[k] != v]
        model = self.save_dict.get("model")
        if not differ and isinstance(model, torch.nn.Module) and "model" in state:
            mismatch = describe_mismatch(_unwrap(model), state["model"])
            if mismatch:
                differ.append(f"the saved weights do not fit this network ({mismatch})")
        if differ:
            self._refuse("it was saved for another run: " + "; ".join(differ))
        return state

    def _objects(self, engine: Engine) -> dict:
        return {**{k: _unwrap(v) if isinstance(v, torch.nn.Module) else v for k, v in self.save_dict.items()}, "trainer": engine}

    def save(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        new_best = any(
            isinstance(v, BestMetricState) and v.evaluator.state.best_metric_epoch == epoch for v in self.save_dict.values()
        )
        due = epoch % self.interval == 0 or epoch >= engine.state.max_epochs or new_best or engine.should_terminate
        if _is_main_process() and due:
            state = {k: v.state_dict() for k, v in self._objects(engine).items()}
            atomic_torch_save({**state, "run": self.run}, self.checkpoint_file)

    def resume(self, engine: Engine) -> None:
        state, self._state = self._state, None
        if state is None:
            return
        max_epochs = engine.state.max_epochs
        for key, obj in self._objects(engine).items():
            obj.load_state_dict(state[key])
        engine.state.max_epochs = max_epochs
        engine.logger.info(
            f"resumed from {self.checkpoint_file} after epoch {engine.state.epoch} "
            f"(to start fresh, choose another --output_dir)"
        )


class ResumeMismatchError(SystemExit):
    """A resume state that belongs to another run; a ``SystemExit`` so the user sees its one line, not a traceback."""
