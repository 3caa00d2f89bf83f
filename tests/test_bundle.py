"""The bundle end to end through the commands users run: training, inference, evaluation, checks, export."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BUNDLE, SYNTHETIC, bundle_cmd, needs_shared_data, shared_data
from msa2net.bundle_tools import export_bundle

needs_ct_series = needs_shared_data("ct", "dicom_series_20")


def _oblique_affine() -> np.ndarray:
    a, b = 0.4, -0.25
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([0.8, 1.3, 2.5])
    aff[:3, 3] = [-12.5, 40.0, 7.25]
    return aff


AFFINES = {
    "ras": np.diag([0.9, 1.1, 3.0, 1.0]),
    "lps": np.array([[-0.9, 0, 0, 120.0], [0, -1.1, 0, 80.0], [0, 0, 3.0, -50.0], [0, 0, 0, 1]]),
    "oblique": _oblique_affine(),
}


def test_training_writes_best_model_resume_state_and_log(trained_tiny):
    models = trained_tiny / "models"
    assert (models / "model.pt").is_file() and (models / "resume.pt").is_file()
    state = torch.load(models / "resume.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 3 * state["trainer"]["epoch_length"]
    # the learning rate is a function of the iteration (IterationLR), so no scheduler state is saved
    assert set(state) >= {"model", "ema", "optimizer", "trainer", "best_metric"}
    rows = list(csv.DictReader(open(trained_tiny / "eval" / "training_log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(r["val_metric"] != "" for r in rows)
    assert not list(models.glob(".*tmp")), "no temporary checkpoint left behind"


def test_run_id_run_also_trains(volume_dataset, tmp_path):
    bundle_cmd(
        "run", ["train.json"], "--dataset_dir", str(volume_dataset), *SYNTHETIC, "--max_epochs", "1",
        "--val_interval", "1", "--num_workers", "0", "--batch_size", "4", "--slices_per_volume", "2",
        "--ckpt_dir", str(tmp_path / "m"), "--output_dir", str(tmp_path / "e"),
    )
    assert (tmp_path / "m" / "model.pt").is_file()



@pytest.mark.parametrize("baseline", ["basic_unet", "swin_unetr"])
def test_baseline_configs_train_and_evaluate_through_the_bundle(baseline, volume_dataset, tmp_path):
    """The ablation table's MONAI baselines swap only ``network_def``: same data, schedule, loss and evaluation."""
    common = ["--dataset_dir", str(volume_dataset), *SYNTHETIC, "--num_workers", "0", "--ckpt_dir", str(tmp_path / "m")]
    small = ["--network_def#feature_size", "12"] if baseline == "swin_unetr" else []
    bundle_cmd(
        "training", ["train.json", "adamw.json", "gpu_train.json", f"baseline_{baseline}.json"], *common, *small,
        "--max_epochs", "1", "--val_interval", "1", "--batch_size", "4", "--output_dir", str(tmp_path / "e"),
    )
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)["model"]
    assert not any(k.startswith("encoder.") for k in state), "a MONAI network, not MSA2-Net, was trained"
    bundle_cmd(
        "evaluating", ["train.json", "evaluate.json", f"baseline_{baseline}.json"], *common, *small,
        "--output_dir", str(tmp_path / "v"), "--amp", "False",
    )
    dice, _ = summary_of_per_case_csv(tmp_path / "v", "val_mean_dice", ["organ_1", "organ_2"], num_cases=2)
    assert all(v is not None for v in dice["per_class"].values())


def _finite_mean(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def _assert_same(summary_value, expected, what: str) -> None:
    if expected is None:
        assert summary_value is None, what
    else:
        assert summary_value == pytest.approx(expected, rel=1e-5, abs=1e-6), what


def summary_of_per_case_csv(out: Path, metric: str, class_names: list[str], num_cases: int) -> tuple[dict, np.ndarray]:
    """Check ``metrics_summary.json`` against ``<metric>_raw.csv``; return the metric's summary entry and per-case values.

    Each class's mean is over the cases where it is finite (a class absent from a case is NaN), the
    overall mean over the cases' means of their finite values.
    """
    rows = list(csv.DictReader(open(out / f"{metric}_raw.csv")))
    values = np.array([[float(r[f"class{i}"]) for i in range(len(class_names))] for r in rows])
    summary = json.loads((out / "metrics_summary.json").read_text())
    entry = summary["metrics"][metric]
    assert summary["num_cases"] == len(rows) == num_cases and list(entry["per_class"]) == class_names
    for i, name in enumerate(class_names):
        _assert_same(entry["per_class"][name], _finite_mean(values[:, i]), f"{metric} {name}")
    case_means = np.array([m if (m := _finite_mean(row)) is not None else np.nan for row in values])
    _assert_same(entry["mean"], _finite_mean(case_means), f"{metric} mean")
    return entry, values


@pytest.fixture(scope="module")
def geometry_run(trained_tiny, volume_dataset, tmp_path_factory):
    """Inference on the same synthetic volume stored with RAS, LPS and oblique affines and an odd in-plane size."""
    src = nib.load(volume_dataset / "imagesTr" / "case_004.nii.gz")
    data = np.asarray(src.dataobj, dtype=np.float32)[:, 5:60, :]  # 64 x 55 x 12: not the network size
    inputs = tmp_path_factory.mktemp("geometry_in")
    for name, aff in AFFINES.items():
        nib.save(nib.Nifti1Image(data, aff), inputs / f"{name}.nii.gz")
    out = tmp_path_factory.mktemp("geometry_out")
    bundle_cmd(
        "inference", ["inference.json"], "--dataset_dir", str(inputs), "--output_dir", str(out),
        "--ckpt_path", str(trained_tiny / "models" / "model.pt"), *SYNTHETIC,
    )
    return inputs, out


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_output_keeps_input_geometry(geometry_run, name):
    inputs, out = geometry_run
    image = nib.load(inputs / f"{name}.nii.gz")
    seg = nib.load(out / f"{name}_seg.nii.gz")
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-5)
    np.testing.assert_allclose(seg.header.get_zooms(), image.header.get_zooms(), atol=1e-6)
    assert seg.get_data_dtype() == np.uint8
    labels = np.unique(np.asarray(seg.dataobj))
    assert set(labels.tolist()) <= {0, 1, 2}


def test_orientation_does_not_change_the_label_map(geometry_run):
    """The network sees the stored array in every case, so the three label maps are identical voxel for voxel."""
    _, out = geometry_run
    maps = [np.asarray(nib.load(out / f"{n}_seg.nii.gz").dataobj) for n in sorted(AFFINES)]
    assert all(np.array_equal(maps[0], m) for m in maps[1:])


def test_inference_summary_lists_done_cases(geometry_run):
    _, out = geometry_run
    summary = json.loads((out / "inference_summary.json").read_text())
    assert len(summary["done"]) == 3 and summary["failed"] == []


@needs_ct_series
def test_dicom_series_output_lies_on_the_reference_grid(trained_tiny, tmp_path):
    series = shared_data("ct", "dicom_series_20")
    reference = nib.load(shared_data("ct", "dicom_series_20_label_synapse8.nii.gz"))
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copytree(series, inputs / "ct_series")
    bundle_cmd(
        "inference", ["inference.json"], "--dataset_dir", str(inputs), "--output_dir", str(tmp_path / "out"),
        "--ckpt_path", str(trained_tiny / "models" / "model.pt"), *SYNTHETIC,
    )
    seg = nib.load(tmp_path / "out" / "ct_series_seg.nii.gz")
    assert seg.shape == reference.shape == (512, 512, 20)
    # the reference label was written by another reader: same physical grid, possibly another axis order/sign
    mapping = np.linalg.inv(seg.affine) @ reference.affine
    np.testing.assert_allclose(mapping, np.round(mapping), atol=1e-4)
    assert sorted(np.abs(np.round(mapping[:3, :3])).sum(0).tolist()) == [1, 1, 1]
    np.testing.assert_allclose(np.abs(np.diag(seg.affine)[:3]), [0.9765625, 0.9765625, 2.0], atol=1e-5)


def test_evaluating_writes_per_case_csv_and_mean_json(trained_tiny, volume_dataset, tmp_path):
    bundle_cmd(
        "evaluating", ["train.json", "evaluate.json"], "--dataset_dir", str(volume_dataset), *SYNTHETIC,
        "--ckpt_path", str(trained_tiny / "models" / "model.pt"), "--output_dir", str(tmp_path), "--num_workers", "0",
    )
    for metric in ("val_mean_dice", "val_hd95"):
        rows = list(csv.DictReader(open(tmp_path / f"{metric}_raw.csv")))
        assert len(rows) == 2 and all(r["filename"].endswith(".nii.gz") for r in rows)
        assert {"class0", "class1", "mean"} <= set(rows[0])
    dice, _ = summary_of_per_case_csv(tmp_path, "val_mean_dice", ["organ_1", "organ_2"], num_cases=2)
    assert dice["mean"] is not None and 0.0 <= dice["mean"] <= 1.0
    # HD95 is undefined (NaN/inf) for a class a barely trained model does not predict: left out of the means
    _, hd95 = summary_of_per_case_csv(tmp_path, "val_hd95", ["organ_1", "organ_2"], num_cases=2)
    assert not (hd95 < 0).any()


def test_2d_rgb_profile_trains_and_segments_png(rgb_dataset, tmp_path):
    bundle_cmd(
        "training", ["train.json", "profile_kvasir.json"], "--dataset_dir", str(rgb_dataset), "--model_preset", "tiny",
        "--spatial_size", "[64,64]", "--max_epochs", "1", "--num_workers", "0", "--batch_size", "2", "--val_interval", "1",
        "--ckpt_dir", str(tmp_path / "m"), "--output_dir", str(tmp_path / "e"),
    )
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(rgb_dataset / "images" / "case_004.png", inputs)
    bundle_cmd(
        "inference", ["inference.json", "profile_kvasir.json"], "--dataset_dir", str(inputs), "--model_preset", "tiny",
        "--spatial_size", "[64,64]", "--ckpt_path", str(tmp_path / "m" / "model.pt"), "--output_dir", str(tmp_path / "o"),
    )
    src, seg = Image.open(inputs / "case_004.png"), Image.open(tmp_path / "o" / "case_004_seg.png")
    assert src.size == seg.size == (128, 96) and seg.mode == "L"
    assert set(np.unique(np.asarray(seg)).tolist()) <= {0, 1}


def test_workflow_properties_are_complete(volume_dataset, tmp_path):
    from monai.bundle import ConfigWorkflow

    shutil.copy(volume_dataset / "imagesTr" / "case_000.nii.gz", tmp_path)
    cfg = BUNDLE / "configs"
    for kind, config, data in (("infer", "inference.json", tmp_path), ("train", "train.json", volume_dataset)):
        workflow = ConfigWorkflow(
            config_file=str(cfg / config), meta_file=str(cfg / "metadata.json"), logging_file=str(cfg / "logging.conf"),
            workflow_type=kind, dataset_dir=str(data), bundle_root=str(BUNDLE), model_preset="tiny",
        )
        workflow.initialize()
        assert workflow.check_properties() == [], kind


def test_verify_metadata_and_network_io():
    base = [sys.executable, "-m", "monai.bundle"]
    meta = subprocess.run(
        [*base, "verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", "docs/meta_schema.json"],
        cwd=BUNDLE, capture_output=True, text=True,
    )
    assert meta.returncode == 0 and "verified with no error" in meta.stdout + meta.stderr
    net = subprocess.run(
        [*base, "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json", "--config_file",
         "configs/inference.json", "--n", "7", "--model_preset", "tiny"],
        cwd=BUNDLE, capture_output=True, text=True,
    )
    assert net.returncode == 0 and "verified with no error" in net.stdout + net.stderr


def test_metadata_schema_rejects_an_incomplete_file(tmp_path):
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(tmp_path / "metadata.json"),
         "--filepath", str(BUNDLE / "docs" / "meta_schema.json")],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0 and "network_data_format" in proc.stderr


def test_exported_bundle_runs_with_its_own_copy_of_the_code(trained_tiny, volume_dataset, tmp_path):
    folder = export_bundle(tmp_path / "msa2net_bundle")
    for part in ("configs/metadata.json", "configs/inference.json", "docs/README.md", "LICENSE", "msa2net/networks/sacm.py"):
        assert (tmp_path / "msa2net_bundle" / part).is_file(), part
    where = subprocess.run([sys.executable, "-c", "import msa2net; print(msa2net.__file__)"], cwd=folder, capture_output=True, text=True)
    assert where.stdout.strip().startswith(folder), where.stdout + where.stderr
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(volume_dataset / "imagesTr" / "case_005.nii.gz", inputs)
    bundle_cmd(
        "inference", ["inference.json"], "--dataset_dir", str(inputs), "--output_dir", str(tmp_path / "out"),
        "--ckpt_path", str(trained_tiny / "models" / "model.pt"), *SYNTHETIC, cwd=tmp_path / "msa2net_bundle",
    )
    assert (tmp_path / "out" / "case_005_seg.nii.gz").is_file()
    with pytest.raises(FileExistsError, match="already exists"):
        export_bundle(folder)


def test_shipped_model_segments_a_real_acdc_volume(tmp_path):
    """Out of the box: the shipped weights and default configs on a real ACDC volume (validation split)."""
    weights = BUNDLE / "models" / "model.pt"
    if not weights.is_file():
        pytest.skip("no shipped weights in bundle/models")
    acdc = shared_data("acdc")
    case = json.loads((acdc / "dataset.json").read_text())["validation"][0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(acdc / case["image"], inputs)
    bundle_cmd("inference", ["inference.json"], "--dataset_dir", str(inputs), "--output_dir", str(tmp_path / "out"))
    name = case["image"].split("/")[-1].removesuffix(".nii.gz")
    seg = nib.load(tmp_path / "out" / f"{name}_seg.nii.gz")
    ref = nib.load(acdc / case["label"])
    assert seg.shape == ref.shape
    np.testing.assert_allclose(seg.affine, nib.load(inputs / case["image"].split("/")[-1]).affine, atol=1e-5)
    pred, truth = np.asarray(seg.dataobj), np.asarray(ref.dataobj)
    dice = [2 * ((pred == c) & (truth == c)).sum() / ((pred == c).sum() + (truth == c).sum()) for c in (1, 2, 3)]
    assert np.mean(dice) > 0.5, dice


def test_shipped_kvasir_model_segments_real_polyps(tmp_path):
    """The Kvasir-SEG profile serves its own shipped weights (``models/model_kvasir.pt``) on real validation images."""
    if not (BUNDLE / "models" / "model_kvasir.pt").is_file():
        pytest.skip("no shipped Kvasir-SEG weights in bundle/models")
    kvasir = shared_data("kvasir")
    cases = json.loads((kvasir / "dataset.json").read_text())["validation"][:4]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in cases:
        shutil.copy(kvasir / case["image"], inputs)
    bundle_cmd(
        "inference", ["inference.json", "profile_kvasir.json"], "--dataset_dir", str(inputs), "--output_dir", str(tmp_path / "out"),
    )
    dice = []
    for case in cases:
        stem = Path(case["image"]).stem
        pred = np.asarray(Image.open(tmp_path / "out" / f"{stem}_seg.png")) > 0
        truth = np.asarray(Image.open(kvasir / case["label"]).convert("L")) > 127
        assert pred.shape == truth.shape, stem
        dice.append(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    assert np.mean(dice) > 0.7, dice
