"""Refactoring guard: the bundle's resolved configs and a `run inference` label map of the shipped model stay what
they were when the golden files were written (``tests/golden/``).

A change that alters them on purpose (new weights, a new recipe) rewrites the golden files with
``python tests/test_golden_outputs.py --write`` and says so in its commit; any other change must leave them equal.
"""

import gzip
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"
GOLDEN = Path(__file__).resolve().parent / "golden"
#: Config stacks users run (README, model card); each is compared as merged, before any expression is evaluated.
STACKS = {
    "train_acdc_gpu": ["train.json", "profile_acdc.json", "gpu_train.json"],
    "evaluate_acdc": ["train.json", "evaluate.json", "profile_acdc.json"],
    "inference": ["inference.json"],
    "inference_kvasir_tta": ["inference.json", "profile_kvasir.json", "tta.json"],
}


def merged(files: list[str]) -> dict:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    return parser.get()


def synthetic_case(folder: Path) -> Path:
    """A 12-slice oblique volume with a bright ring around a darker disc, 1.4 x 1.2 x 8 mm (no randomness)."""
    yy, xx = np.mgrid[:150, :170].astype(np.float32)
    slices = []
    for z in range(12):
        r = np.hypot(yy - 70 - z, xx - 90 + z)
        slices.append(40 + 160 * ((r > 18 + z % 3) & (r < 28)) + 80 * (r <= 18 + z % 3) + 0.2 * yy)
    affine = np.array([[0.0, -1.2, 0.1, 40.0], [1.4, 0.0, 0.0, -20.0], [0.0, 0.05, 8.0, 5.0], [0, 0, 0, 1]])
    path = folder / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.stack(slices, -1).astype(np.float32), affine), path)
    return path


def inference_label_map(tmp: Path) -> np.ndarray:
    sys.path.insert(0, str(ROOT / "custom"))
    from msa2net.bundle_tools import run_workflow

    inputs, outputs = tmp / "in", tmp / "out"
    inputs.mkdir(parents=True)
    synthetic_case(inputs)
    run_workflow("inference", ["inference.json"], dataset_dir=str(inputs), output_dir=str(outputs), device="$torch.device('cpu')")
    return np.asarray(nib.load(outputs / "case_seg.nii.gz").dataobj)


@pytest.mark.parametrize("name", sorted(STACKS))
def test_resolved_configs_are_unchanged(name):
    golden = json.loads((GOLDEN / f"config_{name}.json").read_text())
    assert json.loads(json.dumps(merged(STACKS[name]))) == golden


def test_inference_label_map_is_unchanged(tmp_path):
    if not (ROOT / "bundle" / "models" / "model.pt").is_file():
        pytest.skip("no shipped weights")
    with gzip.open(GOLDEN / "inference_label.npy.gz") as f:
        golden = np.load(f)
    labels = inference_label_map(tmp_path)
    assert labels.shape == golden.shape
    # float32 on another CPU may flip a voxel at a boundary; a changed pipeline or model flips many
    assert (labels != golden).mean() < 1e-3, f"{int((labels != golden).sum())} voxels differ"
    assert set(np.unique(golden)) == set(np.unique(labels))


if __name__ == "__main__" and "--write" in sys.argv:
    GOLDEN.mkdir(exist_ok=True)
    for name, files in STACKS.items():
        (GOLDEN / f"config_{name}.json").write_text(json.dumps(merged(files), indent=1, sort_keys=True) + "\n")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, gzip.open(GOLDEN / "inference_label.npy.gz", "wb") as f:
        np.save(f, inference_label_map(Path(tmp)))
    print(f"golden files written to {GOLDEN}")
