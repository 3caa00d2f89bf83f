"""Shared fixtures: the bundle folder, synthetic data, and a tiny model trained for real through the bundle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from msa2net.data.synthetic import make_rgb_dataset, make_volume_dataset

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
SHARED_DATA = ROOT.parent / "shared" / "data"

#: Overrides that make the default (ACDC) bundle run the tiny preset on the synthetic volumes (and on CT series,
#: which the shipped metadata's cardiac-MR declaration would refuse: tests/test_input_guard.py covers that).
SYNTHETIC = ["--model_preset", "tiny", "--class_names", "['organ_1','organ_2']", "--spatial_size", "[64,64]", "--allow_input_mismatch", "true"]


def bundle_cmd(run_id: str, configs: list[str], *args: str, cwd: Path = BUNDLE, check: bool = True, timeout: int = 600):
    """Run ``python -m monai.bundle run RUN_ID --config_file [...] ARGS`` as a user would, from the bundle folder."""
    config = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available at {path}")
    return path


def needs_shared_data(*parts: str):
    """Skip mark for a test that needs ``SHARED_DATA/<parts>``, decided before its fixtures run (some train a model)."""
    path = SHARED_DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"real data not available at {path}")


@pytest.fixture(scope="session")
def volume_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("volumes")
    make_volume_dataset(str(root), num_cases=6, num_validation=2, shape=(64, 64, 12), seed=1)
    return root


@pytest.fixture(scope="session")
def rgb_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rgb")
    make_rgb_dataset(str(root), num_cases=5, num_validation=2, size=(96, 128), seed=1)
    return root


@pytest.fixture(scope="session")
def trained_tiny(volume_dataset, tmp_path_factory) -> Path:
    """A tiny MSA2-Net trained for a few epochs through ``run training``; returns the run folder."""
    run = tmp_path_factory.mktemp("tiny_run")
    bundle_cmd(
        "training", ["train.json"], "--dataset_dir", str(volume_dataset), *SYNTHETIC,
        "--max_epochs", "3", "--val_interval", "1", "--batch_size", "4", "--slices_per_volume", "4",
        "--num_workers", "0", "--learning_rate", "0.05",
        "--ckpt_dir", str(run / "models"), "--output_dir", str(run / "eval"),
    )
    return run
