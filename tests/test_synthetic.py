"""Tests of the synthetic data generators in :mod:`msa2net.data.synthetic`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import msa2net
from msa2net.data.synthetic import DESCRIPTION, make_rgb_dataset, make_volume_dataset

SMALL = {"shape": (32, 32, 8), "num_cases": 2, "num_validation": 1}


def _load_nifti(root, rel_path):
    nifti = nib.load(os.path.join(root, rel_path))
    return np.asarray(nifti.dataobj), nifti


def _cases(datalist):
    return datalist["training"] + datalist["validation"]


def _read_datalist(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def volume_dataset(tmp_path_factory):
    """The default data set (as the demo uses it), loaded once for the whole module."""
    root = str(tmp_path_factory.mktemp("volume"))
    path = make_volume_dataset(root)
    datalist = _read_datalist(path)
    cases = [
        (_load_nifti(root, c["image"]), _load_nifti(root, c["label"])) for c in _cases(datalist)
    ]
    return root, path, datalist, cases


def test_volume_datalist(volume_dataset):
    root, path, datalist, _ = volume_dataset
    assert path == os.path.join(root, "dataset.json")
    assert datalist["description"] == DESCRIPTION
    assert datalist["name"]
    assert datalist["modality"] == {"0": "synthetic-MR"}
    assert datalist["labels"] == {"0": "background", "1": "organ_1", "2": "organ_2"}
    assert (datalist["numTraining"], datalist["numValidation"]) == (9, 3)
    assert (len(datalist["training"]), len(datalist["validation"])) == (9, 3)
    images = [c["image"] for c in _cases(datalist)]
    assert len(set(images)) == 12
    assert sorted(images) == [f"imagesTr/case_{i:03d}.nii.gz" for i in range(12)]
    for case in _cases(datalist):
        assert set(case) == {"image", "label"}
        assert case["label"] == case["image"].replace("imagesTr/", "labelsTr/")
        for rel_path in case.values():
            assert not os.path.isabs(rel_path)
            assert os.path.isfile(os.path.join(root, rel_path))


def test_volume_geometry(volume_dataset):
    for (image, image_nifti), (label, label_nifti) in volume_dataset[3]:
        assert image.shape == label.shape == (96, 96, 20)
        assert image.dtype == np.float32
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(image_nifti.affine, label_nifti.affine)
        np.testing.assert_array_equal(image_nifti.affine, np.diag([1.5, 1.5, 3.0, 1.0]))
        assert nib.aff2axcodes(image_nifti.affine) == ("R", "A", "S")
        # Readers that prefer the qform (ITK) must see the same geometry as nibabel.
        for nifti in (image_nifti, label_nifti):
            qform, qform_code = nifti.get_qform(coded=True)
            sform, sform_code = nifti.get_sform(coded=True)
            assert qform_code == sform_code == 1
            np.testing.assert_array_equal(qform, image_nifti.affine)
            np.testing.assert_array_equal(sform, image_nifti.affine)
            assert nifti.header.get_xyzt_units()[0] == "mm"


def test_volume_custom_geometry_and_classes(tmp_path):
    path = make_volume_dataset(tmp_path, num_classes=5, spacing=(0.8, 0.7, 5.0), **SMALL)
    datalist = _read_datalist(path)
    assert datalist["labels"] == {"0": "background", **{str(k): f"organ_{k}" for k in range(1, 5)}}
    values = set()
    for case in _cases(datalist):
        image, image_nifti = _load_nifti(tmp_path, case["image"])
        label, label_nifti = _load_nifti(tmp_path, case["label"])
        assert image.shape == label.shape == SMALL["shape"]
        np.testing.assert_allclose(image_nifti.header.get_zooms(), (0.8, 0.7, 5.0), rtol=1e-6)
        np.testing.assert_array_equal(image_nifti.affine, label_nifti.affine)
        values |= set(np.unique(label).tolist())
    assert values == {0, 1, 2, 3, 4}


def test_volume_label_values(volume_dataset):
    per_case = [set(np.unique(label).tolist()) for _, (label, _) in volume_dataset[3]]
    assert set().union(*per_case) == {0, 1, 2}
    # Placement keeps organs apart at these sizes, so no case loses an organ.
    assert all(values == {0, 1, 2} for values in per_case)


def test_organ_cross_section_varies_along_z(volume_dataset):
    for _, (label, _) in volume_dataset[3]:
        for organ in (1, 2):
            area = (label == organ).sum(axis=(0, 1))
            occupied = np.flatnonzero(area)
            assert occupied.size >= 3
            # One contiguous run of slices that ends inside the volume.
            np.testing.assert_array_equal(occupied, np.arange(occupied[0], occupied[-1] + 1))
            assert area[0] == 0 and area[-1] == 0
            assert area.max() > 2 * max(area[occupied[0]], area[occupied[-1]])


def test_organ_intensity_contrast(volume_dataset):
    for (image, _), (label, _) in volume_dataset[3]:
        background = image[label == 0].mean()
        assert abs(background - 0.1) < 0.02
        organ_means = [image[label == organ].mean() for organ in (1, 2)]
        for mean in organ_means:
            assert mean - background > 0.15
        # Distinct intensities per organ, in label order.
        assert organ_means[1] - organ_means[0] > 0.3


def test_volume_noise_argument(tmp_path):
    clean_path = make_volume_dataset(tmp_path / "clean", noise=0.0, **SMALL)
    noisy_path = make_volume_dataset(tmp_path / "noisy", noise=0.2, **SMALL)
    case = _read_datalist(clean_path)["training"][0]
    clean, _ = _load_nifti(os.path.dirname(clean_path), case["image"])
    noisy, _ = _load_nifti(os.path.dirname(noisy_path), case["image"])
    residual = noisy - clean
    assert 0.17 < residual.std() < 0.23
    # Without noise, only the smooth bias field (+-15 %) varies the background.
    label, _ = _load_nifti(os.path.dirname(clean_path), case["label"])
    background = clean[label == 0]
    assert np.abs(background - 0.1).max() < 0.1 * 0.16
    assert background.max() - background.min() > 0.1 * 0.05


def _volume_arrays(root):
    datalist = _read_datalist(os.path.join(root, "dataset.json"))
    return [_load_nifti(root, c[key])[0] for c in _cases(datalist) for key in ("image", "label")]


def test_volume_determinism(tmp_path):
    first = make_volume_dataset(tmp_path / "a", seed=3, **SMALL)
    second = make_volume_dataset(tmp_path / "b", seed=3, **SMALL)
    make_volume_dataset(tmp_path / "c", seed=4, **SMALL)
    a, b, c = (_volume_arrays(tmp_path / name) for name in "abc")
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    assert _read_datalist(first) == _read_datalist(second)
    for x, z in zip(a, c):
        assert not np.array_equal(x, z)


def test_volume_case_independent_of_num_cases(tmp_path):
    make_volume_dataset(tmp_path / "two", **SMALL)
    make_volume_dataset(tmp_path / "three", **{**SMALL, "num_cases": 3})
    two, three = _volume_arrays(tmp_path / "two"), _volume_arrays(tmp_path / "three")
    # case_000 image and label come first in both listings (case_000 is a training case).
    for x, y in zip(two[:2], three[:2]):
        assert x.tobytes() == y.tobytes()


def test_rgb_dataset(tmp_path):
    path = make_rgb_dataset(tmp_path, num_cases=5, size=(48, 64), num_validation=2)
    datalist = _read_datalist(path)
    assert path == os.path.join(tmp_path, "dataset.json")
    assert datalist["labels"] == {"0": "background", "1": "polyp"}
    assert datalist["description"] == DESCRIPTION
    assert (datalist["numTraining"], datalist["numValidation"]) == (3, 2)
    assert (len(datalist["training"]), len(datalist["validation"])) == (3, 2)
    for case in _cases(datalist):
        assert case["label"] == case["image"].replace("images/", "masks/")
        image = np.asarray(Image.open(os.path.join(tmp_path, case["image"])))
        mask = np.asarray(Image.open(os.path.join(tmp_path, case["label"])))
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8
        assert mask.shape == (48, 64) and mask.dtype == np.uint8
        # Every frame holds both polyp and background.
        assert set(np.unique(mask).tolist()) == {0, 255}
        polyp, mucosa = image[mask == 255].astype(float), image[mask == 0].astype(float)
        # Red-dominated pink mucosa (blue about equal to green) against orange-red polyps
        # (blue well below green): a hue difference, not only a brightness one.
        assert np.all(mucosa.mean(0)[0] > mucosa.mean(0)[1:])
        hue_gap = (polyp[:, 1] - polyp[:, 2]).mean() - (mucosa[:, 1] - mucosa[:, 2]).mean()
        assert hue_gap > 10
        # Textured, not flat.
        assert mucosa.std(0).min() > 3


def test_rgb_determinism(tmp_path):
    def arrays(name, seed):
        root = tmp_path / name
        datalist = _read_datalist(make_rgb_dataset(root, num_cases=3, num_validation=1, seed=seed))
        return [np.asarray(Image.open(root / c[key])) for c in _cases(datalist) for key in ("image", "label")]

    a, b, c = arrays("a", 7), arrays("b", 7), arrays("c", 8)
    for x, y in zip(a, b):
        assert x.tobytes() == y.tobytes()
    for x, z in zip(a, c):
        assert not np.array_equal(x, z)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 1},
        {"num_classes": 257},
        {"num_cases": 3, "num_validation": 3},
        {"num_cases": 3, "num_validation": 4},
        {"num_validation": -1},
        {"num_cases": 0},
        {"shape": (96, 0, 20)},
        {"shape": (96, 96, -4)},
        {"shape": (96, 96)},
        {"shape": (8, 96, 20)},
        {"shape": (96.0, 96, 20)},
        {"spacing": (1.5, 0.0, 3.0)},
        {"noise": -0.1},
        {"seed": -1},
    ],
)
def test_volume_bad_arguments(tmp_path, kwargs):
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError):
        make_volume_dataset(out_dir, **kwargs)
    # Arguments are checked before anything is written.
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_cases": 2, "num_validation": 2},
        {"size": (0, 128)},
        {"size": (128, 128, 3)},
        {"seed": 1.5},
    ],
)
def test_rgb_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_rgb_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(msa2net.__file__))}
    out_dir = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "msa2net.data.synthetic", "volume", str(out_dir), "--num_cases", "3",
         "--num_validation", "1", "--shape", "[32,32,8]"],
        capture_output=True, text=True, env=env, check=True,
    )
    assert result.stdout.strip() == str(out_dir / "dataset.json")
    datalist = _read_datalist(out_dir / "dataset.json")
    assert (datalist["numTraining"], datalist["numValidation"]) == (2, 1)
    image, _ = _load_nifti(out_dir, datalist["training"][0]["image"])
    assert image.shape == (32, 32, 8)
