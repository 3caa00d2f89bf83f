"""MONAI Label app that serves the MSA2-Net bundle (segmentation, gated fine-tuning, active learning).

Start it with ``label/serve.py`` (see ``bundle/docs/monailabel.md``); it is a normal MONAI Label
app folder, so ``python -m monailabel.main start_server --app label/app --studies DIR --host 127.0.0.1
--conf models msa2net --conf zoo_source github --conf sam2 false`` works too once the bundle folder is
in ``label/app/model/msa2net`` (without ``--host`` MONAI Label listens on every network interface).

What it changes against the stock ``monaibundle`` sample app of monailabel 0.8.5:

* the shipped ``models/model.pt`` is never written. A fine-tuning (``/train``) trains on the
  datastore's labelled images minus a held-out part and produces a *candidate*; the candidate is
  *published* (served by the next ``/infer``) only when its Dice on the held-out images is at least
  the served model's on the same images. Published versions are ``models/model_vNNNN.pt`` (the last
  ``--conf keep_versions N`` kept, 3 by default), ``models/versions.json`` says which one is served,
  and ``PUT /versions/<model>?serve=vNNNN`` (or ``shipped``) switches back (``weights_registry.py``);
* the train stats carry the keys 3D Slicer's MONAI Label module reads (``epoch``, ``total_epochs``,
  ``best_metric``, ``total_time``) while training runs, plus why a candidate was or was not published;
* ``/infer`` runs off the server's event loop and bad requests get a 4xx naming the problem
  (``http_routes.py``); uploads and labels are read back before they are accepted;
* segments carry the display names of ``msa2net.terminology``, or the names 3D Slicer's generic
  anatomy colour table uses for the same SNOMED CT structure (Slicer colours segments by name);
* a result written as NRRD (asked for as ``.nrrd``, as 3D Slicer's MONAI Label module does, or for an
  ``.nrrd`` image) is a Slicer segmentation file ``*.seg.nrrd`` (``seg_nrrd.py``) carrying each
  segment's name, colour and SNOMED CT term.

Nothing is downloaded: there is no model-zoo lookup and no SAM2 model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from fastapi import HTTPException
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import file_ext

from msa2net.atomic import atomic_path, atomic_torch_save, atomic_write_text
from msa2net.bundle_tools import class_table
from msa2net.terminology import term_for

# MONAI Label loads main.py by file path; its sibling modules are found through the app folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_routes import read_volume  # noqa: E402
from seg_nrrd import Segment, write_seg_nrrd  # noqa: E402
from weights_registry import CANDIDATE_FILE, SHIPPED_FILE, RegistryError, open_registry  # noqa: E402

logger = logging.getLogger(__name__)

FINETUNE_DIR = "finetune"
STATS_FILE = "finetune.json"
DEFAULT_EPOCHS = 10
DEFAULT_VAL_SPLIT = 0.2
# Bundle handlers left out of a MONAI Label fine-tuning: it always starts from weights (no resuming),
# and the app publishes weights itself (the bundle's best-model saver writes ``<ckpt_dir>/model.pt``).
_SKIPPED_HANDLERS = ("msa2net.handlers.ResumeCheckpoint", "msa2net.handlers.BestModelSaver")
# Image ids: Slicer sends its volume node names ("3: Cine SAX"); no path separators or control characters.
_IMAGE_ID = re.compile(r"^[^\s./\\\x00-\x1f][^/\\\x00-\x1f]{0,127}$")
# Result extensions answered with a Slicer segmentation file (written as *.seg.nrrd).
SEGMENTATION_EXTENSIONS = (".nrrd", ".seg.nrrd")
# SNOMED CT code -> name of the structure in Slicer's generic anatomy colour table (GenericAnatomyColors).
_SLICER_ANATOMY_NAMES = {"53085002": "right ventricle of heart", "87878005": "left ventricle of heart"}


_sha_cache: Dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """SHA-256 of a file, cached by path, modification time and size."""
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def resolve_weights(registry, requested: Any = None) -> str:
    """Path of the weights to use: the file named in the request (one of ``registry.files()``), else the served one."""
    if isinstance(requested, (list, tuple)):
        requested = requested[0] if requested else None
    if not requested:
        return registry.served_path()
    name = os.path.basename(str(requested))
    choices = registry.files()
    if name not in choices:
        raise HTTPException(404, f"model_filename {name!r} does not exist; choose one of {choices}.")
    return os.path.join(registry.models_dir, name)


def segment_name(class_name: str, index: int) -> str:
    """The segment name clients show for a class: its terminology display name, or Slicer's name of its structure.

    3D Slicer's MONAI Label module colours a segment by looking its lower-cased name up in Slicer's
    generic anatomy colour table; the structures below are named differently there.
    """
    term = term_for(class_name, index)
    name = _SLICER_ANATOMY_NAMES.get(term.code[0], term.display)
    return name[:1].upper() + name[1:]


def bundle_classes(bundle_dir: str, parser: Optional[ConfigParser] = None) -> List[str]:
    """Class name of each label value (background first): the ``class_names`` of the bundle's inference.json.

    ``label/serve.py`` writes the profile into inference.json, so this is the profile's class list.
    """
    if parser is None:
        parser = ConfigParser()
        parser.read_config(os.path.join(bundle_dir, "configs", "inference.json"))
    return class_table(parser, os.path.join(bundle_dir, "configs", "inference.json"))


def segments_of(classes: List[str]) -> List[Segment]:
    """The foreground classes (``bundle_classes``) as segments: label value, segment name, terminology term."""
    return [Segment(value, segment_name(name, value), term_for(name, value)) for value, name in enumerate(classes) if value > 0]


# --------------------------------------------------------------------------------------------------
# datastore: read uploads back before accepting them
# --------------------------------------------------------------------------------------------------
class CheckedDatastore(LocalDatastore):
    """Local datastore that refuses unreadable images and labels that do not fit their image."""

    def __init__(self, *args, num_classes: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_classes = num_classes

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        name = image_id or os.path.basename(image_filename)
        if image_id and not _IMAGE_ID.match(image_id):
            raise HTTPException(
                400,
                f"image id {image_id!r}: at most 128 characters, no '/' or '\\', not starting with '.' or a space.",
            )
        read_volume(image_filename, "uploaded image", name)
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        image_uri = self.get_image_uri(image_id)
        if not image_uri or not os.path.isfile(image_uri):
            raise HTTPException(404, f"image {image_id!r} is not in the datastore; upload the image before its label.")
        label, label_array = read_volume(label_filename, "uploaded label", image_id)
        image, image_array = read_volume(image_uri, "image", image_id)
        if label_array.shape != image_array.shape:
            raise HTTPException(
                422,
                f"label of {image_id!r} has shape {tuple(label_array.shape)} but the image has shape "
                f"{tuple(image_array.shape)}; export the label in the image's geometry.",
            )
        if not np.allclose(np.asarray(label.affine), np.asarray(image.affine), atol=1e-3):
            raise HTTPException(
                422, f"label of {image_id!r} has another orientation/spacing/origin (affine) than its image."
            )
        values = np.unique(label_array)
        if (
            not np.all(np.equal(np.mod(values, 1), 0))
            or values.min() < 0
            or (self.num_classes and values.max() >= self.num_classes)
        ):
            raise HTTPException(
                422,
                f"label of {image_id!r} holds values {values[:10].tolist()}; expected integers 0..{(self.num_classes or 256) - 1}.",
            )
        return super().save_label(image_id, label_filename, label_tag, label_info)


# --------------------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------------------
class MSA2NetInferTask(BundleInferTask):
    """The bundle's inference.json (preprocessing, SliceInferer, RestoreLabeld) with the served weights."""

    def __init__(self, path: str, conf: Dict[str, str]):
        # Set before the base class runs: with ``--conf preload true`` it loads the network at once.
        self.bundle_dir = path
        self.registry = open_registry(path, conf.get("keep_versions"))
        self._lock = threading.Lock()
        # One inference computes at a time: concurrent requests queue here instead of sharing the cores.
        self._compute = threading.Lock()
        self._results = tempfile.mkdtemp(prefix="msa2net-label-results-")
        super().__init__(path, conf, type="segmentation", load_strict=True)
        if not self.valid:
            return
        self.segments = segments_of(bundle_classes(path, self.bundle_config))
        self.labels = {s.name: s.value for s in self.segments}
        models = os.path.join(path, "models")
        self.path = [os.path.join(models, SHIPPED_FILE)]
        self._refresh_choices()

    def _refresh_choices(self) -> None:
        self._config["model_filename"] = self.registry.files()

    def config(self) -> Dict[str, Any]:
        self._refresh_choices()
        return self._config

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info["labels"] = self.labels
        return info

    def __call__(self, request, callbacks=None):
        request = dict(request)
        choices = self.registry.files()
        # The options list shown to clients is a list; a request that names no single file gets the served weights.
        if isinstance(request.get("model_filename"), (list, tuple)) or request.get("model_filename") in (None, ""):
            request["model_filename"] = choices[0]
        with self._compute:
            return super().__call__(request, callbacks)

    def _get_network(self, device, data):
        path = resolve_weights(self.registry, data.get("model_filename") if data else None)
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._networks.get(device)
            if cached and cached[1] == key:
                network = cached[0]
            else:
                logger.info(f"Loading weights {os.path.basename(path)} on {device}")
                network = copy.deepcopy(self.network).to(torch.device(device))
                checkpoint = torch.load(path, map_location=torch.device(device), weights_only=True)
                network.load_state_dict(checkpoint.get(self.model_state_dict, checkpoint), strict=True)
                network.eval()
                self._networks[device] = (network, key)
        if data is not None:
            data["model_file"] = os.path.basename(path)
            data["model_sha256"] = file_sha256(path)
        return network

    def writer(self, data, extension=None, dtype=None):
        # The extension as the stock writer resolves it: asked for, else the image's own.
        ext = extension or data.get("result_extension") or file_ext(data.get("image_path") or "")
        if str(ext).lower() in SEGMENTATION_EXTENSIONS:
            result_file, result_json = self._write_segmentation(data), data.get(self.output_json_key)
        else:
            # uint8 label maps (the bundle's own SaveImaged writes uint8 too).
            result_file, result_json = super().writer(data, extension=extension, dtype=dtype or np.uint8)
            if result_file and os.path.isfile(result_file):
                # The client saves the result under the same base name in its own temporary folder; on the
                # server's machine that would be this very file, which the server deletes after sending it.
                private = os.path.join(self._results, os.path.basename(result_file))
                os.replace(result_file, private)
                result_file = private
        result_json = dict(result_json or {})
        result_json["model_file"] = data.get("model_file")
        result_json["model_sha256"] = data.get("model_sha256")
        return result_file, result_json

    def _write_segmentation(self, data) -> str:
        """The label map as a Slicer segmentation file in the app's private result folder; returns its path.

        The name ends with ``.seg.nrrd``: the client keeps the server's file name, and Slicer's module
        loads a result as a segmentation (names, colours, terms from the file) only under that ending.
        """
        label = data[self.output_label_key]
        array = label.array if isinstance(label, MetaTensor) else np.asarray(label)
        # The stock writer's geometry: the input's affine as read (MONAI Label's Restored puts it there).
        meta = data.get(f"{self.output_label_key}_meta_dict") or {}
        affine = meta.get("affine")
        if affine is None:
            affine = label.affine
        path = os.path.join(self._results, f"{uuid.uuid4().hex}.seg.nrrd")
        with atomic_path(path) as tmp:
            write_seg_nrrd(str(tmp), array, np.asarray(affine), self.segments)
        return path


# --------------------------------------------------------------------------------------------------
# training (fine-tuning on the datastore's labelled images)
# --------------------------------------------------------------------------------------------------
def _metric(evaluator) -> Optional[float]:
    evaluator.run()
    value = evaluator.state.metrics.get(evaluator.state.key_metric_name) if evaluator.state.metrics else None
    return None if value is None else float(value)


def _finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)


def _ticked(value: Any) -> bool:
    """A boolean option as clients send it (``True``, ``"false"``, ``0`` ...)."""
    return str(value).strip().lower() not in ("false", "0", "no", "off", "")


class MSA2NetTrainTask(BundleTrainTask):
    """Fine-tune with the bundle's train.json into a candidate; publish it only when it beats the served model."""

    def __init__(self, path: str, conf: Dict[str, str]):
        super().__init__(path, conf, load_strict=True)
        self.registry = open_registry(path, conf.get("keep_versions"))
        self.workdir = os.path.join(path, "models", FINETUNE_DIR)
        self._request: Dict[str, Any] = {}
        self._stats: Dict[str, Any] = {}
        self._heldout: List[Dict[str, str]] = []

    def default_learning_rate(self) -> float:
        """A tenth of the bundle's training rate: fine-tuning starts from trained weights."""
        try:
            return float(self.bundle_config.get("learning_rate", 0.01)) / 10
        except (TypeError, ValueError):  # an expression rather than a number
            return 0.001

    def config(self):
        options = super().config()
        options["model_filename"] = self.registry.files()
        options["max_epochs"] = DEFAULT_EPOCHS
        options["val_split"] = DEFAULT_VAL_SPLIT
        options["multi_gpu"] = False
        options["learning_rate"] = self.default_learning_rate()
        return options

    def stats(self):
        """Progress and outcome of the last fine-tuning (what 3D Slicer's module shows), and the served version."""
        try:
            with open(os.path.join(self.workdir, STATS_FILE)) as f:
                stats = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            stats = {}
        stats["served_version"] = self.registry.served()
        return stats

    def _write_stats(self, **values) -> None:
        # NaN/inf (a diverged run) are not JSON: /info would fail; they are reported as null.
        self._stats.update({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()})
        atomic_write_text(os.path.join(self.workdir, STATS_FILE), json.dumps(self._stats, indent=2))

    def __call__(self, request, datastore: Datastore):
        request = dict(request)
        name = request.get("model_filename")
        choices = self.registry.files()
        request["model_filename"] = choices[0] if isinstance(name, (list, tuple)) or not name else os.path.basename(str(name))
        if request["model_filename"] not in choices:
            # The stock task would silently train from scratch.
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"model_filename {request['model_filename']!r} not found; choose one of {choices}.",
            )
        # The same defaults as the options shown to clients (the stock task would use 50 epochs and the bundle's rate).
        request.setdefault("max_epochs", DEFAULT_EPOCHS)
        request.setdefault("val_split", DEFAULT_VAL_SPLIT)
        if request.get("learning_rate") in (None, ""):
            request["learning_rate"] = self.default_learning_rate()
        if not datastore.datalist():
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, "no labelled image in the datastore: submit at least one label first."
            )
        self._request = request
        return super().__call__(request, datastore)

    def _partition_datalist(self, datalist, request, shuffle=False):
        """Hold out ``val_split`` of the labelled images (at least one, and one stays for training); never validate on training images."""
        datalist = sorted(datalist, key=lambda d: d["image"])
        split = float(request.get("val_split", DEFAULT_VAL_SPLIT))
        if len(datalist) < 2 or split <= 0:
            self._heldout = []
            return datalist, []
        count = min(len(datalist) - 1, max(1, round(len(datalist) * split)))
        held = set(random.Random(0).sample(range(len(datalist)), count))
        self._heldout = [d for i, d in enumerate(datalist) if i in held]
        return [d for i, d in enumerate(datalist) if i not in held], self._heldout

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        # Unticking "pretrained" trains from the bundle's own initialisation (the stock task fails on a None path).
        if _ticked(pretrained):
            super()._load_checkpoint(model_pytorch, True, train_handlers)

    def _update_overrides(self, overrides):
        request = self._request
        for key, handlers in (
            (self.const.key_train_handlers(), overrides.get(self.const.key_train_handlers(), [])),
            ("validate#handlers", self.bundle_config.get("validate#handlers", [])),
        ):
            overrides[key] = [
                h
                for h in copy.deepcopy(handlers)
                if not (isinstance(h, dict) and h.get("_target_") in _SKIPPED_HANDLERS)
            ]
        max_epochs = int(overrides[self.const.key_train_trainer_max_epochs()])
        overrides["max_epochs"] = max_epochs  # the LR schedule spans the fine-tuning, not the full training
        # The candidate is compared after training; in-training validation only when asked for.
        overrides["val_interval"] = int(request.get("val_interval") or max_epochs + 1)
        if not self._heldout:
            overrides["val_interval"] = max_epochs + 1
        # Whatever the bundle's handlers still write (checkpoints, logs) stays out of models/*.pt.
        os.makedirs(self.workdir, exist_ok=True)
        overrides["ckpt_dir"] = self.workdir
        overrides["output_dir"] = self.workdir
        overrides["learning_rate"] = float(request["learning_rate"])
        self._stats = {}
        self._write_stats(
            status="RUNNING",
            start_ts=int(time.time()),
            epoch=0,
            total_epochs=max_epochs,
            best_metric=0.0,
            source_weights=request["model_filename"] if _ticked(request.get("pretrained", True)) else None,
            learning_rate=overrides["learning_rate"],
            train_images=len(overrides[self.const.key_train_dataset_data()]),
            heldout_images=[os.path.basename(d["image"]) for d in self._heldout],
        )
        return overrides

    def _on_epoch(self, engine) -> None:
        output = engine.state.output
        output = output[0] if isinstance(output, list) and output else output
        loss = output.get("loss") if isinstance(output, dict) else None
        self._write_stats(
            epoch=engine.state.epoch,
            current_time=round(time.time() - self._stats["start_ts"], 1),
            train_loss=None if loss is None else float(loss),
        )

    def run_single_gpu(self, request, overrides):
        try:
            self._fine_tune(request, overrides)
        except BaseException as e:
            # Slicer shows progress from these stats: a failed run must not look as if it still runs.
            self._write_stats(status="FAILED", reason=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            raise

    def _fine_tune(self, request, overrides) -> None:
        from ignite.engine import Events
        from monai.bundle.scripts import create_workflow

        workflow = create_workflow(
            config_file=self.bundle_config_path,
            meta_file=self.bundle_metadata_path,
            run_id=request.get("run_id", "run"),
            **overrides,
        )
        trainer = workflow.parser.get_parsed_content("train#trainer")
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        network = workflow.parser.get_parsed_content(self.const.key_network())
        network = getattr(network, "module", network)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch)

        served_version = self.registry.served()
        served_metric = None
        if self._heldout:
            # The served model on the held-out images, through the same evaluator the candidate goes through.
            initial = {k: v.detach().clone() for k, v in network.state_dict().items()}
            served = torch.load(self.registry.served_path(), map_location="cpu", weights_only=True)
            network.load_state_dict(served.get(self.model_dict_key, served), strict=True)
            served_metric = _metric(evaluator)
            network.load_state_dict(initial)
            self._write_stats(served_metric=served_metric)

        workflow.run()
        state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
        candidate_metric = _metric(evaluator) if self._heldout else None
        fd, tmp = tempfile.mkstemp(dir=self.registry.models_dir, prefix=".candidate.", suffix=".pt")
        os.close(fd)
        atomic_torch_save({self.model_dict_key: state}, tmp)
        outcome = {
            "served_version_before": served_version,
            "served_metric": served_metric,
            "candidate_metric": candidate_metric,
            "best_metric": candidate_metric if _finite(candidate_metric) else 0.0,
            "sha256": file_sha256(tmp),
        }
        if not self._heldout:
            reason = (
                "not published: no held-out labelled image to compare it on "
                f"(needs at least 2 labelled images and val_split > 0; this run had {self._stats['train_images']} "
                "labelled image(s) for training and none held out)."
            )
        elif not _finite(candidate_metric):
            reason = f"not published: its held-out Dice is {candidate_metric} (training diverged)."
        elif not _finite(served_metric) or candidate_metric >= served_metric:
            reason = ""
        else:
            reason = (
                f"not published: held-out Dice {candidate_metric:.4f} is below the served model's "
                f"{served_metric:.4f} ({served_version}) on the same {len(self._heldout)} image(s)."
            )
        if reason:
            outcome.update(published=False, weights=self.registry.keep_candidate(tmp), reason=reason)
        else:
            record = {k: outcome[k] for k in ("served_version_before", "served_metric", "candidate_metric", "sha256")}
            record["heldout_images"] = self._stats["heldout_images"]
            version = self.registry.publish(tmp, record)
            outcome.update(
                published=True,
                version=version,
                weights=self.registry.file_of(version),
                reason=f"published as {version}: held-out Dice {candidate_metric:.4f} >= served "
                f"{served_metric:.4f} ({served_version}).",
            )
        workflow.finalize()
        self._write_stats(
            status="DONE",
            total_time=round(time.time() - self._stats["start_ts"], 1),
            finished=time.strftime("%Y-%m-%d %H:%M:%S"),
            **outcome,
        )
        logger.info(f"Fine-tuning finished: {outcome['reason']}")

    def run_multi_gpu(self, request, cmd, env):
        raise MONAILabelException(MONAILabelError.INVALID_INPUT, "multi-GPU fine-tuning is not supported by this app.")


# --------------------------------------------------------------------------------------------------
# active learning
# --------------------------------------------------------------------------------------------------
class RandomUnlabeled(Random):
    """The stock random strategy (images not picked lately are likelier), without its failure.

    monailabel 0.8.5 weighs each unlabeled image by the seconds since it was last picked and raises
    ``ValueError`` (HTTP 500) when every unlabeled image was picked within the current second.
    """

    def __call__(self, request, datastore: Datastore):
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        strategy = request["strategy"]
        now = int(time.time())
        weights = [
            max(now - datastore.get_image_info(i).get("strategy", {}).get(strategy, {}).get("ts", 0), 1) for i in images
        ]
        index = random.choices(range(len(images)), weights=weights)[0]
        return {"id": images[index], "weight": weights[index]}


# --------------------------------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------------------------------
class MSA2NetLabelApp(MONAILabelApp):
    """Serves one MSA2-Net bundle folder: ``<app>/model/<name>`` (``--conf models NAME``) or ``--conf bundle DIR``."""

    def __init__(self, app_dir, studies, conf):
        self.model_name = (conf.get("models") or "msa2net").split(",")[0].strip()
        bundle = conf.get("bundle") or os.path.join(app_dir, "model", self.model_name)
        self.bundle_dir = os.path.realpath(bundle)
        for part in ("configs/inference.json", "configs/train.json", "configs/metadata.json"):
            if not os.path.isfile(os.path.join(self.bundle_dir, part)):
                raise MONAILabelException(
                    MONAILabelError.APP_INIT_ERROR,
                    f"{self.bundle_dir}: not a bundle folder ({part} missing); export one with label/serve.py.",
                )
        if not os.path.isfile(os.path.join(self.bundle_dir, "models", SHIPPED_FILE)):
            raise MONAILabelException(
                MONAILabelError.APP_INIT_ERROR,
                f"{self.bundle_dir}/models/{SHIPPED_FILE} is missing: the bundle has no trained weights.",
            )
        self.registry = open_registry(self.bundle_dir, conf.get("keep_versions"))
        self.upload_roots: List[str] = []
        with open(os.path.join(self.bundle_dir, "configs", "metadata.json")) as f:
            metadata = json.load(f)
        try:
            self.num_classes = len(bundle_classes(self.bundle_dir))
        except ValueError as e:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, str(e)) from e
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"MSA2-Net ({metadata.get('name', self.model_name)})",
            description=metadata.get("description", ""),
            version=metadata.get("version", "0"),
        )

    def server_mode(self, mode: bool):
        super().server_mode(mode)
        if mode:
            from monailabel.app import app as server

            from http_routes import install

            install(server, self)

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return CheckedDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            num_classes=self.num_classes,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        task = MSA2NetInferTask(self.bundle_dir, self.conf)
        if not task.is_valid():
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"{self.bundle_dir}: inference task not valid.")
        return {self.model_name: task}

    def init_trainers(self) -> Dict[str, TrainTask]:
        task = MSA2NetTrainTask(self.bundle_dir, self.conf)
        return {self.model_name: task} if task.is_valid() else {}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": RandomUnlabeled(), "first": First()}

    def strategy_names(self) -> List[str]:
        """Names of the active-learning strategies."""
        return sorted(self._strategies)

    def bundle_path(self, model):
        # Called by /train and /batch/infer before a background task starts: refuse unknown models there.
        self._check_model(model)
        return super().bundle_path(model)

    def _check_model(self, model) -> None:
        if model and model not in self._trainers and model not in self._infers:
            raise HTTPException(404, f"model {model!r} is not served here; models: {sorted(self._infers)}.")

    def versions(self, model: str) -> Dict[str, Any]:
        """``GET /versions/<model>``: the served version, the kept ones with their held-out scores, the candidate."""
        self._check_model(model)
        state = self.registry.state()
        candidate = os.path.join(self.registry.models_dir, CANDIDATE_FILE)
        state["candidate_file"] = CANDIDATE_FILE if os.path.isfile(candidate) else None
        return state

    def serve_version(self, model: str, version: str) -> Dict[str, Any]:
        """``PUT /versions/<model>?serve=VERSION``: serve ``shipped`` or a kept ``vNNNN`` from the next ``/infer`` on."""
        self._check_model(model)
        try:
            return self.registry.serve(version)
        except RegistryError as e:
            raise HTTPException(404, str(e)) from None

    def _check_image(self, image: Any, datastore) -> None:
        if not isinstance(image, str) or not image:
            raise HTTPException(400, "no image given: pass an image id of the datastore or upload a file.")
        if datastore.get_image_uri(image):
            return
        if os.path.isabs(image) and os.path.exists(image):
            # A path only comes from an upload to /infer, a session or the studies folder.
            real = os.path.realpath(image)
            roots = [self.studies, *self.upload_roots]
            if self._sessions is not None:
                roots.append(self._sessions.store_path)
            roots = [os.path.realpath(r) for r in roots]
            if not any(real == r or real.startswith(r + os.sep) for r in roots):
                raise HTTPException(403, f"{os.path.basename(image)!r}: only datastore image ids and uploaded files can be segmented.")
            return
        raise HTTPException(
            404,
            f"image {image!r} is not in the datastore ({len(datastore.list_images())} images); "
            "upload it first (PUT /datastore/image) or send the file with the request.",
        )

    def infer(self, request, datastore=None):
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(404, f"model {model!r} is not served here; models: {sorted(self._infers)}.")
        self._check_image(request.get("image"), datastore or self.datastore())
        name = request.get("image_name") or request.get("image")
        try:
            return super().infer(request, datastore)
        except HTTPException:
            raise
        except MONAILabelException as e:
            raise HTTPException(400, f"inference of {name!r} failed: {e.msg}") from None
        except Exception as e:
            logger.exception("inference failed")
            detail = str(e).splitlines()[0][:300] if str(e) else ""
            if isinstance(request.get("image"), str) and os.path.isabs(request["image"]):
                detail = detail.replace(request["image"], str(name))
            raise HTTPException(500, f"inference of {name!r} with {model!r} failed: {type(e).__name__}: {detail}") from None
