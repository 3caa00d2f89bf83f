"""Which weights a MONAI Label server serves: the shipped file, published fine-tunes and the last candidate.

All files live in the bundle's ``models/`` folder:

* ``model.pt``: the shipped weights, never written (version ``shipped``);
* ``model_vNNNN.pt``: fine-tunes that were published (they beat the served model on held-out labelled
  images); the newest ``keep`` of them are kept, older ones are deleted (never the one being served);
* ``model_candidate.pt``: the last fine-tune that was *not* published, kept for inspection;
* ``versions.json``: the registry: which version is served and what each one scored.

The training subprocess publishes and the server process rolls back, so every read-modify-write of
the registry holds an exclusive file lock and the registry is replaced atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

SHIPPED = "shipped"
SHIPPED_FILE = "model.pt"
CANDIDATE_FILE = "model_candidate.pt"
REGISTRY_FILE = "versions.json"
DEFAULT_KEEP = 3
_VERSION = re.compile(r"^v(\d{4,})$")


class RegistryError(ValueError):
    """A request names a version that does not exist (the message is meant for the client)."""


class WeightsRegistry:
    """Published versions of one bundle's weights.

    Args:
        models_dir: the bundle's ``models`` folder.
        keep: how many published fine-tunes to keep (at least 1).
    """

    def __init__(self, models_dir: str, keep: int = DEFAULT_KEEP):
        self.models_dir = models_dir
        self.keep = max(1, int(keep))
        self._path = os.path.join(models_dir, REGISTRY_FILE)
        self._lock_path = os.path.join(models_dir, ".versions.lock")

    # -------------------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[Dict[str, Any]]:
        os.makedirs(self.models_dir, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self._read()
                yield state
                self._write(state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> Dict[str, Any]:
        try:
            with open(self._path) as f:
                state = json.load(f)
        except FileNotFoundError:
            state = {}
        state.setdefault("served", SHIPPED)
        state.setdefault("versions", [])
        return state

    def _write(self, state: Dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.models_dir, prefix=".versions.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=2)
            os.replace(tmp, self._path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    # -------------------------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        """The registry as stored: ``served``, ``keep`` and ``versions`` (oldest first, with their scores)."""
        state = self._read()
        state["keep"] = self.keep
        state["shipped_file"] = SHIPPED_FILE
        return state

    def served(self) -> str:
        """The version the next default ``/infer`` uses (``shipped`` or ``vNNNN``)."""
        return self._read()["served"]

    def file_of(self, version: str) -> str:
        """Weights file name (inside ``models/``) of a version; :class:`RegistryError` when there is none."""
        if version == SHIPPED:
            return SHIPPED_FILE
        for entry in self._read()["versions"]:
            if entry["version"] == version:
                return entry["file"]
        raise RegistryError(f"no published version {version!r}; versions: {self.names()}.")

    def served_path(self) -> str:
        """Path of the served weights (the shipped file when a served version's file went missing)."""
        path = os.path.join(self.models_dir, self.file_of(self.served()))
        return path if os.path.isfile(path) else os.path.join(self.models_dir, SHIPPED_FILE)

    def names(self) -> List[str]:
        """``shipped`` and the kept published versions, oldest first."""
        return [SHIPPED] + [v["version"] for v in self._read()["versions"]]

    def files(self) -> List[str]:
        """Selectable weights files: the served one first, then the other versions newest first, then the candidate."""
        state = self._read()
        served = self.file_of(state["served"])
        ordered = [served] + [v["file"] for v in reversed(state["versions"])] + [SHIPPED_FILE, CANDIDATE_FILE]
        names: List[str] = []
        for name in ordered:
            if name not in names and os.path.isfile(os.path.join(self.models_dir, name)):
                names.append(name)
        return names or [SHIPPED_FILE]

    # -------------------------------------------------------------------------------------------
    def publish(self, weights_file: str, record: Dict[str, Any]) -> str:
        """Move ``weights_file`` in as the next version, serve it, prune old versions; returns the version."""
        with self._locked() as state:
            numbers = [int(_VERSION.match(v["version"]).group(1)) for v in state["versions"]]
            number = max(numbers, default=int(state.get("last_number", 0))) + 1
            state["last_number"] = number
            version = f"v{number:04d}"
            name = f"model_{version}.pt"
            shutil.move(weights_file, os.path.join(self.models_dir, name))
            entry = {"version": version, "file": name, "published": time.strftime("%Y-%m-%d %H:%M:%S")}
            entry.update(record)
            state["versions"].append(entry)
            state["served"] = version
            self._prune(state)
            return version

    def keep_candidate(self, weights_file: str) -> str:
        """Keep a fine-tune that was not published as ``model_candidate.pt`` (replacing the previous one)."""
        dest = os.path.join(self.models_dir, CANDIDATE_FILE)
        os.replace(weights_file, dest)
        return CANDIDATE_FILE

    def serve(self, version: str) -> Dict[str, Any]:
        """Serve an earlier (or later) version: ``shipped`` or a kept ``vNNNN`` (the rollback call)."""
        with self._locked() as state:
            known = [SHIPPED] + [v["version"] for v in state["versions"]]
            if version not in known:
                raise RegistryError(f"no published version {version!r}; versions: {known}.")
            previous, state["served"] = state["served"], version
        return {"served": version, "previous": previous}

    def _prune(self, state: Dict[str, Any]) -> None:
        while len(state["versions"]) > self.keep:
            oldest = next((v for v in state["versions"] if v["version"] != state["served"]), None)
            if oldest is None:
                break
            state["versions"].remove(oldest)
            path = os.path.join(self.models_dir, oldest["file"])
            if os.path.exists(path):
                os.remove(path)


def open_registry(bundle_dir: str, keep: Optional[Any] = None) -> WeightsRegistry:
    """The registry of a bundle folder; ``keep`` as given in the app's ``--conf keep_versions N``."""
    try:
        keep = int(keep) if keep not in (None, "") else DEFAULT_KEEP
    except (TypeError, ValueError):
        raise RegistryError(f"keep_versions {keep!r}: expected a whole number of versions to keep.") from None
    return WeightsRegistry(os.path.join(bundle_dir, "models"), keep)
