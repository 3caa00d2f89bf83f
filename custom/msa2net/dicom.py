"""DICOM series checks shared by the bundle (``run inference`` on a series folder) and the MONAI Deploy app.

:func:`order_slices` is the one rule for slice positions: it sorts the slices along the slice normal
and refuses repeated positions, uneven gaps and in-plane drift. :func:`check_dicom_series` applies it
to a folder read by ITK (the bundle); the Deploy application applies it to the pydicom datasets of the
selected series (``deploy/app/geometry.py``), where it also checks orientation, pixel spacing and SOP
class per slice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from msa2net.errors import InputError

__all__ = ["check_dicom_series", "order_slices"]


def order_slices(
    positions: Sequence[Sequence[float]], normal: Sequence[float], rel_tol: float = 0.01, abs_tol: float = 0.01
) -> tuple[list[int], float]:
    """Sort slice positions along the slice normal and check that they make one evenly sampled volume.

    ITK and the MONAI Deploy App SDK stack the slices of a series and take one slice spacing for all;
    a missing slice, a repeated position or a sheared stack would give a volume whose geometry is wrong.

    Args:
        positions: ImagePositionPatient of each slice (mm), in any order; at least two.
        normal: unit normal of the slices (cross product of the row and column direction cosines).
        rel_tol: allowed deviation of a gap from the median gap, as a fraction of it.
        abs_tol: smallest allowed deviation in mm (and the smallest gap that counts as two positions).

    Returns:
        ``(order, spacing)``: indices that sort the slices along ``normal`` and the mean slice spacing (mm).

    Raises:
        InputError: two slices at one position; a gap that differs from the median gap by more than
            ``max(abs_tol, rel_tol * gap)`` (a missing slice, mixed acquisitions); consecutive positions
            that drift in-plane by more than that bound (gantry tilt, shear). The message names the
            positions; callers prefix the file or series.
    """
    positions = np.asarray(positions, dtype=float)
    normal = np.asarray(normal, dtype=float)
    if len(positions) < 2:
        raise InputError(f"{len(positions)} slice(s); at least 2 are needed to define a volume.")
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    along, positions = along[order], positions[order]
    gaps = np.diff(along)
    if gaps.min() <= abs_tol:
        k = int(np.argmin(gaps))
        raise InputError(
            f"two slices lie at the same position ({along[k]:.3f} mm along the slice normal): the series holds "
            "repeated or multi-phase acquisitions; split it before inference."
        )
    typical = float(np.median(gaps))
    tol = max(abs_tol, rel_tol * typical)
    bad = np.flatnonzero(np.abs(gaps - typical) > tol)
    if bad.size:
        k = int(bad[0])
        raise InputError(
            f"slice spacing is not uniform: {gaps[k]:.3f} mm between the slices at {along[k]:.3f} and {along[k + 1]:.3f} mm "
            f"along the normal, where the typical gap is {typical:.3f} mm ({bad.size} uneven gap(s)); a slice is missing "
            "or the series mixes acquisitions."
        )
    steps = np.diff(positions, axis=0)
    drift = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)
    if drift.max() > tol:
        raise InputError(
            f"slice positions drift {drift.max():.3f} mm in-plane between neighbours (gantry tilt or shear); "
            "only volumes whose slices stack along the slice normal are supported."
        )
    return order, float((along[-1] - along[0]) / (len(along) - 1))


def check_dicom_series(folder: str | os.PathLike, rel_tol: float = 0.01, abs_tol: float = 0.01) -> None:
    """Refuse a folder that would not make one evenly sampled volume.

    Raises :class:`InputError` ``"<folder>: <problem>"`` for: no readable DICOM image, more than one
    series, or slice positions that :func:`order_slices` refuses (with the same tolerances). A single
    slice passes (ITK reads it as a one-slice volume).
    """
    import itk

    folder = Path(folder)
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.SetDirectory(str(folder))
    uids = list(names.GetSeriesUIDs())
    if not uids:
        raise InputError(f"{folder}: no readable DICOM image series in this folder.")
    if len(uids) > 1:
        raise InputError(f"{folder}: holds {len(uids)} DICOM series; put one series per folder.")
    files = list(names.GetFileNames(uids[0]))
    if len(files) < 2:
        return
    io = itk.GDCMImageIO.New()
    positions, normal = [], None
    for f in files:
        io.SetFileName(f)
        io.ReadImageInformation()
        positions.append([io.GetOrigin(i) for i in range(3)])
        if normal is None:
            normal = np.cross([io.GetDirection(0)[i] for i in range(3)], [io.GetDirection(1)[i] for i in range(3)])
    try:
        order_slices(positions, normal, rel_tol, abs_tol)
    except InputError as err:
        raise InputError(f"{folder}: {err}") from None
