"""HTTP routes this app puts in front of MONAI Label 0.8.5's own.

MONAI Label's ``POST /infer/{model}`` runs inference inside an ``async`` handler, so one inference
stops every other request (``/info``, training status) until it ends; it answers a missing image,
malformed ``params`` or an unreadable upload with a bare 500 that shows the server's temporary path.
``POST /activelearning/{strategy}`` answers an unknown strategy with a 500. The routes here take the
same parameters and answer the same way, but run in FastAPI's thread pool (the event loop keeps
answering) and turn client errors into 4xx messages that name the problem and no server path.
``/versions/{model}`` lists the served and kept weights and switches between them (roll back).

They are inserted at the front of the server's route table when the app starts in server mode
(routes are matched in order, so they take precedence over MONAI Label's routes of the same path).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Dict, Optional

import numpy as np
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, File, Form, HTTPException, UploadFile
from monailabel.config import settings
from monailabel.endpoints.activelearning import sample as next_sample
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.utils.others.generic import remove_file

__all__ = ["install", "read_volume", "save_upload", "scrub_paths"]

#: Image file endings an upload may have (MONAI's LoadImage reads them).
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd", ".nrrd.gz")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"/:]+/)*[^\s'\"/:]*")


def scrub_paths(text: str, path: str, name: str) -> str:
    """``text`` with ``path`` replaced by ``name`` and any other absolute path by ``<path>``."""
    return _ABSOLUTE_PATH.sub("<path>", text.replace(path, name))


def read_volume(path: str, what: str, name: str):
    """Load an image as the bundle does (MONAI LoadImage); HTTP 422 naming ``name`` when it is unusable.

    Returns:
        the loaded MetaTensor and its array (2D or 3D).
    """
    from monai.transforms import LoadImage

    try:
        img = LoadImage(image_only=True)(path)
        array = np.asarray(img)
    except Exception as e:  # any reader failure means the file is unusable
        detail = scrub_paths(str(e).splitlines()[0][:300] if str(e) else "", path, name)
        raise HTTPException(422, f"{what} {name!r} is not a readable image ({type(e).__name__}: {detail})") from None
    if array.ndim not in (2, 3) or min(array.shape) < 1:
        raise HTTPException(
            422, f"{what} {name!r} has shape {tuple(array.shape)}; expected a single-channel 2D or 3D image."
        )
    return img, array


def _parse_params(params: Optional[str]) -> Dict[str, Any]:
    try:
        value = json.loads(params) if params else {}
    except json.JSONDecodeError as e:
        raise HTTPException(400, f"params is not valid JSON ({e.msg} at character {e.pos}).") from None
    if not isinstance(value, dict):
        raise HTTPException(400, f"params must be a JSON object, not {type(value).__name__}.")
    return value


def _suffix(filename: str) -> str:
    lower = filename.lower()
    for suffix in sorted(UPLOAD_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return suffix
    raise HTTPException(
        415, f"uploaded file {os.path.basename(filename)!r}: unsupported type; send one of {list(UPLOAD_SUFFIXES)}."
    )


def save_upload(upload: UploadFile, folder: str, background_tasks: BackgroundTasks) -> tuple[str, str]:
    """Write an upload to a private file (removed after the response); returns (path, client's file name)."""
    name = os.path.basename(upload.filename or "upload.nii.gz")
    path = os.path.join(folder, f"{uuid.uuid4().hex}{_suffix(name)}")
    with open(path, "wb") as out:
        shutil.copyfileobj(upload.file, out)
    background_tasks.add_task(remove_file, path)
    return path, name


def build_router(app) -> APIRouter:
    """The routes, bound to a running :class:`MSA2NetLabelApp` ``app``."""
    router = APIRouter()
    upload_dir = tempfile.mkdtemp(prefix="msa2net-label-uploads-")
    app.upload_roots.append(upload_dir)

    @router.post("/infer/{model}", summary="Run inference (MSA2-Net app: runs off the event loop)")
    def infer(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: Optional[ResultType] = None,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
    ):
        request: Dict[str, Any] = {"model": model, "image": image}
        extra = _parse_params(params)
        if output == ResultType.dicom_seg:
            raise HTTPException(400, "output=dicom_seg needs a DICOMweb datastore; this server has a local one.")
        if label:
            raise HTTPException(400, "this app's model takes no input label; send the image alone.")
        if file:
            path, name = save_upload(file, upload_dir, background_tasks)
            read_volume(path, "uploaded file", name)
            request["image"], request["image_name"] = path, name
        elif session_id:
            sessions = app.sessions()
            session = sessions.get_session(session_id) if sessions is not None else None
            if not session:
                raise HTTPException(404, f"session {session_id!r} does not exist or has expired; upload the image again.")
            request["image"], request["image_name"] = session.image, f"session {session_id}"
            request["session"] = session.to_json()
        elif not image:
            raise HTTPException(400, "no image given: pass image=<datastore id>, a session_id or upload a file.")
        request.update(app.info().get("config", {}).get("infer", {}))
        request.update(extra)
        result = app.infer(request)
        return send_response(app.datastore(), result, output, background_tasks)

    @router.post("/activelearning/{strategy}", summary="Next sample to label (MSA2-Net app: unknown strategy = 404)")
    def activelearning(
        strategy: str,
        params: Optional[dict] = None,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
    ):
        if strategy not in app.strategy_names():
            raise HTTPException(404, f"strategy {strategy!r} does not exist; strategies: {app.strategy_names()}.")
        return next_sample(strategy, params, user.username)

    @router.get("/versions/{model}", summary="Weights versions: served, kept and their held-out scores")
    def versions(model: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        return app.versions(model)

    @router.put("/versions/{model}", summary="Serve another kept version (roll back): ?serve=v0001 or shipped")
    def serve_version(model: str, serve: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        return app.serve_version(model, serve)

    return router


def install(server: FastAPI, app) -> None:
    """Put this app's routes in front of MONAI Label's in ``server``'s route table."""
    routes = server.router.routes
    before = len(routes)
    server.include_router(build_router(app), prefix=settings.MONAI_LABEL_API_STR)
    added = routes[before:]
    del routes[before:]
    routes[0:0] = added
    server.openapi_schema = None

