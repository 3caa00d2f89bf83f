"""Input checks that turn malformed images into one clear error naming the file."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from msa2net.errors import InputError, source_name
from msa2net.resample import check_label_classes

__all__ = ["InputError", "ValidateImaged", "ValidateLabelClassesd"]


def _source(x) -> str:
    return source_name(x, "<in-memory image>")


class ValidateImaged(MapTransform):
    """Refuse images that would give a wrong or meaningless segmentation.

    Checks, after loading and ``EnsureChannelFirstd``: the number of spatial dimensions, the
    channel count, finite intensities, a usable geometry (finite, non-singular affine with
    spacing in ``(0, max_spacing]`` mm) and, when ``label_key`` is present, a label with the
    image's spatial shape whose values are whole numbers in ``[0, 255]`` (the bundle stores
    labels as uint8, which would wrap -1 to 255 and 256 to 0 without a word). Raises
    :class:`InputError` ``"<file>: <problem>"``.

    Args:
        keys: the image key.
        spatial_dims: 3 for volumes, 2 for images.
        channels: expected channels.
        label_key: optional label key to compare shapes with.
        max_spacing: largest plausible voxel spacing in mm.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int = 3,
        channels: int = 1,
        label_key: str | None = "label",
        max_spacing: float = 1000.0,
    ) -> None:
        super().__init__(keys)
        self.spatial_dims, self.channels = spatial_dims, channels
        self.label_key, self.max_spacing = label_key, max_spacing

    @staticmethod
    def _check_nifti_header(src: str, affine) -> None:
        """MONAI's NIfTI reader replaces a singular header affine by the identity: check the file's own affine."""
        header_affine = nib.load(src).affine
        if not np.isfinite(header_affine).all() or abs(np.linalg.det(header_affine[:3, :3])) < 1e-12:
            raise InputError(f"{src}: the header's affine is singular or not finite.")
        if affine is not None and not np.allclose(np.asarray(affine, dtype=float), header_affine, atol=1e-4):
            raise InputError(f"{src}: the affine read ({np.asarray(affine).tolist()}) differs from the header's.")

    @staticmethod
    def _check_label_values(label) -> None:
        """Refuse label values that are not whole numbers in ``[0, 255]``: one min/max pass, and for floats a rounding pass."""
        src = _source(label)
        values = label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)
        if values.numel() == 0:
            raise InputError(f"{src}: empty label map of shape {tuple(values.shape)}.")
        lo, hi = (float(v) for v in torch.aminmax(values))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise InputError(f"{src}: label values must be whole numbers in [0, 255], found NaN or infinite values.")
        if lo < 0 or hi > 255:
            outside = torch.unique(values[(values < 0) | (values > 255)])
            shown = ", ".join(f"{v:g}" for v in outside[:5].tolist()) + (", ..." if len(outside) > 5 else "")
            raise InputError(
                f"{src}: label values must be whole numbers in [0, 255] (class indices), found values in "
                f"[{lo:g}, {hi:g}] ({shown} outside)."
            )
        if values.is_floating_point():
            # contiguous chunks bound the temporary of frac() for large volumes and keep the pass fast
            for chunk in values.reshape(-1).split(1 << 22):
                if chunk.frac().count_nonzero():
                    fractional = chunk[chunk.frac() != 0]
                    raise InputError(
                        f"{src}: label values must be whole numbers (class indices), found {float(fractional[0]):g}; "
                        "is this an intensity image rather than a label map?"
                    )

    def _check(self, img, label) -> None:
        src = _source(img)
        if Path(src).is_dir():
            from msa2net.dicom import check_dicom_series

            check_dicom_series(src)
        kind = "volume" if self.spatial_dims == 3 else "2D image"
        shape = tuple(img.shape)
        if len(shape) - 1 != self.spatial_dims:
            found = f"{len(shape) - 1}D" if len(shape) - 1 in (2, 3) else f"{len(shape) - 1}-dimensional"
            raise InputError(f"{src}: expected a {kind}, got a {found} image of shape {shape[1:]} with {shape[0]} channel(s).")
        if shape[0] != self.channels:
            raise InputError(
                f"{src}: expected {self.channels} channel(s), got {shape[0]} (a 4D or multi-channel image? "
                f"spatial shape {shape[1:]})."
            )
        if min(shape[1:]) < 1:
            raise InputError(f"{src}: empty image of shape {shape[1:]}.")
        values = torch.as_tensor(img)
        # one float64 sum carries any NaN or infinity (a whole-volume isfinite mask costs ten times more)
        if values.is_floating_point() and not torch.isfinite(values.sum(dtype=torch.float64)):
            bad = int((~torch.isfinite(values)).sum())
            raise InputError(f"{src}: {bad} voxel(s) are NaN or infinite.")
        pixdim = np.asarray((getattr(img, "meta", {}) or {}).get("pixdim", []), dtype=float).ravel()
        if pixdim.size > self.spatial_dims and (pixdim[1 : 1 + self.spatial_dims] <= 0).any():
            raise InputError(f"{src}: the header's voxel spacing {pixdim[1 : 1 + self.spatial_dims].tolist()} has zero or negative entries.")
        if self.spatial_dims == 3 and src.endswith((".nii", ".nii.gz")):
            self._check_nifti_header(src, getattr(img, "affine", None))
        affine = getattr(img, "affine", None)
        if affine is not None and self.spatial_dims == 3:
            a = np.asarray(affine, dtype=float)
            spacing = np.linalg.norm(a[:3, :3], axis=0)
            if not np.isfinite(a).all() or abs(np.linalg.det(a[:3, :3])) < 1e-12:
                raise InputError(f"{src}: the image geometry (affine) is singular or not finite.")
            if (spacing <= 0).any() or (spacing > self.max_spacing).any():
                raise InputError(f"{src}: implausible voxel spacing {np.round(spacing, 6).tolist()} mm.")
        if label is not None and tuple(label.shape[1:]) != shape[1:]:
            raise InputError(
                f"{_source(label)}: label shape {tuple(label.shape[1:])} differs from its image's shape {shape[1:]} ({src})."
            )
        if label is not None:
            self._check_label_values(label)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        label = d.get(self.label_key) if self.label_key else None
        for key in self.key_iterator(d):
            self._check(d[key], label)
        return d


class ValidateLabelClassesd(MapTransform):
    """Refuse label values the profile has no class for, naming the label file.

    Training finds them in :class:`msa2net.resample.ResizeLabeld`; pipelines that keep labels on
    their own grid (validation, ``evaluate.json``) need this check after the profile's
    ``label_transforms`` (which may remap values, e.g. 0/255 masks to 0/1), before one-hot encoding.

    Args:
        keys: label keys.
        num_classes: background + the profile's class_names.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, num_classes: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = int(num_classes)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                check_label_classes(d[key], self.num_classes)
            except InputError as err:
                raise InputError(f"{_source(d[key])}: {err}") from None
        return d
