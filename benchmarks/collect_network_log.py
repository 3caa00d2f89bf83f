"""Rebuild ``network.{json,md}`` from the rows ``bench_network.py`` printed, when its run was cut short.

The H200 run of 2026-11-27 hit its 150 s limit after the four network rows (before the SACM section and
the result files); its printed rows are in ``results/bench_h200.log`` and the environment of the same
call in ``results/e2e.json``. FlopCounterMode over-counts the backward pass of the grouped convolutions
of MSA2-Net's default SACM form (624 GFLOPs per slice for fwd+bwd against ~33 expected: the per-sample
batch-folded grouped convolution's backward is counted as if ungrouped), so the fwd+bwd TFLOP/s of MSA2-Net rows are also
given from 3 x the forward count (the usual fwd+bwd estimate), marked ``*_est``.

    python benchmarks/collect_network_log.py results/bench_h200.log results/e2e.json
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, env_header, md_table, write_results  # noqa: E402


def main(log: str, env_json: str) -> None:
    rows = [ast.literal_eval(line) for line in Path(log).read_text().splitlines() if line.startswith("{'model'")]
    env = json.loads(Path(env_json).read_text())["env"]
    peak = None
    for r in rows:
        if r["gflops_fwd_bwd_per_slice"] > 5 * r["gflops_fwd_per_slice"]:
            r["flop_counter_bwd_overcount"] = True
            g = 3 * r["gflops_fwd_per_slice"]
            for d in ("fp32", "bf16"):
                r[f"{d}_fwd_bwd_tflops_est"] = g * r[f"{d}_fwd_bwd_slices_per_s"] / 1e3
        if r.get("bf16_fwd_frac_of_bf16_peak"):
            peak = r["bf16_fwd_tflops"] / r["bf16_fwd_frac_of_bf16_peak"]
    env["bf16_matmul_tflops_measured"] = peak
    results = {"env": env, "batch": 64, "size": 224, "num_classes": 9, "iters": 6, "networks": rows,
               "note": "rebuilt from the printed rows (run cut at 150 s); SACM forms in network_sacm.json"}
    cols = ["model", "params_M", "gflops_fwd_per_slice", "fp32_fwd_slices_per_s", "bf16_fwd_slices_per_s",
            "fp32_fwd_bwd_slices_per_s", "bf16_fwd_bwd_slices_per_s", "bf16_fwd_tflops", "bf16_fwd_frac_of_bf16_peak", "peak_mem_gib"]
    md = ["# Network throughput, 224x224, batch 64, 9 classes (same run)\n", env_header(env),
          f"- measured bf16 matmul rate (8192^3 torch.matmul): {peak and round(peak, 1)} TFLOP/s\n",
          "FLOPs: torch.utils.flop_counter (matmul/conv/attention only). fp32 = PyTorch defaults (TF32 off for matmul, on for cuDNN); bf16 = autocast. Median of 6 runs after 2 warm-up.\n",
          md_table(rows, cols), "",
          "fwd+bwd TFLOP/s (bf16): " + ", ".join(f"{r['model']}: {r.get('bf16_fwd_bwd_tflops_est', r['bf16_fwd_bwd_tflops']):.1f}" for r in rows)
          + " (MSA2-Net from 3 x forward FLOPs: FlopCounterMode over-counts the backward of its grouped convolutions)."]
    write_results("network", results, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main(*sys.argv[1:3])
