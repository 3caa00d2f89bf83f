"""Checks of a DICOM series folder before it is read as one volume."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from msa2net.transforms import InputError

__all__ = ["check_dicom_series"]


def check_dicom_series(folder: str | os.PathLike, gap_tolerance: float = 0.25) -> None:
    """Refuse a folder that would not make one evenly sampled volume.

    ITK stacks the slices of a series and takes the spacing from the first two; a missing
    slice, a duplicate position or a second series in the folder would give a volume whose
    geometry is wrong. Raises :class:`InputError` ``"<folder>: <problem>"`` for: no readable
    DICOM image, more than one series, two slices at one position, or a gap between slices that
    differs from the median gap by more than ``gap_tolerance`` (relative).
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
    depth = np.sort(np.asarray(positions) @ normal)
    gaps = np.diff(depth)
    if (gaps < 1e-3).any():
        k = int(np.argmax(gaps < 1e-3))
        raise InputError(f"{folder}: two slices share the position {depth[k]:.3f} mm along the slice normal.")
    median = float(np.median(gaps))
    bad = np.abs(gaps - median) > gap_tolerance * median
    if bad.any():
        k = int(np.argmax(bad))
        raise InputError(
            f"{folder}: uneven slice positions (gap of {gaps[k]:.3f} mm between {depth[k]:.3f} and {depth[k + 1]:.3f} mm, "
            f"typical gap {median:.3f} mm): a slice is missing or the folder mixes acquisitions."
        )
