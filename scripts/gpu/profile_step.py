"""Where one training iteration's time goes: the bundle's own trainer, timed on the host and on the GPU.

Builds the training workflow from the bundle's configs (``train.json``, a dataset profile,
``gpu_train.json`` and any extra files, plus ``--set`` overrides), runs its ``SupervisedTrainer`` for
a few short epochs and reports:

* ``step_ms``: wall time per iteration in the steady state (after the first epoch, no validation);
* ``gpu_ms``: GPU kernel time per iteration (``torch.profiler`` over ``--profile_steps`` iterations);
  ``gpu_busy`` = gpu_ms / step_ms. Well below 1 means the host (Python, kernel launches, waits on the
  GPU) sets the pace, and a second GPU cannot help;
* ``host_syncs``: iterations' calls of ``cudaStreamSynchronize``/``cudaDeviceSynchronize``/
  ``cudaMemcpy`` device-to-host waits seen by the profiler per iteration (each stops the host from
  running ahead of the GPU);
* ``handlers_ms``: ignite's ``HandlersTimeProfiler`` host time per event handler and for the
  iteration function and data loading, per iteration.

Run from ``bundle/`` on the GPU host (monai, ignite installed, ``PYTHONPATH`` with ``custom``)::

    python3 ../scripts/gpu/profile_step.py --dataset_dir ../.gpudata/acdc --out profile.json \\
        --set model_preset=paper
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from ignite.engine import Events
from ignite.handlers import HandlersTimeProfiler
from monai.bundle import ConfigParser

_sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync")


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_trainer(configs: list[str], overrides: dict):
    parser = ConfigParser()
    parser.read_config(configs)
    parser.update(overrides)
    parser.get_parsed_content("initialize")
    return parser, parser.get_parsed_content("train#trainer")


def profile_gpu(trainer, start_iter: int, steps: int, result: dict) -> None:
    """Attach a torch.profiler window over iterations ``start_iter .. start_iter + steps``."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
    state = {}

    @trainer.on(Events.ITERATION_STARTED(once=start_iter))
    def _begin(engine):
        _sync()
        state["t0"] = time.perf_counter()
        prof.__enter__()

    @trainer.on(Events.ITERATION_COMPLETED(once=start_iter + steps - 1))
    def _end(engine):
        _sync()
        prof.__exit__(None, None, None)
        wall = (time.perf_counter() - state["t0"]) / steps
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        syncs = {e.key: e.count / steps for e in events if e.key in SYNC_OPS}
        top_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        result.update(
            profiled_step_ms=1e3 * wall,
            gpu_ms=gpu_us / 1e3 / steps,
            gpu_busy=gpu_us / 1e6 / steps / wall,
            host_syncs_per_step=syncs,
            top_host_ops_ms={e.key: e.self_cpu_time_total / 1e3 / steps for e in top_cpu},
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--profile", default="acdc")
    ap.add_argument("--extra", nargs="*", default=[], help="more config files after gpu_train.json")
    ap.add_argument("--set", nargs="*", default=[], help="overrides key=value (JSON values)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--profile_steps", type=int, default=10, help="iterations under torch.profiler (0: none)")
    ap.add_argument("--work", default="/tmp/profile_step")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)  # a resume.pt left there would resume a finished run
    configs = ["configs/train.json", f"configs/profile_{args.profile}.json", "configs/gpu_train.json", *args.extra]
    overrides = {
        "dataset_dir": args.dataset_dir,
        "output_dir": f"{args.work}/eval",
        "ckpt_dir": f"{args.work}/models",
        "max_epochs": args.epochs,
        "val_interval": 10**6,
        **parse_set(args.set),
    }
    parser, trainer = build_trainer(configs, overrides)
    timer = HandlersTimeProfiler()
    timer.attach(trainer)
    result: dict = {"configs": configs, "overrides": overrides, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    epoch_len = trainer.state.epoch_length or len(trainer.data_loader)
    marks = {}

    @trainer.on(Events.EPOCH_COMPLETED)
    def _mark(engine):
        _sync()
        marks[engine.state.epoch] = (time.perf_counter(), engine.state.iteration)

    if args.profile_steps > 0:
        profile_gpu(trainer, epoch_len + 2, args.profile_steps, result)
    trainer.run()
    (t1, i1), (tn, i_n) = marks[1], marks[args.epochs]
    result["step_ms"] = 1e3 * (tn - t1) / (i_n - i1)
    result["batch_size"] = parser.get_parsed_content("batch_size")
    result["samples_per_s"] = result["batch_size"] * 1e3 / result["step_ms"]
    iters = max(1, trainer.state.iteration)
    rows = timer.get_results()
    result["handlers_ms"] = {}
    for row in rows:
        name, event, total = row[0], row[1], row[2]
        if isinstance(total, (int, float)):
            result["handlers_ms"][f"{name} [{event}]"] = 1e3 * float(total) / iters
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
