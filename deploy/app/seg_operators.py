"""Operators of the MSA2-Net MONAI Deploy application, and the checks behind them.

The App SDK's DICOM operators are used as they are where they do the right thing; the
subclasses here change only what this application needs:

* :class:`DICOMFolderLoaderOperator`: reads every file under the input folder (non-DICOM files are
  skipped and counted), takes a blank SOP Class/Instance UID from the file meta (where Part 10
  keeps the same values), derives a deterministic Study/Series Instance UID where de-identification
  blanked it (logged as a warning), and groups instances by study and series. Exact duplicates of
  one SOP instance are kept once. A folder without a single DICOM instance is an error.
* :class:`RuleSeriesSelectorOperator`: the SDK selector with this app's CT-or-MR rules; it raises
  a clear error listing what the folder holds when no series matches (the SDK passes on an empty list).
* :class:`CheckedSeriesToVolumeOperator`: checks the selected series' geometry before building the
  volume (:func:`check_series`): single-frame CT/MR image storage only, one size, pixel spacing and
  orientation, positions on one line along the slice normal, uniform spacing (a missing slice is an
  error), no two instances at one position. It also writes the affine with the in-plane spacings in
  DICOM's order (PixelSpacing is [row spacing, column spacing]; the SDK 4.0 affine swaps them, which
  matters for non-square pixels).
* :class:`LabeledSegWriterOperator`: the SDK DICOM SEG writer, with each segment's recommended
  display colour set.
* :class:`NiftiSegWriterOperator`: a NIfTI copy of the label map in the input's geometry (RAS affine).

Inference itself is the SDK's ``MonaiBundleInferenceOperator`` on the bundle folder (see ``app.py``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec
from monai.deploy.core.domain.dicom_series import DICOMSeries
from monai.deploy.core.domain.dicom_study import DICOMStudy
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
IMAGE_SOP_CLASSES = {CT_IMAGE_STORAGE: "CT Image Storage", MR_IMAGE_STORAGE: "MR Image Storage"}
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

#: Default selection: the largest CT image series of the study, else the largest MR image series.
DEFAULT_RULES = {
    "selections": [
        {"name": "CT", "conditions": {"Modality": "(?i)^CT$", "SOPClassUID": "^1\\.2\\.840\\.10008\\.5\\.1\\.4\\.1\\.1\\.2$"}},
        {"name": "MR", "conditions": {"Modality": "(?i)^MR$", "SOPClassUID": "^1\\.2\\.840\\.10008\\.5\\.1\\.4\\.1\\.1\\.4$"}},
    ]
}


class SeriesGeometryError(ValueError):
    """The selected series cannot be turned into one volume of well-defined geometry."""


# --------------------------------------------------------------------------------------------
# Loading


def _blank(value) -> bool:
    return value is None or not str(value).strip()


def repair_identifiers(ds) -> list[str]:
    """Fill blank identifying UIDs of ``ds`` in place; return what was filled.

    SOP Class/Instance UID come from the file meta (Media Storage SOP Class/Instance UID, which
    Part 10 requires to be equal to them). A blank Study/Series Instance UID is derived
    deterministically from the study/series attributes that remain, so every instance of one
    blanked series gets the same UID; a SEG written for such input cannot be matched to a study in
    a PACS, hence the warning the caller logs.
    """
    filled = []
    meta = getattr(ds, "file_meta", None)
    for key, meta_key in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if _blank(ds.get(key)) and meta is not None and not _blank(meta.get(meta_key)):
            setattr(ds, key, str(meta.get(meta_key)))
            filled.append(f"{key} from file meta")
    if _blank(ds.get("StudyInstanceUID")):
        keys = ("PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription")
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["study"] + [str(ds.get(k, "")) for k in keys])
        filled.append("StudyInstanceUID derived")
    if _blank(ds.get("SeriesInstanceUID")):
        keys = ("FrameOfReferenceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime")
        srcs = ["series", str(ds.StudyInstanceUID)] + [str(ds.get(k, "")) for k in keys]
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=srcs)
        filled.append("SeriesInstanceUID derived")
    if _blank(ds.get("SOPInstanceUID")):
        keys = ("ImagePositionPatient", "InstanceNumber", "AcquisitionNumber")
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["instance", str(ds.SeriesInstanceUID)] + [str(ds.get(k, "")) for k in keys])
        filled.append("SOPInstanceUID derived")
    return filled


class DICOMFolderLoaderOperator(DICOMDataLoaderOperator):
    """The SDK's DICOM folder loader with blank-UID repair and plain study/series grouping (module doc)."""

    def _load_data(self, files: list[str]) -> list[DICOMStudy]:
        studies: dict[str, DICOMStudy] = {}
        series_by_uid: dict[str, DICOMSeries] = {}
        seen: set[tuple[str, str]] = set()
        skipped, repaired = 0, {}
        for path in sorted(files):
            try:
                ds = dcmread(path)
            except (InvalidDicomError, OSError, ValueError, EOFError) as err:
                skipped += 1
                logger.debug("skipped %s: %s", path, err)
                continue
            for note in repair_identifiers(ds):
                repaired[note] = repaired.get(note, 0) + 1
            if _blank(ds.get("SOPClassUID")) or str(ds.SOPClassUID) == DICOMDIR_SOP_CLASS:
                skipped += 1
                continue
            key = (str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            if key in seen:
                logger.info("%s: SOP instance %s already loaded from another file; kept once", path, key[1])
                continue
            seen.add(key)
            study_uid = str(ds.StudyInstanceUID)
            if study_uid not in studies:
                studies[study_uid] = DICOMStudy(study_uid)
                self.populate_study_attributes(studies[study_uid], ds)
            if key[0] not in series_by_uid:
                series = DICOMSeries(key[0])
                if "SeriesNumber" in ds and _blank(ds.SeriesNumber):
                    del ds.SeriesNumber  # the SDK's attribute reader fails on an empty IS value
                self.populate_series_attributes(series, ds)
                series_by_uid[key[0]] = series
                studies[study_uid].add_series(series)
            series_by_uid[key[0]].add_sop_instance(ds)
        if repaired:
            logger.warning("blank DICOM identifiers filled (de-identified input?): %s", repaired)
        if not studies:
            raise ValueError(f"no DICOM instance found: {len(files)} file(s) scanned, {skipped} not DICOM or skipped.")
        logger.info("loaded %d instance(s) in %d series; %d file(s) skipped", len(seen), len(series_by_uid), skipped)
        return list(studies.values())


# --------------------------------------------------------------------------------------------
# Series selection


def describe_studies(dicom_study_list) -> str:
    """One line per series: modality, SOP class, instance count, description."""
    lines = []
    for study in dicom_study_list or []:
        for series in study.get_all_series():
            instances = series.get_sop_instances()
            classes = sorted({str(i.get_native_sop_instance().get("SOPClassUID", "?")) for i in instances})
            lines.append(
                f"{getattr(series, 'Modality', None) or '?'} series {series.SeriesInstanceUID} "
                f"({len(instances)} instance(s), SOP class {', '.join(classes)}, "
                f"description {getattr(series, 'SeriesDescription', None)!r})"
            )
    return "; ".join(lines) or "nothing"


class RuleSeriesSelectorOperator(DICOMSeriesSelectorOperator):
    """The SDK selector; no matching series is an error naming what the input holds."""

    def filter(self, selection_rules, dicom_study_list, all_matched=False, sort_by_sop_instance_count=False):
        selected = super().filter(selection_rules, dicom_study_list, all_matched, sort_by_sop_instance_count)
        if not selected:
            raise ValueError(
                "no series matches the selection rules (single-frame CT or MR image storage); "
                f"the input holds: {describe_studies(dicom_study_list)}"
            )
        return selected


# --------------------------------------------------------------------------------------------
# Geometry


@dataclass
class SeriesGeometry:
    """Geometry of a checked series; ``order`` sorts the instances along the slice normal."""

    order: list[int]
    rows: int
    columns: int
    row_spacing: float  # PixelSpacing[0]: between rows, along the column direction
    column_spacing: float  # PixelSpacing[1]: between columns, along the row direction
    row_cosine: np.ndarray  # direction of increasing column index
    column_cosine: np.ndarray  # direction of increasing row index
    normal: np.ndarray
    slice_spacing: float
    origin: np.ndarray  # ImagePositionPatient of the first sorted slice (LPS, mm)

    def lps_affine(self) -> np.ndarray:
        """Index ``(column, row, slice)`` -> LPS millimetres."""
        a = np.eye(4)
        a[:3, 0] = self.row_cosine * self.column_spacing
        a[:3, 1] = self.column_cosine * self.row_spacing
        a[:3, 2] = self.normal * self.slice_spacing
        a[:3, 3] = self.origin
        return a

    def ras_affine(self) -> np.ndarray:
        """Index ``(column, row, slice)`` -> RAS millimetres (NIfTI convention)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.lps_affine()


def _floats(ds, key: str, n: int, where: str) -> np.ndarray:
    value = ds.get(key)
    if value is None or len(value) != n:
        raise SeriesGeometryError(f"{where}: {key} is missing or malformed ({value!r}).")
    return np.asarray([float(v) for v in value])


def check_series(datasets: Sequence, rel_tol: float = 0.01, abs_tol: float = 0.01) -> SeriesGeometry:
    """Check that ``datasets`` (pydicom) form one volume; raise :class:`SeriesGeometryError` saying why not.

    Tolerances: slice gaps may differ from the typical (median) gap by ``max(abs_tol mm, rel_tol * gap)``;
    the same bound applies to the in-plane drift of consecutive positions; orientations and pixel
    spacings must agree within 1e-4.
    """
    n = len(datasets)
    if n < 2:
        raise SeriesGeometryError(f"the series has {n} image(s); at least 2 slices are needed to define a volume.")
    classes = {str(ds.get("SOPClassUID", "")) for ds in datasets}
    unsupported = sorted(classes - set(IMAGE_SOP_CLASSES))
    if unsupported:
        raise SeriesGeometryError(
            f"the series holds SOP class(es) {unsupported}; only single-frame {sorted(IMAGE_SOP_CLASSES.values())} "
            "are supported (non-image objects, multi-frame enhanced images and secondary captures are not)."
        )
    if len(classes) > 1:
        raise SeriesGeometryError(f"the series mixes SOP classes {sorted(classes)}.")
    first = datasets[0]
    uid0 = first.get("SOPInstanceUID")
    rows, columns = int(first.get("Rows", 0)), int(first.get("Columns", 0))
    spacing = _floats(first, "PixelSpacing", 2, f"instance {uid0}")
    iop = _floats(first, "ImageOrientationPatient", 6, f"instance {uid0}")
    r, c = iop[:3], iop[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-3 or abs(np.linalg.norm(c) - 1) > 1e-3 or abs(r @ c) > 1e-3:
        raise SeriesGeometryError(f"instance {uid0}: ImageOrientationPatient {iop.tolist()} is not two orthonormal vectors.")
    r, c = r / np.linalg.norm(r), c / np.linalg.norm(c)
    normal = np.cross(r, c)
    positions = []
    for ds in datasets:
        where = f"instance {ds.get('SOPInstanceUID')}"
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise SeriesGeometryError(f"{where}: multi-frame images are not supported.")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise SeriesGeometryError(f"{where}: only single-channel (monochrome) images are supported.")
        if "PixelData" not in ds:
            raise SeriesGeometryError(f"{where}: no pixel data.")
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (rows, columns):
            raise SeriesGeometryError(
                f"{where}: {ds.get('Rows')}x{ds.get('Columns')} pixels where the series has {rows}x{columns}; "
                "the series mixes images of different sizes."
            )
        if np.abs(_floats(ds, "PixelSpacing", 2, where) - spacing).max() > 1e-4:
            raise SeriesGeometryError(f"{where}: PixelSpacing differs from the rest of the series.")
        if np.abs(_floats(ds, "ImageOrientationPatient", 6, where) - iop).max() > 1e-4:
            raise SeriesGeometryError(f"{where}: ImageOrientationPatient differs from the rest of the series (mixed orientations).")
        positions.append(_floats(ds, "ImagePositionPatient", 3, where))
    positions = np.asarray(positions)
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    along, positions = along[order], positions[order]
    gaps = np.diff(along)
    if gaps.min() <= abs_tol:
        k = int(np.argmin(gaps))
        raise SeriesGeometryError(
            f"two instances lie at the same position ({along[k]:.3f} mm along the slice normal): "
            "the series holds repeated or multi-phase acquisitions; split it before inference."
        )
    typical = float(np.median(gaps))
    tol = max(abs_tol, rel_tol * typical)
    bad = np.flatnonzero(np.abs(gaps - typical) > tol)
    if bad.size:
        k = int(bad[0])
        raise SeriesGeometryError(
            f"slice spacing is not uniform: {gaps[k]:.3f} mm between the slices at {along[k]:.3f} and "
            f"{along[k + 1]:.3f} mm along the normal, where the typical gap is {typical:.3f} mm "
            f"({bad.size} uneven gap(s)); a slice is missing or the series mixes acquisitions."
        )
    mean = (along[-1] - along[0]) / (n - 1)
    steps = np.diff(positions, axis=0)
    drift = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)
    if drift.max() > tol:
        raise SeriesGeometryError(
            f"slice positions drift {drift.max():.3f} mm in-plane between neighbours (gantry tilt or shear); "
            "only volumes whose slices stack along the slice normal are supported."
        )
    return SeriesGeometry(
        order=order,
        rows=rows,
        columns=columns,
        row_spacing=float(spacing[0]),
        column_spacing=float(spacing[1]),
        row_cosine=r,
        column_cosine=c,
        normal=normal,
        slice_spacing=float(mean),
        origin=positions[0],
    )


class CheckedSeriesToVolumeOperator(DICOMSeriesToVolumeOperator):
    """The SDK's series-to-volume operator, with :func:`check_series` and a corrected affine."""

    def prepare_series(self, series):
        instances = series.get_sop_instances()
        geometry = check_series([i.get_native_sop_instance() for i in instances])
        series._sop_instances = [instances[i] for i in geometry.order]  # the SDK's own attribute, as its prepare_series
        series.depth_pixel_spacing = geometry.slice_spacing
        series.depth_direction_cosine = geometry.normal.tolist()
        series.dicom_affine_transform = geometry.lps_affine()
        series.nifti_affine_transform = geometry.ras_affine()
        logger.info(
            "series %s: %d slices of %dx%d, spacing %.4g x %.4g x %.4g mm",
            series.SeriesInstanceUID, len(instances), geometry.rows, geometry.columns,
            geometry.column_spacing, geometry.row_spacing, geometry.slice_spacing,
        )


# --------------------------------------------------------------------------------------------
# Bundle labels and the writers

#: SNOMED CT codes for the class names this project's profiles use.
_SCT_CODES = {
    "aorta": codes.SCT.Aorta,
    "gallbladder": codes.SCT.Gallbladder,
    "left_kidney": Code("18639004", "SCT", "Left kidney"),
    "right_kidney": Code("9846003", "SCT", "Right kidney"),
    "kidney": codes.SCT.Kidney,
    "liver": codes.SCT.Liver,
    "pancreas": codes.SCT.Pancreas,
    "spleen": codes.SCT.Spleen,
    "stomach": codes.SCT.Stomach,
    "right_ventricle": codes.SCT.RightVentricle,
    "left_ventricle": codes.SCT.LeftVentricle,
    "myocardium": codes.SCT.LeftVentricleMyocardium,
}
#: Default display colours (RGB) by class name; others cycle through :data:`_PALETTE`.
_COLORS = {
    "aorta": (224, 97, 76),
    "gallbladder": (139, 150, 98),
    "left_kidney": (185, 102, 83),
    "right_kidney": (214, 150, 120),
    "liver": (221, 130, 101),
    "pancreas": (249, 180, 111),
    "spleen": (157, 108, 162),
    "stomach": (216, 132, 105),
    "right_ventricle": (51, 102, 204),
    "myocardium": (230, 170, 50),
    "left_ventricle": (204, 51, 51),
}
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207)]


@dataclass
class Label:
    value: int
    name: str
    rgb: tuple[int, int, int]
    code: Code


@dataclass
class BundleInfo:
    """What the application needs from the bundle folder besides what the inference operator parses."""

    path: Path
    config_names: list[str]
    name: str
    version: str
    labels: list[Label]


def find_bundle(model_path: str | os.PathLike) -> Path:
    """The bundle folder at ``model_path``, or the only bundle folder inside it (MAP layout ``models/<name>/``)."""
    root = Path(model_path)
    if (root / "configs" / "metadata.json").is_file():
        return root
    found = [p for p in sorted(root.iterdir()) if (p / "configs" / "metadata.json").is_file()] if root.is_dir() else []
    if len(found) != 1:
        raise FileNotFoundError(
            f"{root}: expected a MONAI bundle folder (configs/metadata.json, models/model.ts) or a folder holding "
            f"exactly one; found {len(found)}. Build one with `python -m msa2net.export deploy_bundle`."
        )
    return found[0]


def read_bundle(bundle: Path) -> BundleInfo:
    """Config names, name, version and labels (names from the config's ``class_names``, else the metadata)."""
    from monai.bundle import ConfigParser

    names = ["inference"] + (["deploy"] if (bundle / "configs" / "deploy.json").is_file() else [])
    parser = ConfigParser()
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.read_config([str(bundle / "configs" / f"{n}.json") for n in names])
    meta = parser.get("_meta_", {})
    class_names = parser.get("class_names")
    if not isinstance(class_names, list):
        channel_def = meta.get("network_data_format", {}).get("outputs", {}).get("pred", {}).get("channel_def", {})
        class_names = [channel_def[k] for k in sorted(channel_def, key=int) if int(k) > 0]
    colors = meta.get("label_colors", {})
    labels = []
    for value, name in enumerate(class_names, 1):
        rgb = tuple(colors.get(name) or _COLORS.get(name) or _PALETTE[(value - 1) % len(_PALETTE)])
        code = _SCT_CODES.get(name, Code("91723000", "SCT", "Anatomical Structure"))
        labels.append(Label(value, str(name), rgb, code))
    if not labels:
        raise ValueError(f"{bundle}: no class names in the configs (class_names) or the metadata (channel_def).")
    return BundleInfo(bundle, names, str(meta.get("name", "MSA2-Net")), str(meta.get("version", "")), labels)


def segment_descriptions(info: BundleInfo) -> list[SegmentDescription]:
    """One SDK segment description per label, in label order (segment number = label value)."""
    category = codes.SCT.AnatomicalStructure
    return [
        SegmentDescription(
            segment_label=label.name[:64],
            segmented_property_category=category,
            segmented_property_type=label.code,
            algorithm_name=info.name[:64],
            algorithm_family=codes.DCM.ArtificialIntelligence,
            algorithm_version=info.version[:64] or "0",
        )
        for label in info.labels
    ]


class LabeledSegWriterOperator(DICOMSegmentationWriterOperator):
    """The SDK DICOM SEG writer; each segment also gets its Recommended Display CIELab Value."""

    def __init__(self, fragment: Fragment, *args, colors: Sequence[tuple[int, int, int]], **kwargs):
        import highdicom as hd

        super().__init__(fragment, *args, **kwargs)
        if len(colors) != len(self._seg_descs):
            raise ValueError(f"{len(colors)} colours for {len(self._seg_descs)} segments.")
        for desc, rgb in zip(self._seg_descs, colors, strict=True):
            desc.RecommendedDisplayCIELabValue = list(hd.color.CIELabColor.from_rgb(*rgb).value)


class NiftiSegWriterOperator(Operator):
    """Writes ``<output>/<SeriesInstanceUID>_seg.nii.gz``: the label map on the input's voxel grid.

    Inputs: ``seg_image`` (label ``Image``, DHW as the SDK passes it) and ``image`` (the input volume,
    whose metadata carries the RAS affine of index order ``(column, row, slice)``).
    """

    def __init__(self, fragment: Fragment, *args, output_folder: Path, **kwargs):
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("seg_image")
        spec.input("image")
        spec.output("path").condition(ConditionType.NONE)

    def compute(self, op_input, op_output, context):
        import nibabel as nib

        seg, image = op_input.receive("seg_image"), op_input.receive("image")
        labels = np.asarray(seg.asnumpy())
        source = np.asarray(image.asnumpy())
        if labels.shape != source.shape:
            raise ValueError(f"label map {labels.shape} and input volume {source.shape} differ in shape (DHW).")
        meta = image.metadata()
        affine = np.asarray(meta["nifti_affine_transform"], dtype=np.float64)
        out = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.uint8), affine)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        self.output_folder.mkdir(parents=True, exist_ok=True)
        path = self.output_folder / f"{meta.get('SeriesInstanceUID', 'series')}_seg.nii.gz"
        nib.save(out, str(path))
        logger.info("NIfTI copy of the label map written to %s", path)
        op_output.emit(str(path), "path")


def selection_rules() -> str:
    """The selection rules: ``$MSA2NET_SELECTION_RULES`` (a JSON file) if set, else :data:`DEFAULT_RULES`."""
    path = os.environ.get("MSA2NET_SELECTION_RULES")
    if path:
        rules = json.loads(Path(path).read_text())
        if not rules.get("selections"):
            raise ValueError(f"{path}: selection rules need a non-empty 'selections' list.")
        return json.dumps(rules)
    return json.dumps(DEFAULT_RULES)
