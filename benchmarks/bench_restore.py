"""Memory and time of putting a prediction back on the input's grid with the bundle's ``RestoreLabeld``
(probabilities resized bilinearly, then argmax, a chunk of slices at a time; MONAI's ``Invertd`` would hold the
whole 9 x 512 x 512 x D probability volume: 5.7 GB in float32 at D = 600).

Each case runs in its own process, so its peak resident memory (``ru_maxrss``) is its own. The case is the
Synapse profile's: 9 classes, network grid 224x224, input grid 512x512, 200 or 600 slices.

    python benchmarks/bench_restore.py --slices 200 600

Writes ``benchmarks/results/restore.json`` and ``restore.md`` (machine named).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import RESULTS, env_info

CHILD = r"""
import json, resource, sys, time
import torch
from monai.data import MetaTensor
from monai.transforms import Resized
from msa2net.resample import RestoreLabeld
chunk, depth = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
pre = Resized(keys="image", spatial_size=[224, 224, -1], mode="bilinear")
data = pre({"image": MetaTensor(torch.zeros(1, 512, 512, depth))})
data["pred"] = torch.randn(9, 224, 224, depth)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
out = RestoreLabeld(keys="pred", ref_key="image", chunk=chunk)(data)["pred"]
took = time.perf_counter() - start
print(json.dumps({"chunk": chunk, "slices": depth, "shape": list(out.shape), "seconds": round(took, 2),
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  "before_gb": round(base / 2**20, 2)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, nargs="+", default=[200, 600])
    ap.add_argument("--chunks", nargs="+", default=["16"], help="slices restored at a time")
    args = ap.parse_args()
    rows = []
    for depth in args.slices:
        for chunk in args.chunks:
            proc = subprocess.run([sys.executable, "-c", CHILD, chunk, str(depth)], capture_output=True, text=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
                "chunk": chunk, "slices": depth, "error": proc.stderr.strip().splitlines()[-1]}
            rows.append(row)
            print(row, flush=True)
    env = env_info()
    (RESULTS / "restore.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    lines = [f"# Restoring a 9-class prediction from 224x224 to 512x512 (CPU: {env['host_cpu']}, {env['cpu_count']} cores, shared with other jobs; {env['date_utc']})", "",
             "| slices | chunk (slices) | seconds | peak resident memory (GB) | before restoring (GB) |", "|---|---|---|---|---|"]
    lines += [f"| {r['slices']} | {r['chunk']} | {r.get('seconds', r.get('error'))} | {r.get('peak_rss_gb', '')} | {r.get('before_gb', '')} |" for r in rows]
    (RESULTS / "restore.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
