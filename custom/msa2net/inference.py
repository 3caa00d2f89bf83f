"""Finding the inputs of a bundle inference run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["list_inputs", "is_dicom_series_dir"]


def is_dicom_series_dir(path: Path) -> bool:
    """A folder holding ``.dcm`` files, or extension-less files starting with the DICOM preamble."""
    if not path.is_dir():
        return False
    for f in path.iterdir():
        if f.is_file() and f.suffix.lower() == ".dcm":
            return True
        if f.is_file() and not f.suffix:
            with open(f, "rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    return True
    return False


def list_inputs(dataset_dir: str | os.PathLike, patterns: Sequence[str] = ("*.nii.gz", "*.nii")) -> list[dict]:
    """Inference datalist ``[{"image": path}, ...]`` for a file, a DICOM series folder, or a folder of either.

    Files matching ``patterns`` and DICOM series sub-folders are listed in sorted order.
    """
    root = Path(dataset_dir)
    if root.is_file() or is_dicom_series_dir(root):
        return [{"image": str(root)}]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder or file not found.")
    files = {p for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    series = {p for p in root.iterdir() if is_dicom_series_dir(p)}
    items = sorted(files | series)
    if not items:
        raise FileNotFoundError(f"{root}: no input images matching {list(patterns)} and no DICOM series folder.")
    return [{"image": str(p)} for p in items]
