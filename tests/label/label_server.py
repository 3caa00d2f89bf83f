"""Starting and driving a real MONAI Label server with this project's app, for the label tests and benchmark.

The server is ``label/serve.py`` (the documented command) in a subprocess on a free loopback port.
Only importable in the label environment (it needs ``monailabel``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundle"
SERVE = ROOT / "label" / "serve.py"
SHIPPED_WEIGHTS = BUNDLE / "models" / "model.pt"
SHARED_DATA = Path(os.environ.get("MSA2NET_SHARED_DATA", ROOT.parent / "shared" / "data"))
MODEL = "msa2net"
#: Config a tiny model is trained and served with: the synthetic profile at 64x64 slices (faster).
TINY_OVERRIDES = {"spatial_size": [64, 64]}
STARTUP_TIMEOUT = 240
TRAIN_TIMEOUT = 600


def load_serve():
    """``label/serve.py`` as a module."""
    spec = importlib.util.spec_from_file_location("msa2net_label_serve", SERVE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command; AssertionError with its output tails when it fails."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def real(*parts: str) -> Path | None:
    """A path under the shared real-data folder, or None when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    return path if path.exists() else None


def train_tiny(root: Path, data: Path, epochs: int) -> Path:
    """Train the tiny preset with the synthetic profile through ``monai.bundle run training``; returns model.pt."""
    out = root / "tiny_run"
    config = "['configs/train.json','configs/profile_synthetic.json']"
    run(
        [
            sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config,
            "--dataset_dir", str(data), "--max_epochs", str(epochs), "--val_interval", str(epochs),
            "--batch_size", "8", "--slices_per_volume", "8", "--num_workers", "0",
            "--spatial_size", json.dumps(TINY_OVERRIDES["spatial_size"]),
            "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"),
        ],
        cwd=BUNDLE,
    )  # fmt: skip
    weights = out / "models" / "model.pt"
    assert weights.is_file(), f"training wrote no {weights}"
    return weights


class Server:
    """A MONAI Label server started with ``label/serve.py`` on a free port; stop() ends it and its children."""

    def __init__(self, root: Path, studies: Path, *extra: str):
        self.root = root
        self.app = root / "app"
        self.bundle = self.app / "model" / MODEL
        self.models = self.bundle / "models"
        self.studies = studies
        self.log = root / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, str(SERVE), "--app-dir", str(self.app), "--studies", str(studies)]
        cmd += ["--port", str(self.port), *extra]
        # Sessions (volumes uploaded without entering the datastore) go to the test's folder, not ~/.cache.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MONAI_LABEL_SESSION_PATH": str(root / "sessions")}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        client = self.client(self.root / "probe")
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                client.info()
                return
            except (OSError, MONAILabelClientException):
                if time.monotonic() > deadline:
                    raise AssertionError(f"server not answering after {STARTUP_TIMEOUT} s:\n{self.log_tail()}") from None
                time.sleep(1.0)

    def client(self, tmpdir: Path) -> MONAILabelClient:
        """MONAI Label's own client, saving results into ``tmpdir``."""
        tmpdir.mkdir(parents=True, exist_ok=True)
        return MONAILabelClient(self.url, tmpdir=str(tmpdir))

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def train(self, client: MONAILabelClient, params: dict, on_poll=None) -> dict:
        """Start a fine-tuning, wait for it, return the final train stats; ``on_poll(info)`` sees each /info while it runs."""
        task = client.train_start(MODEL, params)
        assert task.get("status") in ("SUBMITTED", "RUNNING"), task
        deadline = time.monotonic() + TRAIN_TIMEOUT
        status = task
        while status.get("status") in ("SUBMITTED", "RUNNING"):
            assert time.monotonic() < deadline, f"training still running after {TRAIN_TIMEOUT} s: {status}"
            if on_poll is not None:
                on_poll(client.info())
            time.sleep(0.5)
            status = client.train_status()
        assert status["status"] == "DONE", f"{status}\n{self.log_tail()}"
        return client.info()["train_stats"][MODEL]

    def stop(self) -> None:
        """Stop the server and everything it started (its training subprocesses share its process group)."""
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
