"""Batched 2D augmentation for training from random initialisation, one implementation for GPU and CPU.

:class:`SliceAugmentation` transforms a whole batch ``(B, C, H, W)`` at once on its device: every random
choice is drawn for the batch and kept per sample with ``torch.where``, so nothing synchronises with the
host. The same object serves the GPU loader (:class:`msa2net.data.gpu_loader.GPUSliceLoader`) and, through
:class:`RandSliceAugmentd`, the bundle's CPU ``DataLoader`` pipeline, so the settings live in one config key
(``augmentation_params``).

Spatial (image and label move together; labels by nearest neighbour, so they stay whole and aligned):

* rot90 by k in {1, 2, 3} quarter turns (``rot90_prob``), flips along each axis (``flip_prob`` each);
* one affine resampling per sample for rotation by an angle uniform in ``[-rotate_range, rotate_range]``
  radians (``rotate_prob``) and isotropic zoom by a factor uniform in ``scale_range`` (``scale_prob``;
  above 1 enlarges the content), zero padding.

Intensity (image only), in the order of nnU-Net's default pipeline:

* Gaussian noise with standard deviation uniform in ``[0, noise_std]`` (``noise_prob``);
* Gaussian blur with sigma uniform in ``blur_sigma`` pixels (``blur_prob``);
* multiplicative brightness, factor uniform in ``brightness_range`` (``brightness_prob``);
* contrast around the sample mean, factor uniform in ``contrast_range``, clipped to the sample's
  range before the change (``contrast_prob``);
* low-resolution simulation: nearest down-sampling by a factor uniform in ``lowres_range`` and bilinear
  up-sampling back (``lowres_prob``; one factor per batch, applied to the chosen samples);
* gamma uniform in ``gamma_range`` on the sample's intensities mapped to ``[0, 1]`` and mapped back
  (``gamma_prob``).

Reference: F. Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical
image segmentation", Nature Methods 18, 2021 (the default data augmentation, in 2D).
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

__all__ = ["SliceAugmentation", "RandSliceAugmentd"]


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {p}.")


def _check_range(name: str, r: Sequence[float], low: float = 0.0) -> tuple[float, float]:
    if len(r) != 2 or not low <= r[0] <= r[1]:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max, got {r}.")
    return float(r[0]), float(r[1])


@dataclass
class SliceAugmentation:
    """Random spatial and intensity augmentation of a batch of 2D slices (see the module docstring).

    Args:
        rot90_prob, flip_prob: quarter turns (square slices only) and flips along each axis.
        rotate_prob, rotate_range: rotation probability and largest angle in radians (``math.pi``: any).
        scale_prob, scale_range: zoom probability and ``(min, max)`` factor.
        noise_prob, noise_std: additive Gaussian noise and the largest standard deviation.
        blur_prob, blur_sigma: Gaussian blur and the ``(min, max)`` sigma in pixels.
        brightness_prob, brightness_range: multiplicative brightness and its ``(min, max)`` factor.
        contrast_prob, contrast_range: contrast and its ``(min, max)`` factor.
        lowres_prob, lowres_range: low-resolution simulation and the ``(min, max)`` down-sampling factor.
        gamma_prob, gamma_range: gamma and its ``(min, max)``.

    All probabilities default to 0 (no augmentation); the bundle's ``augmentation_params`` sets them.
    """

    rot90_prob: float = 0.0
    flip_prob: float = 0.0
    rotate_prob: float = 0.0
    rotate_range: float = math.pi
    scale_prob: float = 0.0
    scale_range: tuple[float, float] = (0.7, 1.4)
    noise_prob: float = 0.0
    noise_std: float = 0.1
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    brightness_prob: float = 0.0
    brightness_range: tuple[float, float] = (0.75, 1.25)
    contrast_prob: float = 0.0
    contrast_range: tuple[float, float] = (0.75, 1.25)
    lowres_prob: float = 0.0
    lowres_range: tuple[float, float] = (0.5, 1.0)
    gamma_prob: float = 0.0
    gamma_range: tuple[float, float] = (0.7, 1.5)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name.endswith("_prob"):
                _check_prob(name, value)
        self.scale_range = _check_range("scale_range", self.scale_range, low=1e-3)
        self.blur_sigma = _check_range("blur_sigma", self.blur_sigma, low=1e-3)
        self.brightness_range = _check_range("brightness_range", self.brightness_range)
        self.contrast_range = _check_range("contrast_range", self.contrast_range)
        self.lowres_range = _check_range("lowres_range", self.lowres_range, low=1e-3)
        self.gamma_range = _check_range("gamma_range", self.gamma_range, low=1e-3)
        if self.lowres_range[1] > 1.0:
            raise ValueError(f"lowres_range must lie in (0, 1], got {self.lowres_range}.")
        if self.rotate_range < 0 or self.noise_std < 0:
            raise ValueError(f"rotate_range and noise_std must be >= 0, got {self.rotate_range}, {self.noise_std}.")
        self._host_rng = random.Random(0)

    def reseed(self, seed: int) -> None:
        """Seed the host-side draws (the low-resolution factor); device draws follow the caller's generator."""
        self._host_rng.seed(seed)

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment ``image`` ``(B, C, H, W)`` float and ``label`` ``(B, 1, H, W)`` integer (or ``None``).

        Returns both with unchanged shapes and types.
        """
        if image.ndim != 4 or (label is not None and (label.ndim != 4 or label.shape[-2:] != image.shape[-2:])):
            raise ValueError(
                f"expected image (B, C, H, W) and label (B, 1, H, W), got {tuple(image.shape)} and "
                f"{None if label is None else tuple(label.shape)}."
            )
        image, label = self._spatial(image, label, generator)
        return self._intensity(image, generator), label

    @staticmethod
    def _where(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.view(-1, *([1] * (old.ndim - 1))), new, old)

    def _draw(self, prob: float, bsz: int, generator, device) -> torch.Tensor:
        return torch.rand(bsz, generator=generator, device=device) < prob

    def _uniform(self, low: float, high: float, bsz: int, generator, device) -> torch.Tensor:
        return low + (high - low) * torch.rand(bsz, generator=generator, device=device)

    def _spatial(self, image, label, g):
        bsz, dev = image.shape[0], image.device
        if self.rot90_prob > 0:
            if image.shape[-1] != image.shape[-2]:
                raise ValueError(f"rot90 needs square slices, got {tuple(image.shape[-2:])}; set rot90_prob to 0.")
            k = torch.randint(1, 4, (bsz,), generator=g, device=dev)
            k = torch.where(self._draw(self.rot90_prob, bsz, g, dev), k, torch.zeros_like(k))
            img0, lbl0 = image, label
            for q in (1, 2, 3):
                image = self._where(k == q, torch.rot90(img0, q, dims=(-2, -1)), image)
                if label is not None:
                    label = self._where(k == q, torch.rot90(lbl0, q, dims=(-2, -1)), label)
        for axis in (-2, -1):
            if self.flip_prob > 0:
                m = self._draw(self.flip_prob, bsz, g, dev)
                image = self._where(m, image.flip(axis), image)
                label = None if label is None else self._where(m, label.flip(axis), label)
        rot = self._draw(self.rotate_prob, bsz, g, dev) if self.rotate_prob > 0 and self.rotate_range > 0 else None
        zoom = self._draw(self.scale_prob, bsz, g, dev) if self.scale_prob > 0 else None
        if rot is None and zoom is None:
            return image, label
        angle = self._uniform(-self.rotate_range, self.rotate_range, bsz, g, dev)
        angle = angle * rot if rot is not None else torch.zeros_like(angle)
        scale = self._uniform(*self.scale_range, bsz, g, dev)
        scale = torch.where(zoom, scale, torch.ones_like(scale)) if zoom is not None else torch.ones_like(scale)
        h, w = image.shape[-2:]
        cos, sin, zero = torch.cos(angle) / scale, torch.sin(angle) / scale, torch.zeros_like(angle)
        # output -> input mapping in affine_grid's normalised coordinates, aspect-correct in pixels
        theta = torch.stack([torch.stack([cos, -sin * h / w, zero], 1), torch.stack([sin * w / h, cos, zero], 1)], 1)
        grid = F.affine_grid(theta.to(image.dtype), list(image.shape), align_corners=False)
        moved = rot if zoom is None else (zoom if rot is None else rot | zoom)
        image = self._where(moved, F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False), image)
        if label is not None:
            warped = F.grid_sample(label.to(image.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False)
            label = self._where(moved, warped.round().to(label.dtype), label)
        return image, label

    def _intensity(self, image, g):
        bsz, dev = image.shape[0], image.device
        dims = (1, 2, 3)
        if self.noise_prob > 0 and self.noise_std > 0:
            std = self._uniform(0.0, self.noise_std, bsz, g, dev).view(-1, 1, 1, 1)
            noise = torch.randn(image.shape, generator=g, device=dev, dtype=image.dtype) * std
            image = self._where(self._draw(self.noise_prob, bsz, g, dev), image + noise, image)
        if self.blur_prob > 0:
            image = self._where(self._draw(self.blur_prob, bsz, g, dev), self._blur(image, g), image)
        if self.brightness_prob > 0:
            f = self._uniform(*self.brightness_range, bsz, g, dev).view(-1, 1, 1, 1)
            image = self._where(self._draw(self.brightness_prob, bsz, g, dev), image * f, image)
        if self.contrast_prob > 0:
            f = self._uniform(*self.contrast_range, bsz, g, dev).view(-1, 1, 1, 1)
            mean = image.mean(dims, keepdim=True)
            lo, hi = image.amin(dims, keepdim=True), image.amax(dims, keepdim=True)
            changed = torch.minimum(torch.maximum((image - mean) * f + mean, lo), hi)
            image = self._where(self._draw(self.contrast_prob, bsz, g, dev), changed, image)
        if self.lowres_prob > 0:
            h, w = image.shape[-2:]
            # the down-sampled size must be known on the host: drawn there, so a GPU batch never waits
            factor = self._host_rng.uniform(*self.lowres_range)
            small = F.interpolate(image, size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="nearest")
            back = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
            image = self._where(self._draw(self.lowres_prob, bsz, g, dev), back, image)
        if self.gamma_prob > 0:
            gamma = self._uniform(*self.gamma_range, bsz, g, dev).view(-1, 1, 1, 1)
            lo, hi = image.amin(dims, keepdim=True), image.amax(dims, keepdim=True)
            span = (hi - lo).clamp_min(1e-7)
            changed = ((image - lo) / span).clamp(0, 1).pow(gamma) * span + lo
            image = self._where(self._draw(self.gamma_prob, bsz, g, dev), changed, image)
        return image

    def _blur(self, image: torch.Tensor, g) -> torch.Tensor:
        bsz, ch = image.shape[:2]
        sigma = self._uniform(*self.blur_sigma, bsz, g, image.device)
        radius = max(1, math.ceil(3 * self.blur_sigma[1]))
        x = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
        k = torch.exp(-0.5 * (x[None] / sigma[:, None].to(image.dtype)) ** 2)
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # (B*C, K): one kernel per sample
        flat = image.reshape(1, bsz * ch, *image.shape[-2:])
        flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=bsz * ch)
        flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=bsz * ch)
        return flat.reshape(image.shape)


class RandSliceAugmentd(Randomizable, MapTransform):
    """:class:`SliceAugmentation` for one 2D sample of a MONAI dictionary pipeline (the bundle's CPU path).

    Args:
        keys: ``(image_key, label_key)``; the label key may be missing from the data.
        params: keyword arguments of :class:`SliceAugmentation` (the bundle's ``augmentation_params``).

    Shapes: image ``(C, H, W)``, label ``(1, H, W)``; returned with the same shapes and types.
    """

    def __init__(self, keys: KeysCollection, params: Mapping | None = None) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if len(self.keys) != 2:
            raise ValueError(f"keys must be (image_key, label_key), got {self.keys}.")
        self.augmentation = SliceAugmentation(**dict(params or {}))
        self.generator = torch.Generator()

    def randomize(self, data=None) -> None:
        seed = int(self.R.randint(0, 2**31 - 1))
        self.generator.manual_seed(seed)
        self.augmentation.reseed(seed)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize()
        image_key, label_key = self.keys
        image = torch.as_tensor(d[image_key])
        label = d.get(label_key)
        label_t = None if label is None else torch.as_tensor(label)
        out_img, out_lbl = self.augmentation(image[None].float(), None if label_t is None else label_t[None], self.generator)
        d[image_key] = out_img[0].to(image.dtype)
        if label_t is not None:
            d[label_key] = out_lbl[0].to(label_t.dtype)
        return d
