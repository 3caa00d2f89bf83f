"""Reading the input folder: DICOM instances grouped by study and series, and the identifiers a SEG must reference.

A DICOM SEG references its study (Study Instance UID), the source series (Series Instance UID) and every
source instance (SOP Instance UID). De-identification sometimes blanks them. SOP Class and Instance UID
are then taken from the file meta (Media Storage SOP Class/Instance UID, which Part 10 requires to be
equal to them): nothing is invented. Blank Study, Series or SOP Instance UIDs are derived
deterministically from the attributes that remain, only so that the instances can be grouped, and
recorded in :class:`DerivedIdentifiers`: the application refuses a selected series with derived
identifiers (a SEG with invented identifiers matches nothing in an archive) unless the user passed
``--derive-missing-uids``; then the derivation is logged and stated in the SEG (Image Comments).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from monai.deploy.core.domain.dicom_series import DICOMSeries
from monai.deploy.core.domain.dicom_study import DICOMStudy
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from msa2net.errors import InputError

__all__ = [
    "DICOMDIR_SOP_CLASS", "DerivedIdentifiers", "DICOMFolderLoaderOperator", "repair_identifiers", "files_folder",
    "series_name", "source_file",
]

logger = logging.getLogger(__name__)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Each UID that may be derived, the attributes it is derived from, and the UID above it in the hierarchy.
_DERIVATION = {
    "StudyInstanceUID": (("PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription"), None),
    "SeriesInstanceUID": (("FrameOfReferenceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime"), "StudyInstanceUID"),
    "SOPInstanceUID": (("ImagePositionPatient", "InstanceNumber", "AcquisitionNumber"), "SeriesInstanceUID"),
}


def _blank(value) -> bool:
    return value is None or not str(value).strip()


def files_folder(files: Iterable[str]) -> str | None:
    """The deepest folder holding all of ``files`` (absolute), or ``None`` where there are none."""
    folders = [os.path.dirname(os.path.abspath(f)) for f in files]
    return os.path.commonpath(folders) if folders else None


def source_file(ds) -> str | None:
    """The file pydicom read ``ds`` from; ``None`` for a dataset made in memory."""
    name = getattr(ds, "filename", None)
    return os.fspath(name) if isinstance(name, (str, os.PathLike)) else None


def series_name(datasets: Sequence) -> str:
    """``<folder> (series <UID>)``: the folder holding the series' files and its Series Instance UID."""
    uids = ", ".join(sorted({str(ds.get("SeriesInstanceUID") or "") for ds in datasets} - {""}))
    folder = files_folder(f for f in map(source_file, datasets) if f)
    series = f"series {uids}" if uids else "the series"
    return f"{folder} ({series})" if folder else series


@dataclass
class DerivedIdentifiers:
    """UIDs the loader derived, per series: shared by the loader, the series check and the SEG writer."""

    by_series: dict[str, dict[str, int]] = field(default_factory=dict)
    #: the files whose UIDs were derived, per series: a derived Series Instance UID means nothing to the user
    files: dict[str, list[str]] = field(default_factory=dict)

    def add(self, series_uid: str, keywords: list[str], path: str) -> None:
        counts = self.by_series.setdefault(series_uid, {})
        for k in keywords:
            counts[k] = counts.get(k, 0) + 1
        self.files.setdefault(series_uid, []).append(path)

    def statement(self, series_uid: str) -> str:
        """One sentence for the log and the SEG; empty when nothing of the series was derived."""
        counts = self.by_series.get(series_uid)
        if not counts:
            return ""
        what = "; ".join(f"{k} of {n} instance(s) from {', '.join(_DERIVATION[k][0])}" for k, n in sorted(counts.items()))
        return f"Source identifiers were blank and derived by the MSA2-Net application ({what}); they match no archive."

    def check(self, series_uid: str, allowed: bool) -> None:
        """Refuse a series with derived identifiers unless ``allowed`` (then log the derivation)."""
        counts = self.by_series.get(series_uid)
        if not counts:
            return
        if not allowed:
            raise InputError(
                f"{files_folder(self.files[series_uid])}: the selected series has blank {' and '.join(sorted(counts))} "
                "(de-identified input?); a SEG must reference them, so it is refused. --derive-missing-uids derives stable ones, "
                "stated in the SEG and the log."
            )
        logger.warning("%s", self.statement(series_uid))


def repair_identifiers(ds) -> list[str]:
    """Fill blank identifying UIDs of ``ds`` in place (module doc); return the keywords of the derived ones.

    SOP Class/Instance UID taken from the file meta are not reported: they are the instance's own.
    """
    meta = getattr(ds, "file_meta", None)
    for key, meta_key in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if _blank(ds.get(key)) and meta is not None and not _blank(meta.get(meta_key)):
            setattr(ds, key, str(meta.get(meta_key)))
    derived = []
    for key, (sources, parent) in _DERIVATION.items():
        if _blank(ds.get(key)):
            srcs = [key] + ([str(ds.get(parent))] if parent else []) + [str(ds.get(k, "")) for k in sources]
            setattr(ds, key, generate_uid(entropy_srcs=srcs))
            derived.append(key)
    return derived


class DICOMFolderLoaderOperator(DICOMDataLoaderOperator):
    """The SDK's DICOM folder loader with the identifier handling above and plain study/series grouping.

    Non-DICOM files are skipped and counted; exact duplicates of one SOP instance are kept once; a folder
    without a single DICOM instance is an error that names the folder.

    Args:
        derived: where derived identifiers are recorded.
    """

    def __init__(self, *args, derived: DerivedIdentifiers | None = None, **kwargs):
        self.derived = derived if derived is not None else DerivedIdentifiers()
        super().__init__(*args, **kwargs)

    def load_data_to_studies(self, input_path: Path) -> list[DICOMStudy]:
        """The studies in ``input_path`` and its subfolders (the SDK's method, with errors that name the folder)."""
        if not Path(input_path).is_dir():
            raise InputError(f"{input_path}: the input folder does not exist or is not a folder.")
        files: list[str] = []
        self._list_files(input_path, files)
        studies = self._load_data(files)
        if not studies:
            raise InputError(
                f"{input_path}: no DICOM instance found among {len(files)} file(s) (non-DICOM files and DICOMDIRs are skipped)."
            )
        return studies

    def _load_data(self, files: list[str]) -> list[DICOMStudy]:
        studies: dict[str, DICOMStudy] = {}
        series_by_uid: dict[str, DICOMSeries] = {}
        seen: set[tuple[str, str]] = set()
        skipped = 0
        for path in sorted(files):
            try:
                ds = dcmread(path)
            except (InvalidDicomError, OSError, ValueError, EOFError) as err:
                skipped += 1
                logger.debug("skipped %s: %s", path, err)
                continue
            derived = repair_identifiers(ds)
            if _blank(ds.get("SOPClassUID")) or str(ds.SOPClassUID) == DICOMDIR_SOP_CLASS:
                skipped += 1
                continue
            key = (str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            if key in seen:
                logger.info("%s: SOP instance %s already loaded from another file; kept once", path, key[1])
                continue
            seen.add(key)
            if derived:
                self.derived.add(key[0], derived, path)
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
        logger.info("loaded %d instance(s) in %d series; %d file(s) skipped", len(seen), len(series_by_uid), skipped)
        return list(studies.values())
