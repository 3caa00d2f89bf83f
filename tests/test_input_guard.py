"""The modality and anatomy guard (``msa2net.input_guard``): the rule, its sources of facts, and ``run inference``.

DICOM series are written by ITK/GDCM with the Modality and Body Part Examined a scanner would set; the
shipped bundle declares MR of the heart (``configs/metadata.json``), so a CT series is refused.
"""

from __future__ import annotations

import json
import logging
import os

import itk
import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLE, bundle_cmd

from msa2net.errors import InputError
from msa2net.input_guard import InputDeclaration, InputFacts, InputGuardd, input_mismatch
from msa2net.io import load_imaged

CARDIAC_MR = InputDeclaration(("MR",), ("HEART", "CHEST", "THORAX"))


def write_series(folder, modality: str, body_part: str | None = None, slices: int = 4, uid: str = "1.2.826.0.1.3680043.8.498.7"):
    """A small DICOM series (one file per slice, 2.5 mm apart) with the given Modality and Body Part Examined."""
    os.makedirs(folder, exist_ok=True)
    data = np.random.default_rng(0).integers(0, 500, (slices, 32, 32)).astype(np.int16)
    for k in range(slices):
        img = itk.image_from_array(np.ascontiguousarray(data[k : k + 1]))
        img.SetSpacing([1.0, 1.0, 2.5])
        img.SetOrigin([0.0, 0.0, 2.5 * k])
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        meta = img.GetMetaDataDictionary()
        tags = {"0020|000e": uid, "0020|000d": uid + ".0", "0008|0060": modality, "0020|0013": str(k + 1), "0008|0018": f"{uid}.{k + 1}"}
        if body_part:
            tags["0018|0015"] = body_part
        for tag, value in tags.items():
            meta[tag] = value
        itk.imwrite(img, os.path.join(folder, f"slice{k:03d}.dcm"), imageio=io)
    return folder


@pytest.mark.parametrize(
    "facts, expected",
    [
        (InputFacts("CT", None, "the series"), "the series is modality CT, the model is for MR"),
        (InputFacts("MR", "HEART"), None),
        (InputFacts("MR", None), None),  # no body part stated: nothing to compare
        (InputFacts(None, None), None),  # nothing stated at all
        (InputFacts("MR", "ABDOMEN", "x"), "x is body part ABDOMEN, the model is for HEART/CHEST/THORAX"),
        (InputFacts("CT", "ABDOMEN", "x"), "x is modality CT, the model is for MR; body part ABDOMEN, the model is for HEART/CHEST/THORAX"),
    ],
)
def test_rule_names_what_differs(facts, expected):
    assert input_mismatch(CARDIAC_MR, facts) == expected


def test_undeclared_bundle_checks_nothing():
    assert input_mismatch(InputDeclaration(), InputFacts("CT", "ABDOMEN")) is None


def test_shipped_metadata_declares_cardiac_mr():
    declared = InputDeclaration.from_metadata_file(BUNDLE / "configs" / "metadata.json")
    assert declared.modalities == ("MR",) and "HEART" in declared.body_parts


def _load(path):
    return load_imaged("image", image_only=True)({"image": str(path)})


def test_ct_series_is_refused_and_mr_series_accepted(tmp_path):
    guard = InputGuardd("image", CARDIAC_MR)
    with pytest.raises(InputError, match=r"ct: the series is modality CT, the model is for MR; body part ABDOMEN.*--allow_input_mismatch true"):
        guard(_load(write_series(tmp_path / "ct", "CT", "ABDOMEN")))
    guard(_load(write_series(tmp_path / "mr", "MR", "HEART", uid="1.2.826.0.1.3680043.8.498.8")))
    with pytest.raises(InputError, match="body part ABDOMEN"):
        guard(_load(write_series(tmp_path / "mr_abdomen", "MR", "ABDOMEN", uid="1.2.826.0.1.3680043.8.498.9")))


def test_override_lets_a_mismatch_through_with_a_warning(tmp_path, caplog):
    data = _load(write_series(tmp_path / "ct", "CT"))
    with caplog.at_level(logging.WARNING, logger="msa2net.input_guard"):
        out = InputGuardd("image", CARDIAC_MR, allow_mismatch=True)(data)
    assert out["image"] is data["image"]
    assert "modality CT, the model is for MR" in caplog.text and "research use only" in caplog.text


def test_sdk_metadata_is_read():
    """The MONAI Deploy App SDK passes the series' attributes in the image's metadata."""
    from monai.data import MetaTensor

    img = MetaTensor(np.zeros((1, 4, 4, 2), np.float32), meta={"Modality": "CT", "BodyPartExamined": "ABDOMEN"})
    with pytest.raises(InputError, match="modality CT"):
        InputGuardd("image", CARDIAC_MR)({"image": img})


def test_nifti_sidecar_and_header_description(tmp_path):
    guard = InputGuardd("image", CARDIAC_MR)
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    plain = tmp_path / "plain.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), affine), plain)
    guard(_load(plain))  # states nothing: passes unchecked

    with_sidecar = tmp_path / "ct_case.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), affine), with_sidecar)
    (tmp_path / "ct_case.json").write_text(json.dumps({"Modality": "CT", "BodyPartExamined": "ABDOMEN"}))
    with pytest.raises(InputError, match=r"ct_case.nii.gz \(sidecar ct_case.json\) is modality CT"):
        guard(_load(with_sidecar))

    described = nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), affine)
    described.header["descrip"] = b"modality=MR bodypart=HEART"
    nib.save(described, tmp_path / "mr_case.nii")
    guard(_load(tmp_path / "mr_case.nii"))
    described.header["descrip"] = b"modality=CT"
    nib.save(described, tmp_path / "ct_described.nii")
    with pytest.raises(InputError, match=r"\(header description\) is modality CT"):
        guard(_load(tmp_path / "ct_described.nii"))

    (tmp_path / "plain.json").write_text("{not json")
    with pytest.raises(InputError, match="plain.json: unreadable JSON sidecar"):
        guard(_load(plain))


def test_run_inference_refuses_ct_keeps_mr_and_obeys_the_override(tmp_path):
    """The shipped bundle, as a user runs it: one CT and one MR series in a folder, then the CT one with the override."""
    inputs = tmp_path / "in"
    write_series(inputs / "ct_series", "CT", "ABDOMEN")
    write_series(inputs / "mr_series", "MR", "HEART", uid="1.2.826.0.1.3680043.8.498.8")
    out = tmp_path / "out"
    proc = bundle_cmd("inference", ["inference.json"], "--dataset_dir", str(inputs), "--output_dir", str(out), check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "ct_series: the series is modality CT, the model is for MR" in log
    assert not (out / "ct_series_seg.nii.gz").exists()
    assert nib.load(out / "mr_series_seg.nii.gz").shape == (32, 32, 4)

    (inputs / "mr_series").rename(tmp_path / "mr_series")
    proc = bundle_cmd(
        "inference", ["inference.json"], "--dataset_dir", str(inputs), "--output_dir", str(out), "--allow_input_mismatch", "true"
    )
    assert nib.load(out / "ct_series_seg.nii.gz").shape == (32, 32, 4)
