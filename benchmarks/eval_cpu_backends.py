"""Segmentation accuracy of CPU backends: the bundle's evaluation (Dice, HD95) run through each, against float32 PyTorch.

For each backend, ``python -m monai.bundle run evaluating`` with ``train.json`` + ``evaluate.json`` +
``inference_cpu.json --cpu_backend <name>`` on the validation split of ``--dataset_dir``; the reference
is the same evaluation without ``inference_cpu.json`` (eager float32 PyTorch). The result files record
each backend's mean Dice and its difference in points, and the weights digest of the checkpoint: an
INT8 backend may be listed for these weights in ``inference_cpu.json``'s ``cpu_int8_weights`` when its
Dice is within ``--max_drop`` points of float32::

    python benchmarks/eval_cpu_backends.py --dataset_dir /data/acdc --ckpt bundle/models/model.pt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, bundle_setting, env_header, env_info, md_table, write_results  # noqa: I001
from msa2net.inference import load_weights
from msa2net.networks import create_msa2net
from msa2net.onnx_runtime import weights_digest


def evaluate(configs: list[str], out_dir: Path, args, extra: list[str]) -> dict:
    config = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", config,
        "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf", "--bundle_root", ".",
        "--dataset_dir", args.dataset_dir, "--ckpt_path", str(Path(args.ckpt).resolve()), "--output_dir", str(out_dir),
        "--model_preset", args.preset, "--num_workers", "0", *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "custom"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT / "bundle", env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"evaluation failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    chosen = [line for line in proc.stdout.splitlines() if "CPU backend:" in line]
    summary = json.loads((out_dir / "metrics_summary.json").read_text())
    return {"summary": summary, "log": chosen[-1].split(" - ")[-1] if chosen else ""}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--ckpt", default=str(ROOT / "bundle" / "models" / "model.pt"))
    ap.add_argument("--preset", default=None, help="preset of --ckpt (default: inference.json's, the shipped weights')")
    ap.add_argument("--backends", default="onnxruntime_int8")
    ap.add_argument("--max_drop", type=float, default=0.2, help="largest accepted Dice drop, in points")
    ap.add_argument("--out_dir", default=None)
    ap.add_argument("--name", default="cpu_dice")
    args = ap.parse_args()
    args.preset = args.preset or bundle_setting("model_preset")
    net = create_msa2net(args.preset, in_channels=1, num_classes=4)
    load_weights(net, args.ckpt)
    digest = weights_digest(net)
    scratch = Path(tempfile.mkdtemp(prefix="eval_cpu_"))
    rows = []
    ref = evaluate(["train.json", "evaluate.json"], scratch / "float32", args, [])
    ref_dice = ref["summary"]["metrics"]["val_mean_dice"]["mean"]
    rows.append({"backend": "float32 eager (reference)", "mean_dice": ref_dice, "hd95": ref["summary"]["metrics"]["val_hd95"]["mean"], "dice_change_points": 0.0})
    for name in args.backends.split(","):
        res = evaluate(["train.json", "evaluate.json", "inference_cpu.json"], scratch / name.replace(":", "_"), args,
                       ["--cpu_backend", name, "--cpu_cache_dir", str(scratch / "cache")])
        metrics = res["summary"]["metrics"]
        change = 100 * (metrics["val_mean_dice"]["mean"] - ref_dice)
        rows.append({"backend": name, "mean_dice": metrics["val_mean_dice"]["mean"], "hd95": metrics["val_hd95"]["mean"],
                     "dice_change_points": change, "within_max_drop": change >= -args.max_drop,
                     "per_class": metrics["val_mean_dice"]["per_class"], "log": res["log"]})
        print(rows[-1], flush=True)
    env = env_info()
    results = {"env": env, "ckpt": Path(args.ckpt).name, "preset": args.preset, "weights_sha256": digest,
               "num_cases": ref["summary"]["num_cases"], "max_drop_points": args.max_drop, "rows": rows}
    md = [
        f"# Accuracy of CPU backends: {ref['summary']['num_cases']} validation volumes, `{args.preset}` preset, `{Path(args.ckpt).name}`\n",
        env_header(env),
        f"- weights_sha256 (`msa2net.onnx_runtime.weights_digest`): `{digest}`",
        f"- accepted: Dice at most {args.max_drop} points below float32",
        "",
        md_table(rows, ["backend", "mean_dice", "dice_change_points", "within_max_drop", "hd95"]),
    ]
    pj, pm = write_results(args.name, results, "\n".join(md), args.out_dir)
    print("\n".join(md))
    print(f"wrote {pj} and {pm}")


if __name__ == "__main__":
    main()
