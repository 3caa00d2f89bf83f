"""MSA2-Net segmentation as a MONAI Deploy App SDK application: DICOM series in, DICOM SEG and NIfTI out.

Pipeline::

    DICOM folder -> DICOMFolderLoaderOperator (loading.py) -> GuardedSeriesSelectorOperator (selection.py:
      the declared modality; refuses a mismatch and derived identifiers) -> CheckedSeriesToVolumeOperator
      (geometry.py) -> ConfiguredBundleInferenceOperator (bundle.py: the SDK's MonaiBundleInferenceOperator,
      the bundle's own preprocessing, SliceInferer and postprocessing, models/model.ts)
      -> LabeledSegWriterOperator (DICOM SEG) and NiftiSegWriterOperator (writers.py)

The command line, the log file and the all-or-nothing output are in ``command.py`` (``python deploy/app``).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from bundle import ConfiguredBundleInferenceOperator, find_bundle, read_bundle
from geometry import CheckedSeriesToVolumeOperator
from loading import DerivedIdentifiers, DICOMFolderLoaderOperator
from selection import GuardedSeriesSelectorOperator
from writers import DEFAULT_SERIES_NUMBER, LabeledSegWriterOperator, NiftiSegWriterOperator

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Image, IOType
from monai.deploy.operators.monai_bundle_inference_operator import BundleConfigNames, IOMapping
from msa2net.input_guard import InputDeclaration

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    """This application's own options (``command.py``), beyond the SDK's ``-i -o -m -l -w``."""

    allow_input_mismatch: bool = False
    derive_missing_uids: bool = False
    series_number: int = DEFAULT_SERIES_NUMBER


class MSA2NetSegApp(Application):
    """DICOM CT/MR series -> MSA2-Net (slice by slice) -> DICOM SEG + NIfTI label map."""

    options = Options()

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        super().run(*args, **kwargs)
        logger.info("MSA2-Net application finished in %.1f s", time.perf_counter() - start)

    def compose(self):
        app_context: AppContext = Application.init_app_context(self.argv)
        input_path, output_path = Path(app_context.input_path), Path(app_context.output_path)
        bundle = read_bundle(find_bundle(app_context.model_path))
        declared = InputDeclaration.from_meta(bundle.meta)
        logger.info("bundle %s (%s %s), configs %s, labels %s, for %s", bundle.path, bundle.name, bundle.version,
                    bundle.config_names, [label.name for label in bundle.labels], declared.describe())
        derived = DerivedIdentifiers()

        loader = DICOMFolderLoaderOperator(
            self, CountCondition(self, 1), input_folder=input_path, derived=derived, name="dicom_loader"
        )
        selector = GuardedSeriesSelectorOperator(
            self, declared=declared, allow_mismatch=self.options.allow_input_mismatch, derived=derived,
            derive_missing_uids=self.options.derive_missing_uids, all_matched=True, sort_by_sop_instance_count=True,
            name="series_selector",
        )
        to_volume = CheckedSeriesToVolumeOperator(self, name="series_to_volume")
        # The SDK resolves -m through its model factory, which sees a bundle folder as a generic model and
        # would hand that (not a network) to the operator; with no models in its context the operator loads
        # the bundle folder it is given: configs/inference.json (+ deploy.json) and models/model.ts.
        bundle_context = copy.copy(app_context)
        bundle_context.models = None
        inference = ConfiguredBundleInferenceOperator(
            self,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            app_context=bundle_context,
            bundle_path=bundle.path,
            bundle_config_names=BundleConfigNames(config_names=bundle.config_names),
            config_overrides={"bundle_root": str(bundle.path), "allow_input_mismatch": self.options.allow_input_mismatch},
            name="bundle_inference",
        )
        seg_writer = LabeledSegWriterOperator(
            self, bundle=bundle, series_number=self.options.series_number, derived=derived,
            output_folder=output_path, omit_empty_frames=True, name="dicom_seg_writer",
        )
        nifti_writer = NiftiSegWriterOperator(self, output_folder=output_path, name="nifti_writer")

        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, inference, {("image", "image")})
        self.add_flow(selector, seg_writer, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(inference, seg_writer, {("pred", "seg_image")})
        self.add_flow(inference, nifti_writer, {("pred", "seg_image")})
        self.add_flow(to_volume, nifti_writer, {("image", "image")})
