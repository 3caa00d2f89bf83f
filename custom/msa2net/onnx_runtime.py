"""Bundle inference through ONNX Runtime on the CPU, selected by a config file.

``configs/inference_onnxruntime.json`` replaces the bundle's ``network`` by :class:`OnnxRuntimeNetwork`,
which keeps the PyTorch network for its weights and runs the forward pass in ONNX Runtime:

* weights still come from ``ckpt_path`` through :func:`msa2net.inference.load_weights`
  (``weights_only=True``); ``load_state_dict`` goes to the PyTorch network;
* on the first forward pass after weights are loaded, the network is exported (legacy TorchScript-based
  exporter, opset 17, dynamic batch, at ``input_shape``) to ``onnx_path``, unless that file was
  exported before from the same weights, input shape, opset and package versions (a SHA-256 of them
  is stored in the model's metadata); the file is written under a temporary name and renamed;
* sessions are built under a lock, so concurrent callers (a MONAI Label server) share one;
* the session is checked against PyTorch on a random batch of two (:func:`msa2net.export.check_exported`):
  logits must agree within ``atol`` (default 1e-3), else a ``RuntimeError`` names the difference.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from msa2net.export import check_exported

__all__ = ["OnnxRuntimeNetwork", "weights_digest"]

_DIGEST_KEY = "msa2net_export_sha256"
_OPSET = 17


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over the names, shapes, types and bytes of a module's state dict."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class OnnxRuntimeNetwork(nn.Module):
    """A PyTorch network whose forward pass runs in ONNX Runtime (CPU).

    Args:
        network: the PyTorch network (its weights are loaded and exported).
        onnx_path: where the exported model is kept between runs; a temporary folder is used when
            that folder cannot be written.
        input_shape: ``(1, C, H, W)`` the export traces; the exported model takes any batch size at
            that ``C, H, W``.
        threads: ONNX Runtime intra-op threads (default: all cores).
        atol: largest logit difference to PyTorch accepted by the check at start-up.

    Shapes: input ``(B, C, H, W)`` float tensor; output ``(B, num_classes, H, W)`` float32 on the input's device.
    """

    def __init__(
        self, network: nn.Module, onnx_path: str | os.PathLike, input_shape: Sequence[int], threads: int | None = None, atol: float = 1e-3
    ) -> None:
        super().__init__()
        if len(input_shape) != 4 or input_shape[0] != 1:
            raise ValueError(f"input_shape must be (1, C, H, W), got {tuple(input_shape)}.")
        self.network = network.cpu().eval()
        self.onnx_path = Path(onnx_path)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.threads = threads or os.cpu_count()
        self.atol = atol
        self._session = None
        self._lock = threading.Lock()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # Checkpoints hold the PyTorch network's keys; new weights need a new export.
        with self._lock:
            self._session = None
            return self.network.load_state_dict(state_dict, strict=strict, assign=assign)

    def state_dict(self, *args, **kwargs):
        return self.network.state_dict(*args, **kwargs)

    def _export(self, digest: str) -> bytes:
        import onnx

        buf = io.BytesIO()
        with torch.no_grad():
            torch.onnx.export(
                self.network, torch.rand(self.input_shape), buf, input_names=["image"], output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=_OPSET, dynamo=False,
            )
        model = onnx.load_from_string(buf.getvalue())
        onnx.helper.set_model_props(model, {_DIGEST_KEY: digest})
        return model.SerializeToString()

    def _model_bytes(self) -> bytes:
        import onnx

        import msa2net

        # The export fixes the spatial size (and follows the code and exporter): all are part of the key.
        key = f"{weights_digest(self.network)}:{self.input_shape}:{_OPSET}:{msa2net.__version__}:{torch.__version__}"
        digest = hashlib.sha256(key.encode()).hexdigest()
        if self.onnx_path.is_file():
            cached = self.onnx_path.read_bytes()
            try:
                props = {p.key: p.value for p in onnx.load_from_string(cached).metadata_props}
            except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt
                props = {}
            if props.get(_DIGEST_KEY) == digest:
                return cached
        blob = self._export(digest)
        target = self.onnx_path
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        except OSError:
            target = Path(tempfile.gettempdir()) / f"msa2net_{digest[:16]}.onnx"
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, target)
        return blob

    def session(self):
        """The ONNX Runtime session for the current weights (exported and checked on first use)."""
        with self._lock:
            if self._session is None:
                self._session = self._new_session()
            return self._session

    def _new_session(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(self._model_bytes(), so, providers=["CPUExecutionProvider"])
        try:
            check_exported(lambda x: sess.run(None, {"image": x.numpy()})[0], self.network, self.input_shape, self.atol, batch_sizes=(2,))
        except AssertionError as e:
            raise RuntimeError(f"{self.onnx_path}: ONNX Runtime disagrees with PyTorch: {e}") from None
        return sess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session().run(None, {"image": x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(x.device)
