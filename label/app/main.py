"""MONAI Label app that serves the MSA2-Net bundle (segmentation, fine-tuning, active learning).

Start it with ``label/serve.py`` (see ``bundle/docs/monailabel.md``); it is a normal MONAI Label
app folder, so ``python -m monailabel.main start_server --app label/app --studies DIR --conf models msa2net``
works too once the bundle folder is in ``label/app/model/msa2net``.

Why not the stock ``monaibundle`` sample app of monailabel 0.8.5 (it does load a local bundle from
``<app>/model/<name>``, and its /info/ and /infer/ work with this bundle):

* its trainer runs the bundle's ``train.json`` as is, whose best-model handler writes
  ``<bundle>/models/model.pt``: fine-tuning would overwrite the shipped weights in place, and the
  bundle's resumable-training handler would resume the previous fine-tuning run instead of starting one;
* its inference task picks the shortest ``models/*.pt`` name (``model.pt``) unless the client names a
  file, so the next /infer after a fine-tuning would still use the shipped weights;
* a bad request (unknown image id, corrupt upload, label of another shape) ends in a bare
  ``500 Internal Server Error`` or is accepted and breaks training later.

Here the shipped ``models/model.pt`` is never written: a fine-tuning starts from the newest weights,
runs the bundle's own training workflow on the datastore's labelled images and publishes its final
weights atomically to ``models/model_finetuned.pt`` (its logs go to ``models/finetune/``); inference
uses the newest of the two files unless the request names one (``model_filename``). Uploads are read
back before they enter the datastore and bad requests get an HTTP 4xx with a message. Nothing is
downloaded: there is no model-zoo lookup and no SAM2 model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
from typing import Any, Dict

import numpy as np
import torch
from fastapi import HTTPException
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
from monailabel.config import settings
from msa2net.atomic import atomic_torch_save

logger = logging.getLogger(__name__)

SHIPPED_WEIGHTS = "model.pt"
FINETUNED_WEIGHTS = "model_finetuned.pt"
FINETUNE_DIR = "finetune"
DEFAULT_EPOCHS = 10
# Bundle handlers left out of a MONAI Label fine-tuning: it always starts from weights (no resuming),
# and it publishes its final weights itself (the bundle's best-model saver writes ``<ckpt_dir>/model.pt``).
_SKIPPED_HANDLERS = ("msa2net.handlers.ResumeCheckpoint", "msa2net.handlers.BestModelSaver")
_IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --------------------------------------------------------------------------------------------------
# weights files
# --------------------------------------------------------------------------------------------------
def weights_choices(bundle_dir: str) -> list[str]:
    """Weights files of the bundle, newest first: the fine-tuned file (when present), then the shipped one."""
    models = os.path.join(bundle_dir, "models")
    names = [n for n in (FINETUNED_WEIGHTS, SHIPPED_WEIGHTS) if os.path.isfile(os.path.join(models, n))]
    return names or [SHIPPED_WEIGHTS]


def resolve_weights(bundle_dir: str, requested: Any = None) -> str:
    """Path of the weights to use: the file named in the request, else the newest one."""
    if isinstance(requested, (list, tuple)):
        requested = requested[0] if requested else None
    if requested:
        name = os.path.basename(str(requested))
        if name not in (SHIPPED_WEIGHTS, FINETUNED_WEIGHTS):
            raise HTTPException(400, f"model_filename {requested!r}: choose one of {weights_choices(bundle_dir)}.")
        path = os.path.join(bundle_dir, "models", name)
        if not os.path.isfile(path):
            raise HTTPException(
                404, f"model_filename {name!r} does not exist yet; available: {weights_choices(bundle_dir)}."
            )
        return path
    return os.path.join(bundle_dir, "models", weights_choices(bundle_dir)[0])


_sha_cache: Dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


# --------------------------------------------------------------------------------------------------
# datastore: read uploads back before accepting them
# --------------------------------------------------------------------------------------------------
def _read_volume(path: str, what: str, name: str):
    """Load an uploaded file the way the bundle does (MONAI LoadImage); HTTP 422 when it cannot be read."""
    from monai.transforms import LoadImage

    try:
        img = LoadImage(image_only=True)(path)
        array = np.asarray(img)
    except Exception as e:  # any reader failure means the upload is unusable
        raise HTTPException(
            422, f"{what} {name!r} is not a readable image ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        ) from None
    if array.ndim not in (2, 3) or min(array.shape) < 1:
        raise HTTPException(
            422, f"{what} {name!r} has shape {tuple(array.shape)}; expected a single-channel 2D or 3D image."
        )
    return img, array


class CheckedDatastore(LocalDatastore):
    """Local datastore that refuses unreadable images and labels that do not fit their image."""

    def __init__(self, *args, num_classes: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_classes = num_classes

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        name = image_id or os.path.basename(image_filename)
        if image_id and not _IMAGE_ID.match(image_id):
            raise HTTPException(400, f"image id {image_id!r}: use letters, digits, '.', '_' or '-' (at most 128).")
        _read_volume(image_filename, "uploaded image", name)
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        image_uri = self.get_image_uri(image_id)
        if not image_uri or not os.path.isfile(image_uri):
            raise HTTPException(404, f"image {image_id!r} is not in the datastore; upload the image before its label.")
        label, label_array = _read_volume(label_filename, "uploaded label", image_id)
        image, image_array = _read_volume(image_uri, "image", image_id)
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
    """The bundle's inference.json (preprocessing, SliceInferer, Invertd) with the newest weights."""

    def __init__(self, path: str, conf: Dict[str, str]):
        # Set before the base class runs: with ``--conf preload true`` it loads the network at once.
        self.bundle_dir = path
        self._lock = threading.Lock()
        super().__init__(path, conf, type="segmentation", load_strict=True)
        if not self.valid:
            return
        models = os.path.join(path, "models")
        # Last existing path is the "latest" for MONAI Label (e.g. /model/<name> reports it).
        self.path = [os.path.join(models, SHIPPED_WEIGHTS), os.path.join(models, FINETUNED_WEIGHTS)]
        self._refresh_choices()

    def _refresh_choices(self) -> None:
        self._config["model_filename"] = weights_choices(self.bundle_dir)

    def config(self) -> Dict[str, Any]:
        self._refresh_choices()
        return self._config

    def __call__(self, request, callbacks=None):
        self._refresh_choices()
        request = dict(request)
        # A request that names no file gets the newest weights (the default of the options list).
        request.setdefault("model_filename", self._config["model_filename"][0])
        return super().__call__(request, callbacks)

    def _get_network(self, device, data):
        path = resolve_weights(self.bundle_dir, data.get("model_filename") if data else None)
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._networks.get(device)
            if cached and cached[1] == key:
                network = cached[0]
            else:
                logger.info(f"Loading weights {path} on {device}")
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
        # uint8 label maps (the bundle's own SaveImaged writes uint8 too).
        result_file, result_json = super().writer(data, extension=extension, dtype=dtype or np.uint8)
        result_json = dict(result_json or {})
        result_json["model_file"] = data.get("model_file")
        result_json["model_sha256"] = data.get("model_sha256")
        return result_file, result_json


# --------------------------------------------------------------------------------------------------
# training (fine-tuning on the datastore's labelled images)
# --------------------------------------------------------------------------------------------------
class MSA2NetTrainTask(BundleTrainTask):
    """Fine-tune with the bundle's train.json; final weights go to ``models/model_finetuned.pt``."""

    def __init__(self, path: str, conf: Dict[str, str]):
        super().__init__(path, conf, load_strict=True)
        self._request: Dict[str, Any] = {}
        self._last: Dict[str, Any] = {}

    def default_learning_rate(self) -> float:
        """A tenth of the bundle's training rate: fine-tuning starts from trained weights."""
        try:
            return float(self.bundle_config.get("learning_rate", 0.01)) / 10
        except (TypeError, ValueError):  # an expression rather than a number
            return 0.001

    def config(self):
        options = super().config()
        options["model_filename"] = weights_choices(self.bundle_path)
        options["max_epochs"] = DEFAULT_EPOCHS
        options["multi_gpu"] = False
        options["learning_rate"] = self.default_learning_rate()
        return options

    def stats(self):
        info = os.path.join(self.bundle_path, "models", FINETUNE_DIR, "finetune.json")
        if os.path.isfile(info):
            with open(info) as f:
                return json.load(f)
        return {}

    def __call__(self, request, datastore: Datastore):
        request = dict(request)
        name = request.get("model_filename")
        if isinstance(name, (list, tuple)) or not name:
            request["model_filename"] = weights_choices(self.bundle_path)[0]
        request["model_filename"] = os.path.basename(str(request["model_filename"]))
        if not os.path.isfile(os.path.join(self.bundle_path, "models", request["model_filename"])):
            # The stock task would silently train from scratch.
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"model_filename {request['model_filename']!r} not found; choose one of {weights_choices(self.bundle_path)}.",
            )
        # The same defaults as the options shown to clients (the stock task would use 50 epochs and the bundle's rate).
        request.setdefault("max_epochs", DEFAULT_EPOCHS)
        if request.get("learning_rate") in (None, ""):
            request["learning_rate"] = self.default_learning_rate()
        labelled = datastore.datalist()
        if not labelled:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, "no labelled image in the datastore: submit at least one label first."
            )
        self._request = request
        start = time.time()
        super().__call__(request, datastore)
        self._last["seconds"] = round(time.time() - start, 1)
        self._last["images"] = len(labelled)
        return dict(self._last)

    def _partition_datalist(self, datalist, request, shuffle=False):
        train_ds, val_ds = super()._partition_datalist(datalist, request, shuffle)
        if not val_ds:  # too few images to hold one out: validate on the training images
            val_ds = list(train_ds)
        return train_ds, val_ds

    def _update_overrides(self, overrides):
        request = self._request
        workdir = os.path.join(self.bundle_path, "models", FINETUNE_DIR)
        os.makedirs(workdir, exist_ok=True)
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
        overrides["val_interval"] = int(request.get("val_interval", max_epochs))
        # Whatever the bundle's handlers still write (checkpoints, logs) stays out of models/*.pt.
        overrides["ckpt_dir"] = workdir
        overrides["output_dir"] = workdir
        if request.get("learning_rate") not in (None, ""):
            overrides["learning_rate"] = float(request["learning_rate"])
        self._last = {
            "source_weights": os.path.basename(str(request.get("model_filename"))),
            "max_epochs": max_epochs,
            "learning_rate": overrides.get("learning_rate", self.bundle_config.get("learning_rate")),
        }
        return overrides

    def run_single_gpu(self, request, overrides):
        from monai.bundle.scripts import create_workflow

        workflow = create_workflow(
            config_file=self.bundle_config_path,
            meta_file=self.bundle_metadata_path,
            run_id=request.get("run_id", "run"),
            **overrides,
        )
        workflow.run()
        network = workflow.parser.get_parsed_content(self.const.key_network())
        network = getattr(network, "module", network)
        out = os.path.join(self.bundle_path, "models", FINETUNED_WEIGHTS)
        state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
        atomic_torch_save({self.model_dict_key: state}, out)
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        metric = evaluator.state.metrics.get(evaluator.state.key_metric_name) if evaluator.state.metrics else None
        self._last.update(
            {
                "weights": FINETUNED_WEIGHTS,
                "sha256": file_sha256(out),
                "val_mean_dice": None if metric is None else float(metric),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        )
        workflow.finalize()
        with open(os.path.join(self.bundle_path, "models", FINETUNE_DIR, "finetune.json"), "w") as f:
            json.dump(self._last, f, indent=2)
        logger.info(f"Fine-tuned weights written to {out}: {self._last}")

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
        if not os.path.isfile(os.path.join(self.bundle_dir, "models", SHIPPED_WEIGHTS)):
            raise MONAILabelException(
                MONAILabelError.APP_INIT_ERROR,
                f"{self.bundle_dir}/models/{SHIPPED_WEIGHTS} is missing: the bundle has no trained weights.",
            )
        with open(os.path.join(self.bundle_dir, "configs", "metadata.json")) as f:
            metadata = json.load(f)
        channel_def = next(iter(metadata["network_data_format"]["outputs"].values()))["channel_def"]
        self.num_classes = len(channel_def)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"MSA2-Net ({metadata.get('name', self.model_name)})",
            description=metadata.get("description", ""),
            version=metadata.get("version", "0"),
        )

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

    def bundle_path(self, model):
        # Called by /train and /batch/infer before a background task starts: refuse unknown models there.
        if model and model not in self._trainers and model not in self._infers:
            raise HTTPException(404, f"model {model!r} is not served here; models: {sorted(self._infers)}.")
        return super().bundle_path(model)

    def _check_image(self, image: Any, datastore) -> None:
        if not isinstance(image, str) or not image:
            raise HTTPException(400, "no image given: pass an image id of the datastore or upload a file.")
        if os.path.exists(image):
            # A path only comes from an upload to /infer (a temporary file), a session or the studies folder.
            real = os.path.realpath(image)
            roots = [tempfile.gettempdir(), self.studies]
            if self._sessions is not None:
                roots.append(self._sessions.store_path)
            roots = [os.path.realpath(r) for r in roots]
            if not any(real == r or real.startswith(r + os.sep) for r in roots):
                raise HTTPException(403, f"{image!r}: only datastore image ids and uploaded files can be segmented.")
            return
        if not datastore.get_image_uri(image):
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
        try:
            return super().infer(request, datastore)
        except HTTPException:
            raise
        except MONAILabelException as e:
            raise HTTPException(400, f"inference of {request.get('image')!r} failed: {e.msg}") from None
        except Exception as e:
            logger.exception("inference failed")
            raise HTTPException(
                500, f"inference of {request.get('image')!r} with {model!r} failed: {type(e).__name__}: {e}"
            ) from None
