"""Unit tests of the Deploy application's checks and helpers (``deploy/app/*.py``), in process.

Run with the deploy environment: ``.venv-deploy/bin/python -m pytest tests/deploy``; skipped elsewhere.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("monai.deploy.core", reason="MONAI Deploy App SDK not installed (see bundle/docs/deploy.md)")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from deploy_testdata import APP, ROOT, dicom_to_nifti, write_non_image, write_series  # noqa: E402

sys.path.insert(0, str(APP))
import bundle as bundle_info  # noqa: E402
import geometry as volume  # noqa: E402
import loading  # noqa: E402
import selection  # noqa: E402

from msa2net.input_guard import InputDeclaration  # noqa: E402
from msa2net.terminology import PALETTE  # noqa: E402

REAL_CT = ROOT.parent / "shared" / "data" / "ct" / "dicom_series_20"


def _read(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct") / "input"
    write_series(folder, "CT", shape=(6, 32, 40))
    return folder


def test_check_series_sorts_and_matches_itk_geometry(tmp_path):
    folder = tmp_path / "mr"
    write_series(
        folder, "MR", shape=(5, 36, 40), pixel_spacing=(1.2, 0.8), slice_spacing=6.0,
        orientation=(0, 1, 0, 0, 0, -1), origin=(30.0, -40.0, 43.0), descending_files=True,
    )
    datasets = _read(folder)
    geometry = volume.check_series(datasets)
    along = [float(np.dot(datasets[i].ImagePositionPatient, geometry.normal)) for i in geometry.order]
    assert along == sorted(along)
    assert geometry.slice_spacing == pytest.approx(6.0)
    reference = nib.load(dicom_to_nifti(folder, tmp_path / "mr.nii.gz"))
    # non-square pixels: column 0 must carry the column spacing (0.8), column 1 the row spacing (1.2)
    np.testing.assert_allclose(geometry.ras_affine(), reference.affine, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(geometry.lps_affine()[:3, :3], axis=0), [0.8, 1.2, 6.0], atol=1e-6)


def _duplicate(ds):
    ds[3].ImagePositionPatient = ds[2].ImagePositionPatient


def _orientation(ds):
    ds[2].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]


def _sop_class(ds):
    ds[2].SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"


def _multi_frame(ds):
    ds[1].NumberOfFrames = 2


def _no_position(ds):
    del ds[3].ImagePositionPatient


def _spacing(ds):
    ds[3].PixelSpacing = [0.5, 0.5]


def _single_slice(ds):
    del ds[1:]


def _series_name(datasets: list[pydicom.Dataset]) -> str:
    """How a refusal of the whole series must name it: its folder and its Series Instance UID."""
    return f"{Path(datasets[0].filename).parent} (series {datasets[0].SeriesInstanceUID}): "


@pytest.mark.parametrize(
    "change, message, bad_file",
    [
        (_duplicate, "same position", None),
        (_orientation, "mixed orientations", 2),
        (_sop_class, "holds SOP class", None),
        (_multi_frame, "multi-frame", 1),
        (_no_position, "ImagePositionPatient is missing", 3),
        (_spacing, "PixelSpacing differs", 3),
        (_single_slice, "at least 2 slices", None),
    ],
)
def test_check_series_rejects_naming_the_file_or_the_series(ct_series, change, message, bad_file):
    """An instance's problem names its file; a problem of the series names its folder and UID."""
    datasets = _read(ct_series)
    who = _series_name(datasets) if bad_file is None else f"{datasets[bad_file].filename}: "
    change(datasets)
    with pytest.raises(volume.SeriesGeometryError, match=message) as err:
        volume.check_series(datasets)
    assert str(err.value).startswith(who) and "\n" not in str(err.value)


def test_check_series_without_files_names_the_instance(ct_series):
    """Datasets made in memory have no file: the SOP Instance UID is all there is to name."""
    datasets = [pydicom.Dataset(ds) for ds in _read(ct_series)]
    datasets[1].NumberOfFrames = 2
    with pytest.raises(volume.SeriesGeometryError, match=f"^instance {datasets[1].SOPInstanceUID}: multi-frame"):
        volume.check_series(datasets)
    with pytest.raises(volume.SeriesGeometryError, match=f"^series {datasets[0].SeriesInstanceUID}: 1 image"):
        volume.check_series(datasets[:1])


def test_decode_pixels_names_the_file_it_cannot_decode(tmp_path):
    folder = tmp_path / "input"
    write_series(folder, "CT", shape=(3, 16, 16))
    bad = sorted(folder.glob("*.dcm"))[1]
    ds = pydicom.dcmread(bad)
    ds.PixelData = ds.PixelData[:100]  # a truncated transfer
    ds.save_as(bad)
    datasets = _read(folder)
    volume.check_series(datasets)  # the header is sound
    with pytest.raises(volume.SeriesGeometryError, match="the pixel data cannot be decoded") as err:
        volume.decode_pixels(datasets)
    assert str(err.value).startswith(f"{bad}: ") and "\n" not in str(err.value)


def test_check_series_rejects_missing_slice_and_tilt(ct_series):
    datasets = _read(ct_series)
    gap = [ds for ds in datasets if int(ds.InstanceNumber) != 3]
    with pytest.raises(volume.SeriesGeometryError, match="slice spacing is not uniform") as err:
        volume.check_series(gap)
    assert str(err.value).startswith(_series_name(datasets))
    for k, ds in enumerate(sorted(datasets, key=lambda d: int(d.InstanceNumber))):
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1] + 0.5 * k, ipp[2]]  # gantry tilt: y shifts with z
    with pytest.raises(volume.SeriesGeometryError, match="drift"):
        volume.check_series(datasets)


@pytest.mark.parametrize("fraction, refused", [(0.05, True), (0.005, False)])
def test_check_series_gap_tolerance(ct_series, fraction, refused):
    """One slice moved along the normal by a fraction of the gap: the displacements the bundle's own check is tested with."""
    datasets = sorted(_read(ct_series), key=lambda d: float(d.ImagePositionPatient[2]))
    gap = float(datasets[1].ImagePositionPatient[2]) - float(datasets[0].ImagePositionPatient[2])
    ipp = [float(v) for v in datasets[3].ImagePositionPatient]
    datasets[3].ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + fraction * gap]
    if refused:
        with pytest.raises(volume.SeriesGeometryError, match="slice spacing is not uniform"):
            volume.check_series(datasets)
    else:
        volume.check_series(datasets)


def test_repair_identifiers_takes_meta_uids_and_derives_the_rest_deterministically(ct_series):
    a, b = _read(ct_series)[:2]
    meta_uid = str(a.file_meta.MediaStorageSOPInstanceUID)
    for ds in (a, b):
        ds.SOPInstanceUID = ds.SOPClassUID = ds.StudyInstanceUID = ds.SeriesInstanceUID = ""
    derived = loading.repair_identifiers(a)
    loading.repair_identifiers(b)
    assert derived == ["StudyInstanceUID", "SeriesInstanceUID"]  # the SOP UIDs come from the file meta: not derived
    assert str(a.SOPInstanceUID) == meta_uid and str(a.SOPClassUID) == selection.CT_IMAGE_STORAGE
    assert a.SeriesInstanceUID == b.SeriesInstanceUID and a.StudyInstanceUID == b.StudyInstanceUID
    for uid in (a.SeriesInstanceUID, a.StudyInstanceUID):
        assert re.fullmatch(r"[0-9.]{1,64}", str(uid))
    untouched = _read(ct_series)[0]
    assert loading.repair_identifiers(untouched) == []


def test_derived_identifiers_refuse_unless_allowed():
    derived = loading.DerivedIdentifiers()
    derived.add("1.2.3", ["StudyInstanceUID", "SeriesInstanceUID"], "/data/case 7/series 2/a.dcm")
    derived.add("1.2.3", ["StudyInstanceUID", "SeriesInstanceUID"], "/data/case 7/series 2/more/b.dcm")
    derived.check("9.9", allowed=False)  # another series: nothing derived
    # the derived Series Instance UID means nothing to the user: the folder of the files does
    with pytest.raises(loading.InputError, match="^/data/case 7/series 2: the selected series has blank SeriesInstanceUID and StudyInstanceUID"):
        derived.check("1.2.3", allowed=False)
    derived.check("1.2.3", allowed=True)
    assert "StudyInstanceUID of 2 instance(s) from PatientID" in derived.statement("1.2.3")


def test_loader_groups_series_skips_non_dicom_and_repeated_files(tmp_path, ct_series):
    from monai.deploy.core import Fragment

    folder = tmp_path / "input"
    shutil.copytree(ct_series, folder / "ct")
    first = sorted((folder / "ct").glob("*.dcm"))[0]
    shutil.copy2(first, folder / "copy_of_first.dcm")
    (folder / "readme.txt").write_text("not DICOM")
    write_non_image(folder / "sr", "sr")
    loader = loading.DICOMFolderLoaderOperator(Fragment(), input_folder=folder, name="loader")
    studies = loader.load_data_to_studies(folder)
    series = [s for st in studies for s in st.get_all_series()]
    counts = sorted((s.Modality, len(s.get_sop_instances())) for s in series)
    assert counts == [("CT", 6), ("SR", 1)]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    with pytest.raises(loading.InputError, match="no DICOM instance found among 1 file") as err:
        loader.load_data_to_studies(empty)
    assert str(err.value).startswith(f"{empty}: ")
    with pytest.raises(loading.InputError, match="not a folder") as err:
        loader.load_data_to_studies(empty / "a.txt")
    assert str(err.value).startswith(f"{empty / 'a.txt'}: ")


@pytest.mark.skipif(not REAL_CT.is_dir(), reason=f"real data not available at {REAL_CT}")
def test_loader_groups_the_deidentified_real_series_and_records_derived_uids():
    from monai.deploy.core import Fragment

    loader = loading.DICOMFolderLoaderOperator(Fragment(), input_folder=REAL_CT, name="loader")
    studies = loader.load_data_to_studies(REAL_CT)
    (series,) = [s for st in studies for s in st.get_all_series()]
    instances = [i.get_native_sop_instance() for i in series.get_sop_instances()]
    assert len(instances) == 20 and series.Modality == "CT"
    assert loader.derived.by_series[series.SeriesInstanceUID] == {"StudyInstanceUID": 20, "SeriesInstanceUID": 20}
    assert {str(ds.SOPInstanceUID) for ds in instances} == {p.name[3:-4] for p in REAL_CT.glob("CT.*.dcm")}
    geometry = volume.check_series(instances)
    assert geometry.slice_spacing == pytest.approx(2.0)


def test_read_bundle_labels_and_find_bundle(tmp_path):
    bundle = tmp_path / "models" / "msa2net"
    (bundle / "configs").mkdir(parents=True)
    shutil.copy2(ROOT / "bundle" / "configs" / "metadata.json", bundle / "configs")
    shutil.copy2(ROOT / "bundle" / "configs" / "inference.json", bundle / "configs")
    info = bundle_info.read_bundle(bundle_info.find_bundle(bundle))
    assert info.config_names == ["inference"]
    assert [label.name for label in info.labels] == ["right_ventricle", "myocardium", "left_ventricle"]
    (bundle / "configs" / "deploy.json").write_text(json.dumps({"class_names": ["liver", "tumour_x"]}))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta["label_colors"] = {"liver": [1, 2, 3]}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    info = bundle_info.read_bundle(bundle_info.find_bundle(tmp_path / "models"))  # MAP layout: models/<name>/
    assert info.config_names == ["inference", "deploy"]
    assert [(label.value, label.name, label.rgb) for label in info.labels] == [(1, "liver", (1, 2, 3)), (2, "tumour_x", PALETTE[1])]
    assert info.labels[0].code[0] == "10200004" and info.labels[1].code[2] == "Anatomical Structure"
    with pytest.raises(FileNotFoundError, match="exactly one"):
        bundle_info.find_bundle(tmp_path)


def test_selection_rules_follow_the_declaration_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MSA2NET_SELECTION_RULES", raising=False)
    mr = InputDeclaration(("MR",), ("HEART",))
    assert [r["name"] for r in json.loads(selection.selection_rules(mr))["selections"]] == ["MR"]
    assert [r["name"] for r in json.loads(selection.selection_rules(mr, allow_mismatch=True))["selections"]] == ["MR", "CT"]
    assert [r["name"] for r in json.loads(selection.selection_rules(InputDeclaration()))["selections"]] == ["CT", "MR"]
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"selections": [{"name": "MR only", "conditions": {"Modality": "MR"}}]}))
    monkeypatch.setenv("MSA2NET_SELECTION_RULES", str(rules))
    assert json.loads(selection.selection_rules(mr))["selections"][0]["name"] == "MR only"
    rules.write_text("{}")
    with pytest.raises(ValueError, match="selections"):
        selection.selection_rules(mr)
