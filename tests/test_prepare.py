"""Tests of msa2net.data.prepare on tiny synthetic copies of each dataset layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from msa2net.data import prepare as P

SHAPE = (8, 6, 3)  # H != W so that a transposed axis shows up as a shape error
ALL_SYNAPSE = P.SYNAPSE_TRAIN_CASES + P.SYNAPSE_TEST_CASES


def _nifti(path: Path, data=None, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(SHAPE, np.uint8) if data is None else data
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _png(path: Path, size=(6, 8), mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


def _acdc(root: Path, patients=range(1, 11), folder="training") -> Path:
    for p in patients:
        pdir = root / folder / f"patient{p:03d}" if folder else root / f"patient{p:03d}"
        for frame in (1, 12):
            _nifti(pdir / f"patient{p:03d}_frame{frame:02d}.nii.gz")
            _nifti(pdir / f"patient{p:03d}_frame{frame:02d}_gt.nii.gz")
        _nifti(pdir / f"patient{p:03d}_4d.nii.gz", np.zeros(SHAPE + (2,), np.uint8))
        (pdir / "Info.cfg").write_text("ED: 1\nES: 12\n")
    return root


def _acdc_msd(root: Path, patients=range(1, 9)) -> Path:
    for p in patients:
        for frame in (1, 12):
            name = f"patient{p:03d}_frame{frame:02d}.nii.gz"
            _nifti(root / "imagesTr" / name)
            _nifti(root / "labelsTr" / name)
    (root / "dataset.json").write_text(json.dumps({"name": "ACDC", "labels": P.ACDC_LABELS, "training": []}))
    return root


def _synapse_raw(root: Path, labels: dict | None = None) -> Path:
    for case in ALL_SYNAPSE:
        _nifti(root / "img" / f"img{case}.nii.gz", np.zeros(SHAPE, np.int16))
        _nifti(root / "label" / f"label{case}.nii.gz", (labels or {}).get(case, np.zeros(SHAPE, np.uint8)))
    return root


def _synapse_npz(root: Path, train=("case0005", "case0006"), test=("case0001",), num_slices=3) -> Path:
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir(parents=True)
    for case in train:
        # Written in reverse so that file creation order cannot stand in for slice order.
        for k in reversed(range(num_slices)):
            image = np.full(SHAPE[:2], k / 10, np.float32)
            image[0, 0] = k / 100  # makes each slice unique and shows the H x W orientation
            np.savez(root / "train_npz" / f"{case}_slice{k:03d}.npz", image=image, label=np.full(SHAPE[:2], k % 9.0))
    for case in test:
        rng = np.random.default_rng(0)
        with h5py.File(root / "test_vol_h5" / f"{case}.npy.h5", "w") as f:
            f["image"] = rng.random((4,) + SHAPE[:2]).astype(np.float32)
            f["label"] = rng.integers(0, 9, (4,) + SHAPE[:2]).astype(np.float32)
    return root


def _paired_2d(root: Path, stems, mask_suffix="", mask_ext=".png", image_dir="images", mask_dir="masks") -> Path:
    for stem in stems:
        _png(root / image_dir / f"{stem}.jpg", mode="RGB")
        _png(root / mask_dir / f"{stem}{mask_suffix}{mask_ext}")
    return root


def _msd(root: Path, n=6, **extra) -> Path:
    pairs = [{"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"} for i in range(n)]
    for pair in pairs:
        _nifti(root / pair["image"])
        _nifti(root / pair["label"])
    _nifti(root / "imagesTs" / "t0.nii.gz")
    data = {"name": "Toy", "labels": {"0": "background", "1": "organ"}, "numTraining": n, "training": pairs}
    data.update(test=["./imagesTs/t0.nii.gz"], **extra)
    (root / "dataset.json").write_text(json.dumps(data))
    return root


def _patient(entry: dict) -> str:
    return Path(entry["image"]).name.split("_")[0]


def _assert_paths_exist(datalist: dict, root: Path) -> None:
    for key in ("training", "validation", "test"):
        for entry in datalist[key]:
            for value in entry.values():
                assert not os.path.isabs(value) and (root / value).is_file(), value


# ----------------------------------------------------------------------------- layouts


def test_acdc_counts_and_patient_split(tmp_path):
    root = _acdc(tmp_path)
    _acdc(root, patients=(11, 12), folder="testing")
    datalist = P.prepare_acdc(root, val_fraction=0.2, seed=0)
    assert datalist["labels"] == P.ACDC_LABELS
    assert len(datalist["training"]) == 16 and len(datalist["validation"]) == 4 and len(datalist["test"]) == 4
    splits = {key: {_patient(e) for e in datalist[key]} for key in ("training", "validation", "test")}
    assert not splits["training"] & splits["validation"]
    assert splits["test"] == {"patient011", "patient012"}
    for entry in datalist["training"]:
        assert entry["label"] == entry["image"].replace(".nii.gz", "_gt.nii.gz")
        assert "_4d" not in entry["image"]
    _assert_paths_exist(datalist, root)


def test_acdc_split_is_deterministic_and_seeded(tmp_path):
    root = _acdc(tmp_path)
    first, again = P.prepare_acdc(root, seed=1), P.prepare_acdc(root, seed=1)
    assert first == again
    assert first["validation"] != P.prepare_acdc(root, seed=2)["validation"]
    assert P.prepare_acdc(root, val_fraction=0)["validation"] == []


def test_acdc_flat_layout(tmp_path):
    datalist = P.prepare_acdc(_acdc(tmp_path, patients=range(1, 5), folder=None), val_fraction=0.25)
    assert len(datalist["training"]) == 6 and len(datalist["validation"]) == 2
    assert datalist["training"][0]["image"] == "patient001/patient001_frame01.nii.gz"


def test_acdc_msd_resplit_by_patient(tmp_path):
    datalist = P.prepare_acdc_msd(_acdc_msd(tmp_path), val_fraction=0.25)
    train = {_patient(e) for e in datalist["training"]}
    val = {_patient(e) for e in datalist["validation"]}
    assert len(train) == 6 and len(val) == 2 and not train & val
    assert len(datalist["training"]) == 12 and datalist["test"] == []


def test_synapse_raw_standard_split(tmp_path):
    root = _synapse_raw(tmp_path)
    datalist = P.prepare_synapse_raw(root)
    ids = {key: [Path(e["image"]).name[3:7] for e in datalist[key]] for key in ("training", "validation", "test")}
    assert ids["training"] == list(P.SYNAPSE_TRAIN_CASES)
    assert ids["test"] == ids["validation"] == list(P.SYNAPSE_TEST_CASES)
    assert datalist["labels"] == P.BTCV_LABELS
    assert datalist["test"][0] == {"image": "img/img0001.nii.gz", "label": "label/label0001.nii.gz"}

    held_out = P.prepare_synapse_raw(root, val_fraction=0.2, seed=0)
    val_ids = {Path(e["image"]).name[3:7] for e in held_out["validation"]}
    train_ids = {Path(e["image"]).name[3:7] for e in held_out["training"]}
    assert len(val_ids) == 4 and train_ids | val_ids == set(P.SYNAPSE_TRAIN_CASES) and not train_ids & val_ids
    assert held_out["test"] == datalist["test"]


def test_remap_btcv_to_synapse8_table():
    btcv = np.arange(-1, 16)
    expected = [0, 0, 7, 4, 3, 2, 0, 5, 8, 1, 0, 0, 6, 0, 0, 0, 0]
    np.testing.assert_array_equal(P.remap_btcv_to_synapse8(btcv), expected)


def test_synapse_raw_remap_voxel_by_voxel(tmp_path):
    rng = np.random.default_rng(0)
    btcv = rng.integers(0, 14, SHAPE).astype(np.int16)
    affine = np.array([[0.7, 0, 0, -10], [0, 0.8, 0, 5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    root = _synapse_raw(tmp_path)
    _nifti(root / "label" / "label0005.nii.gz", btcv, affine)
    datalist = P.prepare_synapse_raw(root, remap_synapse8=True)
    assert datalist["labels"] == P.SYNAPSE8_LABELS
    assert datalist["training"][0]["label"] == "label_synapse8/label0005.nii.gz"
    assert len(list((root / "label_synapse8").iterdir())) == 30
    out = nib.load(root / "label_synapse8" / "label0005.nii.gz")
    data = np.asanyarray(out.dataobj)
    assert data.dtype == np.uint8 and data.shape == SHAPE
    np.testing.assert_allclose(out.affine, affine)
    lookup = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}
    for index in np.ndindex(SHAPE):
        assert data[index] == lookup.get(int(btcv[index]), 0), index
    assert set(np.unique(data)) == set(range(9))


def test_synapse_npz_conversion_keeps_slice_order_and_values(tmp_path):
    root = _synapse_npz(tmp_path)
    datalist = P.prepare_synapse_npz(root)
    images = [e["image"] for e in datalist["training"]]
    assert images == ["nifti/imagesTr/case0005.nii.gz", "nifti/imagesTr/case0006.nii.gz"]
    assert datalist["test"] == datalist["validation"] == [
        {"image": "nifti/imagesTs/case0001.nii.gz", "label": "nifti/labelsTs/case0001.nii.gz"}
    ]
    image = nib.load(root / "nifti/imagesTr/case0005.nii.gz")
    label = np.asanyarray(nib.load(root / "nifti/labelsTr/case0005.nii.gz").dataobj)
    assert image.shape == SHAPE and label.dtype == np.uint8
    np.testing.assert_array_equal(image.affine, np.eye(4))
    for k in range(3):
        with np.load(root / "train_npz" / f"case0005_slice{k:03d}.npz") as f:
            np.testing.assert_array_equal(image.get_fdata(dtype=np.float32)[..., k], f["image"])
            np.testing.assert_array_equal(label[..., k], f["label"])
    with h5py.File(root / "test_vol_h5" / "case0001.npy.h5") as f:
        vol_image, vol_label = f["image"][()], f["label"][()]
    test_image = nib.load(root / "nifti/imagesTs/case0001.nii.gz").get_fdata(dtype=np.float32)
    test_label = np.asanyarray(nib.load(root / "nifti/labelsTs/case0001.nii.gz").dataobj)
    assert test_image.shape == SHAPE[:2] + (4,)
    for d in range(4):
        np.testing.assert_array_equal(test_image[..., d], vol_image[d])
        np.testing.assert_array_equal(test_label[..., d], vol_label[d])


def test_kvasir_pairs_and_split(tmp_path):
    root = tmp_path
    _paired_2d(root, [f"a{i}" for i in range(5)], mask_ext=".jpg")
    _paired_2d(root, [f"b{i}" for i in range(3)], mask_ext=".png")
    datalist = P.prepare_kvasir(root, val_fraction=0.25, seed=0)
    assert datalist["labels"] == {"0": "background", "1": "polyp"}
    assert len(datalist["training"]) == 6 and len(datalist["validation"]) == 2
    train, val = ({e["image"] for e in datalist[k]} for k in ("training", "validation"))
    assert not train & val
    assert {"image": "images/b0.jpg", "label": "masks/b0.png"} in datalist["training"] + datalist["validation"]
    _assert_paths_exist(datalist, root)


def test_isic_ignores_superpixels(tmp_path):
    stems = [f"ISIC_{i:07d}" for i in range(4)]
    root = _paired_2d(tmp_path, stems, "_segmentation", image_dir="data", mask_dir="ground_truth")
    _png(root / "data" / "ISIC_0000000_superpixels.png")
    datalist = P.prepare_isic(root, val_fraction=0.25, image_dir="data", mask_dir="ground_truth")
    assert datalist["labels"] == {"0": "background", "1": "lesion"}
    entries = datalist["training"] + datalist["validation"]
    assert sorted(e["image"] for e in entries) == [f"data/{s}.jpg" for s in stems]
    assert {"image": "data/ISIC_0000002.jpg", "label": "ground_truth/ISIC_0000002_segmentation.png"} in entries


def test_msd_resplit_and_keeps_existing_validation(tmp_path):
    root = _msd(tmp_path)
    datalist = P.prepare_msd(root, val_fraction=0.34)
    assert len(datalist["training"]) == 4 and len(datalist["validation"]) == 2
    assert datalist["test"] == [{"image": "imagesTs/t0.nii.gz"}]
    assert datalist["name"] == "Toy" and "numTraining" not in datalist

    given = [{"image": "imagesTr/c0.nii.gz", "label": "labelsTr/c0.nii.gz"}]
    data = json.loads((root / "dataset.json").read_text())
    data.update(training=data["training"][1:], validation=given)
    (root / "dataset.json").write_text(json.dumps(data))
    assert P.prepare_msd(root / "dataset.json")["validation"] == given


@pytest.mark.parametrize(
    "layout, make",
    [
        ("acdc", _acdc),
        ("acdc", lambda r: _acdc(r, folder=None)),
        ("acdc_msd", _acdc_msd),
        ("synapse_raw", _synapse_raw),
        ("synapse_npz", _synapse_npz),
        ("kvasir", lambda r: _paired_2d(r, ["x", "y"])),
        ("isic", lambda r: _paired_2d(r, ["ISIC_0000001", "ISIC_0000002"], "_segmentation")),
        ("msd", _msd),
    ],
)
def test_detect_layout(tmp_path, layout, make):
    assert P.detect_layout(make(tmp_path)) == layout


# ----------------------------------------------------------------------------- bad inputs


def _raises(fn, *args, match: str, **kwargs) -> str:
    """Run ``fn``, expect a DatasetLayoutError naming ``match``; return its message."""
    with pytest.raises(P.DatasetLayoutError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert match in message and "\n" not in message and isinstance(info.value, ValueError)
    return message


def test_missing_label(tmp_path):
    root = _acdc(tmp_path)
    (root / "training/patient003/patient003_frame12_gt.nii.gz").unlink()
    assert "missing label" in _raises(P.prepare_acdc, root, match="patient003_frame12.nii.gz")


def test_missing_label_2d_and_synapse(tmp_path):
    root = _paired_2d(tmp_path / "k", ["a", "b"])
    (root / "masks/b.png").unlink()
    _raises(P.prepare_kvasir, root, match="images/b.jpg")
    root = _synapse_raw(tmp_path / "s")
    (root / "label/label0022.nii.gz").unlink()
    _raises(P.prepare_synapse_raw, root, match="img0022.nii.gz")


def test_label_shape_mismatch(tmp_path):
    root = _acdc(tmp_path)
    _nifti(root / "training/patient002/patient002_frame01_gt.nii.gz", np.zeros((8, 6, 2), np.uint8))
    assert "shape" in _raises(P.prepare_acdc, root, match="patient002_frame01_gt.nii.gz")
    root = _paired_2d(tmp_path / "k", ["a", "b"])
    _png(root / "masks/a.png", size=(8, 6))  # transposed size
    _raises(P.prepare_kvasir, root, match="masks/a.png")


def test_duplicate_case_ids(tmp_path):
    root = _paired_2d(tmp_path / "k", ["a", "b"])
    _png(root / "images/a.png", mode="RGB")
    assert "duplicate" in _raises(P.prepare_kvasir, root, match="a.")
    root = _msd(tmp_path / "m", n=3)
    data = json.loads((root / "dataset.json").read_text())
    data["test"] = [data["training"][0]]  # the same case in training and test
    (root / "dataset.json").write_text(json.dumps(data))
    assert "duplicate" in _raises(P.prepare_msd, root, match="c0.nii.gz")


def test_corrupt_files(tmp_path):
    root = _acdc(tmp_path / "a")
    (root / "training/patient004/patient004_frame01.nii.gz").write_bytes(b"not a nifti")
    assert "unreadable" in _raises(P.prepare_acdc, root, match="patient004_frame01.nii.gz")
    root = _paired_2d(tmp_path / "k", ["a", "b"])
    (root / "masks/b.png").write_bytes(b"\x89PNG broken")
    _raises(P.prepare_kvasir, root, match="masks/b.png")
    root = _synapse_npz(tmp_path / "s")
    (root / "train_npz/case0006_slice001.npz").write_bytes(b"PK broken")
    _raises(P.prepare_synapse_npz, root, match="case0006_slice001.npz")
    root = _msd(tmp_path / "m")
    (root / "dataset.json").write_text("{not json")
    _raises(P.prepare_msd, root, match="dataset.json")


@pytest.mark.parametrize("layout", ["acdc", "acdc_msd", "kvasir", "isic", "synapse_npz"])
def test_no_cases_found(tmp_path, layout):
    for sub in ("training", "imagesTr", "labelsTr", "images", "masks", "train_npz", "test_vol_h5"):
        (tmp_path / sub).mkdir()
    assert "no cases found" in _raises(P.prepare_datalist, layout, tmp_path, match=str(tmp_path))


def test_synapse_raw_requires_the_standard_cases(tmp_path):
    root = _synapse_raw(tmp_path)
    (root / "img/img0040.nii.gz").unlink()
    assert "0040" in _raises(P.prepare_synapse_raw, root, match=str(root / "img"))
    _nifti(root / "img/img0040.nii.gz")
    _nifti(root / "img/img0041.nii.gz")
    _nifti(root / "label/label0041.nii.gz")
    _raises(P.prepare_synapse_raw, root, match="img0041.nii.gz")


@pytest.mark.parametrize("bad", ["../outside.nii.gz", "imagesTr/../../outside.nii.gz", "ABSOLUTE"])
def test_msd_path_escaping_root(tmp_path, bad):
    root = _msd(tmp_path / "ds", n=2)
    outside = _nifti(tmp_path / "outside.nii.gz")
    bad = str(outside) if bad == "ABSOLUTE" else bad
    data = json.loads((root / "dataset.json").read_text())
    data["training"].append({"image": bad, "label": "labelsTr/c0.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(data))
    assert "escapes" in _raises(P.prepare_msd, root, match="dataset.json")
    datalist = P.prepare_msd(root, val_fraction=0, allow_outside_root=True)
    assert {"image": "../outside.nii.gz", "label": "labelsTr/c0.nii.gz"} in datalist["training"]


def test_bad_options():
    with pytest.raises(ValueError, match="val_fraction"):
        P.split_by_group(["a", "b"], 1.0)
    with pytest.raises(ValueError, match="remap_synapse8"):
        P.prepare_datalist("acdc", ".", remap_synapse8=True)
    with pytest.raises(ValueError, match="unknown layout"):
        P.prepare_datalist("brats", ".")


# ----------------------------------------------------------------------------- writing and CLI


def test_write_datalist_is_atomic(tmp_path):
    out = P.write_datalist({"a": 1}, tmp_path / "sub" / "datalist.json")
    with pytest.raises(TypeError):
        P.write_datalist({"a": object()}, out)
    assert json.loads(out.read_text()) == {"a": 1}
    assert [p.name for p in out.parent.iterdir()] == ["datalist.json"]


def test_cli_main_auto_writes_json(tmp_path, capsys):
    root = _acdc(tmp_path / "acdc", patients=range(1, 5))
    P.main("auto", str(root), val_fraction=0.25)
    written = json.loads((root / "datalist.json").read_text())
    assert written == P.prepare_acdc(root, val_fraction=0.25)
    assert "6 training, 2 validation, 0 test" in capsys.readouterr().out


def test_cli_main_bad_dataset_exits_2(tmp_path, capsys):
    root = _acdc(tmp_path, patients=(1, 2))
    (root / "training/patient002/patient002_frame01_gt.nii.gz").unlink()
    with pytest.raises(SystemExit) as info:
        P.main("acdc", str(root), out=str(tmp_path / "out.json"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "patient002_frame01.nii.gz" in err
    assert not (tmp_path / "out.json").exists()


def test_cli_subprocess_exit_status_and_one_line(tmp_path):
    root = _paired_2d(tmp_path, ["a", "b"])
    (root / "masks/a.png").unlink()
    env = {**os.environ, "PYTHONPATH": str(Path(P.__file__).parents[2])}
    cmd = [sys.executable, "-m", "msa2net.data.prepare", "kvasir", str(root), "--out", str(tmp_path / "d.json")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "images/a.jpg" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "masks"]
