"""Bundle inference: finding the inputs, loading weights safely, and segmenting case by case."""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from msa2net.atomic import atomic_write_text

__all__ = ["list_inputs", "is_dicom_series_dir", "load_weights", "run_inference", "error_line"]

logger = logging.getLogger("msa2net.inference")


def is_dicom_series_dir(path: Path) -> bool:
    """A folder holding ``.dcm`` files, or extension-less files starting with the DICOM preamble."""
    if not path.is_dir():
        return False
    for f in path.iterdir():
        if f.is_file() and f.suffix.lower() == ".dcm":
            return True
        if f.is_file() and not f.suffix:
            with open(f, "rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    return True
    return False


def list_inputs(dataset_dir: str | os.PathLike, patterns: Sequence[str] = ("*.nii.gz", "*.nii")) -> list[dict]:
    """Inference datalist ``[{"image": path}, ...]`` for a file, a DICOM series folder, or a folder of either.

    Files matching ``patterns`` and DICOM series sub-folders are listed in sorted order.
    """
    root = Path(dataset_dir)
    if root.is_file() or is_dicom_series_dir(root):
        return [{"image": str(root)}]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder or file not found.")
    files = {p for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    series = {p for p in root.iterdir() if is_dicom_series_dir(p)}
    items = sorted(files | series)
    if not items:
        raise FileNotFoundError(f"{root}: no input images matching {list(patterns)} and no DICOM series folder.")
    return [{"image": str(p)} for p in items]


def error_line(exc: BaseException) -> str:
    """The most specific one-line reason in an exception chain (MONAI wraps reader errors several times)."""
    reasons = []
    while exc is not None:
        text = " ".join(str(exc).split())
        if text:
            reasons.append(f"{text}" if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {text}")
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)
    return reasons[-1] if reasons else "unknown error"


def load_weights(network: torch.nn.Module, ckpt_path: str | os.PathLike, device=None) -> None:
    """Load ``{"model": state_dict}`` (or a bare state dict) with ``weights_only=True``; errors name the file."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; train the model or pass --ckpt_path.")
    try:
        state = torch.load(path, map_location=device or "cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused to load: the file holds Python objects beyond tensors "
            f"(weights_only=True); only plain weight files are accepted ({str(e).splitlines()[0]})."
        ) from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]}).") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit this network; is model_preset right? ({str(e).splitlines()[0]})") from None


def run_inference(
    dataset_dir: str,
    image_pattern: Sequence[str],
    preprocessing: Callable,
    network: torch.nn.Module,
    inferer: Callable,
    postprocessing: Callable,
    ckpt_path: str,
    output_dir: str,
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> dict:
    """Segment every input of ``dataset_dir``, one case at a time, so one bad case never stops the batch.

    Each failure is logged as one line ``<file>: <problem>``; outputs are written atomically by
    the postprocessing's writer, so a failed case leaves no file. ``<output_dir>/inference_summary.json``
    lists done and failed cases. Exits with status 1 when any case failed and 2 when nothing
    could start (no inputs, unreadable checkpoint).
    """
    try:
        datalist = list_inputs(dataset_dir, image_pattern)
        load_weights(network, ckpt_path, device)
    except (OSError, ValueError) as e:
        logger.error("error: %s", error_line(e))
        raise SystemExit(2) from None
    network.eval()
    done, failed = [], []
    for i, item in enumerate(datalist, start=1):
        src = item["image"]
        start = time.perf_counter()
        try:
            data = preprocessing(item)
            with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, enabled=amp):
                data["pred"] = inferer(data["image"][None].to(device), network)[0].float()
            postprocessing(data)
        except Exception as e:  # one bad case must not stop the batch
            reason = error_line(e).removeprefix(f"{src}: ")
            failed.append({"image": src, "error": reason})
            logger.error("[%d/%d] failed: %s: %s", i, len(datalist), src, reason)
            continue
        done.append({"image": src, "seconds": round(time.perf_counter() - start, 3)})
        logger.info("[%d/%d] segmented %s in %.2f s", i, len(datalist), src, done[-1]["seconds"])
    summary = {"done": done, "failed": failed}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(output_dir) / "inference_summary.json", json.dumps(summary, indent=2) + "\n")
    logger.info("%d of %d cases segmented, %d failed; summary in %s", len(done), len(datalist), len(failed), output_dir)
    if failed:
        logger.error("failed cases: %s", ", ".join(f["image"] for f in failed))
        raise SystemExit(1)
    return summary
