"""The MONAI Deploy application (``deploy/app``): DICOM series in, DICOM SEG and NIfTI out.

Run with the deploy environment (``bundle/docs/deploy.md``)::

    .venv-deploy/bin/python -m pytest tests/deploy

Everything is skipped where the MONAI Deploy App SDK is not importable (the main environment).

The application runs as a user runs it (``python deploy/app -i -o -m``, a subprocess) on the real
20-slice CT series (``../shared/data/ct/dicom_series_20``, skipped where absent), on a synthetic
axial CT series and on a synthetic sagittal MR series with non-square pixels stored in reverse
file order. The reference is ``python -m monai.bundle run inference`` with the same bundle on the
series converted to NIfTI by ITK. The model labels voxels by intensity *and* by their place in the
slice (:mod:`threshold_net`) and the phantom is asymmetric on all three axes, so a flipped, transposed
or shifted output cannot match the reference. The SEG is painted back onto the reference's voxel
grid through its own per-frame positions and must equal the reference label map voxel for voxel.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("monai.deploy.core", reason="MONAI Deploy App SDK not installed (see bundle/docs/deploy.md)")

import highdicom as hd  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from deploy_testdata import (  # noqa: E402
    APP,
    ROOT,
    SEG_STORAGE,
    dicom_to_nifti,
    read_source_series,
    seg_on_grid,
    start_app,
    start_reference,
    write_non_image,
    write_series,
)

from msa2net.export import deploy_bundle  # noqa: E402

REAL_CT = ROOT.parent / "shared" / "data" / "ct" / "dicom_series_20"
CLASS_NAMES = ["liver", "spleen"]  # label 1: mid intensity in the first half of the slice; label 2: bright
THRESHOLD_NET = {"_target_": "threshold_net.PositionThresholdNet", "in_channels": "@in_channels", "num_classes": "@num_classes"}


@pytest.fixture(scope="session")
def threshold_bundle(tmp_path_factory) -> Path:
    """A deploy bundle whose network is :class:`threshold_net.PositionThresholdNet`, exported to model.ts."""
    from threshold_net import PositionThresholdNet

    root = tmp_path_factory.mktemp("threshold_bundle")
    ckpt = root / "threshold.pt"
    torch.save({"model": PositionThresholdNet(1, len(CLASS_NAMES) + 1).state_dict()}, ckpt)
    bundle = Path(
        deploy_bundle(
            str(root / "bundle"), str(ckpt), extra_files=[str(Path(__file__).with_name("threshold_net.py"))],
            network_def=THRESHOLD_NET, class_names=CLASS_NAMES,
            # the net's thresholds are intensities in [0, 1], not the default per-volume z-scores
            intensity_transforms=[{"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0}],
        )
    )
    # a test network for CT and MR phantoms alike: its bundle declares no modality or body part
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    for key in ("modality", "body_part_examined"):
        meta["network_data_format"]["inputs"]["image"].pop(key)
    meta_file.write_text(json.dumps(meta, indent=4))
    return bundle


@pytest.fixture(scope="session")
def msa2net_bundle(tmp_path_factory) -> Path:
    """A deploy bundle of a randomly initialised ``tiny`` MSA2-Net at 96x96, traced to model.ts."""
    from msa2net.networks import create_msa2net

    root = tmp_path_factory.mktemp("msa2net_bundle")
    names = ["organ_1", "organ_2"]
    torch.manual_seed(0)
    torch.save({"model": create_msa2net("tiny", 1, len(names) + 1).state_dict()}, root / "tiny.pt")
    return Path(
        deploy_bundle(str(root / "bundle"), str(root / "tiny.pt"), model_preset="tiny", spatial_size=[96, 96], class_names=names)
    )


def _series_case(name: str, root: Path) -> Path:
    folder = root / "input"
    if name == "real_ct":
        if not REAL_CT.is_dir():
            pytest.skip(f"real data not available at {REAL_CT}")
        shutil.copytree(REAL_CT, folder)
    elif name == "synthetic_ct":
        write_series(folder, "CT")
    elif name == "synthetic_mr":
        write_series(
            folder, "MR", shape=(10, 72, 80), pixel_spacing=(1.2, 0.8), slice_spacing=6.0,
            orientation=(0, 1, 0, 0, 0, -1), origin=(30.0, -40.0, 43.0), descending_files=True,
        )
    return folder


def _only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, found {[f.name for f in found]}"
    return found[0]


def _run_and_compare(
    series: Path, bundle: Path, tmp_path: Path, class_names: list[str], max_mismatch: float = 0.0, args: tuple = ()
) -> np.ndarray:
    """Run the app (with ``args``) and the reference on ``series``; check the SEG and the NIfTI copy against the reference.

    Returns the reference label map. ``max_mismatch`` is the fraction of voxels allowed to differ.
    """
    nifti_dir = tmp_path / "nifti"
    dicom_to_nifti(series, nifti_dir / "series.nii.gz")
    app = start_app(series, tmp_path / "app_out", bundle, *args)
    ref = start_reference(nifti_dir, tmp_path / "ref_out", bundle)
    _, app_seconds = app.check()
    ref.check()
    print(f"{series}: app {app_seconds:.1f} s")

    reference = nib.load(_only(tmp_path / "ref_out", "*_seg.nii.gz"))
    ref_labels = np.asarray(reference.dataobj).astype(np.uint8)
    assert ref_labels.shape == nib.load(nifti_dir / "series.nii.gz").shape

    sources = read_source_series(series)
    seg = pydicom.dcmread(_only(tmp_path / "app_out", "*.dcm"))
    assert seg.SOPClassUID == SEG_STORAGE and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == class_names
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == list(range(1, len(class_names) + 1))
    referenced = {str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert referenced == set(sources), "the SEG must reference every source instance, and only those"
    source_study = {str(ds.get("StudyInstanceUID") or "") for ds in sources.values()}
    if source_study != {""}:
        assert {str(seg.StudyInstanceUID)} == source_study
        assert {str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)} == {str(ds.SeriesInstanceUID) for ds in sources.values()}

    painted = seg_on_grid(seg, reference.affine, ref_labels.shape, sources)
    mismatch = int((painted != ref_labels).sum())
    assert mismatch <= max_mismatch * ref_labels.size, (
        f"{mismatch} voxels differ between the DICOM SEG and `run inference` on the NIfTI conversion"
    )
    copy = nib.load(_only(tmp_path / "app_out", "*_seg.nii.gz"))
    np.testing.assert_allclose(copy.affine, reference.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(copy.dataobj), painted)
    return ref_labels


@pytest.mark.parametrize("case", ["real_ct", "synthetic_ct", "synthetic_mr"])
def test_seg_matches_bundle_inference_in_physical_space(case, threshold_bundle, tmp_path):
    series = _series_case(case, tmp_path)
    # the real series is de-identified without Study/Series Instance UIDs: processed only when asked to derive them
    args = ("--derive-missing-uids",) if case == "real_ct" else ()
    ref_labels = _run_and_compare(series, threshold_bundle, tmp_path, CLASS_NAMES, args=args)
    for value in range(len(CLASS_NAMES) + 1):
        assert (ref_labels == value).sum() > 50, f"label {value} (nearly) absent from the reference: a weak test"
    for axis in range(3):
        assert not np.array_equal(ref_labels, np.flip(ref_labels, axis)), f"reference symmetric along axis {axis}"
    seg = pydicom.dcmread(_only(tmp_path / "app_out", "*.dcm"))
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in seg.SegmentSequence] == ["Liver", "Spleen"]
    expected_lab = [list(hd.color.CIELabColor.from_rgb(*rgb).value) for rgb in [(221, 130, 101), (157, 108, 162)]]
    assert [list(s.RecommendedDisplayCIELabValue) for s in seg.SegmentSequence] == expected_lab


def test_msa2net_torchscript_in_the_app(msa2net_bundle, tmp_path):
    """The real network (tiny, traced at batch 1, 96x96: padded attention windows) through the same path."""
    series = _series_case("synthetic_mr", tmp_path)
    ref_labels = _run_and_compare(series, msa2net_bundle, tmp_path, ["organ_1", "organ_2"], max_mismatch=1e-4)
    assert len(np.unique(ref_labels)) > 1, "the network's labels are constant: the comparison would be empty"


def _expect_failure(tmp_path: Path, series: Path, bundle: Path, message: str, *args: str) -> str:
    """The app refuses: exit status 1, one line on the terminal naming the problem and the log, no output folder."""
    out = tmp_path / "app_out"
    code, terminal, _ = start_app(series, out, bundle, *args).wait()
    assert code == 1, f"the app accepted bad input:\n{terminal[-3000:]}"
    lines = terminal.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], f"expected one line with {message!r}, got:\n{terminal[-3000:]}"
    log = tmp_path / "app_out.log"
    assert f"(details: {log})" in lines[0] and "Traceback" in log.read_text(), "the details belong in the log file"
    assert not out.exists(), "a failed run must leave no output folder"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".app_out")] == [], "staging folder left behind"
    return lines[0]


def test_folder_without_dicom_is_an_error(threshold_bundle, tmp_path):
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "notes.txt").write_text("not DICOM\n")
    _expect_failure(tmp_path, folder, threshold_bundle, f"{folder}: no DICOM instance found")


def test_missing_slice_is_an_error_naming_the_folder_and_series(threshold_bundle, tmp_path):
    series = write_series(tmp_path / "input", "CT", drop_slices=(5,))
    _expect_failure(
        tmp_path, tmp_path / "input", threshold_bundle, f"{tmp_path / 'input'} (series {series['series']}): slice spacing is not uniform"
    )


def test_non_image_objects_only_is_an_error(threshold_bundle, tmp_path):
    write_non_image(tmp_path / "input", "sr")
    write_non_image(tmp_path / "input", "sc")
    _expect_failure(tmp_path, tmp_path / "input", threshold_bundle, f"{tmp_path / 'input'}: no series matches the selection rules")


def test_mixed_sizes_in_one_series_is_an_error_naming_the_file(threshold_bundle, tmp_path):
    write_series(tmp_path / "input", "CT", sizes={4: (60, 80)})
    odd = _only(tmp_path / "input", "004_*.dcm")  # slice 4, the one of another size
    line = _expect_failure(tmp_path, tmp_path / "input", threshold_bundle, f"{odd}: 60x80 pixels where the series has 64x80")
    assert "mixes images of different sizes" in line


def test_undecodable_pixel_data_is_an_error_naming_the_file(threshold_bundle, tmp_path):
    """A truncated file: its header is sound, its pixel data too short; the SDK alone would name no file."""
    write_series(tmp_path / "input", "CT", shape=(4, 32, 32))
    bad = sorted((tmp_path / "input").glob("*.dcm"))[2]
    ds = pydicom.dcmread(bad)
    ds.PixelData = ds.PixelData[:1000]
    ds.save_as(bad)
    _expect_failure(tmp_path, tmp_path / "input", threshold_bundle, f"{bad}: the pixel data cannot be decoded")


def test_mixed_folder_selects_the_ct_series(threshold_bundle, tmp_path):
    folder = tmp_path / "input"
    mr = write_series(folder / "mr", "MR", shape=(14, 40, 40), series_number=2)
    ct = write_series(folder / "ct", "CT", study_uid=mr["study"], series_number=3)
    write_non_image(folder / "other", "sr", study_uid=mr["study"])
    write_non_image(folder / "other", "sc", study_uid=mr["study"])
    app_log, _ = start_app(folder, tmp_path / "app_out", threshold_bundle).check()
    seg = pydicom.dcmread(_only(tmp_path / "app_out", "*.dcm"))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct["series"]
    frames = {str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID) for f in seg.PerFrameFunctionalGroupsSequence}
    assert frames <= {i["sop"] for i in ct["instances"]}
    assert nib.load(_only(tmp_path / "app_out", "*_seg.nii.gz")).shape == (80, 64, 12)


def test_app_is_where_the_docs_say(threshold_bundle):
    doc = (ROOT / "bundle" / "docs" / "deploy.md").read_text()
    assert (APP / "__main__.py").is_file() and (APP / "app.yaml").is_file() and (APP / "requirements.txt").is_file()
    for command in ("deploy/app -i", "monai-deploy package deploy/app", "python -m msa2net.export deploy_bundle"):
        assert command in doc, f"bundle/docs/deploy.md lacks {command!r}"


def _set_on_every_file(folder: Path, **attributes) -> None:
    """Re-tag every DICOM file under ``folder`` (an empty string blanks an attribute)."""
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        for key, value in attributes.items():
            setattr(ds, key, value)
        ds.save_as(path)


def test_ct_series_into_the_mr_model_is_refused_and_the_override_runs_it(msa2net_bundle, tmp_path):
    """The MSA2-Net bundle declares cardiac MR (metadata.json): a CT series is refused, unless overridden."""
    write_series(tmp_path / "input", "CT")
    line = _expect_failure(tmp_path, tmp_path / "input", msa2net_bundle, f"{tmp_path / 'input'}: no series matches")
    assert "the model is for MR" in line
    assert "the input holds: CT series" in line and "--allow-input-mismatch" in line
    start_app(tmp_path / "input", tmp_path / "app_out", msa2net_bundle, "--allow-input-mismatch").check()
    seg = pydicom.dcmread(_only(tmp_path / "app_out", "*.dcm"))
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert "is modality CT, the model is for MR; run anyway" in (tmp_path / "app_out.log").read_text()


def test_mr_series_of_another_body_part_is_refused(msa2net_bundle, tmp_path):
    write_series(tmp_path / "input", "MR", shape=(6, 40, 40))
    _set_on_every_file(tmp_path / "input", BodyPartExamined="ABDOMEN")
    uid = pydicom.dcmread(next((tmp_path / "input").iterdir())).SeriesInstanceUID
    _expect_failure(
        tmp_path, tmp_path / "input", msa2net_bundle,
        f"{tmp_path / 'input'} (series {uid}) is body part ABDOMEN, the model is for HEART/CHEST/THORAX",
    )


def test_series_without_study_and_series_uids_is_refused_or_derived_on_request(threshold_bundle, tmp_path):
    write_series(tmp_path / "input", "CT", shape=(6, 40, 40))
    _set_on_every_file(tmp_path / "input", StudyInstanceUID="", SeriesInstanceUID="")
    _expect_failure(tmp_path, tmp_path / "input", threshold_bundle, f"{tmp_path / 'input'}: the selected series has blank SeriesInstanceUID and StudyInstanceUID")
    start_app(tmp_path / "input", tmp_path / "app_out", threshold_bundle, "--derive-missing-uids").check()
    seg = pydicom.dcmread(_only(tmp_path / "app_out", "*.dcm"))
    statement = "Source identifiers were blank and derived by the MSA2-Net application"
    assert seg.ImageComments.startswith(statement) and "SeriesInstanceUID of 6 instance(s)" in seg.ImageComments
    assert statement in (tmp_path / "app_out.log").read_text()


def test_seg_attributes_a_pacs_reads_and_dciodvfy(threshold_bundle, tmp_path):
    write_series(tmp_path / "input", "CT", shape=(6, 48, 48))
    meta = json.loads((threshold_bundle / "configs" / "metadata.json").read_text())
    terminal, _ = start_app(tmp_path / "input", tmp_path / "app_out", threshold_bundle, "--series-number", "77").check()
    assert len(terminal.strip().splitlines()) == 1 and terminal.startswith("msa2net deploy: wrote ")
    path = _only(tmp_path / "app_out", "*.dcm")
    seg = pydicom.dcmread(path)
    assert seg.SeriesDescription == meta["name"] and int(seg.SeriesNumber) == 77
    assert (seg.Manufacturer, seg.ManufacturerModelName, seg.SoftwareVersions) == (meta["authors"], meta["name"], meta["version"])
    assert str(seg.ContentCreatorName) == "MSA2-Net^" + meta["name"].partition(" ")[2]
    ours = [item for item in seg.ContributingEquipmentSequence if item.Manufacturer == meta["authors"]]
    assert len(ours) == 1 and ours[0].SoftwareVersions == meta["version"] and "DeviceUID" not in ours[0]
    assert "ImageComments" not in seg  # nothing was derived
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) not installed")
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True).stderr
    problems = [line for line in report.splitlines() if line.startswith(("Error", "Warning"))]
    # the test series has no Patient ID/Study ID values a DICOMDIR would need; the SEG copies the source's
    from_source = ("needed to build DICOMDIR - Patient ID", "needed to build DICOMDIR - Study ID")
    assert [line for line in problems if not line.endswith(from_source)] == [], report


def test_default_series_number_is_stable(threshold_bundle, tmp_path):
    write_series(tmp_path / "input", "CT", shape=(4, 32, 32))
    numbers = []
    for run in ("a", "b"):
        start_app(tmp_path / "input", tmp_path / run, threshold_bundle).check()
        numbers.append(int(pydicom.dcmread(_only(tmp_path / run, "*.dcm")).SeriesNumber))
    assert numbers == [9001, 9001]


def test_all_background_result_writes_every_frame_empty(threshold_bundle, tmp_path):
    """Nothing found: highdicom cannot omit every frame, so the SEG holds all of them, empty (as the guide says)."""
    write_series(tmp_path / "input", "CT", shape=(4, 32, 32))
    for path in sorted((tmp_path / "input").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PixelData = np.zeros((ds.Rows, ds.Columns), dtype=ds.pixel_array.dtype).tobytes()
        ds.save_as(path)
    start_app(tmp_path / "input", tmp_path / "app_out", threshold_bundle).check()
    seg = pydicom.dcmread(_only(tmp_path / "app_out", "*.dcm"))
    assert int(seg.NumberOfFrames) == 4 * len(CLASS_NAMES) and not seg.pixel_array.any()


def test_missing_input_folder_is_one_line(threshold_bundle, tmp_path):
    _expect_failure(tmp_path, tmp_path / "absent", threshold_bundle, "input path not found")
