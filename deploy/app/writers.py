"""Writing the results: the DICOM Segmentation and a NIfTI copy of the label map.

:class:`LabeledSegWriterOperator` is the SDK's DICOM SEG writer with the attributes a PACS administrator
reads set from the bundle rather than the SDK's defaults: Series Description (the bundle's name, whole),
a Series Number that is the same on every run (``--series-number``, default :data:`DEFAULT_SERIES_NUMBER`),
Manufacturer, Manufacturer's Model Name and Software Versions naming the bundle's authors, name and
version (General and Enhanced General Equipment, and a Contributing Equipment item with the purpose
"Processing Equipment", without a Device UID, which is not a standard attribute there), Device Serial
Number the digest of the weights (``models/model.ts``), Content Creator's Name the bundle's name (its
first word as the family name component: ``MSA2-Net^cardiac MRI segmentation ...``), each segment's recommended display colour, and, where the loader derived
identifiers, a statement of it in Image Comments.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import numpy as np
from bundle import BundleInfo
from loading import DerivedIdentifiers
from pydicom.sr.coding import Code

from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec
from monai.deploy.core.domain.dicom_series import DICOMSeries
from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription

__all__ = ["DEFAULT_SERIES_NUMBER", "segment_descriptions", "LabeledSegWriterOperator", "NiftiSegWriterOperator"]

logger = logging.getLogger(__name__)

#: Series Number of every SEG this application writes unless ``--series-number`` says otherwise.
DEFAULT_SERIES_NUMBER = 9001
#: DICOM LO values hold at most 64 characters.
_LO = 64
#: CID 7005 "Contributing Equipment Purposes of Reference".
_PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")


def _lo(text: str, what: str) -> str:
    if len(text) > _LO:
        logger.warning("%s %r is longer than DICOM's 64 characters; cut to %r", what, text, text[:_LO])
    return text[:_LO]


def segment_descriptions(info: BundleInfo) -> list[SegmentDescription]:
    """One SDK segment description per label, in label order (segment number = label value)."""
    from pydicom.sr.codedict import codes

    return [
        SegmentDescription(
            segment_label=_lo(label.name, "segment label"),
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=Code(*label.code),
            algorithm_name=_lo(info.name, "algorithm name"),
            algorithm_family=codes.DCM.ArtificialIntelligence,
            algorithm_version=_lo(info.version, "algorithm version"),
        )
        for label in info.labels
    ]


class LabeledSegWriterOperator(DICOMSegmentationWriterOperator):
    """The SDK DICOM SEG writer with this bundle's attributes (module doc).

    Args:
        bundle: the bundle that produced the labels.
        series_number: Series Number of the SEG.
        derived: identifiers the loader derived, stated in the SEG.
    """

    def __init__(
        self, fragment: Fragment, *args, bundle: BundleInfo, series_number: int = DEFAULT_SERIES_NUMBER,
        derived: DerivedIdentifiers | None = None, **kwargs,
    ):
        import highdicom as hd

        self.bundle, self.series_number = bundle, int(series_number)
        self.derived = derived if derived is not None else DerivedIdentifiers()
        self.series_description = _lo(bundle.name, "SeriesDescription")
        self.serial = bundle.model_digest()
        # PN components family^given: a name without "^" reads as the retired free-text form (dciodvfy warns)
        family, _, given = bundle.name.replace("^", " ").partition(" ")
        self.content_creator = f"{family[:_LO]}^{given[:_LO]}"
        super().__init__(fragment, *args, segment_descriptions=segment_descriptions(bundle), model_info=None, **kwargs)
        for desc, label in zip(self._seg_descs, bundle.labels, strict=True):
            desc.RecommendedDisplayCIELabValue = list(hd.color.CIELabColor.from_rgb(*label.rgb).value)

    def create_dicom_seg(self, image: np.ndarray, dicom_series: DICOMSeries, output_dir: Path):
        import highdicom as hd

        sources = [i.get_native_sop_instance() for i in dicom_series.get_sop_instances()]
        equipment = {
            "manufacturer": _lo(self.bundle.authors, "Manufacturer"),
            "manufacturer_model_name": self.series_description,
            "software_versions": _lo(self.bundle.version, "SoftwareVersions"),
            "device_serial_number": self.serial,
        }
        sop_uid = hd.UID()
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=image,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=self._seg_descs,
            series_instance_uid=hd.UID(),
            series_number=self.series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            series_description=self.series_description,
            content_label="SEGMENTATION",
            content_description=_lo(f"{self.bundle.name} {self.bundle.version}", "ContentDescription"),
            content_creator_name=self.content_creator,
            omit_empty_frames=self._omit_empty_frames,
            contributing_equipment=[hd.ContributingEquipment(purpose_of_reference=_PROCESSING_EQUIPMENT, **equipment)],
            **equipment,
        )
        now = datetime.datetime.now().astimezone()
        seg.SeriesDate, seg.SeriesTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        seg.TimezoneOffsetFromUTC = now.strftime("%z")
        statement = self.derived.statement(str(dicom_series.SeriesInstanceUID))
        if statement:
            seg.ImageComments = statement[:10240]
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / f"{sop_uid}.dcm"
        seg.save_as(path, enforce_file_format=True)
        logger.info("DICOM SEG written to %s (%d frame(s), series number %d)", path, int(seg.NumberOfFrames), self.series_number)


class NiftiSegWriterOperator(Operator):
    """Writes ``<output>/<SeriesInstanceUID>_seg.nii.gz``: the label map on the input's voxel grid.

    Inputs: ``seg_image`` (label ``Image``, DHW as the SDK passes it) and ``image`` (the input volume,
    whose metadata carries the RAS affine of index order ``(column, row, slice)``).
    """

    def __init__(self, fragment: Fragment, *args, output_folder: Path, **kwargs):
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("seg_image")
        spec.input("image")
        spec.output("path").condition(ConditionType.NONE)

    def compute(self, op_input, op_output, context):
        import nibabel as nib

        seg, image = op_input.receive("seg_image"), op_input.receive("image")
        labels = np.asarray(seg.asnumpy())
        source = np.asarray(image.asnumpy())
        if labels.shape != source.shape:
            raise ValueError(f"label map {labels.shape} and input volume {source.shape} differ in shape (DHW).")
        meta = image.metadata()
        affine = np.asarray(meta["nifti_affine_transform"], dtype=np.float64)
        out = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.uint8), affine)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        self.output_folder.mkdir(parents=True, exist_ok=True)
        path = self.output_folder / f"{meta.get('SeriesInstanceUID', 'series')}_seg.nii.gz"
        nib.save(out, str(path))
        logger.info("NIfTI copy of the label map written to %s", path)
        op_output.emit(str(path), "path")

