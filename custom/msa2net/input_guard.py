"""Refuse images the model was not made for: the input's modality and body part against the bundle's declaration.

A segmentation model applied to another modality or anatomy still writes a plausible-looking label
map (a cardiac MRI model labels an abdominal CT "left ventricle"), and a viewer or PACS shows it like
any other. The bundle declares what it was trained on in ``configs/metadata.json``, under
``network_data_format.inputs.image``:

* ``modality``: the DICOM modality (``"MR"``, ``"CT"``), or a list of them;
* ``body_part_examined``: accepted DICOM Body Part Examined values (``["HEART", "CHEST", "THORAX"]``).

:func:`input_mismatch` is the one rule, used by ``run inference`` (through :class:`InputGuardd` in
``inference.json``'s ``load_transforms``) and by the MONAI Deploy application (before inference):
a modality that differs is a mismatch; a body part is compared only where the input states one (many
series leave Body Part Examined empty) and the bundle declares some. What the input states comes from

* a DICOM series: its Modality and Body Part Examined (the Deploy App SDK passes them in the image's
  metadata; for a series folder read by ITK, the first file's header);
* a NIfTI file: an optional JSON sidecar next to it (``case.nii.gz`` -> ``case.json``, the form dcm2niix
  writes: ``{"Modality": "MR", "BodyPartExamined": "HEART"}``), else ``modality=MR`` /
  ``bodypart=HEART`` in the header's description field; a file stating neither passes unchecked.

An explicit override (``--allow_input_mismatch true`` for the bundle, ``--allow-input-mismatch`` for
the Deploy app) turns the refusal into a logged warning, for research only.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

from monai.config import KeysCollection
from monai.transforms import MapTransform

from msa2net.errors import InputError

__all__ = ["InputDeclaration", "InputFacts", "input_mismatch", "facts_from_meta", "InputGuardd"]

logger = logging.getLogger(__name__)

#: How to override the refusal, named in every message of ``run inference``.
BUNDLE_OVERRIDE = "--allow_input_mismatch true"
_DESCRIP_FIELD = re.compile(r"\b(modality|bodypart|body_part_examined)\s*[=:]\s*([A-Za-z0-9_]+)", re.IGNORECASE)
#: DICOM tags as ITK names them.
_ITK_TAGS = {"modality": "0008|0060", "body_part": "0018|0015"}


def _codes(value) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else list(value or [])
    return tuple(str(v).strip().upper() for v in values if str(v).strip())


def _code(value) -> str | None:
    text = str(value).strip().upper() if value is not None else ""
    return text or None


@dataclass(frozen=True)
class InputDeclaration:
    """What a bundle's model was trained on (empty: not declared, not checked)."""

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()

    @classmethod
    def from_meta(cls, meta: Mapping) -> InputDeclaration:
        """The declaration in a bundle's ``metadata.json`` content (``network_data_format.inputs.image``)."""
        image = (meta or {}).get("network_data_format", {}).get("inputs", {}).get("image", {})
        return cls.from_image_format(image)

    @classmethod
    def from_metadata_file(cls, path: str | os.PathLike) -> InputDeclaration:
        """The declaration in a bundle's ``metadata.json`` file; a missing or unreadable file is an error naming it."""
        try:
            return cls.from_meta(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: cannot read the bundle's input declaration ({err}); is bundle_root right?") from None

    @classmethod
    def from_image_format(cls, image: Mapping) -> InputDeclaration:
        """The declaration in one input's format entry (``{"modality": "MR", "body_part_examined": [...]}``)."""
        return cls(_codes((image or {}).get("modality")), _codes((image or {}).get("body_part_examined")))

    def describe(self) -> str:
        """``"MR, body part HEART/CHEST/THORAX"``, for logs."""
        parts = ["/".join(self.modalities) or "any modality"]
        if self.body_parts:
            parts.append("body part " + "/".join(self.body_parts))
        return ", ".join(parts)


@dataclass(frozen=True)
class InputFacts:
    """What an input states about itself (``None``: not stated)."""

    modality: str | None = None
    body_part: str | None = None
    source: str = "the input"


def input_mismatch(declared: InputDeclaration, facts: InputFacts) -> str | None:
    """The one rule: how ``facts`` contradict ``declared``, or ``None`` when nothing does.

    Returns:
        A phrase naming what differs, e.g. ``"the series is modality CT, the model is for MR"``; unstated facts
        and undeclared fields never mismatch.
    """
    problems = []
    if declared.modalities and facts.modality and facts.modality not in declared.modalities:
        problems.append(f"modality {facts.modality}, the model is for {'/'.join(declared.modalities)}")
    if declared.body_parts and facts.body_part and facts.body_part not in declared.body_parts:
        problems.append(f"body part {facts.body_part}, the model is for {'/'.join(declared.body_parts)}")
    return f"{facts.source} is " + "; ".join(problems) if problems else None


def facts_from_meta(meta: Mapping, source: str = "the input") -> InputFacts:
    """Modality and body part from image metadata: DICOM keywords (the Deploy App SDK) or ITK's tag names."""
    meta = meta or {}
    modality = meta.get("Modality", meta.get(_ITK_TAGS["modality"]))
    body_part = meta.get("BodyPartExamined", meta.get(_ITK_TAGS["body_part"]))
    return InputFacts(_code(modality), _code(body_part), source)


def _dicom_folder_facts(folder: Path) -> InputFacts:
    """Modality and body part of the first DICOM file of a series folder, read by ITK (header only)."""
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.SetDirectory(str(folder))
    uids = list(names.GetSeriesUIDs())
    if not uids:
        return InputFacts(source=f"{folder}: the series")
    io = itk.GDCMImageIO.New()
    io.SetFileName(list(names.GetFileNames(uids[0]))[0])
    io.ReadImageInformation()
    tags = io.GetMetaDataDictionary()
    found = {k: str(tags[t]) if tags.HasKey(t) else None for k, t in _ITK_TAGS.items()}
    return InputFacts(_code(found["modality"]), _code(found["body_part"]), f"{folder}: the series")


def _nifti_facts(path: Path) -> InputFacts:
    """A NIfTI file's JSON sidecar (dcm2niix keys), else ``modality=``/``bodypart=`` in its header's description."""
    stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
    sidecar = path.with_name(stem + ".json")
    if sidecar.is_file():
        try:
            side = json.loads(sidecar.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"{sidecar}: unreadable JSON sidecar ({err}).") from None
        if not isinstance(side, dict):
            raise InputError(f"{sidecar}: the JSON sidecar is not an object.")
        return InputFacts(_code(side.get("Modality")), _code(side.get("BodyPartExamined")), f"{path} (sidecar {sidecar.name})")
    import nibabel as nib

    descrip = nib.load(path).header["descrip"].item()
    descrip = descrip.decode(errors="replace") if isinstance(descrip, bytes) else str(descrip)
    fields = {k.lower(): v for k, v in _DESCRIP_FIELD.findall(descrip)}
    body_part = fields.get("bodypart", fields.get("body_part_examined"))
    return InputFacts(_code(fields.get("modality")), _code(body_part), f"{path} (header description)")


class InputGuardd(MapTransform):
    """Refuse an image whose modality or body part contradicts what the bundle declares (module doc).

    Args:
        keys: the image key(s).
        declared: the bundle's ``metadata.json`` (``inference.json`` passes ``@bundle_root + '/configs/metadata.json'``,
            which every bundle runner sets, where ``_meta_`` is not read by all of them) or an :class:`InputDeclaration`.
        allow_mismatch: log a warning instead of refusing (research use only).

    Raises:
        InputError: ``"<file>: ... is modality CT, the model is for MR; ..."``, one line naming what differs
            and the override.
    """

    def __init__(
        self, keys: KeysCollection, declared: str | os.PathLike | InputDeclaration, allow_mismatch: bool = False
    ) -> None:
        super().__init__(keys)
        self.declared = declared if isinstance(declared, InputDeclaration) else InputDeclaration.from_metadata_file(declared)
        self.allow_mismatch = bool(allow_mismatch)

    def facts(self, img) -> InputFacts:
        """What ``img`` (a MONAI ``MetaTensor``) states about its modality and body part."""
        meta = getattr(img, "meta", {}) or {}
        src = str(meta.get("filename_or_obj", "") or "")
        facts = facts_from_meta(meta, f"{src}: the image" if src else "the image")
        if facts.modality or not src:
            return facts
        path = Path(src)
        if path.is_dir():
            return _dicom_folder_facts(path)
        if path.name.endswith((".nii", ".nii.gz")):
            return _nifti_facts(path)
        return facts

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if not (self.declared.modalities or self.declared.body_parts):
            return d
        for key in self.key_iterator(d):
            problem = input_mismatch(self.declared, self.facts(d[key]))
            if problem is None:
                continue
            if not self.allow_mismatch:
                raise InputError(f"{problem} (metadata.json); refused. To run it anyway for research, pass {BUNDLE_OVERRIDE}.")
            logger.warning("%s; run anyway because the mismatch is allowed (research use only).", problem)
        return d
