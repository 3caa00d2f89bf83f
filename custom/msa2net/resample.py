"""Exact in-plane resampling of label maps: to the network's grid for training, and back to the input's grid.

A label map resized with torch's legacy ``nearest`` mode lands half a pixel off the image resized
bilinearly (``align_corners=False``), and an argmax taken before resizing back throws away the
sub-pixel information the network computed. Both cost several Dice points on small structures such as
the myocardium. Here:

* :class:`ResizeLabeld` resizes a label map as one-hot channels (bilinear with anti-aliasing, so a
  down-sampled pixel takes the class covering most of it), then argmax: aligned with the image and
  without the staircase of nearest sampling;
* :class:`ResizeImaged` resizes images in-plane, bilinearly, optionally with torch's anti-aliasing
  (the filter widened by the down-sampling factor, as image libraries do): the Gaussian smoothing of
  MONAI's ``Resized(anti_aliasing=True)`` filters the whole volume with a 3D convolution, which takes
  tens of seconds on a 2-core CPU for a 512x512x200 CT, where this takes about one;
* :class:`RestoreLabeld` puts a prediction back to the grid the input had before its in-plane resize:
  class probabilities are resized bilinearly, then the argmax is taken, a chunk of slices at a time so
  that the memory stays bounded for large volumes (a 512x512x600 CT: a few hundred MB, not the GBs of
  a full-volume probability map).

Both work slice by slice along the last array axis for volumes ``(C, H, W, D)`` and on single 2D images
``(C, H, W)``; the through-plane axis is never resampled, as in the bundle's ``Resized`` with
``spatial_size=[h, w, -1]``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.transforms.utils import scale_affine
from monai.utils import TraceKeys

from msa2net.errors import InputError, source_name

__all__ = [
    "ResizeImaged", "ResizeLabeld", "RestoreLabeld", "check_label_classes", "resize_image", "resize_label", "restore_label",
]

_RESIZE_OPS = ("Resize", "Resized", "ResizeImaged")


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def _chunks(depth: int, size: int):
    for start in range(0, depth, size):
        yield start, min(depth, start + size)


def _as_slices(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``(C, H, W, D)`` -> ``(stop - start, C, H, W)``; ``(C, H, W)`` -> ``(1, C, H, W)``."""
    return x[None] if x.ndim == 3 else x[..., start:stop].permute(3, 0, 1, 2)


def _put(out: torch.Tensor, start: int, stop: int, slices: torch.Tensor) -> None:
    """Write ``(n, C, H, W)`` slices into ``out`` ``(C, H, W[, D])``: the inverse of :func:`_as_slices`."""
    if out.ndim == 3:
        out.copy_(slices[0])
    else:
        out[..., start:stop] = slices.permute(1, 2, 3, 0)


def _plane(spatial_size: Sequence[int]) -> list[int]:
    plane = [int(s) for s in list(spatial_size)[:2]]
    if len(plane) != 2 or min(plane) < 1:
        raise ValueError(f"spatial_size must start with two positive sizes (h, w), got {spatial_size}.")
    return plane


def _with_geometry(data: torch.Tensor, ref, new_plane: Sequence[int]) -> torch.Tensor:
    """``data`` as a MetaTensor carrying ``ref``'s metadata with the affine of the resized grid."""
    if not isinstance(ref, MetaTensor):
        return data
    old = list(ref.shape[1:])
    new = list(new_plane) + old[2:]
    pad = [1] * (ref.affine.shape[-1] - 1 - len(old))  # a 2D image keeps MONAI's 4x4 affine
    scale = scale_affine(old + pad, new + pad)
    affine = torch.as_tensor(ref.affine, dtype=torch.float64) @ torch.as_tensor(scale, dtype=torch.float64)
    out = MetaTensor(data, meta=dict(ref.meta))
    out.affine = affine.to(ref.affine.dtype)
    return out


def resize_image(image: torch.Tensor, plane: Sequence[int], anti_aliasing: bool = False, chunk: int = 64) -> torch.Tensor:
    """Resize an image ``(C, H, W[, D])`` in-plane to ``plane`` ``(h, w)``, bilinearly (``align_corners=False``).

    ``anti_aliasing``: widen the interpolation filter when down-sampling (torch's ``antialias``), so
    that structures smaller than the new pixel are averaged rather than skipped. Returns a float
    tensor ``(C, h, w[, D])`` on the image's device, ``chunk`` slices resized at a time.
    """
    if image.ndim not in (3, 4):
        raise ValueError(f"expected an image (C, H, W[, D]), got shape {tuple(image.shape)}.")
    x = _plain(image)
    x = x if x.is_floating_point() else x.float()
    depth = x.shape[-1] if x.ndim == 4 else 1
    out = torch.empty((x.shape[0], *plane, *x.shape[3:]), dtype=x.dtype, device=x.device)
    for start, stop in _chunks(depth, chunk):
        small = F.interpolate(
            _as_slices(x, start, stop), size=tuple(plane), mode="bilinear", align_corners=False, antialias=anti_aliasing
        )
        _put(out, start, stop, small)
    return out


def check_label_classes(label: torch.Tensor, num_classes: int) -> None:
    """Refuse label values that ``num_classes`` (background + the profile's class_names) have no class for.

    Raises:
        InputError: naming the values and the class count (callers prefix the file); one-hot encoding
            would otherwise fail with torch's message, which names neither.
    """
    lbl = _plain(label)
    if lbl.numel() == 0 or float(lbl.max()) < num_classes:
        return
    extra = torch.unique(lbl[lbl >= num_classes]).tolist()
    shown = ", ".join(f"{v:g}" for v in extra[:8]) + (", ..." if len(extra) > 8 else "")
    values = "label value {} does" if len(extra) == 1 else "label values {} do"
    raise InputError(
        f"{values.format(shown)} not exist in this profile, which has {num_classes} classes "
        f"(0 = background, 1..{num_classes - 1} = class_names); remap the labels or use the matching profile."
    )


def resize_label(label: torch.Tensor, plane: Sequence[int], num_classes: int | None = None, chunk: int = 32) -> torch.Tensor:
    """Resize a label map ``(1, H, W[, D])`` of whole numbers to ``plane`` ``(h, w)`` through one-hot channels.

    Returns ``(1, h, w[, D])`` uint8 on the label's device. ``num_classes`` defaults to the largest label + 1.

    Raises:
        InputError: label values outside ``[0, 255]`` or, with ``num_classes``, not below it (the
            message names the values; :class:`ResizeLabeld` prefixes the file).
    """
    if label.ndim not in (3, 4) or label.shape[0] != 1:
        raise ValueError(f"expected a label map (1, H, W[, D]), got shape {tuple(label.shape)}.")
    lbl = _plain(label)
    lbl = (lbl.round() if lbl.is_floating_point() else lbl).long()
    lo, hi = (int(v) for v in torch.aminmax(lbl))
    if lo < 0 or hi > 255:
        raise InputError(f"label values must be whole numbers in [0, 255], found values in [{lo}, {hi}].")
    if num_classes and hi >= num_classes:
        check_label_classes(lbl, num_classes)
    k = int(num_classes or hi + 1)
    depth = lbl.shape[-1] if lbl.ndim == 4 else 1
    out = torch.zeros((1, *plane, *lbl.shape[3:]), dtype=torch.uint8, device=lbl.device)
    for start, stop in _chunks(depth, chunk):
        onehot = F.one_hot(_as_slices(lbl, start, stop)[:, 0], k).permute(0, 3, 1, 2).float()
        small = F.interpolate(onehot, size=tuple(plane), mode="bilinear", align_corners=False, antialias=True)
        _put(out, start, stop, small.argmax(1, keepdim=True).to(torch.uint8))
    return out


def restore_label(pred: torch.Tensor, plane: Sequence[int], softmax: bool = True, chunk: int = 16) -> torch.Tensor:
    """Label map on the ``plane`` ``(H, W)`` grid from network output ``(C, h, w[, D])``.

    ``softmax``: ``pred`` holds logits (``False``: it already holds probabilities). Probabilities are
    resized bilinearly (``align_corners=False``, the convention of the bundle's image resize), then the
    argmax is taken. Returns ``(1, H, W[, D])`` uint8 on ``pred``'s device.
    """
    if pred.ndim not in (3, 4):
        raise ValueError(f"expected a prediction (C, h, w[, D]), got shape {tuple(pred.shape)}.")
    p = _plain(pred)
    depth = p.shape[-1] if p.ndim == 4 else 1
    out = torch.empty((1, *plane, *p.shape[3:]), dtype=torch.uint8, device=p.device)
    for start, stop in _chunks(depth, chunk):
        x = _as_slices(p, start, stop).float()
        x = x.softmax(1) if softmax else x
        if tuple(x.shape[-2:]) != tuple(plane):
            x = F.interpolate(x, size=tuple(plane), mode="bilinear", align_corners=False)
        _put(out, start, stop, x.argmax(1, keepdim=True).to(torch.uint8))
    return out


class ResizeImaged(MapTransform):
    """Dictionary form of :func:`resize_image`: images to the in-plane ``spatial_size`` of the network.

    The output keeps the input's metadata with the affine of the new grid, and its trace records the
    input's size (``orig_size``) as MONAI's ``Resized`` does, which :class:`RestoreLabeld` reads.

    Args:
        keys: image keys.
        spatial_size: ``(h, w)``; a longer sequence (the bundle's ``resize_size``, ``[h, w, -1]``) is cut
            to its first two entries.
        anti_aliasing: widen the filter when down-sampling (see :func:`resize_image`).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int],
        anti_aliasing: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.plane, self.anti_aliasing = _plane(spatial_size), anti_aliasing

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            out = _with_geometry(resize_image(img, self.plane, self.anti_aliasing), img, self.plane)
            if isinstance(out, MetaTensor):
                out.applied_operations = [
                    *img.applied_operations,
                    {TraceKeys.CLASS_NAME: type(self).__name__, TraceKeys.ORIG_SIZE: tuple(img.shape[1:])},
                ]
            d[key] = out
        return d


class ResizeLabeld(MapTransform):
    """Dictionary form of :func:`resize_label`: label maps to the in-plane ``spatial_size`` of the network.

    Args:
        keys: label keys.
        spatial_size: ``(h, w)``; a longer sequence (the bundle's ``resize_size``, ``[h, w, -1]``) is cut
            to its first two entries.
        num_classes: classes of the one-hot encoding (default: largest label + 1 per image); a label
            value not below it raises :class:`InputError` naming the label file.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int],
        num_classes: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.plane, self.num_classes = _plane(spatial_size), num_classes

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                small = resize_label(d[key], self.plane, self.num_classes)
            except InputError as err:
                raise InputError(f"{source_name(d[key], '<in-memory label>')}: {err}") from None
            d[key] = _with_geometry(small, d[key], self.plane)
        return d


class RestoreLabeld(MapTransform):
    """Dictionary form of :func:`restore_label`: the prediction back on the input's grid, with its geometry.

    The input's in-plane size before the resize is read from the reference image's trace of applied
    transforms (the last ``Resize``/``Resized``), as MONAI's ``Invertd`` would, and the output carries
    the reference's metadata with the affine of that grid, so a writer saves it in the input's
    geometry. Without a resize in the trace, the prediction is only argmax-ed.

    Args:
        keys: prediction keys, ``(C, h, w[, D])`` logits (or probabilities with ``softmax=False``).
        ref_key: the preprocessed image whose trace and metadata describe the input grid.
        softmax: apply softmax over the class channel first.
        chunk: slices resized at a time (bounds the memory).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_key: str = "image",
        softmax: bool = True,
        chunk: int = 16,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}.")
        self.ref_key, self.softmax, self.chunk = ref_key, softmax, chunk

    def _input_plane(self, ref) -> list[int] | None:
        for op in reversed(getattr(ref, "applied_operations", None) or []):
            if op.get("class") in _RESIZE_OPS:
                return [int(s) for s in np.asarray(op["orig_size"]).tolist()[:2]]
        return None

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        ref = d[self.ref_key]
        plane = self._input_plane(ref) or list(ref.shape[1:3])
        for key in self.key_iterator(d):
            pred = d[key]
            if tuple(pred.shape[1:3]) != tuple(ref.shape[1:3]) or pred.shape[3:] != ref.shape[3:]:
                raise ValueError(
                    f"prediction of spatial shape {tuple(pred.shape[1:])} does not match its image's "
                    f"{tuple(ref.shape[1:])}."
                )
            label = restore_label(pred, plane, softmax=self.softmax, chunk=self.chunk)
            d[key] = _with_geometry(label, ref, plane)
        return d
