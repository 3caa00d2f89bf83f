"""Measure training images/s of one MSA2-Net preset for a few settings, to choose the GPU training setup.

Each setting runs ``benchmarks/bench_train.py``'s ``timed_steps`` (the bundle's training step: DiceCE 0.5/0.5,
SGD momentum 0.9, wd 1e-4, autocast with a GradScaler, the loss read back each step) on batches from
:class:`msa2net.data.gpu_loader.GPUSliceLoader` over random slices, after a warm-up. Settings are tried
in a fixed sequence: SACM form (kernel, sum), then channels-last for the better form, then a larger
batch for the better layout. Prints one JSON object; ``--out`` also writes it.

    python scripts/gpu/probe_train.py --preset paper --out probe_paper.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from msa2net.data.gpu_loader import GPUSliceLoader
from msa2net.networks import create_msa2net

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_train import timed_steps  # noqa: E402  (the training step the benchmarks time)


def measure(preset, form, channels_last, batch, steps, warmup, device, dtype, num_classes=4, size=224):
    torch.manual_seed(0)
    net = create_msa2net(preset, in_channels=1, num_classes=num_classes, sacm_form=form).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    items = [
        {"image": torch.rand(1, size, size, 16), "label": torch.randint(0, num_classes, (1, size, size, 16), dtype=torch.uint8)}
        for _ in range(max(1, (batch * 4) // 16))
    ]
    loader = GPUSliceLoader(items, batch_size=batch, device=device, channels_last=channels_last, samples_per_epoch=10**9)
    rate = timed_steps(net, iter(loader), steps, warmup, device, dtype)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    del net, loader
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {"form": form, "channels_last": channels_last, "batch": batch, "images_per_s": rate, "peak_gib": mem}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--big_batch", type=int, default=48)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--out", default=None)
    ap.add_argument("--configs", default=None, help='only these settings, e.g. "kernel:0:48,sum:1:48"')
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    dtype = torch.bfloat16
    kw = dict(steps=args.steps, warmup=args.warmup, device=device, dtype=dtype)
    if args.configs:  # fixed list "form:channels_last(0/1):batch,..."; the fastest is chosen
        runs = []
        for spec in args.configs.split(","):
            form, cl, batch = spec.split(":")
            runs.append(measure(args.preset, form, bool(int(cl)), int(batch), **kw))
        choice = max(runs, key=lambda r: r["images_per_s"])
    else:
        runs = [measure(args.preset, f, False, args.batch, **kw) for f in ("kernel", "sum")]
        best = max(runs, key=lambda r: r["images_per_s"])
        runs.append(measure(args.preset, best["form"], True, args.batch, **kw))
        best = max(runs, key=lambda r: r["images_per_s"])
        runs.append(measure(args.preset, best["form"], best["channels_last"], args.big_batch, **kw))
        big = runs[-1]
        # a larger batch must pay clearly (fewer optimiser steps per sample otherwise)
        choice = big if big["images_per_s"] > 1.2 * best["images_per_s"] else best
    result = {"preset": args.preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "runs": runs, "choice": choice}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
