"""CPU inference: seconds per slice (the bundle's ``spatial_size``) and per ACDC-sized volume, eager PyTorch vs TorchScript vs ONNX Runtime.

Same run, same inputs, same thread count (default: all cores of the machine): for each preset, eager
PyTorch (float32, eval, no grad), TorchScript (``torch.jit.trace`` then ``torch.jit.freeze``) and ONNX
Runtime (the bundle's ``msa2net.onnx_runtime.OnnxRuntimeNetwork``: legacy TorchScript-based exporter, opset 17,
dynamic batch, all graph optimisations), each at
batch 1 (one slice) and at batch ``--volume_slices`` (one ACDC volume of about 10 slices at once, as the
bundle's SliceInferer batches them). The largest logit difference against eager is recorded (target < 1e-3).

    python benchmarks/bench_cpu.py                 # writes benchmarks/results/cpu.{json,md}
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import bundle_spatial_size, env_header, env_info, md_table, write_results  # noqa: I001
from msa2net.networks import create_msa2net, list_presets
from msa2net.onnx_runtime import OnnxRuntimeNetwork


def median_time(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="paper,base", help=f"comma-separated, from {list_presets()}")
    ap.add_argument("--spatial_size", type=int, nargs=2, default=None, help="H W (default: the bundle's spatial_size)")
    ap.add_argument("--num_classes", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--volume_slices", type=int, default=10)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out_dir", default=None)
    ap.add_argument("--name", default="cpu")
    args = ap.parse_args()
    if unknown := set(args.presets.split(",")) - set(list_presets()):
        ap.error(f"unknown presets {sorted(unknown)}; choose from {list_presets()}")
    size = args.spatial_size or bundle_spatial_size()
    scratch = tempfile.mkdtemp(prefix="bench_cpu_")

    torch.set_num_threads(args.threads)
    rows = []
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        net = create_msa2net(preset, in_channels=1, num_classes=args.num_classes).eval()
        x1 = torch.rand(1, 1, *size)
        xv = torch.rand(args.volume_slices, 1, *size)
        with torch.no_grad():
            ref1, refv = net(x1), net(xv)
            traced = torch.jit.freeze(torch.jit.trace(net, torch.rand(2, 1, *size)))
        # the bundle's own ONNX Runtime backend (configs/inference_onnxruntime.json), exported to a scratch file
        ort_net = OnnxRuntimeNetwork(net, Path(scratch) / f"{preset}.onnx", (1, 1, *size), threads=args.threads)
        row = {"preset": preset, "params_M": sum(p.numel() for p in net.parameters()) / 1e6, "threads": args.threads}
        runners = {
            "eager": lambda x: net(x),
            "torchscript": lambda x: traced(x),
            "onnxruntime": ort_net,
        }
        for name, run in runners.items():
            with torch.no_grad():
                d1 = (run(x1) - ref1).abs().max().item()
                dv = (run(xv) - refv).abs().max().item()
                t1 = median_time(lambda: run(x1), args.warmup, args.iters)
                tv = median_time(lambda: run(xv), 1, max(2, args.iters // 2))
            row[f"{name}_s_per_slice"] = t1
            row[f"{name}_s_per_volume"] = tv
            row[f"{name}_max_abs_diff"] = max(d1, dv)
            print(preset, name, t1, tv, max(d1, dv), flush=True)
        row["ort_speedup_vs_eager_slice"] = row["eager_s_per_slice"] / row["onnxruntime_s_per_slice"]
        row["ort_speedup_vs_eager_volume"] = row["eager_s_per_volume"] / row["onnxruntime_s_per_volume"]
        rows.append(row)
    env = env_info()
    results = {"env": env, "spatial_size": size, "volume_slices": args.volume_slices, "rows": rows, "target_ort_speedup": 1.5}
    cols = ["preset", "params_M", "threads", "eager_s_per_slice", "torchscript_s_per_slice", "onnxruntime_s_per_slice", "ort_speedup_vs_eager_slice",
            "eager_s_per_volume", "torchscript_s_per_volume", "onnxruntime_s_per_volume", "ort_speedup_vs_eager_volume", "onnxruntime_max_abs_diff", "torchscript_max_abs_diff"]
    md = [f"# CPU inference, {size[0]}x{size[1]} float32 ({args.threads} threads; volume = {args.volume_slices} slices in one batch)\n", env_header(env), "", md_table(rows, cols)]
    pj, pm = write_results(args.name, results, "\n".join(md), args.out_dir)
    print("\n".join(md))
    print(f"wrote {pj} and {pm}")


if __name__ == "__main__":
    main()
