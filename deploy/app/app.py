"""MSA2-Net segmentation as a MONAI Deploy App SDK application: DICOM series in, DICOM SEG and NIfTI out.

Pipeline::

    DICOM folder -> DICOMFolderLoaderOperator -> RuleSeriesSelectorOperator (CT, else MR)
      -> CheckedSeriesToVolumeOperator -> MonaiBundleInferenceOperator (the bundle's own
         preprocessing, SliceInferer and postprocessing, models/model.ts)
      -> LabeledSegWriterOperator (DICOM SEG, one segment per label) and NiftiSegWriterOperator

Run (``-m``: a bundle folder from ``python -m msa2net.export deploy_bundle``, or a folder holding one)::

    .venv-deploy/bin/python deploy/app -i <dicom folder> -o <output folder> -m <bundle folder>

``$MSA2NET_SELECTION_RULES`` may name a JSON file of DICOMSeriesSelectorOperator rules replacing the
default (largest CT image series, else largest MR image series). Exit status 0 on success; on bad
input the error names the problem and nothing is written.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from pydicom.uid import generate_uid
from seg_operators import (
    CheckedSeriesToVolumeOperator,
    DICOMFolderLoaderOperator,
    LabeledSegWriterOperator,
    NiftiSegWriterOperator,
    RuleSeriesSelectorOperator,
    find_bundle,
    read_bundle,
    segment_descriptions,
    selection_rules,
)

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Image, IOType
from monai.deploy.operators.dicom_seg_writer_operator import ModelInfo
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)

logger = logging.getLogger(__name__)


class MSA2NetSegApp(Application):
    """DICOM CT/MR series -> MSA2-Net (slice by slice) -> DICOM SEG + NIfTI label map."""

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        super().run(*args, **kwargs)
        logger.info("MSA2-Net application finished in %.1f s", time.perf_counter() - start)

    def compose(self):
        app_context: AppContext = Application.init_app_context(self.argv)
        input_path, output_path = Path(app_context.input_path), Path(app_context.output_path)
        bundle = read_bundle(find_bundle(app_context.model_path))
        logger.info("bundle %s (%s %s), configs %s, labels %s", bundle.path, bundle.name, bundle.version,
                    bundle.config_names, [label.name for label in bundle.labels])

        loader = DICOMFolderLoaderOperator(self, CountCondition(self, 1), input_folder=input_path, name="dicom_loader")
        selector = RuleSeriesSelectorOperator(
            self, rules=selection_rules(), all_matched=True, sort_by_sop_instance_count=True, name="series_selector"
        )
        to_volume = CheckedSeriesToVolumeOperator(self, name="series_to_volume")
        # The SDK resolves -m through its model factory, which sees a bundle folder as a generic model and
        # would hand that (not a network) to the operator; with no models in its context the operator loads
        # the bundle folder it is given: configs/inference.json (+ deploy.json) and models/model.ts.
        bundle_context = copy.copy(app_context)
        bundle_context.models = None
        inference = MonaiBundleInferenceOperator(
            self,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            app_context=bundle_context,
            bundle_path=bundle.path,
            bundle_config_names=BundleConfigNames(config_names=bundle.config_names),
            name="bundle_inference",
        )
        seg_writer = LabeledSegWriterOperator(
            self,
            segment_descriptions=segment_descriptions(bundle),
            colors=[label.rgb for label in bundle.labels],
            custom_tags={"SeriesDescription": f"{bundle.name} segmentation (research use only)"[:64]},
            output_folder=output_path,
            model_info=ModelInfo(
                "MSA2-Net bundle developers", bundle.name[:64], bundle.version or "0",
                str(generate_uid(entropy_srcs=[bundle.name, bundle.version])),
            ),
            omit_empty_frames=True,
            name="dicom_seg_writer",
        )
        nifti_writer = NiftiSegWriterOperator(self, output_folder=output_path, name="nifti_writer")

        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, inference, {("image", "image")})
        self.add_flow(selector, seg_writer, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(inference, seg_writer, {("pred", "seg_image")})
        self.add_flow(inference, nifti_writer, {("pred", "seg_image")})
        self.add_flow(to_volume, nifti_writer, {("image", "image")})


def main() -> None:
    MSA2NetSegApp().run()


if __name__ == "__main__":
    main()
