"""Checking that the selected series makes one volume of well-defined geometry, and building that volume.

:func:`check_series` checks per instance what the SDK's volume operator assumes (single-frame CT/MR image
storage, one size, pixel spacing and orientation, a position) and applies the slice-position rule the
bundle applies too (:func:`msa2net.dicom.order_slices`: no repeated positions, uniform gaps, no in-plane
drift). :class:`CheckedSeriesToVolumeOperator` runs it before building the volume and writes the affine
with the in-plane spacings in DICOM's order (PixelSpacing is [row spacing, column spacing]; the SDK 4.0
affine swaps them, which matters for non-square pixels). A refusal names the file of the instance at
fault, or the folder and Series Instance UID of the series.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from loading import series_name, source_file
from selection import IMAGE_SOP_CLASSES

from monai.data.utils import orientation_ras_lps
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from msa2net.dicom import order_slices
from msa2net.errors import InputError

__all__ = ["SeriesGeometryError", "SeriesGeometry", "check_series", "decode_pixels", "CheckedSeriesToVolumeOperator"]

logger = logging.getLogger(__name__)


class SeriesGeometryError(InputError):
    """The selected series cannot be turned into one volume of well-defined geometry."""


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
        return orientation_ras_lps(self.lps_affine())


def _instance_name(ds) -> str:
    """The instance's file, which a user can find (its SOP Instance UID only where there is no file)."""
    return source_file(ds) or f"instance {ds.get('SOPInstanceUID')}"


def _floats(ds, key: str, n: int, where: str) -> np.ndarray:
    value = ds.get(key)
    if value is None or len(value) != n:
        raise SeriesGeometryError(f"{where}: {key} is missing or malformed ({value!r}).")
    return np.asarray([float(v) for v in value])


def _check_instance(ds, rows: int, columns: int, spacing: np.ndarray, iop: np.ndarray) -> np.ndarray:
    """Check one instance against the series' first; return its ImagePositionPatient."""
    where = _instance_name(ds)
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
    return _floats(ds, "ImagePositionPatient", 3, where)


def check_series(datasets: Sequence, rel_tol: float = 0.01, abs_tol: float = 0.01) -> SeriesGeometry:
    """Check that ``datasets`` (pydicom) form one volume; raise :class:`SeriesGeometryError` saying why not.

    Orientations and pixel spacings must agree within 1e-4; slice positions follow
    :func:`msa2net.dicom.order_slices` with ``rel_tol`` and ``abs_tol``.
    """
    series, n = series_name(datasets), len(datasets)
    if n < 2:
        raise SeriesGeometryError(f"{series}: {n} image(s); at least 2 slices are needed to define a volume.")
    classes = {str(ds.get("SOPClassUID", "")) for ds in datasets}
    unsupported = sorted(classes - set(IMAGE_SOP_CLASSES))
    if unsupported:
        raise SeriesGeometryError(
            f"{series}: holds SOP class(es) {unsupported}; only single-frame {sorted(IMAGE_SOP_CLASSES.values())} "
            "are supported (non-image objects, multi-frame enhanced images and secondary captures are not)."
        )
    if len(classes) > 1:
        raise SeriesGeometryError(f"{series}: mixes SOP classes {sorted(classes)}.")
    first = datasets[0]
    where = _instance_name(first)
    rows, columns = int(first.get("Rows", 0)), int(first.get("Columns", 0))
    spacing = _floats(first, "PixelSpacing", 2, where)
    iop = _floats(first, "ImageOrientationPatient", 6, where)
    r, c = iop[:3], iop[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-3 or abs(np.linalg.norm(c) - 1) > 1e-3 or abs(r @ c) > 1e-3:
        raise SeriesGeometryError(f"{where}: ImageOrientationPatient {iop.tolist()} is not two orthonormal vectors.")
    r, c = r / np.linalg.norm(r), c / np.linalg.norm(c)
    normal = np.cross(r, c)
    positions = np.asarray([_check_instance(ds, rows, columns, spacing, iop) for ds in datasets])
    try:
        order, slice_spacing = order_slices(positions, normal, rel_tol, abs_tol)
    except InputError as err:
        raise SeriesGeometryError(f"{series}: {err}") from None
    return SeriesGeometry(
        order=order,
        rows=rows,
        columns=columns,
        row_spacing=float(spacing[0]),
        column_spacing=float(spacing[1]),
        row_cosine=r,
        column_cosine=c,
        normal=normal,
        slice_spacing=slice_spacing,
        origin=positions[order[0]],
    )


def decode_pixels(datasets: Sequence) -> None:
    """Decode the pixel data of every instance, refusing one that cannot be decoded with its file's name.

    The SDK's volume builder fails on such an instance with a message that names no file; pydicom keeps
    the decoded arrays, so the builder does not decode them again.
    """
    for ds in datasets:
        try:
            ds.pixel_array
        except Exception as err:  # pydicom raises ValueError, RuntimeError, NotImplementedError... by codec
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SeriesGeometryError(f"{_instance_name(ds)}: the pixel data cannot be decoded ({reason}).") from err


class CheckedSeriesToVolumeOperator(DICOMSeriesToVolumeOperator):
    """The SDK's series-to-volume operator, with :func:`check_series`, :func:`decode_pixels` and a corrected affine."""

    def prepare_series(self, series):
        instances = series.get_sop_instances()
        datasets = [i.get_native_sop_instance() for i in instances]
        geometry = check_series(datasets)
        decode_pixels(datasets)
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
