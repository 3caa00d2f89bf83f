"""Turn public dataset layouts into the bundle's datalist.

The datalist is a JSON file in the Medical Segmentation Decathlon style::

    {"name": ..., "labels": {"0": "background", ...},
     "training": [{"image": rel_path, "label": rel_path}, ...],
     "validation": [...], "test": [...]}

Every path in it is relative to the dataset root, so it can be read with
``monai.data.load_decathlon_datalist(path, base_dir=root)`` (``base_dir`` may be left out
when the datalist sits in the root, which is the default).

Supported layouts (one ``prepare_*`` function each, :func:`prepare_datalist` dispatches):

==============  =========================================================================
``acdc``        ACDC release: ``training/patientXXX/patientXXX_frameYY[_gt].nii.gz``
                (``testing/`` becomes the test list), or flat ``patientXXX/`` folders
``acdc_msd``    ACDC in MSD form: ``imagesTr/patientXXX_frameYY.nii.gz`` + ``labelsTr/``
``synapse_raw`` BTCV raw data: ``img/img0001.nii.gz`` + ``label/label0001.nii.gz``
``synapse_npz`` TransUNet preprocessed Synapse: ``train_npz/`` + ``test_vol_h5/``
``kvasir``      Kvasir-SEG: ``images/`` + ``masks/`` with the same file stems
``isic``        ISIC 2017/2018: ``ISIC_XXXXXXX.jpg`` + ``ISIC_XXXXXXX_segmentation.png``
``msd``         any MSD ``dataset.json``
==============  =========================================================================

Splits are by patient where a patient has several images (ACDC), seeded and
deterministic, unless the layout defines its own split (Synapse, an MSD ``validation`` list).

Command line::

    python -m msa2net.data.prepare LAYOUT ROOT [--out OUT_JSON] [--val_fraction 0.125] [--seed 0]
    python -m msa2net.data.prepare auto ROOT

A bad dataset makes the command print ``error: <message>`` on stderr and exit with status 2.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from numbers import Real
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from PIL import Image

__all__ = [
    "ACDC_LABELS",
    "BTCV_LABELS",
    "BTCV_TO_SYNAPSE8",
    "DEFAULT_VAL_FRACTION",
    "LAYOUTS",
    "SYNAPSE8_LABELS",
    "SYNAPSE_TEST_CASES",
    "SYNAPSE_TRAIN_CASES",
    "DatasetLayoutError",
    "detect_layout",
    "main",
    "prepare_acdc",
    "prepare_acdc_msd",
    "prepare_datalist",
    "prepare_isic",
    "prepare_kvasir",
    "prepare_msd",
    "prepare_synapse_npz",
    "prepare_synapse_raw",
    "remap_btcv_to_synapse8",
    "split_by_group",
    "write_datalist",
]

DEFAULT_VAL_FRACTION = 0.125

ACDC_LABELS = {"0": "background", "1": "right_ventricle", "2": "myocardium", "3": "left_ventricle"}
BTCV_LABELS = {
    "0": "background",
    "1": "spleen",
    "2": "right_kidney",
    "3": "left_kidney",
    "4": "gallbladder",
    "5": "esophagus",
    "6": "liver",
    "7": "stomach",
    "8": "aorta",
    "9": "inferior_vena_cava",
    "10": "portal_and_splenic_vein",
    "11": "pancreas",
    "12": "right_adrenal_gland",
    "13": "left_adrenal_gland",
}
SYNAPSE8_LABELS = {
    "0": "background",
    "1": "aorta",
    "2": "gallbladder",
    "3": "left_kidney",
    "4": "right_kidney",
    "5": "liver",
    "6": "pancreas",
    "7": "spleen",
    "8": "stomach",
}
# BTCV organ id -> Synapse 8-organ id (TransUNet protocol); unlisted BTCV ids become background.
BTCV_TO_SYNAPSE8 = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}
# The TransUNet split of the 30 labelled BTCV cases, used by every Synapse benchmark.
SYNAPSE_TEST_CASES = (
    "0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032", "0035", "0036", "0038",
)  # fmt: skip
SYNAPSE_TRAIN_CASES = (
    "0005", "0006", "0007", "0009", "0010", "0021", "0023", "0024", "0026",
    "0027", "0028", "0030", "0031", "0033", "0034", "0037", "0039", "0040",
)  # fmt: skip

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_ACDC_FRAME = re.compile(r"^(patient\d{3})_frame\d{2}\.nii(\.gz)?$")
_ACDC_PATIENT = re.compile(r"^patient\d{3}$")
_BTCV_IMAGE = re.compile(r"^img(\d{4})\.nii(\.gz)?$")
_NPZ_SLICE = re.compile(r"^(case\d{4})_slice(\d+)\.npz$")
_H5_VOLUME = re.compile(r"^(case\d{4})\.npy\.h5$")
_ISIC_IMAGE = re.compile(r"^ISIC_\d+$")


class DatasetLayoutError(ValueError):
    """A dataset file does not fit its layout; the one-line message names the file.

    Args:
        path: The offending file or folder.
        problem: What is wrong with it; whitespace runs (newlines included) are collapsed.
    """

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = os.fspath(path)
        super().__init__(_one_line(f"{self.path}: {problem}"))


class _Case(NamedTuple):
    """One image/label pair; ``group`` is the unit a split never divides (the patient)."""

    case_id: str
    group: str
    image: Path
    label: Path | None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _stem(path: Path) -> str:
    """File name without its (possibly double) image suffix."""
    name = path.name
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _files(folder: Path) -> list[Path]:
    # Hidden files are skipped because archives unpacked on macOS leave "._name" copies.
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _require_dir(folder: Path) -> Path:
    if not folder.is_dir():
        raise DatasetLayoutError(folder, "folder not found")
    return folder


def _require_label(image: Path, label: Path) -> Path:
    if not label.is_file():
        raise DatasetLayoutError(image, f"missing label (expected {label})")
    return label


def _require_cases(cases: Sequence, folder: Path, what: str) -> None:
    if not cases:
        raise DatasetLayoutError(folder, f"no cases found (expected {what})")


def _relative(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _check_fraction(val_fraction) -> float:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, Real) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}.")
    return float(val_fraction)


# ----------------------------------------------------------------------------- validation


def _spatial_shape(path: Path) -> tuple[int, ...]:
    """Array shape from the file header only (NIfTI) or the image size (PIL), as rows first.

    Trailing singleton axes beyond the second are dropped so that ``H x W x 1`` matches ``H x W``.
    """
    try:
        if path.name.endswith(_NIFTI_SUFFIXES):
            shape = tuple(int(s) for s in nib.load(path).shape)
        else:
            with Image.open(path) as img:
                shape = (img.height, img.width)
    except Exception as exc:  # each reader raises its own exception types on corrupt files
        raise DatasetLayoutError(path, f"unreadable file ({type(exc).__name__}: {exc})") from exc
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _check_shapes(case: _Case) -> None:
    """The label must match the image's leading axes (images may carry extra channel axes)."""
    image_shape = _spatial_shape(case.image)
    if case.label is None:
        return
    label_shape = _spatial_shape(case.label)
    if image_shape[: len(label_shape)] != label_shape:
        raise DatasetLayoutError(
            case.label, f"label shape {label_shape} differs from image shape {image_shape} of {case.image}"
        )


def _check_unique(cases: Iterable[_Case]) -> None:
    seen: dict[str, _Case] = {}
    for case in cases:
        if case.case_id in seen:
            raise DatasetLayoutError(
                case.image, f"duplicate case id {case.case_id!r} (also {seen[case.case_id].image})"
            )
        seen[case.case_id] = case


def _validate(*splits: Sequence[_Case]) -> None:
    """Check ids across all splits first: a case in two splits would leak into evaluation."""
    _check_unique(case for split in splits for case in split)
    for split in splits:
        for case in split:
            _check_shapes(case)


# ----------------------------------------------------------------------------- splitting


def split_by_group(groups: Sequence[str], val_fraction: float, seed: int = 0) -> set[str]:
    """Choose the validation groups (patients) for a seeded, deterministic split.

    Args:
        groups: Group id of every case; repeats are fine, each group is drawn once.
        val_fraction: Fraction of groups for validation, in ``[0, 1)``. A positive fraction gives at least
            one validation group, and at least one group is always kept for training.
        seed: Seed of the permutation; the result depends only on the set of groups and the seed.

    Returns:
        Groups assigned to validation.
    """
    val_fraction = _check_fraction(val_fraction)
    unique = sorted(set(groups))
    num_val = int(round(val_fraction * len(unique)))
    num_val = min(max(num_val, 1 if val_fraction > 0 else 0), len(unique) - 1)
    # RandomState, not Generator: numpy guarantees its stream stays the same across versions.
    order = np.random.RandomState(seed).permutation(len(unique))
    return {unique[i] for i in order[:num_val]}


def _split(cases: Sequence[_Case], val_fraction: float, seed: int) -> tuple[list[_Case], list[_Case]]:
    val_groups = split_by_group([c.group for c in cases], val_fraction, seed)
    return [c for c in cases if c.group not in val_groups], [c for c in cases if c.group in val_groups]


def _entry(case: _Case, root: Path) -> dict[str, str]:
    entry = {"image": _relative(case.image, root)}
    if case.label is not None:
        entry["label"] = _relative(case.label, root)
    return entry


def _datalist(
    name: str,
    labels: dict[str, str],
    root: Path,
    training: Sequence[_Case],
    validation: Sequence[_Case],
    test: Sequence[_Case] = (),
) -> dict:
    datalist = {"name": name, "labels": dict(labels)}
    for key, cases in (("training", training), ("validation", validation), ("test", test)):
        datalist[key] = [_entry(c, root) for c in sorted(cases, key=lambda c: c.case_id)]
    return datalist


# ----------------------------------------------------------------------------- ACDC


def _acdc_patient_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _ACDC_PATIENT.match(p.name))


def _acdc_cases(patient_dirs: Iterable[Path]) -> list[_Case]:
    """Frame images and their ``_gt`` labels; the 4D cine and ``Info.cfg`` do not match."""
    cases = []
    for patient_dir in patient_dirs:
        for image in _files(patient_dir):
            match = _ACDC_FRAME.match(image.name)
            if match:
                stem = _stem(image)
                label = image.with_name(f"{stem}_gt{image.name[len(stem):]}")
                cases.append(_Case(stem, match.group(1), image, _require_label(image, label)))
    return cases


def prepare_acdc(root: str | os.PathLike, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0) -> dict:
    """Datalist for ACDC as released by the challenge.

    ``ROOT/training/patientXXX/patientXXX_frameYY.nii.gz`` with ``patientXXX_frameYY_gt.nii.gz``
    is split into training and validation by patient; ``ROOT/testing/patientXXX`` (if present)
    becomes the test list. Patient folders directly under ``ROOT`` are read as training data.

    Args:
        root: Dataset root.
        val_fraction: Fraction of training patients held out for validation.
        seed: Seed of the patient split.

    Returns:
        The datalist, paths relative to ``root``.
    """
    root = Path(root)
    train_dir = root / "training" if (root / "training").is_dir() else _require_dir(root)
    test_dir = root / "testing"
    cases = _acdc_cases(_acdc_patient_dirs(train_dir))
    test = _acdc_cases(_acdc_patient_dirs(test_dir)) if test_dir.is_dir() else []
    _require_cases(cases, train_dir, "patientXXX/patientXXX_frameYY.nii.gz")
    _validate(cases, test)
    training, validation = _split(cases, val_fraction, seed)
    return _datalist("ACDC", ACDC_LABELS, root, training, validation, test)


def _msd_folder_cases(images: Path, labels: Path, group: Callable[[Path], str]) -> list[_Case]:
    return [
        _Case(_stem(image), group(image), image, _require_label(image, labels / image.name))
        for image in _files(images)
        if image.name.endswith(_NIFTI_SUFFIXES)
    ]


def _acdc_patient(image: Path) -> str:
    match = _ACDC_FRAME.match(image.name)
    if not match:
        raise DatasetLayoutError(image, "file name is not patientXXX_frameYY.nii.gz, cannot tell the patient")
    return match.group(1)


def prepare_acdc_msd(
    root: str | os.PathLike, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0
) -> dict:
    """Datalist for ACDC already in MSD form, re-split by the patient id in the file names.

    ``ROOT/imagesTr/patientXXX_frameYY.nii.gz`` with the same name under ``labelsTr/``;
    ``imagesTs/`` (with ``labelsTs/`` if present) becomes the test list. An existing
    ``dataset.json`` is not read: its split may put frames of one patient on both sides.

    Args:
        root: Dataset root.
        val_fraction: Fraction of training patients held out for validation.
        seed: Seed of the patient split.

    Returns:
        The datalist, paths relative to ``root``.
    """
    root = Path(root)
    cases = _msd_folder_cases(_require_dir(root / "imagesTr"), root / "labelsTr", _acdc_patient)
    _require_cases(cases, root / "imagesTr", "patientXXX_frameYY.nii.gz")
    test = []
    if (root / "imagesTs").is_dir():
        test = [
            _Case(_stem(image), _acdc_patient(image), image, None)
            for image in _files(root / "imagesTs")
            if image.name.endswith(_NIFTI_SUFFIXES)
        ]
        if (root / "labelsTs").is_dir():
            test = [c._replace(label=_require_label(c.image, root / "labelsTs" / c.image.name)) for c in test]
    _validate(cases, test)
    training, validation = _split(cases, val_fraction, seed)
    return _datalist("ACDC", ACDC_LABELS, root, training, validation, test)


# ----------------------------------------------------------------------------- Synapse


def remap_btcv_to_synapse8(label: np.ndarray) -> np.ndarray:
    """Map BTCV organ ids (1..13) to the 8 Synapse classes, everything else to background.

    Args:
        label: BTCV label map of any shape.

    Returns:
        ``uint8`` label map of the same shape with values 0..8 (see ``SYNAPSE8_LABELS``).
    """
    out = np.zeros(label.shape, dtype=np.uint8)
    for btcv_id, synapse_id in BTCV_TO_SYNAPSE8.items():
        out[label == btcv_id] = synapse_id
    return out


def _write_remapped(label: Path, out_path: Path) -> Path:
    """Remapped copy of a BTCV label volume with the original header geometry."""
    try:
        img = nib.load(label)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # each reader raises its own exception types on corrupt files
        raise DatasetLayoutError(label, f"unreadable file ({type(exc).__name__}: {exc})") from exc
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    nib.save(nib.Nifti1Image(remap_btcv_to_synapse8(data), img.affine, header), out_path)
    return out_path


def _synapse_split(
    training: list[_Case], test: list[_Case], val_fraction: float | None, seed: int
) -> tuple[list[_Case], list[_Case]]:
    """Validate on the test cases, as the published Synapse results do, unless asked otherwise."""
    if val_fraction is None:
        return training, test
    return _split(training, val_fraction, seed)


def prepare_synapse_raw(
    root: str | os.PathLike,
    val_fraction: float | None = None,
    seed: int = 0,
    remap_synapse8: bool = False,
    output_dir: str | os.PathLike | None = None,
) -> dict:
    """Datalist for the raw BTCV volumes with the standard TransUNet Synapse split.

    ``ROOT/img/img0001.nii.gz`` with ``ROOT/label/label0001.nii.gz``; the 18 cases of
    ``SYNAPSE_TRAIN_CASES`` are for training, the 12 of ``SYNAPSE_TEST_CASES`` are the test list
    and, unless ``val_fraction`` is given, also the validation list.

    Args:
        root: Dataset root.
        val_fraction: If given, the fraction of the 18 training cases held out for validation.
        seed: Seed of that split.
        remap_synapse8: Write ``uint8`` label volumes remapped to the 8 Synapse organs (same affine and header
            geometry) into ``output_dir`` and point the datalist at them. Otherwise the BTCV labels
            (13 organs) are listed as they are.
        output_dir: Folder of the remapped labels, ``ROOT/label_synapse8`` by default.

    Returns:
        The datalist, paths relative to ``root``.
    """
    root = Path(root)
    if val_fraction is not None:
        _check_fraction(val_fraction)  # fail before writing remapped labels, not after
    cases = []
    for image in _files(_require_dir(root / "img")):
        match = _BTCV_IMAGE.match(image.name)
        if match:
            label = root / "label" / image.name.replace("img", "label", 1)
            cases.append(_Case(match.group(1), match.group(1), image, _require_label(image, label)))
    _require_cases(cases, root / "img", "img0001.nii.gz")
    _check_unique(cases)
    by_id = {c.case_id: c for c in cases}
    standard = set(SYNAPSE_TRAIN_CASES + SYNAPSE_TEST_CASES)
    for case in cases:
        if case.case_id not in standard:
            raise DatasetLayoutError(case.image, "case is not one of the 30 of the standard Synapse split")
    missing = sorted(standard - set(by_id))
    if missing:
        raise DatasetLayoutError(root / "img", f"missing standard Synapse cases {', '.join(missing)}")
    training = [by_id[i] for i in SYNAPSE_TRAIN_CASES]
    test = [by_id[i] for i in SYNAPSE_TEST_CASES]
    _validate(training, test)
    labels = BTCV_LABELS
    if remap_synapse8:
        out_dir = Path(output_dir) if output_dir is not None else root / "label_synapse8"
        out_dir.mkdir(parents=True, exist_ok=True)
        training, test = (
            [c._replace(label=_write_remapped(c.label, out_dir / c.label.name)) for c in split]
            for split in (training, test)
        )
        labels = SYNAPSE8_LABELS
    training, validation = _synapse_split(training, test, val_fraction, seed)
    return _datalist("Synapse", labels, root, training, validation, test)


def _load_arrays(path: Path, reader: Callable) -> tuple[np.ndarray, np.ndarray]:
    """``image`` and ``label`` arrays of one npz/h5 file; the label is checked to be 0..255."""
    try:
        with reader(path) as f:
            image, label = np.asarray(f["image"], dtype=np.float32), np.asarray(f["label"])
    except Exception as exc:  # each reader raises its own exception types on corrupt files
        raise DatasetLayoutError(path, f"unreadable file ({type(exc).__name__}: {exc})") from exc
    if image.shape != label.shape:
        raise DatasetLayoutError(path, f"label shape {label.shape} differs from image shape {image.shape}")
    if label.size and (label.min() < 0 or label.max() > 255 or not np.array_equal(label, np.round(label))):
        raise DatasetLayoutError(path, "label values are not integers in 0..255")
    return image, label.astype(np.uint8)


def _save_pair(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path) -> tuple[Path, Path]:
    # The npz/h5 files carry no geometry, so the identity affine is the only honest one.
    for array, path in ((image, image_path), (label, label_path)):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return image_path, label_path


def _npz_training_cases(train_dir: Path, out_dir: Path) -> list[_Case]:
    """Stack the slices of each case in slice order into an ``H x W x D`` volume."""
    slices: dict[str, dict[int, Path]] = {}
    for path in _files(train_dir):
        match = _NPZ_SLICE.match(path.name)
        if match:
            case_slices = slices.setdefault(match.group(1), {})
            index = int(match.group(2))
            if index in case_slices:
                raise DatasetLayoutError(path, f"duplicate slice {index} (also {case_slices[index]})")
            case_slices[index] = path
    cases = []
    for case_id, case_slices in sorted(slices.items()):
        paths = [case_slices[i] for i in sorted(case_slices)]
        arrays = [_load_arrays(p, np.load) for p in paths]
        for path, (image, _) in zip(paths, arrays):
            if image.shape != arrays[0][0].shape:
                raise DatasetLayoutError(
                    path, f"slice shape {image.shape} differs from {arrays[0][0].shape} of {paths[0]}"
                )
        image_path, label_path = _save_pair(
            np.stack([a[0] for a in arrays], axis=-1),
            np.stack([a[1] for a in arrays], axis=-1),
            out_dir / "imagesTr" / f"{case_id}.nii.gz",
            out_dir / "labelsTr" / f"{case_id}.nii.gz",
        )
        cases.append(_Case(case_id, case_id, image_path, label_path))
    return cases


def _h5_test_cases(test_dir: Path, out_dir: Path) -> list[_Case]:
    """Transpose each ``D x H x W`` test volume to ``H x W x D``, the layout of the training volumes."""
    try:
        import h5py  # imported here because only this layout needs it
    except ImportError as exc:
        raise ImportError("the synapse_npz layout needs h5py to read test_vol_h5 (pip install h5py)") from exc
    cases = []
    for path in _files(test_dir):
        match = _H5_VOLUME.match(path.name)
        if match:
            image, label = _load_arrays(path, lambda p: h5py.File(p, "r"))
            if image.ndim != 3:
                raise DatasetLayoutError(path, f"expected a D x H x W volume, got shape {image.shape}")
            case_id = match.group(1)
            image_path, label_path = _save_pair(
                image.transpose(1, 2, 0),
                label.transpose(1, 2, 0),
                out_dir / "imagesTs" / f"{case_id}.nii.gz",
                out_dir / "labelsTs" / f"{case_id}.nii.gz",
            )
            cases.append(_Case(case_id, case_id, image_path, label_path))
    return cases


def prepare_synapse_npz(
    root: str | os.PathLike,
    val_fraction: float | None = None,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
) -> dict:
    """Datalist for the TransUNet-preprocessed Synapse data, converted to NIfTI volumes.

    ``ROOT/train_npz/caseXXXX_sliceYYY.npz`` (arrays ``image`` H x W in [0, 1], ``label`` H x W)
    are stacked per case in slice order into ``H x W x D`` volumes; ``ROOT/test_vol_h5/caseXXXX.npy.h5``
    (datasets ``image``, ``label``, D x H x W) are transposed to ``H x W x D``. Volumes are written
    as ``float32`` images and ``uint8`` labels (already 0..8) with an identity affine under
    ``output_dir/{imagesTr,labelsTr,imagesTs,labelsTs}/caseXXXX.nii.gz``.
    The test volumes are the test list and, unless ``val_fraction`` is given, the validation list.

    Args:
        root: Dataset root.
        val_fraction: If given, the fraction of the training cases held out for validation.
        seed: Seed of that split.
        output_dir: Folder of the converted volumes, ``ROOT/nifti`` by default.

    Returns:
        The datalist (``SYNAPSE8_LABELS``), paths relative to ``root``.
    """
    root = Path(root)
    out_dir = Path(output_dir) if output_dir is not None else root / "nifti"
    if val_fraction is not None:
        _check_fraction(val_fraction)  # fail before the conversion, not after it
    train_dir, test_dir = _require_dir(root / "train_npz"), _require_dir(root / "test_vol_h5")
    training = _npz_training_cases(train_dir, out_dir)
    _require_cases(training, train_dir, "caseXXXX_sliceYYY.npz")
    test = _h5_test_cases(test_dir, out_dir)
    _require_cases(test, test_dir, "caseXXXX.npy.h5")
    _check_unique(training + test)
    training, validation = _synapse_split(training, test, val_fraction, seed)
    return _datalist("Synapse", SYNAPSE8_LABELS, root, training, validation, test)


# ----------------------------------------------------------------------------- 2D images


def _paired_2d_cases(
    image_dir: Path, mask_dir: Path, mask_suffix: str, keep: Callable[[str], bool]
) -> list[_Case]:
    """Images with the mask of the same stem plus ``mask_suffix``, in any image format."""
    cases = []
    for image in _files(image_dir):
        if image.suffix.lower() in _IMAGE_SUFFIXES and keep(image.stem):
            stem = mask_dir / f"{image.stem}{mask_suffix}"
            masks = [m for m in (stem.with_name(stem.name + s) for s in _IMAGE_SUFFIXES) if m.is_file()]
            if not masks:
                raise DatasetLayoutError(image, f"missing mask (expected {stem}.png or .jpg)")
            if len(masks) > 1:
                raise DatasetLayoutError(image, f"several masks: {', '.join(m.name for m in masks)}")
            cases.append(_Case(image.stem, image.stem, image, masks[0]))
    return cases


def _prepare_2d(root, name, labels, image_dir, mask_dir, mask_suffix, keep, val_fraction, seed) -> dict:
    root = Path(root)
    images = _require_dir(root / image_dir)
    cases = _paired_2d_cases(images, _require_dir(root / mask_dir), mask_suffix, keep)
    _require_cases(cases, images, f"image files with masks in {root / mask_dir}")
    _validate(cases)
    training, validation = _split(cases, val_fraction, seed)
    return _datalist(name, labels, root, training, validation)


def prepare_kvasir(
    root: str | os.PathLike,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    image_dir: str = "images",
    mask_dir: str = "masks",
) -> dict:
    """Datalist for Kvasir-SEG: ``images/NAME.jpg`` with ``masks/NAME.jpg`` or ``.png``.

    Masks are listed as they are (0/255, JPEG masks with compression noise); binarise them
    when loading. The split is random by image.

    Args:
        root: Dataset root.
        val_fraction: Fraction of images held out for validation.
        seed: Seed of the split.
        image_dir, mask_dir: Folders of the images and masks, relative to ``root``.

    Returns:
        The datalist, labels ``{"0": "background", "1": "polyp"}``, paths relative to ``root``.
    """
    labels = {"0": "background", "1": "polyp"}
    return _prepare_2d(root, "Kvasir-SEG", labels, image_dir, mask_dir, "", lambda _: True, val_fraction, seed)


def prepare_isic(
    root: str | os.PathLike,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    image_dir: str = "images",
    mask_dir: str = "masks",
) -> dict:
    """Datalist for ISIC 2017/2018: ``ISIC_XXXXXXX.jpg`` with ``ISIC_XXXXXXX_segmentation.png``.

    Other files in the image folder (``*_superpixels.png``, metadata) are ignored. The split is
    random by image. Point ``image_dir`` and ``mask_dir`` at the release folders, e.g.
    ``ISIC-2017_Training_Data`` and ``ISIC-2017_Training_Part1_GroundTruth``.

    Args:
        root: Dataset root.
        val_fraction: Fraction of images held out for validation.
        seed: Seed of the split.
        image_dir, mask_dir: Folders of the images and masks, relative to ``root``.

    Returns:
        The datalist, labels ``{"0": "background", "1": "lesion"}``, paths relative to ``root``.
    """
    labels = {"0": "background", "1": "lesion"}
    keep = _ISIC_IMAGE.match
    return _prepare_2d(root, "ISIC", labels, image_dir, mask_dir, "_segmentation", keep, val_fraction, seed)


# ----------------------------------------------------------------------------- MSD


def _msd_path(value, root: Path, json_path: Path, allow_outside_root: bool) -> Path:
    """Resolve one datalist path, refusing paths that leave the root (checked lexically,
    so a root reached through a symlink is fine)."""
    if not isinstance(value, str) or not value:
        raise DatasetLayoutError(json_path, f"path {value!r} is not a non-empty string")
    inside = not os.path.isabs(value) and os.path.normpath(value).split(os.sep)[0] != ".."
    if not inside and not allow_outside_root:
        raise DatasetLayoutError(
            json_path, f"path {value!r} escapes the dataset root {root} (allow_outside_root=True permits it)"
        )
    path = root / value
    if not path.is_file():
        raise DatasetLayoutError(path, f"file not found (listed in {json_path})")
    return path


def _msd_cases(entries, key: str, root: Path, json_path: Path, allow_outside_root: bool) -> list[_Case]:
    if not isinstance(entries, list):
        raise DatasetLayoutError(json_path, f"{key!r} is not a list")
    cases = []
    for entry in entries:
        # MSD lists test images as bare strings.
        entry = {"image": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "image" not in entry:
            raise DatasetLayoutError(json_path, f"{key!r} entry {entry!r} has no image")
        if key != "test" and "label" not in entry:
            raise DatasetLayoutError(json_path, f"{key!r} entry {entry['image']!r} has no label")
        image = _msd_path(entry["image"], root, json_path, allow_outside_root)
        label = _msd_path(entry["label"], root, json_path, allow_outside_root) if "label" in entry else None
        cases.append(_Case(_stem(image), _stem(image), image, label))
    return cases


def prepare_msd(
    root: str | os.PathLike,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    allow_outside_root: bool = False,
) -> dict:
    """Validate an MSD ``dataset.json`` and split ``training`` if it has no ``validation`` list.

    Args:
        root: Folder holding ``dataset.json``, or the path of the JSON file; its paths are relative
            to the folder it is in.
        val_fraction: Fraction of training cases held out for validation when there is no validation list.
        seed: Seed of that split.
        allow_outside_root: Accept absolute paths and paths through ``..`` (they are written relative to the root).

    Returns:
        The datalist: ``name``, ``labels`` and other metadata kept, paths relative to the root.
    """
    json_path = Path(root)
    if json_path.is_dir():
        json_path = json_path / "dataset.json"
    root = json_path.parent
    try:
        data = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetLayoutError(json_path, f"unreadable datalist ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("labels"), dict):
        raise DatasetLayoutError(json_path, "not an MSD datalist (no 'labels' mapping)")
    training = _msd_cases(data.get("training", []), "training", root, json_path, allow_outside_root)
    _require_cases(training, json_path, "a 'training' list")
    validation = _msd_cases(data.get("validation", []), "validation", root, json_path, allow_outside_root)
    test = _msd_cases(data.get("test", []), "test", root, json_path, allow_outside_root)
    _validate(training, validation, test)
    if "validation" not in data:
        training, validation = _split(training, val_fraction, seed)
    # Counts such as numTraining would be stale after a re-split; the lists carry them.
    meta = {k: v for k, v in data.items() if k not in ("training", "validation", "test") and not k.startswith("num")}
    datalist = _datalist(str(data.get("name", root.name)), data["labels"], root, training, validation, test)
    return {**meta, **datalist}


# ----------------------------------------------------------------------------- dispatch


LAYOUTS: dict[str, Callable[..., dict]] = {
    "acdc": prepare_acdc,
    "acdc_msd": prepare_acdc_msd,
    "synapse_raw": prepare_synapse_raw,
    "synapse_npz": prepare_synapse_npz,
    "kvasir": prepare_kvasir,
    "isic": prepare_isic,
    "msd": prepare_msd,
}


def detect_layout(root: str | os.PathLike) -> str:
    """Name of the layout in ``LAYOUTS`` that the folder contents match.

    Args:
        root: Dataset root (or an MSD ``dataset.json``).

    Returns:
        The layout name.
    """
    root = Path(root)
    if root.is_file() and root.suffix == ".json":
        return "msd"
    if not root.is_dir():
        raise DatasetLayoutError(root, "folder not found")

    def has(*names: str) -> bool:
        return all((root / n).exists() for n in names)

    if has("train_npz") or has("test_vol_h5"):
        return "synapse_npz"
    if has("img", "label"):
        return "synapse_raw"
    if has("training") or _acdc_patient_dirs(root):
        return "acdc"
    # ACDC in MSD form is told apart from other MSD sets so that its split stays by patient.
    if has("imagesTr") and any(_ACDC_FRAME.match(p.name) for p in _files(root / "imagesTr")):
        return "acdc_msd"
    if has("dataset.json"):
        return "msd"
    if has("images", "masks"):
        return "isic" if any(_ISIC_IMAGE.match(p.stem) for p in _files(root / "images")) else "kvasir"
    raise DatasetLayoutError(root, f"cannot detect the dataset layout (known: {', '.join(LAYOUTS)})")


def prepare_datalist(layout: str, root: str | os.PathLike, **options) -> dict:
    """Build the datalist of ``root`` with the ``prepare_*`` function of ``layout``.

    Args:
        layout: One of ``LAYOUTS`` or ``"auto"`` (see :func:`detect_layout`).
        root: Dataset root.
        options: Keyword arguments of that function (``val_fraction``, ``seed``, ...).

    Returns:
        The datalist.
    """
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}, expected auto or one of {', '.join(LAYOUTS)}.")
    prepare = LAYOUTS[layout]
    unknown = sorted(set(options) - set(inspect.signature(prepare).parameters))
    if unknown:
        raise ValueError(f"option(s) {', '.join(unknown)} do not apply to layout {layout!r}.")
    return prepare(root, **options)


def write_datalist(datalist: dict, path: str | os.PathLike) -> Path:
    """Write the datalist as JSON atomically: a reader sees the old file or the whole new one.

    Args:
        datalist: JSON-serialisable datalist.
        path: Output file; its folder is created if needed.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(datalist, indent=2) + "\n"  # serialise first so a failure leaves no temp file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def main(layout: str, root: str, out: str | None = None, **options) -> None:
    """Command line: write the datalist of ``root`` to ``out`` (``ROOT/datalist.json`` by default).

    Further flags are the options of the layout's ``prepare_*`` function: ``--val_fraction``,
    ``--seed``, ``--output_dir``, ``--remap_synapse8``, ``--allow_outside_root``, ``--image_dir``,
    ``--mask_dir``. On a bad dataset, prints ``error: <message>`` to stderr and exits with status 2.

    Args:
        layout: ``auto`` or one of acdc, acdc_msd, synapse_raw, synapse_npz, kvasir, isic, msd.
        root: Dataset root (for ``msd`` also the ``dataset.json`` path).
        out: Output JSON path.
    """
    # fire turns numeric-looking arguments into numbers, so paths are made strings again.
    root = Path(str(root))
    out_path = Path(str(out)) if out is not None else (root.parent if root.is_file() else root) / "datalist.json"
    try:
        datalist = prepare_datalist(str(layout), root, **options)
        write_datalist(datalist, out_path)
    except (ValueError, OSError, ImportError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    counts = ", ".join(f"{len(datalist[k])} {k}" for k in ("training", "validation", "test"))
    print(f"wrote {out_path}: {counts}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
