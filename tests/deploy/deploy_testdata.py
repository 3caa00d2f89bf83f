"""Helpers of the Deploy application tests: synthetic DICOM series, the reference path, SEG geometry.

Imported only by test modules that first checked the App SDK is importable (the deploy environment).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "deploy" / "app"

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


# --------------------------------------------------------------------------------------------
# Synthetic series


def phantom(points_lps: np.ndarray) -> np.ndarray:
    """Intensity in [0, 1] at LPS points ``(..., 3)`` mm: a body ellipsoid and two blobs, asymmetric on every axis.

    A bright ball sits patient-left, anterior, superior; a mid-grey box patient-right, posterior,
    inferior; a faint gradient runs head to foot.
    """
    x, y, z = points_lps[..., 0], points_lps[..., 1], points_lps[..., 2]
    body = ((x / 60) ** 2 + (y / 45) ** 2 < 1).astype(np.float32) * (0.15 + 0.05 * (z + 20) / 40)
    ball = ((x - 22) ** 2 + (y + 14) ** 2 + (z - 6) ** 2 < 14**2).astype(np.float32)
    box = ((np.abs(x + 25) < 12) & (np.abs(y - 10) < 16) & (z < 2)).astype(np.float32)
    out = body
    out = np.where(box > 0, 0.45, out)
    out = np.where(ball > 0, 0.95, out)
    return out.astype(np.float32)


def _base_dataset(sop_class: str, modality: str, study_uid: str, series_uid: str, series_number: int, description: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Deploy", "PHANTOM-1", "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = datetime.date.today().strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "ACC1", ""
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = modality, series_number, description
    ds.Manufacturer = "msa2net tests"
    return ds


def write_series(
    folder: Path,
    modality: str = "CT",
    shape: tuple[int, int, int] = (12, 64, 80),
    pixel_spacing: tuple[float, float] = (0.9, 0.9),
    slice_spacing: float = 3.0,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-36.0, -28.8, -16.5),
    study_uid: str | None = None,
    series_number: int = 1,
    descending_files: bool = False,
    drop_slices: Sequence[int] = (),
    sizes: dict[int, tuple[int, int]] | None = None,
) -> dict:
    """Write a single-frame CT or MR series of :func:`phantom`; return its UIDs and geometry.

    ``shape`` is (slices, rows, columns); ``pixel_spacing`` is DICOM's [row spacing, column spacing].
    CT stores ``int16`` with RescaleIntercept -1024 (HU = 1000 * phantom - 1000 + ...); MR stores
    ``uint16`` without rescale. File names are unrelated to slice order (``descending_files``
    reverses it); ``drop_slices`` leaves slices out; ``sizes`` gives some slices another (rows, cols).
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_of_reference = generate_uid()
    iop = np.asarray(orientation, dtype=float)
    r, c = iop[:3], iop[3:]
    normal = np.cross(r, c)
    n, rows, cols = shape
    sop_class = CT_IMAGE if modality == "CT" else MR_IMAGE
    written = []
    for k in range(n):
        if k in drop_slices:
            continue
        nr, nc = (sizes or {}).get(k, (rows, cols))
        ipp = np.asarray(origin, dtype=float) + k * slice_spacing * normal
        jj, ii = np.mgrid[0:nr, 0:nc]
        points = ipp + ii[..., None] * pixel_spacing[1] * r + jj[..., None] * pixel_spacing[0] * c
        values = phantom(points)
        ds = _base_dataset(sop_class, modality, study_uid, series_uid, series_number, f"{modality} phantom")
        ds.FrameOfReferenceUID = frame_of_reference
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
        ds.SliceThickness = f"{slice_spacing:.6f}"
        ds.Rows, ds.Columns = nr, nc
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        if modality == "CT":
            stored = np.round(values * 1400 + 24 + 10 * jj / nr).astype(np.int16)  # HU -1000 .. 400
            ds.PixelRepresentation = 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        else:
            stored = np.round(values * 3000 + 40).astype(np.uint16)
            ds.PixelRepresentation = 0
            ds.MagneticFieldStrength, ds.ScanningSequence, ds.SequenceVariant = "1.5", "SE", "NONE"
        ds.PixelData = stored.tobytes()
        name = f"{(n - k) if descending_files else k:03d}_{generate_uid()[-8:]}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        written.append({"sop": str(ds.SOPInstanceUID), "ipp": ipp})
    return {"study": study_uid, "series": series_uid, "instances": written, "folder": folder}


def write_non_image(folder: Path, kind: str, study_uid: str | None = None) -> str:
    """A Basic Text SR (``kind="sr"``) or a CT-modality secondary capture without geometry (``kind="sc"``)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    if kind == "sr":
        ds = _base_dataset(BASIC_TEXT_SR, "SR", study_uid, generate_uid(), 90, "report")
        ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
        ds.ContinuityOfContent = "SEPARATE"
    elif kind == "sc":
        ds = _base_dataset(SECONDARY_CAPTURE, "CT", study_uid, generate_uid(), 91, "dose screen")
        ds.ConversionType = "WSD"
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 16, 16, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.zeros((16, 16), np.uint8).tobytes()
    else:
        raise ValueError(kind)
    path = folder / f"{kind}_{generate_uid()[-8:]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


# --------------------------------------------------------------------------------------------
# Running the application and the reference path


class Run:
    """A command started in the background, its output going to a log file."""

    def __init__(self, cmd: list[str], log: Path, cwd: Path, env: dict | None = None) -> None:
        self.cmd, self.log = cmd, log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(log, "w")
        self.start = time.perf_counter()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=full_env)

    def wait(self, timeout: float = 300) -> tuple[int, str, float]:
        """Exit code, output and wall seconds."""
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self._out.close()
        return code, self.log.read_text(errors="replace"), time.perf_counter() - self.start

    def check(self, timeout: float = 300) -> tuple[str, float]:
        code, out, seconds = self.wait(timeout)
        assert code == 0, f"{' '.join(self.cmd)} exited {code}:\n{out[-6000:]}"
        return out, seconds


def start_app(input_dir: Path, output_dir: Path, bundle: Path, *args: str, env: dict | None = None) -> Run:
    """The documented command: ``python deploy/app -i <input> -o <output> -m <bundle> [args]``.

    The terminal output goes to ``<output>.terminal``; the app's own log to ``<output>.log`` (``--log-file``).
    """
    log = output_dir.parent / f"{output_dir.name}.log"
    cmd = [sys.executable, str(APP), "-i", str(input_dir), "-o", str(output_dir), "-m", str(bundle), "--log-file", str(log), *args]
    return Run(cmd, output_dir.parent / f"{output_dir.name}.terminal", cwd=output_dir.parent, env=env)


def start_reference(nifti_dir: Path, output_dir: Path, bundle: Path) -> Run:
    """``python -m monai.bundle run inference`` on the NIfTI folder with the bundle's own configs and model.pt."""
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "inference",
        "--config_file", "['configs/inference.json','configs/deploy.json']",
        "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf", "--bundle_root", str(bundle),
        "--dataset_dir", str(nifti_dir), "--output_dir", str(output_dir), "--ckpt_path", str(bundle / "models" / "model.pt"),
    ]
    return Run(cmd, output_dir.parent / f"{output_dir.name}.log", cwd=bundle)


def dicom_to_nifti(folder: Path, out_file: Path) -> Path:
    """Convert the (only) DICOM series in ``folder`` to NIfTI with ITK's GDCM reader, independent of the app."""
    import itk

    names = itk.GDCMSeriesFileNames.New(Directory=str(folder))
    names.SetUseSeriesDetails(False)
    uids = names.GetSeriesUIDs()
    if len(uids) != 1:
        raise ValueError(f"{folder}: expected one series, ITK found {len(uids)}")
    reader = itk.ImageSeriesReader[itk.Image[itk.F, 3]].New(FileNames=names.GetFileNames(uids[0]), ImageIO=itk.GDCMImageIO.New())
    reader.Update()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    itk.imwrite(reader.GetOutput(), str(out_file))
    return out_file


# --------------------------------------------------------------------------------------------
# Reading the SEG back


def read_source_series(folder: Path) -> dict[str, pydicom.Dataset]:
    """SOP Instance UID -> header of every image instance under ``folder`` (UIDs as the app reads them)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except pydicom.errors.InvalidDicomError:
                continue
            uid = str(ds.get("SOPInstanceUID") or "") or str(ds.file_meta.MediaStorageSOPInstanceUID)
            out[uid] = ds
    return out


def seg_on_grid(seg: pydicom.Dataset, affine_ras: np.ndarray, shape: Sequence[int], sources: dict) -> np.ndarray:
    """Paint the SEG's frames onto a voxel grid given by its RAS affine, checking each frame on the way.

    For every frame: its source image is one of ``sources`` and its ImagePositionPatient equals that
    source's; every pixel centre maps to a voxel centre of the grid (within 1e-3 voxel); segments do
    not overlap. Returns the label map (segment number per voxel, 0 elsewhere).
    """
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    spacing = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, dtype=float)
    r, c = iop[:3], iop[3:]
    inv = np.linalg.inv(np.asarray(affine_ras, dtype=float))
    jj, ii = np.mgrid[0 : seg.Rows, 0 : seg.Columns]
    out = np.zeros(tuple(shape), dtype=np.uint8)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        ipp = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        src_uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert src_uid in sources, f"frame references {src_uid}, not an instance of the source series"
        src = sources[src_uid]
        np.testing.assert_allclose(ipp, np.asarray(src.ImagePositionPatient, dtype=float), atol=1e-4)
        np.testing.assert_allclose(iop, np.asarray(src.ImageOrientationPatient, dtype=float), atol=1e-4)
        np.testing.assert_allclose(spacing, np.asarray(src.PixelSpacing, dtype=float), atol=1e-6)
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        lps = ipp + ii[..., None] * spacing[1] * r + jj[..., None] * spacing[0] * c
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = ras @ inv[:3, :3].T + inv[:3, 3]
        idx = np.rint(ijk)
        assert np.abs(ijk - idx).max() < 1e-3, "SEG pixel centres fall between the reference voxels"
        idx = idx.astype(int)
        assert (idx >= 0).all() and (idx < np.asarray(shape)).all(), "SEG frame lies outside the reference volume"
        on = frame.astype(bool)
        target = (idx[..., 0][on], idx[..., 1][on], idx[..., 2][on])
        assert not out[target].any(), "segments overlap"
        out[target] = number
    return out
