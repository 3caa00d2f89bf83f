"""Network throughput at the bundle's slice size: MSA2-Net (paper preset) against the bundle's baselines, MONAI
SwinUNETR (2D) and BasicUNet (2D).

Same run, same card, same batch (default 64), 1 input channel, 9 output classes (Synapse-sized head), slices of
the bundle's ``spatial_size`` (``inference.json``; ``--spatial_size`` to change). Networks are named
``msa2net_<preset>`` for any registered preset and by file name for ``bundle/configs/baseline_*.json``, built as
the bundle builds them:

* slices/s for forward only (eval, no grad) and forward+backward (train mode, mean of the logits as loss),
  in float32 (PyTorch defaults: TF32 off for matmul, on for cuDNN convolutions) and bfloat16 autocast;
* parameters; FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products,
  convolutions and attention only; elementwise work is not counted) and the achieved TFLOP/s, also as a
  fraction of the card's measured bf16 matrix-product rate (8192^3 ``torch.matmul``);
* ``--cuda_graphs``: the same models again, run from CUDA graphs (``msa2net.cuda_graphs.GraphedForward``:
  one graph for the eval forward, one for the training forward+backward), which removes the CPU's
  kernel-launch cost from both networks alike;
* SACM: the default "kernel" form (one grouped convolution with the per-sample aggregated kernel) against
  the reference "sum" form, as single modules and inside the whole paper network, same weights and inputs,
  with the largest difference between the two forms' outputs.

    python benchmarks/bench_network.py            # writes benchmarks/results/network.{json,md}
"""

from __future__ import annotations

import argparse
import gc

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import (  # noqa: I001
    build_network, bundle_spatial_size, cuda_time, env_header, env_info, matmul_tflops, md_table, network_names, write_results,
)
from msa2net.cuda_graphs import GraphedForward
from msa2net.networks.sacm import SACM


def count_flops(net, x) -> tuple[int, int]:
    """(forward FLOPs, forward+backward FLOPs) for input ``x``."""
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x)
    fwd = fc.get_total_flops()
    net.train()
    with FlopCounterMode(display=False) as fc:
        net(x).float().mean().backward()
    net.zero_grad(set_to_none=True)
    return fwd, fc.get_total_flops()


def set_sacm_form(net, form: str) -> None:
    for m in net.modules():
        if isinstance(m, SACM):
            m.form = form


def time_modes(net, x, iters: int, warmup: int, dtype_names=("fp32", "bf16")) -> dict:
    dev = x.device.type
    out = {}
    for dname in dtype_names:
        amp = dname == "bf16"

        def fwd():
            with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
                net(x)

        def fwd_bwd():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
                loss = net(x).float().mean()
            loss.backward()
            net.zero_grad(set_to_none=True)

        net.eval()
        out[f"{dname}_fwd_s"] = cuda_time(fwd, warmup, iters)
        net.train()
        out[f"{dname}_fwd_bwd_s"] = cuda_time(fwd_bwd, warmup, iters)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--spatial_size", type=int, nargs=2, default=None, help="H W (default: the bundle's spatial_size)")
    ap.add_argument("--num_classes", type=int, default=9)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--models", default="msa2net_paper,swin_unetr,basic_unet", help=f"comma-separated, from {network_names()}")
    ap.add_argument("--channels_last", default="msa2net_paper", help="models also timed in channels-last layout")
    ap.add_argument("--cuda_graphs", default="msa2net_paper,swin_unetr", help="models also timed from CUDA graphs")
    ap.add_argument("--sacm_modules", default=None, help="CxS inputs of the single-module SACM test (default: paper stages 1-3)")
    ap.add_argument("--out_dir", default=None)
    ap.add_argument("--name", default="network")
    args = ap.parse_args()
    unknown = {m for flag in (args.models, args.channels_last, args.cuda_graphs) for m in flag.split(",") if m} - set(network_names())
    if unknown:
        ap.error(f"unknown networks {sorted(unknown)}; choose from {network_names()}")

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    env = env_info()
    peak = matmul_tflops() if dev.type == "cuda" else None
    env["bf16_matmul_tflops_measured"] = peak
    b, (h, w) = args.batch, args.spatial_size or bundle_spatial_size()
    x = torch.randn(b, 1, h, w, device=dev)
    rows = []

    def dump(rows, sacm_rows):
        """Write what is measured so far, so a run cut short still leaves its results."""
        results = {"env": env, "batch": b, "spatial_size": [h, w], "num_classes": args.num_classes, "iters": args.iters, "networks": rows, "sacm_modules": sacm_rows}
        cols = ["model", "params_M", "gflops_fwd_per_slice", "fp32_fwd_slices_per_s", "bf16_fwd_slices_per_s", "fp32_fwd_bwd_slices_per_s", "bf16_fwd_bwd_slices_per_s", "bf16_fwd_tflops", "bf16_fwd_bwd_tflops", "bf16_fwd_frac_of_bf16_peak", "peak_mem_gib"]
        md = [f"# Network throughput, {h}x{w}, batch {b}\n", env_header(env), f"- measured bf16 matmul rate (8192^3): {peak and round(peak, 1)} TFLOP/s\n",
              "FLOPs: torch.utils.flop_counter (matmul/conv/attention only). fp32 = PyTorch defaults; bf16 = autocast.\n",
              md_table(rows, cols), "\n## SACM forms (bf16 autocast, same weights and inputs)\n",
              md_table(sacm_rows, ["sacm_input", "kernel_bf16_fwd_ms", "sum_bf16_fwd_ms", "kernel_bf16_fwd_bwd_ms", "sum_bf16_fwd_bwd_ms", "rel_diff_kernel_vs_sum_fp32"])]
        write_results(args.name, results, "\n".join(md), args.out_dir)
        return md

    variants = [(m, False) for m in args.models.split(",") if m]
    variants += [(m, True) for m in args.channels_last.split(",") if m]
    variants += [("msa2net_paper", "sum")] if "msa2net_paper" in args.models else []
    if dev.type == "cuda":
        variants += [(m, "graph") for m in args.cuda_graphs.split(",") if m]
    for name, variant in variants:
        torch.manual_seed(0)
        net = build_network(name, 1, args.num_classes).to(dev)
        xin = x
        label = name
        if variant is True:
            net = net.to(memory_format=torch.channels_last)
            xin = x.contiguous(memory_format=torch.channels_last)
            label += " (channels_last)"
        elif variant == "sum":
            set_sacm_form(net, "sum")
            label += " (SACM sum form)"
        params = sum(p.numel() for p in net.parameters())
        fwd_flops, fb_flops = count_flops(net, xin)
        if variant == "graph":
            net = GraphedForward(net)
            label += " (CUDA graph)"
        # One training graph per wrapper: the graphed variant is timed in bf16 only.
        t = time_modes(net, xin, args.iters, args.warmup, ("bf16",) if variant == "graph" else ("fp32", "bf16"))
        row = {"model": label, "params_M": params / 1e6, "gflops_fwd_per_slice": fwd_flops / b / 1e9, "gflops_fwd_bwd_per_slice": fb_flops / b / 1e9}
        for mode, flops in (("fwd", fwd_flops), ("fwd_bwd", fb_flops)):
            for dname in ("fp32", "bf16"):
                if f"{dname}_{mode}_s" not in t:
                    continue
                sec = t[f"{dname}_{mode}_s"]
                row[f"{dname}_{mode}_slices_per_s"] = b / sec
                row[f"{dname}_{mode}_tflops"] = flops / sec / 1e12
                if peak:
                    row[f"{dname}_{mode}_frac_of_bf16_peak"] = flops / sec / 1e12 / peak
        if dev.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        if fb_flops > 5 * fwd_flops:  # FlopCounterMode over-counts the backward of batch-folded grouped convs
            row["flop_counter_bwd_overcount"] = True
            for dname in ("fp32", "bf16"):
                if f"{dname}_fwd_bwd_slices_per_s" in row:
                    row[f"{dname}_fwd_bwd_tflops_est"] = 3 * fwd_flops * row[f"{dname}_fwd_bwd_slices_per_s"] / b / 1e12
        rows.append(row)
        print(row, flush=True)
        dump(rows, [])
        del net
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # SACM single modules: kernel vs sum form, same weights and inputs
    sacm_rows = []
    # the paper preset's first three stage maps at this slice size
    sacm_modules = args.sacm_modules or f"64x{h // 4},128x{h // 8},256x{h // 16}"
    for spec in [v for v in sacm_modules.split(",") if v]:
        c, hw = (int(v) for v in spec.split("x"))
        torch.manual_seed(0)
        mod = SACM(c, c, (3, 5, 7)).to(dev)
        with torch.no_grad():  # a non-trivial gate, so the candidates really mix
            mod.gate[-1].weight.normal_(0, 0.5)
        xm = torch.randn(b, c, hw, hw, device=dev)
        mod.eval()
        with torch.no_grad():
            yk = mod(xm) if mod.form == "kernel" else None
            mod.form = "sum"
            ys = mod(xm)
            mod.form = "kernel"
            yk = mod(xm)
        rel = ((yk - ys).norm() / ys.norm()).item()
        row = {"sacm_input": f"{b}x{c}x{hw}x{hw}", "rel_diff_kernel_vs_sum_fp32": rel}
        for form in ("kernel", "sum"):
            mod.form = form
            t = time_modes(mod, xm, args.iters, args.warmup, ("bf16",))
            row[f"{form}_bf16_fwd_ms"] = t["bf16_fwd_s"] * 1e3
            row[f"{form}_bf16_fwd_bwd_ms"] = t["bf16_fwd_bwd_s"] * 1e3
        sacm_rows.append(row)
        print(row, flush=True)
        dump(rows, sacm_rows)

    md = dump(rows, sacm_rows)
    print("\n".join(md))


if __name__ == "__main__":
    main()
