"""Writers that never leave a half-written output: write under a temporary name, then rename."""

from __future__ import annotations

import os
from pathlib import Path

from monai.data import ITKWriter, NibabelWriter, PILWriter

__all__ = ["AtomicNibabelWriter", "AtomicPILWriter", "AtomicITKWriter", "atomic_writer_for"]


class _AtomicWrite:
    def write(self, filename, verbose: bool = False, **kwargs) -> None:
        path = Path(filename)
        # keep the real extension at the end so the backend picks the same format
        tmp = path.with_name(f".partial-{path.name}")
        try:
            super().write(str(tmp), verbose=verbose, **kwargs)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class AtomicNibabelWriter(_AtomicWrite, NibabelWriter):
    """NIfTI writer with an atomic rename."""


class AtomicPILWriter(_AtomicWrite, PILWriter):
    """PNG/JPEG writer with an atomic rename."""


class AtomicITKWriter(_AtomicWrite, ITKWriter):
    """ITK (NRRD, MHA, ...) writer with an atomic rename."""


def atomic_writer_for(output_ext: str) -> type:
    """The atomic writer class for an output extension such as ``.nii.gz`` or ``.png``."""
    ext = output_ext.lower()
    if ext in (".nii", ".nii.gz"):
        return AtomicNibabelWriter
    if ext in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        return AtomicPILWriter
    if ext in (".nrrd", ".mha", ".mhd", ".nhdr"):
        return AtomicITKWriter
    raise ValueError(f"no writer for output extension {output_ext!r}; use .nii.gz, .png, .nrrd or .mha.")
