"""Checks of a DICOM series folder before it is read as one volume."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from msa2net.transforms import InputError

__all__ = ["check_dicom_series"]


def check_dicom_series(folder: str | os.PathLike, rel_tol: float = 0.01, abs_tol: float = 0.01) -> None:
    """Refuse a folder that would not make one evenly sampled volume.

    ITK stacks the slices of a series and takes the spacing from the first two; a missing
    slice, a duplicate position, a tilted (sheared) stack or a second series in the folder would
    give a volume whose geometry is wrong. Raises :class:`InputError` ``"<folder>: <problem>"`` for:
    no readable DICOM image, more than one series, two slices at one position, a gap between
    slices that differs from the median gap by more than ``max(abs_tol mm, rel_tol * gap)``, or
    consecutive positions that drift in-plane by more than that bound. This gap and drift rule, with
    its tolerances, is the one of the MONAI Deploy application's ``check_series``
    (``deploy/app/seg_operators.py``, which reads the positions with pydicom and stays self-contained
    for packaging; both are tested with a slice moved by 5 % and 0.5 % of the gap). The Deploy app
    also checks orientation, pixel spacing and SOP class per slice; this check does not.
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
    positions = np.asarray(positions)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    gaps = np.diff(along)
    if gaps.min() <= abs_tol:
        k = int(np.argmin(gaps))
        raise InputError(f"{folder}: two slices share the position {along[k]:.3f} mm along the slice normal.")
    typical = float(np.median(gaps))
    tol = max(abs_tol, rel_tol * typical)
    bad = np.flatnonzero(np.abs(gaps - typical) > tol)
    if bad.size:
        k = int(bad[0])
        raise InputError(
            f"{folder}: uneven slice positions (gap of {gaps[k]:.3f} mm between {along[k]:.3f} and {along[k + 1]:.3f} mm, "
            f"typical gap {typical:.3f} mm): a slice is missing or the folder mixes acquisitions."
        )
    steps = np.diff(positions, axis=0)
    drift = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)
    if drift.max() > tol:
        raise InputError(
            f"{folder}: slice positions drift {drift.max():.3f} mm in-plane between neighbours (gantry tilt or shear); "
            "only volumes whose slices stack along the slice normal are supported."
        )
