"""Bad training data gets one line naming the file: label values, labels beyond the profile's classes, missing files.

Real NIfTI and PNG files go through the bundle's own transforms (``train.json`` plus each shipped profile),
and good data must still pass every profile, including those that remap 0/255 masks after loading.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser
from monai.transforms import Compose
from PIL import Image

from conftest import BUNDLE, bundle_cmd, shared_data
from msa2net.errors import input_error_line
from msa2net.inference import error_line

CONFIGS = BUNDLE / "configs"
VOLUME_PROFILES = {"acdc": 4, "synapse": 9, "synthetic": 3}  # profile: num_classes
RGB_PROFILES = ("kvasir", "isic")


def bundle(profile: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / f"profile_{profile}.json")])
    for key, value in overrides.items():
        parser[key] = value
    return parser


def line_shown_for(transforms, item: dict) -> str:
    """The line a user is shown for ``item`` (the most specific reason in MONAI's chain of wrapped errors)."""
    with pytest.raises(Exception) as info:
        Compose(transforms)(item)
    root = info.value
    while root.__cause__ is not None:
        root = root.__cause__
    assert "\n" not in str(root), str(root)
    return error_line(info.value)


def training_transforms(profile: str):
    return bundle(profile).get_parsed_content("train#deterministic_transforms")


def validation_transforms(profile: str):
    return bundle(profile).get_parsed_content("validate#preprocessing").transforms


def write_volume(folder: Path, name: str, label: np.ndarray, label_dtype=np.uint8) -> dict:
    """An image and its label as NIfTI files with a 1.5 x 1.5 x 5 mm geometry; returns the datalist item."""
    affine = np.diag([1.5, 1.5, 5.0, 1.0])
    image = np.random.default_rng(0).normal(100.0, 20.0, label.shape).astype(np.float32)
    paths = {"image": folder / f"{name}.nii.gz", "label": folder / f"{name}_label.nii.gz"}
    nib.save(nib.Nifti1Image(image, affine), paths["image"])
    nib.save(nib.Nifti1Image(label.astype(label_dtype), affine), paths["label"])
    return {k: str(v) for k, v in paths.items()}


def write_rgb(folder: Path, name: str, mask: np.ndarray) -> dict:
    """An RGB image and its grey mask as PNG files; returns the datalist item."""
    image = np.random.default_rng(0).integers(0, 256, (*mask.shape, 3), dtype=np.uint8)
    paths = {"image": folder / f"{name}.png", "label": folder / f"{name}_mask.png"}
    Image.fromarray(image).save(paths["image"])
    Image.fromarray(mask.astype(np.uint8)).save(paths["label"])
    return {k: str(v) for k, v in paths.items()}


def organs(num_classes: int, shape=(40, 36, 4)) -> np.ndarray:
    """Labels 0..num_classes-1 as vertical bands, every class present."""
    band = np.arange(shape[1]) * num_classes // shape[1]
    return np.broadcast_to(band[None, :, None], shape).copy()


@pytest.mark.parametrize("where", ["training", "validation"])
@pytest.mark.parametrize(
    "value, problem",
    [(-1, r"found values in \[-1, 3\] \(-1 outside\)"), (256, r"found values in \[0, 256\] \(256 outside\)"),
     (0.5, r"label values must be whole numbers \(class indices\), found 0.5")],
    ids=["ignore_index", "above_uint8", "fractional"],
)
def test_labels_that_the_uint8_cast_would_wrap_are_refused_naming_the_file(tmp_path, where, value, problem):
    label = organs(4).astype(np.float32)
    label[3, 5, 1] = value
    item = write_volume(tmp_path, "case", label, label_dtype=np.float32)
    transforms = training_transforms("acdc") if where == "training" else validation_transforms("acdc")
    line = line_shown_for(transforms, item)
    assert line.startswith(f"{item['label']}: label values must be whole numbers"), line
    assert re.search(problem, line), line


def test_btcv_labels_under_the_synapse_profile_are_refused_with_the_class_count(tmp_path):
    item = write_volume(tmp_path, "img0001", organs(14))  # the 13 BTCV organs, not remapped to Synapse's 8
    line = line_shown_for(training_transforms("synapse"), item)
    assert line == (
        f"{item['label']}: label values 9, 10, 11, 12, 13 do not exist in this profile, which has 9 classes "
        "(0 = background, 1..8 = class_names); remap the labels or use the matching profile."
    )


def test_btcv_labels_in_the_validation_list_are_refused_before_one_hot(tmp_path):
    item = write_volume(tmp_path, "img0035", organs(14))
    line = line_shown_for(validation_transforms("synapse"), item)
    assert line.startswith(f"{item['label']}: label values 9, 10, 11, 12, 13 do not exist in this profile, which has 9 classes"), line


@pytest.mark.parametrize("profile", sorted(VOLUME_PROFILES))
def test_every_volume_profile_still_takes_its_own_labels(tmp_path, profile):
    num_classes = VOLUME_PROFILES[profile]
    item = write_volume(tmp_path, "case", organs(num_classes), label_dtype=np.int16)
    out = Compose(training_transforms(profile))(item)
    assert sorted(np.unique(np.asarray(out["label"])).tolist()) == list(range(num_classes))
    val = Compose(validation_transforms(profile))(item)
    assert sorted(np.unique(np.asarray(val["label"])).tolist()) == list(range(num_classes))


@pytest.mark.parametrize("profile", RGB_PROFILES)
def test_rgb_profiles_still_take_0_255_masks_with_jpeg_grey_levels(tmp_path, profile):
    mask = np.zeros((48, 40), np.uint8)
    mask[10:30, 8:24] = 255
    mask[10, 8:24] = 131  # the grey rim of a mask once saved as JPEG
    item = write_rgb(tmp_path, "frame", mask)
    for transforms in (training_transforms(profile), validation_transforms(profile)):
        out = Compose(transforms)(item)
        assert sorted(np.unique(np.asarray(out["label"])).tolist()) == [0, 1]


@pytest.mark.parametrize("profile", RGB_PROFILES)
def test_rgb_masks_outside_0_255_are_refused_naming_the_file(tmp_path, profile):
    item = write_rgb(tmp_path, "frame", np.zeros((48, 40), np.uint8))
    mask = np.zeros((48, 40), np.uint16)
    mask[4, 4] = 300
    Image.fromarray(mask).save(item["label"])  # a 16-bit grey PNG
    line = line_shown_for(training_transforms(profile), item)
    assert line.startswith(f"{item['label']}: label values must be whole numbers in [0, 255]"), line


def test_real_acdc_and_kvasir_cases_pass_their_profiles():
    acdc = shared_data("acdc")
    kvasir = shared_data("kvasir")
    cases = {
        "acdc": json.loads((acdc / "dataset.json").read_text())["training"][0],
        "kvasir": json.loads((kvasir / "dataset.json").read_text())["training"][0],
    }
    for profile, case in cases.items():
        root = acdc if profile == "acdc" else kvasir
        item = {k: str(root / v) for k, v in case.items()}
        for transforms in (training_transforms(profile), validation_transforms(profile)):
            out = Compose(transforms)(item)
            assert int(np.asarray(out["label"]).max()) == (3 if profile == "acdc" else 1)


def test_real_ct_with_synapse8_labels_passes_the_synapse_profile():
    ct = shared_data("ct")
    item = {"image": str(ct / "example_ct_112.nii.gz"), "label": str(ct / "example_ct_112_label_synapse8.nii.gz")}
    for transforms in (training_transforms("synapse"), validation_transforms("synapse")):
        out = Compose(transforms)(item)
        assert 0 < int(np.asarray(out["label"]).max()) <= 8


def write_datalist(root: Path, entries: list[dict]) -> Path:
    path = root / "dataset.json"
    path.write_text(json.dumps({"training": entries, "validation": entries[:1]}))
    return path


def test_a_missing_file_in_the_datalist_is_one_line_when_the_bundle_reads_it(tmp_path):
    write_volume(tmp_path, "case_a", organs(4))
    write_volume(tmp_path, "case_b", organs(4))
    datalist = write_datalist(tmp_path, [
        {"image": "case_a.nii.gz", "label": "case_a_label.nii.gz"},
        {"image": "case_b.nii.gz", "label": "labels/case_b.nii.gz"},
        {"image": "case_c.nii.gz", "label": "case_c_label.nii.gz"},
    ])
    parser = bundle("acdc", dataset_dir=str(tmp_path))
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("train_datalist")
    assert error_line(info.value) == (
        f"{datalist}: label {tmp_path / 'labels' / 'case_b.nii.gz'} not found (2 more path(s) of list 'training' missing too)."
    )
    assert len(bundle("acdc", dataset_dir=str(tmp_path)).get_parsed_content("val_datalist")) == 1


def test_training_run_names_the_bad_label_file(tmp_path):
    """``run training`` as a user types it: the label's file and problem reach the output."""
    entries = []
    for name, label in (("good", organs(3, (32, 32, 4))), ("bad", organs(3, (32, 32, 4)).astype(np.int16) - 1)):
        write_volume(tmp_path, name, label, label_dtype=np.int16)
        entries.append({"image": f"{name}.nii.gz", "label": f"{name}_label.nii.gz"})
    write_datalist(tmp_path, entries)
    proc = bundle_cmd(
        "training", ["train.json", "profile_synthetic.json"], "--dataset_dir", str(tmp_path),
        "--output_dir", str(tmp_path / "run"), "--max_epochs", "1", "--num_workers", "0", check=False,
    )
    assert proc.returncode == 1
    expected = f"error: {tmp_path / 'bad_label.nii.gz'}: label values must be whole numbers in [0, 255] (class indices), found values in [-1, 1]"
    # the datasets are built inside MONAI's config instantiation; its nested tracebacks give way to the one line
    assert proc.stderr.strip().splitlines()[-1].startswith(expected), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_an_input_error_reraised_from_a_dataloader_worker_keeps_its_line():
    """A worker's error reaches the main process as text; MONAI wraps it once more."""
    try:
        try:
            raise RuntimeError(
                "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                '  File "x.py", line 1, in f\nmsa2net.errors.InputError: /data/l.nii.gz: label values must be whole numbers\n'
                "\nThe above exception was the direct cause of the following exception:\nRuntimeError: applying transform"
            )
        except RuntimeError as worker:
            raise RuntimeError("applying transform <Compose>") from worker
    except RuntimeError as err:
        assert input_error_line(err) == "/data/l.nii.gz: label values must be whole numbers"
    assert input_error_line(RuntimeError("CUDA out of memory")) is None
