"""Model-card figures for ACDC: validation Dice over epochs and wall time, and a reference/prediction overlay.

    python scripts/acdc_figures.py --image /data/acdc/imagesTr/patient028_frame01.nii.gz \
        --label /data/acdc/labelsTr/patient028_frame01.nii.gz --pred out/patient028_frame01_seg.nii.gz

Curves come from the training logs recorded under ``bundle/docs/results``; figures are written to
``bundle/docs/figures``.
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
RUNS = {
    "base, AdamW 5e-4, CUDA graphs (run 4, shipped)": RESULTS / "run4_h200" / "training_log_ship.csv",
    "base, SGD 0.01, eager (run 3)": RESULTS / "run3_h200" / "training_log_base.csv",
    "paper, SGD 0.01, eager, GPU shared (run 1)": RESULTS / "run1_h200" / "training_log_paper.csv",
}


def curves(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, path in RUNS.items():
        rows = [r for r in csv.DictReader(path.open()) if r["val_metric"]]
        ax.plot([int(r["epoch"]) for r in rows], [float(r["val_metric"]) for r in rows], marker="o", ms=3, label=name)
    ax.axhline(0.926, color="grey", ls="--", lw=1, label="paper's reported 0.926")
    ax.set_xlabel("epoch (1680 training slices)")
    ax.set_ylabel("validation mean Dice (RV, Myo, LV)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
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
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--label", type=Path, required=True)
    ap.add_argument("--pred", type=Path, required=True)
    ap.add_argument("--slice", type=int, default=None)
    args = ap.parse_args()
    FIGURES.mkdir(parents=True, exist_ok=True)
    curves(FIGURES / "acdc_validation_dice.png")
    overlay(args.image, args.label, args.pred, FIGURES / f"overlay_{args.image.name.split('.')[0]}.png", args.slice)


if __name__ == "__main__":
    main()
