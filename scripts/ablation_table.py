"""The model card's ablation and baseline table from the records of ``scripts/gpu/run_jobs.py``.

    python scripts/ablation_table.py bundle/docs/results/run5_h200_x4 --reference paper_full

For every job of the run folder's ``summary_*.json``: parameters (the job's ``network_def``, parsed
from the bundle's configs with the job's config files and overrides), epochs done of those planned, best validation epoch, the float32 evaluation of the best
checkpoint (mean and per-class Dice, HD95), the mean Dice difference to ``--reference`` with a 95 %
paired bootstrap interval over the validation volumes (the same volumes in every run), how many volumes
score lower than with the reference and the Wilcoxon signed-rank p-value of the per-volume differences,
seconds of training to first reach 0.85, and the median seconds of one training epoch without validation.
All of these treat the volumes as the only source of variation; one training run per row says nothing
about run-to-run noise.
Prints a Markdown table and writes ``table.json`` beside the records.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from scipy.stats import wilcoxon

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
BOOTSTRAP_SAMPLES = 10000


def _cli_value(text: str):
    """A ``--key value`` override as the bundle's command line (fire) reads it: a Python literal, else a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def build(job: dict, profile: str) -> torch.nn.Module:
    """The job's ``network_def`` from the configs its training used, with its ``--key value`` overrides."""
    parser = ConfigParser()
    configs = ["configs/train.json", f"configs/profile_{profile}.json", *job["configs"]]
    parser.read_config([str(BUNDLE / c) for c in configs])
    for key, value in zip(job["args"][::2], job["args"][1::2]):
        parser[key.lstrip("-")] = _cli_value(value)
    return parser.get_parsed_content("network_def")


def per_case(run: Path, name: str) -> dict[str, float]:
    rows = csv.DictReader((run / name / "evaluate" / "val_mean_dice_raw.csv").open())
    return {Path(r["filename"]).name: float(r["mean"]) for r in rows}


def paired_differences(a: dict[str, float], b: dict[str, float]) -> np.ndarray:
    keys = sorted(a.keys() & b.keys())
    return np.array([a[k] - b[k] for k in keys])


def paired_interval(diff: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean of the per-case differences and its 95 % bootstrap interval (cases resampled)."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(BOOTSTRAP_SAMPLES, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def epoch_seconds(run: Path, name: str) -> float:
    rows = list(csv.DictReader((run / name / "eval" / "training_log.csv").open()))
    t = [float(r["elapsed_s"]) for r in rows]
    return statistics.median(b - a for a, b, r in zip(t, t[1:], rows[1:]) if not r["val_metric"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--reference", default="paper_full")
    args = ap.parse_args()
    run = Path(args.run_dir)
    jobs, planned = [], None
    for f in sorted(run.glob("summary_*.json")):
        s = json.loads(f.read_text())
        planned = s["schedule"]["epochs"]
        gpus = s["env"]["gpus"]
        jobs += [dict(j, card=gpus[int(j["gpu"])].split(", ")[1], profile=s["schedule"]["profile"]) for j in s["jobs"]]
    ref = per_case(run, args.reference)
    rows = []
    for j in jobs:
        ev = j["evaluation"]["metrics"]
        diff = paired_differences(per_case(run, j["name"]), ref)
        d, lo, hi = paired_interval(diff)
        lower = int((diff < 0).sum())
        p_value = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else None
        rows.append(
            {
                "name": j["name"],
                "card": j["card"],
                "params_m": round(sum(p.numel() for p in build(j, j["profile"]).parameters()) / 1e6, 1),
                "epochs": f"{j['epochs_done']}/{planned}",
                "best_epoch": j["best_val"]["epoch"],
                "dice": round(ev["val_mean_dice"]["mean"], 4),
                "per_class": {k: round(v, 3) for k, v in ev["val_mean_dice"]["per_class"].items()},
                "hd95": round(ev["val_hd95"]["mean"], 2),
                "delta_points": [round(100 * d, 2), round(100 * lo, 2), round(100 * hi, 2)],
                "volumes_lower": f"{lower}/{len(diff)}",
                "wilcoxon_p": round(p_value, 3) if p_value is not None else None,
                "first_085_s": j["first_reached_s"]["0.85"],
                "epoch_s": round(epoch_seconds(run, j["name"]), 2),
            }
        )
    rows.sort(key=lambda r: -r["dice"])
    (run / "table.json").write_text(json.dumps(rows, indent=1))
    print(
        f"| run | params | epochs done | best epoch | mean Dice | RV | Myo | LV | HD95 (vox) | vs {args.reference} (points, 95 % CI) "
        "| volumes lower | Wilcoxon p | s to 0.85 | s/epoch |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pc = list(r["per_class"].values())
        d = r["delta_points"]
        print(
            f"| {r['name']} | {r['params_m']} M | {r['epochs']} | {r['best_epoch']} | {r['dice']:.4f} | {pc[0]:.3f} | {pc[1]:.3f} | "
            f"{pc[2]:.3f} | {r['hd95']:.2f} | {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] | {r['volumes_lower']} | {r['wilcoxon_p']} | "
            f"{r['first_085_s']} | {r['epoch_s']} |"
        )


if __name__ == "__main__":
    main()
