"""Model-card figures: ACDC and Kvasir-SEG validation Dice over epochs and GPU time, and an ACDC reference/prediction overlay.

    python scripts/training_figures.py --image /data/acdc/imagesTr/patient028_frame01.nii.gz \
        --label /data/acdc/labelsTr/patient028_frame01.nii.gz --pred out/patient028_frame01_seg.nii.gz

Curves come from the training logs recorded under ``bundle/docs/results``; figures are written to
``bundle/docs/figures``. Without ``--image``, ``--label`` and ``--pred`` only the curves are drawn.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bundle" / "docs" / "results"
FIGURES = ROOT / "bundle" / "docs" / "figures"
R5, R6, R7, R8, R9, R11 = (RESULTS / f"run{n}" for n in ("5_h200_x4", "6_h200_x2", "7_h200_x2", "8_h200_x2", "9_h200_x2", "11_h200"))
# each run's log, and seconds added to its clock: a warm restart is drawn after the GPU time of the run it continues
ACDC_RUNS = {
    "paper, run 9 (warm restart from run 8's best, learning rate 0.01, 600 s)": (R9 / "acdc_paper_s4a" / "training_log.csv", 1930.0),
    "paper, run 9 (the same, learning rate 0.002, 400 s)": (R9 / "acdc_paper_s4c" / "training_log.csv", 1930.0),
    "paper, run 8 (warm restart from run 7's best, a whole H200; shipped)": (R8 / "acdc_paper_s3" / "training_log.csv", 1350.0),
    "paper, run 7 (a whole H200, 1350 s from scratch)": (R7 / "acdc_paper_s2" / "training_log.csv", 0.0),
    "base, run 7 (a whole H200, 460 s)": (R7 / "acdc_base_h200" / "training_log.csv", 0.0),
    "BasicUNet control, run 6 (a whole H200, 450 s)": (R6 / "acdc_unet" / "training_log.csv", 0.0),
    "paper, run 6 (half an H200, 900 s)": (R6 / "acdc_paper" / "training_log.csv", 0.0),
    "paper, run 5 (old recipe, a whole H200)": (R5 / "paper_full" / "eval" / "training_log.csv", 0.0),
}
KVASIR_RUNS = {
    "base, run 11 (warm restart from run 9's best, learning rate 0.01, 420 s)": (R11 / "kvasir_base_s6" / "training_log.csv", 1181.0),
    "base, run 9 (warm restart from run 7's best, learning rate 0.01; shipped)": (R9 / "kvasir_base_s4a" / "training_log.csv", 770.0),
    "base, run 9 (the same, learning rate 0.003, 420 s)": (R9 / "kvasir_base_s4c" / "training_log.csv", 770.0),
    "base, run 8 (warm restart from run 7's best, weights lost)": (R8 / "kvasir_base_s3" / "training_log.csv", 770.0),
    "base, run 7 (half an H200, 770 s from scratch)": (R7 / "kvasir_base" / "training_log.csv", 0.0),
    "paper, run 7 (half an H200, 770 s from scratch)": (R7 / "kvasir_paper" / "training_log.csv", 0.0),
}


def curves(runs: dict, out: Path, metric: str, reported: float, ylim: tuple[float, float], epoch_note: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for name, (path, offset_s) in runs.items():
        rows = [r for r in csv.DictReader(path.open()) if r["val_metric"]]
        dice = [float(r["val_metric"]) for r in rows]
        axes[0].plot([int(r["epoch"]) for r in rows], dice, marker="o", ms=2, label=name)
        if rows and "elapsed_s" in rows[0]:
            axes[1].plot([float(r["elapsed_s"]) + offset_s for r in rows], dice, marker="o", ms=2, label=name)
    for ax in axes:
        ax.axhline(reported, color="grey", ls="--", lw=1, label=f"paper's reported {reported}")
        ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    axes[0].set_xlabel(f"epoch ({epoch_note})")
    axes[1].set_xlabel("H200 seconds (a restart begins at the time behind its weights)")
    axes[0].set_ylabel(f"validation {metric}")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def overlay(image: Path, label: Path, pred: Path, out: Path, slice_index: int | None) -> None:
    img, ref, seg = (np.asanyarray(nib.load(p).dataobj) for p in (image, label, pred))
    z = slice_index if slice_index is not None else int(np.argmax((ref > 0).sum((0, 1))))
    colours = matplotlib.colors.ListedColormap([(0, 0, 0, 0), (0.9, 0.2, 0.2, 0.5), (0.2, 0.8, 0.2, 0.5), (0.2, 0.4, 1.0, 0.5)])
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
    for ax, lab, title in ((axes[0], ref, "reference"), (axes[1], seg, "prediction (shipped model)")):
        ax.imshow(img[..., z].T, cmap="gray", origin="lower")
        ax.imshow(lab[..., z].T, cmap=colours, vmin=0, vmax=3, origin="lower", interpolation="nearest")
        ax.set_title(f"{title}, slice {z}", fontsize=9)
        ax.axis("off")
    fig.suptitle("RV red, Myo green, LV blue", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", type=Path)
    ap.add_argument("--label", type=Path)
    ap.add_argument("--pred", type=Path)
    ap.add_argument("--slice", type=int, default=None)
    args = ap.parse_args()
    given = [a is not None for a in (args.image, args.label, args.pred)]
    if any(given) and not all(given):
        ap.error("the overlay needs --image, --label and --pred together")
    FIGURES.mkdir(parents=True, exist_ok=True)
    curves(ACDC_RUNS, FIGURES / "acdc_validation_dice.png", "mean Dice (RV, Myo, LV)", 0.926, (0.7, 0.95), "runs 6-9: 52 batches of 32")
    curves(KVASIR_RUNS, FIGURES / "kvasir_validation_dice.png", "Dice (polyp)", 0.934, (0.6, 0.95), "runs 8-11: 700 images in batches of 32")
    if not all(given):
        return
    overlay(args.image, args.label, args.pred, FIGURES / f"overlay_{args.image.name.split('.')[0]}.png", args.slice)


if __name__ == "__main__":
    main()
