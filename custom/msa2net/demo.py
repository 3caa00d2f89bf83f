"""The no-download demo: synthetic volumes -> train ``tiny`` MSA2-Net on the CPU -> infer -> evaluate -> figures.

Run ``python -m msa2net.demo`` (or ``msa2net demo``); everything lands in one folder whose path is printed.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from msa2net.bundle_tools import default_bundle_dir, run_workflow
from msa2net.data.synthetic import make_volume_dataset

__all__ = ["run_demo"]

PROFILE = "profile_synthetic.json"
#: The demo fails below this mean validation Dice: a model that does not learn is a bug.
MIN_DICE = 0.80
#: Training time budget of the demo, in seconds.
TRAIN_SECONDS = 150.0
#: The bundle's recipe is made for hours of GPU training from scratch on real data; a few CPU minutes on
#: the synthetic volumes need a larger learning rate, mild augmentation and a shorter EMA warm-up.
DEMO_RECIPE = {
    "learning_rate": 0.05,
    "warmup_iters": 20,
    "ema_decay": 0.99,
    "augmentation_params": {"flip_prob": 0.5, "rotate_prob": 0.3, "rotate_range": 0.35},
}


def _step(i: int, n: int, text: str) -> float:
    print(f"\n=== [{i}/{n}] {text}", flush=True)
    return time.perf_counter()


def plot_training_curve(log_csv: Path, out_png: Path) -> None:
    """Training loss and validation Dice (mean and per class) per epoch, from the run's ``training_log.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = ax.plot(epochs, loss, color="tab:blue", label="training loss (0.5 CE + 0.5 Dice)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    validated = [r for r in rows if r["val_metric"]]
    if validated:
        ax2 = ax.twinx()
        x = [int(r["epoch"]) for r in validated]
        lines += ax2.plot(x, [float(r["val_metric"]) for r in validated], "o-", color="black", label="validation mean Dice")
        # the overlays' colours: class c is tab10's colour c
        for c, col in enumerate((c for c in rows[0] if c.startswith("val_") and c != "val_metric"), start=1):
            values = [float(r[col]) if r[col] else float("nan") for r in validated]
            lines += ax2.plot(x, values, ".--", color=matplotlib.colormaps["tab10"](c), label=f"validation Dice, {col[4:]}")
        ax2.set_ylabel("Dice")
        ax2.set_ylim(0, 1)
    ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    ax.set_title("MSA2-Net tiny on synthetic volumes (CPU)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_overlay(image: Path, label: Path, pred: Path, out_png: Path, class_names: list[str]) -> dict[str, float]:
    """Image slice with the most foreground: reference beside prediction, a legend of the classes and the case's Dice.

    Returns:
        The case's 3D Dice per class.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    img, ref, seg = (np.asarray(nib.load(p).dataobj) for p in (image, label, pred))
    dice = {}
    for c, name in enumerate(class_names, start=1):
        total = (ref == c).sum() + (seg == c).sum()
        dice[name] = float(2 * ((ref == c) & (seg == c)).sum() / total) if total else float("nan")
    z = int(np.argmax((ref > 0).sum(axis=(0, 1))))
    cmap = matplotlib.colormaps["tab10"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    for ax, lab, title in ((axes[0], ref, "reference"), (axes[1], seg, "MSA2-Net")):
        ax.imshow(img[..., z].T, cmap="gray", origin="lower")
        ax.imshow(np.ma.masked_equal(lab[..., z].T, 0), cmap=cmap, vmin=0, vmax=9, alpha=0.5, origin="lower")
        ax.set_title(f"{title}, slice {z}")
        ax.axis("off")
    handles = [Patch(color=cmap(c), alpha=0.5, label=f"{n} (Dice {dice[n]:.3f})") for c, n in enumerate(class_names, start=1)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(f"{image.name.removesuffix('.nii.gz')}: mean Dice {np.nanmean(list(dice.values())):.3f} (3D, whole case)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return dice


def run_demo(
    out_dir: str = "demo_output",
    num_cases: int = 12,
    max_epochs: int | None = None,
    time_budget_s: float | None = TRAIN_SECONDS,
    threads: int = 1,
    seed: int = 0,
) -> str:
    """Run the whole demo; returns (and prints) the output folder.

    Args:
        out_dir: output folder (replaced if it exists).
        num_cases: synthetic volumes (3 of them are held out for validation).
        max_epochs: override the profile's schedule (30 epochs).
        time_budget_s: training seconds: the number of epochs is set from the measured speed so that
            the schedule ends with them (``None``: the profile's epochs), so that a busy machine still
            finishes the demo in minutes.
        threads: PyTorch CPU threads. One by default: on a busy 2-core machine two threads spent
            most of their time waiting on each other (an epoch took 6x longer than with one).
        seed: seed of the data and of training.
    """
    start = time.perf_counter()
    torch.set_num_threads(threads)
    bundle = default_bundle_dir()
    out = Path(out_dir).resolve()
    shutil.rmtree(out, ignore_errors=True)
    data, run, preds, metrics, figures = (out / n for n in ("data", "run", "predictions", "metrics", "figures"))
    schedule = {"max_epochs": max_epochs} if max_epochs else {}

    t = _step(1, 5, f"generating {num_cases} synthetic volumes in {data}")
    datalist = json.loads(Path(make_volume_dataset(str(data), num_cases=num_cases, seed=seed)).read_text())
    inputs = out / "inputs"
    inputs.mkdir()
    for case in datalist["validation"]:
        shutil.copy2(data / case["image"], inputs)
    times = {"data_s": time.perf_counter() - t}

    t = _step(2, 5, "training MSA2-Net 'tiny' on the CPU (bundle workflow 'training'; one line per epoch)")
    run_workflow(
        "training", ["train.json", PROFILE], bundle, dataset_dir=str(data), output_dir=str(run), seed=seed,
        time_budget_s=time_budget_s, val_interval=5, **DEMO_RECIPE, **schedule,
    )
    times["training_s"] = time.perf_counter() - t

    t = _step(3, 5, f"segmenting the {len(datalist['validation'])} held-out volumes (bundle workflow 'inference')")
    ckpt = str(run / "models" / "model.pt")
    run_workflow("inference", ["inference.json", PROFILE], bundle, dataset_dir=str(inputs), output_dir=str(preds), ckpt_path=ckpt)
    times["inference_s"] = time.perf_counter() - t

    t = _step(4, 5, "evaluating Dice and HD95 per class and case (bundle workflow 'evaluating')")
    run_workflow(
        "evaluating", ["train.json", "evaluate.json", PROFILE], bundle, dataset_dir=str(data), ckpt_path=ckpt,
        output_dir=str(metrics),
    )
    times["evaluation_s"] = time.perf_counter() - t

    t = _step(5, 5, "writing the training curve and overlay figures")
    figures.mkdir()
    plot_training_curve(run / "training_log.csv", figures / "training_curve.png")
    class_names = json.loads((bundle / "configs" / PROFILE).read_text())["class_names"]
    for case in datalist["validation"]:
        name = Path(case["image"]).name.removesuffix(".nii.gz")
        plot_overlay(data / case["image"], data / case["label"], preds / f"{name}_seg.nii.gz", figures / f"overlay_{name}.png", class_names)
    times["figures_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - start

    result = json.loads((metrics / "metrics_summary.json").read_text())
    summary = {"mean_dice": result["metrics"]["val_mean_dice"]["mean"], "metrics": result, "times": times}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nmean Dice on the synthetic validation volumes: {summary['mean_dice']:.4f}")
    print(f"total time: {times['total_s']:.0f} s")
    print(f"demo output: {out}")
    if summary["mean_dice"] < MIN_DICE:
        raise SystemExit(f"the demo model did not learn: mean Dice {summary['mean_dice']:.3f} < {MIN_DICE}")
    return str(out)


if __name__ == "__main__":
    import fire

    fire.Fire(run_demo, serialize=lambda _: None)
