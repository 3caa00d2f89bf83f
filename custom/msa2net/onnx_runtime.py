"""ONNX Runtime on the CPU: cached exports, INT8 dynamic quantisation, and sessions with chosen settings.

The CPU backends (:mod:`msa2net.backends`) run the network through these. Exports come from the
project's one exporter (:func:`msa2net.export.onnx_model`) and are kept in a cache folder of their
own, never at a path a user exports to: a file's name is a SHA-256 of everything the export depends
on (the weights, the input shape, the opset and the versions of this package, torch and onnx), so a
cached file is either the right export or not looked at, and files are written under a temporary name
and renamed (:mod:`msa2net.atomic`), so a cached file is never half-written.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from msa2net.atomic import atomic_path, atomic_write_bytes
from msa2net.export import ONNX_INPUT, ONNX_OPSET, onnx_model

__all__ = ["weights_digest", "cached_onnx", "cached_int8", "OrtSettings", "OrtRunner"]


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over the names, shapes, types and bytes of a module's state dict."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _export_key(digest: str, input_shape: Sequence[int], opset: int) -> str:
    import onnx

    import msa2net

    parts = [digest, str(tuple(input_shape)), str(opset), msa2net.__version__, torch.__version__, onnx.__version__]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:24]


def cached_onnx(
    network: nn.Module, input_shape: Sequence[int], cache_dir: str | os.PathLike, digest: str | None = None, opset: int = ONNX_OPSET
) -> Path:
    """Path of ``network`` exported to ONNX at ``input_shape`` in ``cache_dir``, exported (and checked) when absent.

    Args:
        network: the eval-mode PyTorch network.
        input_shape: ``(1, C, H, W)``; the export takes any batch size at ``C, H, W``.
        cache_dir: the cache folder (created).
        digest: :func:`weights_digest` of ``network`` when already known.
        opset: ONNX opset.
    """
    key = _export_key(digest or weights_digest(network), input_shape, opset)
    path = Path(cache_dir) / f"msa2net-{key}.onnx"
    if not path.is_file():
        atomic_write_bytes(path, onnx_model(network, input_shape, opset, {"msa2net_cache_key": key}))
    return path


def cached_int8(onnx_path: Path, op_types: Sequence[str] = ("MatMul",)) -> Path:
    """Path of ``onnx_path`` with dynamic INT8 quantisation of ``op_types`` (next to it), made when absent.

    Dynamic quantisation stores INT8 weights and quantises activations per batch at run time
    (``onnxruntime.quantization.quantize_dynamic``, signed INT8 weights); operators not listed stay float32.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = onnx_path.with_name(f"{onnx_path.stem}.int8-{'-'.join(op_types).lower()}.onnx")
    if not path.is_file():
        # the quantiser logs a line per tensor on the root logger
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            with atomic_path(path) as tmp:
                quantize_dynamic(onnx_path, tmp, op_types_to_quantize=list(op_types), weight_type=QuantType.QInt8)
        finally:
            logging.disable(previous)
    return path


@dataclass(frozen=True)
class OrtSettings:
    """ONNX Runtime session settings that matter for speed on a CPU.

    Args:
        threads: intra-op threads (one operator split over this many cores).
        level: graph optimisation level: ``"basic"``, ``"extended"`` or ``"all"`` (adds layout
            transformations such as NCHWc for convolutions).
        parallel: run independent branches of the graph concurrently (inter-op threads = ``threads``).
    """

    threads: int
    level: str = "all"
    parallel: bool = False


class OrtRunner:
    """A CPU ONNX Runtime session called like a network: ``(B, C, H, W)`` tensor in, logits tensor out.

    Args:
        model_path: the ONNX file.
        settings: session settings.
    """

    def __init__(self, model_path: str | os.PathLike, settings: OrtSettings) -> None:
        import onnxruntime as ort

        levels = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if settings.level not in levels:
            raise ValueError(f"ONNX Runtime optimisation level must be one of {sorted(levels)}, got {settings.level!r}.")
        so = ort.SessionOptions()
        so.intra_op_num_threads = settings.threads
        so.inter_op_num_threads = settings.threads if settings.parallel else 1
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if settings.parallel else ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = levels[settings.level]
        self.session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {ONNX_INPUT: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)
