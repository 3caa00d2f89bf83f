"""CPU inference: milliseconds per slice (the bundle's ``spatial_size``) for each CPU backend of the bundle, and what ``auto`` picks.

Each backend is built exactly as the bundle builds it (``msa2net.backends.CpuBackendNetwork`` with
``backend=<name>``, as ``configs/inference_cpu.json --cpu_backend <name>`` does): eager PyTorch,
TorchScript (trace + freeze), ONNX Runtime with several settings, and ONNX Runtime with dynamic INT8
quantisation. Same weights, inputs and thread count for all. Timing interleaves the backends (one call
of each per round, ``--rounds`` rounds, medians reported), so a load that comes and goes on a shared
machine slows all of them alike; the load average before and after is recorded. Each backend runs at
batch 1 (one slice) and at ``--volume_slices`` (an ACDC volume's slices in one batch, as the bundle's
SliceInferer batches them); the largest logit difference against eager is recorded. Finally
``backend="auto"`` runs its probe (from an empty cache) and its choice is recorded.

The result files name the processor (``/proc/cpuinfo`` model name) and the date::

    python benchmarks/bench_cpu.py --presets paper --ckpt bundle/models/model.pt --note "shared machine"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from common import ROOT, bundle_setting, bundle_spatial_size, env_header, env_info, md_table, write_results  # noqa: I001
from msa2net.backends import CpuBackendNetwork
from msa2net.inference import load_weights
from msa2net.networks import create_msa2net

BACKENDS = "eager,torchscript,onnxruntime,onnxruntime:extended,onnxruntime:parallel,onnxruntime_int8"


def interleaved_medians(runners: dict, inputs: dict, rounds: int) -> dict:
    """``{(runner, input): median seconds}``, each round calling every runner once on every input."""
    times = {(r, i): [] for r in runners for i in inputs}
    with torch.no_grad():
        for run in runners.values():
            for x in inputs.values():
                run(x)
        for _ in range(rounds):
            for r, run in runners.items():
                for i, x in inputs.items():
                    start = time.perf_counter()
                    run(x)
                    times[(r, i)].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="base,paper")
    ap.add_argument("--backends", default=BACKENDS)
    ap.add_argument("--ckpt", default=None, help="weights for --ckpt_preset (others: random weights)")
    ap.add_argument("--ckpt_preset", default=None, help="the preset --ckpt belongs to (default: inference.json's, the shipped weights')")
    ap.add_argument("--spatial_size", type=int, nargs=2, default=None, help="H W (default: the bundle's spatial_size)")
    ap.add_argument("--num_classes", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="default: PyTorch's intra-op thread count")
    ap.add_argument("--volume_slices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no_auto", action="store_true", help="skip the auto probe")
    ap.add_argument("--note", default="", help="a line on the conditions (e.g. a machine shared with other jobs)")
    ap.add_argument("--out_dir", default=None)
    ap.add_argument("--name", default="cpu")
    args = ap.parse_args()
    args.ckpt_preset = args.ckpt_preset or bundle_setting("model_preset")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    size = args.spatial_size or bundle_spatial_size()
    load_before = os.getloadavg()
    # the bundle's list of weights whose INT8 Dice was validated, as `auto` reads it
    int8_weights = json.loads((ROOT / "bundle" / "configs" / "inference_cpu.json").read_text())["cpu_int8_weights"]
    rows, picks = [], []
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        net = create_msa2net(preset, in_channels=1, num_classes=args.num_classes).eval()
        if args.ckpt and preset == args.ckpt_preset:
            load_weights(net, args.ckpt)
        state = net.state_dict()
        cache = tempfile.mkdtemp(prefix="bench_cpu_")
        runners, build_s = {}, {}
        for name in args.backends.split(","):
            start = time.perf_counter()
            runner = CpuBackendNetwork(
                create_msa2net(preset, 1, args.num_classes), (1, 1, *size), backend=name, cache_dir=cache, threads=threads, int8_weights=int8_weights
            )
            runner.load_state_dict(state)
            runner.runner()
            runners[name], build_s[name] = runner, time.perf_counter() - start
        inputs = {"slice": torch.rand(1, 1, *size), "volume": torch.rand(args.volume_slices, 1, *size)}
        with torch.no_grad():
            refs = {k: net(x) for k, x in inputs.items()}
            diffs = {n: max((r(x) - refs[k]).abs().max().item() for k, x in inputs.items()) for n, r in runners.items()}
        med = interleaved_medians(runners, inputs, args.rounds)
        for name in runners:
            rows.append({
                "preset": preset, "backend": name, "threads": threads,
                "ms_per_slice_b1": 1e3 * med[(name, "slice")],
                "ms_per_slice_volume": 1e3 * med[(name, "volume")] / args.volume_slices,
                "speedup_b1": med[("eager", "slice")] / med[(name, "slice")] if ("eager", "slice") in med else None,
                "speedup_volume": med[("eager", "volume")] / med[(name, "volume")] if ("eager", "volume") in med else None,
                "max_abs_logit_diff": diffs[name], "build_s": build_s[name],
            })
            print(rows[-1], flush=True)
        if not args.no_auto:
            auto = CpuBackendNetwork(
                create_msa2net(preset, 1, args.num_classes), (1, 1, *size), cache_dir=tempfile.mkdtemp(prefix="bench_auto_"), threads=threads,
                int8_weights=int8_weights,
            )
            auto.load_state_dict(state)
            start = time.perf_counter()
            auto.runner()
            picks.append({"preset": preset, "auto_selected": auto.selected, "probe_s": time.perf_counter() - start,
                          "probe_ms_per_slice": auto.speeds_ms, "probe_batch": auto.probe_batch})
            print(picks[-1], flush=True)
    env = env_info()
    env["load_average_before_after"] = [load_before, os.getloadavg()]
    results = {"env": env, "note": args.note, "volume_slices": args.volume_slices, "rounds": args.rounds, "rows": rows, "auto": picks}
    cols = ["preset", "backend", "threads", "ms_per_slice_b1", "speedup_b1", "ms_per_slice_volume", "speedup_volume", "max_abs_logit_diff", "build_s"]
    md = [
        f"# CPU inference, {size[0]}x{size[1]} float32 input ({threads} threads; volume = {args.volume_slices} slices in one batch)\n",
        env_header(env),
        f"- load average (1, 5, 15 min) before / after: {load_before} / {env['load_average_before_after'][1]}",
        f"- {args.rounds} interleaved rounds, medians" + (f"; {args.note}" if args.note else ""),
        "",
        md_table(rows, cols),
    ]
    if picks:
        md += ["", "`backend=\"auto\"` (probe from an empty cache, default candidates; INT8 only for validated weights):", "",
               md_table(picks, ["preset", "auto_selected", "probe_s", "probe_batch", "probe_ms_per_slice"])]
    pj, pm = write_results(args.name, results, "\n".join(md), args.out_dir)
    print("\n".join(md))
    print(f"wrote {pj} and {pm}")


if __name__ == "__main__":
    main()
