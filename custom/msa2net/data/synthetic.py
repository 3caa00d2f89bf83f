"""Deterministic synthetic segmentation data sets (no download needed).

Two layouts are produced, matching what the real-data loaders of this project read:

* :func:`make_volume_dataset`: 3D NIfTI volumes in the Medical Segmentation Decathlon
  layout (``imagesTr/``, ``labelsTr/``, ``dataset.json``), standing in for multi-organ
  CT/MR data such as Synapse or ACDC;
* :func:`make_rgb_dataset`: 2D RGB PNG frames with binary 0/255 masks in the Kvasir-SEG
  layout (``images/``, ``masks/``, ``dataset.json``).

The data are synthetic, not real patient data: they exist for the no-download demo and the
tests. Every case is drawn from its own generator seeded by ``(seed, case_index)``, so a case
does not change when ``num_cases`` does, and the same arguments always give identical files.

Command line::

    python -m msa2net.data.synthetic volume OUT_DIR --num_cases 8
    python -m msa2net.data.synthetic rgb OUT_DIR
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from numbers import Integral, Real
from typing import NamedTuple

import nibabel as nib
import numpy as np
from PIL import Image

__all__ = ["make_volume_dataset", "make_rgb_dataset", "DESCRIPTION"]

DESCRIPTION = "synthetic, not real patient data"

# Smallest sizes that still leave room for blobs a few voxels wide with a margin around them.
_MIN_PLANE = 16
_MIN_DEPTH = 4

_BACKGROUND_MEAN = 0.1
# Organ k gets the k-th of these evenly spaced means, so a class can be told by its intensity.
_ORGAN_MEAN_RANGE = (0.3, 0.9)
_ORGAN_MEAN_JITTER = 0.03
# Multiplicative bias field amplitude, as in MR coil inhomogeneity.
_BIAS_STRENGTH = 0.15

_MUCOSA_RGB = np.array([0.85, 0.50, 0.52])
_POLYP_RGB = np.array([0.80, 0.38, 0.22])


class _Blob(NamedTuple):
    """In-plane shape of one blob: a rotated ellipse with a low-order wavy boundary."""

    axes: tuple[float, float]
    angle: float
    wobble: float
    lobes: int
    phase: float

    @property
    def bound(self) -> float:
        """Radius of a disc that contains the whole blob."""
        return max(self.axes) * (1.0 + self.wobble)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_split(num_cases, num_validation) -> tuple[int, int]:
    num_cases = _check_int("num_cases", num_cases, 1)
    num_validation = _check_int("num_validation", num_validation, 0)
    if num_validation >= num_cases:
        raise ValueError(
            f"num_validation must be smaller than num_cases so that training is not empty, "
            f"got num_validation={num_validation}, num_cases={num_cases}."
        )
    return num_cases, num_validation


def _as_tuple(value) -> tuple:
    """``value`` as a tuple when it is a non-string iterable (list, tuple, array), else ``()``."""
    if isinstance(value, (str, bytes)):
        return ()
    try:
        return tuple(value)
    except TypeError:
        return ()


def _check_size(name: str, value, minimum: Sequence[int]) -> tuple[int, ...]:
    values = _as_tuple(value)
    if len(values) != len(minimum) or not all(
        not isinstance(v, bool) and isinstance(v, Integral) and v >= m for v, m in zip(values, minimum)
    ):
        raise ValueError(
            f"{name} must be a sequence of {len(minimum)} positive integers, each at least "
            f"{tuple(minimum)}, got {value!r}."
        )
    return tuple(int(v) for v in values)


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], num_waves: int) -> np.ndarray:
    """Sum of random plane waves of at most one cycle across the extent, scaled to [-1, 1]."""
    coords = np.ogrid[tuple(slice(0.0, 1.0, complex(0, n)) for n in shape)]
    field = np.zeros(shape)
    for _ in range(num_waves):
        freq = rng.uniform(-1.0, 1.0, size=len(shape))
        phase = rng.uniform(0.0, 2.0 * math.pi)
        field = field + np.cos(2.0 * math.pi * sum(f * c for f, c in zip(freq, coords)) + phase)
    return field / max(float(np.abs(field).max()), 1e-12)


def _sample_blobs(rng: np.random.Generator, radii: np.ndarray) -> list[_Blob]:
    return [
        _Blob(
            axes=tuple(float(a) for a in r * rng.uniform(0.8, 1.2, size=2)),
            angle=float(rng.uniform(0.0, math.pi)),
            wobble=float(rng.uniform(0.0, 0.1)),
            lobes=int(rng.integers(2, 4)),
            phase=float(rng.uniform(0.0, 2.0 * math.pi)),
        )
        for r in radii
    ]


def _place_blobs(
    rng: np.random.Generator, plane: tuple[int, int], blobs: Sequence[_Blob], tries: int = 200
) -> list[np.ndarray]:
    """Pick in-plane centres keeping each blob inside the plane and, where possible, apart.

    Rejection sampling on bounding discs; when no separated spot is found (many blobs in a
    small plane), the candidate with the least overlap is kept rather than failing.
    """
    gap = 2.0
    centres: list[np.ndarray] = []
    for blob in blobs:
        low = np.full(2, blob.bound + 1.0)
        high = np.maximum(np.array(plane, dtype=float) - 2.0 - blob.bound, low)
        best, best_slack = low, -math.inf
        for _ in range(tries):
            candidate = rng.uniform(low, high)
            # zip stops at the blobs placed so far, which are the first len(centres) ones.
            slack = min(
                (np.linalg.norm(candidate - c) - blob.bound - other.bound - gap for c, other in zip(centres, blobs)),
                default=math.inf,
            )
            if slack > best_slack:
                best, best_slack = candidate, slack
            if slack >= 0.0:
                break
        centres.append(best)
    return centres


def _blob_distance(blob: _Blob, centre: np.ndarray, plane: tuple[int, int]) -> np.ndarray:
    """Normalised distance from ``centre``: below 1 inside the blob, 0 at its centre."""
    dx, dy = np.ogrid[: plane[0], : plane[1]]
    dx = dx - centre[0]
    dy = dy - centre[1]
    cos_a, sin_a = math.cos(blob.angle), math.sin(blob.angle)
    u = (dx * cos_a + dy * sin_a) / blob.axes[0]
    v = (dy * cos_a - dx * sin_a) / blob.axes[1]
    return np.hypot(u, v) / (1.0 + blob.wobble * np.cos(blob.lobes * np.arctan2(v, u) + blob.phase))


def _write_datalist(out_dir: str, header: dict, pairs: list[dict], num_validation: int) -> str:
    num_training = len(pairs) - num_validation
    datalist = {
        **header,
        "numTraining": num_training,
        "numValidation": num_validation,
        "training": pairs[:num_training],
        "validation": pairs[num_training:],
    }
    path = os.path.join(out_dir, "dataset.json")
    with open(path, "w") as f:
        json.dump(datalist, f, indent=1)
    return path


def make_volume_dataset(
    out_dir: str | os.PathLike,
    num_cases: int = 12,
    shape: Sequence[int] = (96, 96, 20),
    num_classes: int = 3,
    num_validation: int = 3,
    spacing: Sequence[float] = (1.5, 1.5, 3.0),
    noise: float = 0.08,
    seed: int = 0,
) -> str:
    """Write a synthetic multi-organ 3D data set in the Medical Segmentation Decathlon layout.

    Each volume holds ``num_classes - 1`` "organs" on a background of mean intensity 0.1.
    An organ is an ellipsoid-like blob (rotated elliptic cross-section with a slightly wavy
    boundary) whose cross-section grows and then shrinks along z, with radius
    ``r(z) = r_max * sqrt(1 - ((z - z_c) / h_z) ** 2)``. Organ ``k`` has mean intensity the
    ``k``-th of ``num_classes - 1`` values evenly spaced in [0.3, 0.9] (plus a small per-case
    jitter) and label ``k``. Organs are placed apart where the plane allows it; where they
    touch, the later organ is drawn over the earlier. A smooth multiplicative bias field of
    +-15 % and Gaussian noise of standard deviation ``noise`` are then applied.

    Files written under ``out_dir``::

        imagesTr/case_000.nii.gz   float32 intensity volume of ``shape``
        labelsTr/case_000.nii.gz   uint8 label map, values 0..num_classes-1
        dataset.json               name, description, modality, labels, numTraining,
                                   numValidation, training / validation lists of
                                   {"image": ..., "label": ...} paths relative to out_dir

    Both files of a case share the affine ``diag(*spacing, 1)`` (RAS+, origin 0). The last
    ``num_validation`` cases form the validation list.

    Args:
        out_dir: Folder to write into; created if missing, existing files are overwritten.
        num_cases: Number of cases, at least 1.
        shape: Volume size ``(x, y, z)`` in voxels; in-plane at least 16, depth at least 4.
        num_classes: Number of classes including background, 2 to 256 (labels are uint8).
        num_validation: Number of cases listed under ``validation``, ``0 <= num_validation < num_cases``.
        spacing: Voxel size ``(x, y, z)`` in mm, all positive.
        noise: Standard deviation of the additive Gaussian noise, non-negative.
        seed: Non-negative seed; the same arguments give identical arrays.

    Returns:
        Path of the written ``dataset.json``.

    Raises:
        ValueError: When an argument is outside the ranges above.
    """
    num_cases, num_validation = _check_split(num_cases, num_validation)
    shape = _check_size("shape", shape, (_MIN_PLANE, _MIN_PLANE, _MIN_DEPTH))
    num_classes = _check_int("num_classes", num_classes, 2)
    if num_classes > 256:
        raise ValueError(f"num_classes must be at most 256 to fit uint8 labels, got {num_classes}.")
    spacing_values = _as_tuple(spacing)
    if len(spacing_values) != 3 or not all(
        isinstance(s, Real) and math.isfinite(s) and s > 0 for s in spacing_values
    ):
        raise ValueError(f"spacing must be a sequence of 3 positive numbers, got {spacing!r}.")
    if not isinstance(noise, Real) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a non-negative number, got {noise!r}.")
    seed = _check_int("seed", seed, 0)

    out_dir = os.fspath(out_dir)
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)

    num_organs = num_classes - 1
    plane = (shape[0], shape[1])
    # Shrink organs as their number grows so that they still fit side by side.
    crowding = min(1.0, math.sqrt(2.0 / num_organs))
    organ_means = np.linspace(*_ORGAN_MEAN_RANGE, num_organs)
    affine = np.diag([float(s) for s in spacing_values] + [1.0])
    z = np.arange(shape[2])
    pairs = []
    for case in range(num_cases):
        rng = np.random.default_rng((seed, case))
        blobs = _sample_blobs(rng, min(plane) * crowding * rng.uniform(0.10, 0.16, size=num_organs))
        centres = _place_blobs(rng, plane, blobs)
        means = organ_means + rng.uniform(-_ORGAN_MEAN_JITTER, _ORGAN_MEAN_JITTER, size=num_organs)

        image = np.full(shape, _BACKGROUND_MEAN, dtype=np.float32)
        label = np.zeros(shape, dtype=np.uint8)
        for k, (blob, centre, mean) in enumerate(zip(blobs, centres, means), start=1):
            half_height = (shape[2] - 1) * rng.uniform(0.30, 0.45)
            z_centre = rng.uniform(half_height, shape[2] - 1 - half_height)
            scale = np.sqrt(np.clip(1.0 - ((z - z_centre) / half_height) ** 2, 0.0, None))
            # Strict "<" keeps slices with zero scale empty, so each organ ends inside the volume.
            inside = _blob_distance(blob, centre, plane)[:, :, None] < scale
            image[inside] = mean
            label[inside] = k
        image *= (1.0 + _BIAS_STRENGTH * _smooth_field(rng, shape, num_waves=4)).astype(np.float32)
        image += np.float32(noise) * rng.standard_normal(shape, dtype=np.float32)

        name = f"case_{case:03d}.nii.gz"
        pair = {"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"}
        for key, array in (("image", image), ("label", label)):
            nifti = nib.Nifti1Image(array, affine)
            # Set both forms with the same code so that nibabel and ITK readers agree on geometry.
            nifti.set_qform(affine, code=1)
            nifti.set_sform(affine, code=1)
            nifti.header.set_xyzt_units("mm")
            nib.save(nifti, os.path.join(out_dir, pair[key]))
        pairs.append(pair)

    header = {
        "name": "SyntheticOrgans",
        "description": DESCRIPTION,
        "modality": {"0": "synthetic-MR"},
        "labels": {"0": "background", **{str(k): f"organ_{k}" for k in range(1, num_classes)}},
    }
    return _write_datalist(out_dir, header, pairs, num_validation)


def make_rgb_dataset(
    out_dir: str | os.PathLike,
    num_cases: int = 12,
    size: Sequence[int] = (128, 128),
    num_validation: int = 3,
    seed: int = 0,
) -> str:
    """Write a synthetic 2D polyp data set in the Kvasir-SEG layout.

    Each frame is a pinkish "mucosa" with low-frequency shading, fine grain and darker
    corners (as under an endoscope's light), carrying one to three blob "polyps" of an
    orange-red hue, each either darker or lighter than the mucosa and brighter towards its
    apex.

    Files written under ``out_dir``::

        images/case_000.png   uint8 RGB, ``size[0]`` rows by ``size[1]`` columns
        masks/case_000.png    uint8 single channel, 0 background / 255 polyp
        dataset.json          name, description, labels {"0": "background", "1": "polyp"},
                              numTraining, numValidation, training / validation lists of
                              {"image": ..., "label": ...} paths relative to out_dir

    The last ``num_validation`` cases form the validation list.

    Args:
        out_dir: Folder to write into; created if missing, existing files are overwritten.
        num_cases: Number of cases, at least 1.
        size: Image size ``(height, width)`` in pixels, each at least 16.
        num_validation: Number of cases listed under ``validation``, ``0 <= num_validation < num_cases``.
        seed: Non-negative seed; the same arguments give identical images.

    Returns:
        Path of the written ``dataset.json``.

    Raises:
        ValueError: When an argument is outside the ranges above.
    """
    num_cases, num_validation = _check_split(num_cases, num_validation)
    plane = _check_size("size", size, (_MIN_PLANE, _MIN_PLANE))
    seed = _check_int("seed", seed, 0)

    out_dir = os.fspath(out_dir)
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)

    rows, cols = np.ogrid[-1.0 : 1.0 : complex(0, plane[0]), -1.0 : 1.0 : complex(0, plane[1])]
    vignette = 1.0 - 0.175 * (rows**2 + cols**2)
    pairs = []
    for case in range(num_cases):
        rng = np.random.default_rng((seed, case))
        # Brightness varies more than hue between frames, so the mucosa stays pink.
        mucosa = _MUCOSA_RGB * rng.uniform(0.9, 1.05) + rng.uniform(-0.02, 0.02, size=3)
        shading = (1.0 + 0.12 * _smooth_field(rng, plane, num_waves=6)) * vignette
        image = mucosa * shading[..., None]

        num_polyps = int(rng.integers(1, 4))
        blobs = _sample_blobs(rng, min(plane) * rng.uniform(0.08, 0.18, size=num_polyps))
        mask = np.zeros(plane, dtype=bool)
        for blob, centre in zip(blobs, _place_blobs(rng, plane, blobs)):
            distance = _blob_distance(blob, centre, plane)
            inside = distance < 1.0
            tone = rng.choice([0.75, 1.15])
            dome = 0.85 + 0.25 * (1.0 - distance**2)
            image[inside] = (_POLYP_RGB * tone)[None, :] * (dome * vignette)[inside][:, None]
            mask |= inside
        image += 0.03 * rng.standard_normal(image.shape)
        image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)

        name = f"case_{case:03d}.png"
        pair = {"image": f"images/{name}", "label": f"masks/{name}"}
        Image.fromarray(image).save(os.path.join(out_dir, pair["image"]))
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(os.path.join(out_dir, pair["label"]))
        pairs.append(pair)

    header = {
        "name": "SyntheticPolyps",
        "description": DESCRIPTION,
        "labels": {"0": "background", "1": "polyp"},
    }
    return _write_datalist(out_dir, header, pairs, num_validation)


if __name__ == "__main__":
    import fire

    fire.Fire({"volume": make_volume_dataset, "rgb": make_rgb_dataset})
