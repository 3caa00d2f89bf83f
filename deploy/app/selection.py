"""Choosing the series to segment, and refusing one the model was not made for.

The selection rules (SDK ``DICOMSeriesSelectorOperator`` syntax) follow the bundle's declaration
(``metadata.json``: ``network_data_format.inputs.image.modality``): the largest single-frame image series
of the declared modality. ``$MSA2NET_SELECTION_RULES`` may name a JSON file of rules replacing them.
The selected series is then checked with :func:`msa2net.input_guard.input_mismatch` (modality, and body
part where the series states one), the rule ``run inference`` applies too, and for identifiers the loader
had to derive (:class:`loading.DerivedIdentifiers`). Either is refused with one line naming what differs,
unless the user allowed it (``--allow-input-mismatch``, ``--derive-missing-uids``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from loading import DerivedIdentifiers, files_folder, series_name, source_file

from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from msa2net.errors import InputError
from msa2net.input_guard import InputDeclaration, facts_from_meta, input_mismatch

__all__ = ["IMAGE_SOP_CLASSES", "CT_IMAGE_STORAGE", "MR_IMAGE_STORAGE", "selection_rules", "describe_studies", "GuardedSeriesSelectorOperator"]

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
IMAGE_SOP_CLASSES = {CT_IMAGE_STORAGE: "CT Image Storage", MR_IMAGE_STORAGE: "MR Image Storage"}
_SOP_CLASS_OF = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}


def _rule(modality: str) -> dict:
    return {
        "name": modality,
        "conditions": {"Modality": f"(?i)^{modality}$", "SOPClassUID": "^" + _SOP_CLASS_OF[modality].replace(".", "\\.") + "$"},
    }


def selection_rules(declared: InputDeclaration, allow_mismatch: bool = False) -> str:
    """The rules as JSON: ``$MSA2NET_SELECTION_RULES`` if set, else the declared modalities.

    Where nothing is declared, or a mismatch is allowed, any supported modality is selected (CT first, then MR).
    """
    path = os.environ.get("MSA2NET_SELECTION_RULES")
    if path:
        rules = json.loads(Path(path).read_text())
        if not rules.get("selections"):
            raise InputError(f"{path}: selection rules need a non-empty 'selections' list.")
        return json.dumps(rules)
    modalities = [m for m in declared.modalities if m in _SOP_CLASS_OF]
    if allow_mismatch or not modalities:
        modalities = modalities + [m for m in _SOP_CLASS_OF if m not in modalities]
    return json.dumps({"selections": [_rule(m) for m in modalities]})


def describe_studies(dicom_study_list) -> str:
    """One entry per series: modality, SOP class, instance count, description."""
    lines = []
    for study in dicom_study_list or []:
        for series in study.get_all_series():
            instances = series.get_sop_instances()
            classes = sorted({str(i.get_native_sop_instance().get("SOPClassUID", "?")) for i in instances})
            lines.append(
                f"{getattr(series, 'Modality', None) or '?'} series {series.SeriesInstanceUID} "
                f"({len(instances)} instance(s), SOP class {', '.join(classes)}, "
                f"description {getattr(series, 'SeriesDescription', None)!r})"
            )
    return "; ".join(lines) or "nothing"


class GuardedSeriesSelectorOperator(DICOMSeriesSelectorOperator):
    """The SDK selector; no matching series, a mismatch with the declaration or derived identifiers are errors.

    Args:
        declared: the bundle's input declaration.
        allow_mismatch: log a modality or body-part mismatch instead of refusing (research use only).
        derived: identifiers the loader derived; ``derive_missing_uids`` allows a series that has some.
    """

    def __init__(
        self, *args, declared: InputDeclaration, allow_mismatch: bool = False, derived: DerivedIdentifiers,
        derive_missing_uids: bool = False, **kwargs,
    ):
        self.declared, self.allow_mismatch = declared, allow_mismatch
        self.derived, self.derive_missing_uids = derived, derive_missing_uids
        super().__init__(*args, rules=selection_rules(declared, allow_mismatch), **kwargs)

    def filter(self, selection_rules, dicom_study_list, all_matched=False, sort_by_sop_instance_count=False):
        selected = super().filter(selection_rules, dicom_study_list, all_matched, sort_by_sop_instance_count)
        if not selected:
            wanted = "/".join(self.declared.modalities) or "CT or MR"
            files = (
                source_file(instance.get_native_sop_instance())
                for study in dicom_study_list or [] for series in study.get_all_series() for instance in series.get_sop_instances()
            )
            folder = files_folder(f for f in files if f) or "the input"
            raise InputError(
                f"{folder}: no series matches the selection rules (single-frame {wanted} image storage; the model is for {wanted}, "
                f"from the bundle's metadata.json); the input holds: {describe_studies(dicom_study_list)}"
                + ("" if self.allow_mismatch else ". --allow-input-mismatch selects a CT or MR series of another modality (research use only).")
            )
        series = selected[0].selected_series[0].series
        # from the instance: the SDK 4.0 loader reads Body Part Examined from tag (0008,0015), not (0018,0015)
        first = series.get_sop_instances()[0].get_native_sop_instance()
        facts = facts_from_meta(
            {"Modality": first.get("Modality"), "BodyPartExamined": first.get("BodyPartExamined")},
            source=series_name([instance.get_native_sop_instance() for instance in series.get_sop_instances()]),
        )
        problem = input_mismatch(self.declared, facts)
        if problem and not self.allow_mismatch:
            raise InputError(f"{problem} (the bundle's metadata.json); refused. --allow-input-mismatch runs it anyway (research use only).")
        if problem:
            logger.warning("%s; run anyway because --allow-input-mismatch was given (research use only).", problem)
        self.derived.check(series.SeriesInstanceUID, self.derive_missing_uids)
        return selected
