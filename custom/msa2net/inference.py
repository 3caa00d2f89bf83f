"""Bundle inference: finding the inputs, loading weights safely, and segmenting case by case."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import pickle
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import torch
from monai.data import Dataset
from monai.transforms import Compose, SaveImage, SaveImaged

from msa2net.atomic import atomic_write_text
from msa2net.weights import describe_mismatch

__all__ = [
    "LABEL_PATTERNS", "list_inputs", "is_dicom_series_dir", "load_weights", "load_weights_or_exit", "InputFolder", "CaseByCaseInference",
    "run_inference", "error_line",
]

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


#: File names that look like label maps rather than images; left out of inference unless ``exclude_pattern`` says otherwise.
LABEL_PATTERNS = ("*_label*", "*_labels*", "*_seg*", "*_gt*", "*mask*")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name.lower(), p.lower()) for p in patterns)


def list_inputs(
    dataset_dir: str | os.PathLike,
    patterns: Sequence[str] = ("*.nii.gz", "*.nii"),
    exclude: Sequence[str] = LABEL_PATTERNS,
) -> list[dict]:
    """Inference datalist ``[{"image": path}, ...]`` for a file, a DICOM series folder, or a folder of either.

    Files matching ``patterns`` and DICOM series sub-folders are listed in sorted order; those whose
    name matches an ``exclude`` pattern (case-insensitive; by default names that look like label maps)
    are left out and logged. A single file given as ``dataset_dir`` is always used.
    """
    root = Path(dataset_dir)
    if root.is_file() or is_dicom_series_dir(root):
        return [{"image": str(root)}]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder or file not found.")
    files = {p for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    series = {p for p in root.iterdir() if is_dicom_series_dir(p)}
    found = sorted(files | series)
    skipped = [p.name for p in found if _matches(p.name, exclude)]
    if skipped:
        logger.info(
            "skipped %d input(s) matching exclude_pattern %s: %s (pass --exclude_pattern \"[]\" to segment them)",
            len(skipped), list(exclude), ", ".join(skipped),
        )
    items = [p for p in found if not _matches(p.name, exclude)]
    if not items:
        raise FileNotFoundError(
            f"{root}: no input images matching {list(patterns)} and no DICOM series folder"
            + (f" ({len(skipped)} skipped by exclude_pattern)." if skipped else ".")
        )
    return [{"image": str(p)} for p in items]


class InputFolder(Dataset):
    """The images of a folder (or one file or DICOM series) as a MONAI dataset, listed on first use.

    Listing waits until :meth:`CaseByCaseInference.run` asks, so that a missing folder is reported in
    one line instead of failing while the bundle config is parsed.

    Args:
        dataset_dir: a folder, an image file or a DICOM series folder.
        transform: the preprocessing applied to each ``{"image": path}``.
        image_pattern: glob patterns of the files to segment.
        exclude_pattern: glob patterns of file names to leave out (default: names that look like label maps).
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        transform: Callable,
        image_pattern: Sequence[str] = ("*.nii.gz", "*.nii"),
        exclude_pattern: Sequence[str] = LABEL_PATTERNS,
    ) -> None:
        self.dataset_dir, self.transform = dataset_dir, transform
        self.image_pattern, self.exclude_pattern = list(image_pattern), list(exclude_pattern or [])

    @cached_property
    def data(self) -> list[dict]:
        return list_inputs(self.dataset_dir, self.image_pattern, self.exclude_pattern)


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
    mismatch = describe_mismatch(network, state)
    if mismatch:
        raise ValueError(f"{path}: weights do not fit this network: {mismatch}.")
    network.load_state_dict(state)


class CaseByCaseInference:
    """The inference workflow's engine: segment every case of a dataset on its own, so one bad case never stops the batch.

    Each failure is logged as one line ``<file>: <problem>``; outputs are written atomically by
    the postprocessing's writer, so a failed case leaves no file. ``<output_dir>/inference_summary.json``
    lists done and failed cases, once every output is written. Cases are logged in their order.
    :meth:`run` exits with status 1 when any case failed and 2 when nothing could start (no inputs,
    unreadable or unfitting checkpoint).

    The checkpoint loads while the first case is read. With ``prefetch`` (on a GPU by default) the
    cases overlap too: case i+1 is read and preprocessed in a background thread while case i is
    inferred, and case i is written in another background thread while case i+1 is inferred. The
    write is the postprocessing's final ``SaveImage(d)`` step (what comes before it, e.g. restoring
    the input's grid, runs right after inference, so the network's output is freed at once), or all
    of the postprocessing when it does not end with one. At most three cases are held at once: one
    read ahead, one inferred, one being written. The first inference runs alone (CUDA graphs are
    captured and CPU backends timed then, neither of which may meet other threads' work); the
    overlap starts with the second case.

    Args:
        dataset: an :class:`InputFolder` (its transform is the preprocessing).
        network: the network, weights loaded from ``ckpt_path`` when :meth:`run` starts.
        inferer: called as ``inferer(image_batch, network)``.
        postprocessing: applied to ``{"image", "pred", ...}``; writes the label map.
        ckpt_path: ``{"model": state_dict}`` file, read with ``weights_only=True``.
        output_dir: where the summary goes (the postprocessing's writer holds its own output folder).
        device: where the network runs.
        amp: autocast the forward pass.
        prefetch: overlap reading, inference and writing of consecutive cases. ``None`` (default):
            where the network runs on a GPU, not on a CPU (there every stage competes for the same
            cores; on two cores it measured no faster). ``False``: one case at a time, the least
            memory (for a GPU or host that holds only one case; on the bundle's command line
            ``--evaluator#prefetch false``); the weights still load while the first case is read.
    """

    def __init__(
        self,
        dataset: InputFolder,
        network: torch.nn.Module,
        inferer: Callable,
        postprocessing: Callable,
        ckpt_path: str,
        output_dir: str,
        device: torch.device | str = "cpu",
        amp: bool = False,
        prefetch: bool | None = None,
    ) -> None:
        self.dataset, self.network, self.inferer, self.postprocessing = dataset, network, inferer, postprocessing
        self.ckpt_path, self.output_dir, self.device, self.amp, self.prefetch = ckpt_path, output_dir, device, amp, prefetch

    def _read(self, index: int) -> dict:
        with torch.no_grad():
            return self.dataset[index]

    def _infer(self, data: dict) -> dict:
        with torch.no_grad(), torch.autocast(device_type=torch.device(self.device).type, enabled=self.amp):
            data["pred"] = self.inferer(data["image"][None].to(self.device), self.network)[0].float()
        return data

    def _restore_and_write(self) -> tuple[Callable, Callable]:
        """The postprocessing as (everything before its final ``SaveImage(d)``, that step); (nothing, all of it) without one."""
        post = self.postprocessing
        if isinstance(post, Compose) and post.transforms and isinstance(post.transforms[-1], (SaveImage, SaveImaged)):
            last = len(post.transforms) - 1
            return (lambda d: post(d, end=last)), (lambda d: post(d, start=last))
        return (lambda d: d), post

    def run(self) -> dict:
        """Segment every case; returns ``{"done": [...], "failed": [...]}``."""
        try:
            datalist = self.dataset.data
        except (OSError, ValueError) as e:
            logger.error("error: %s", error_line(e))
            raise SystemExit(2) from None
        overlap = self.prefetch if self.prefetch is not None else torch.device(self.device).type != "cpu"
        with ThreadPoolExecutor(1, "msa2net-read") as reader, ThreadPoolExecutor(1, "msa2net-write") as writer:
            done, failed = self._run_cases(datalist, reader, writer, overlap)
        summary = {"done": done, "failed": failed}
        Path(self.output_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(self.output_dir) / "inference_summary.json", json.dumps(summary, indent=2) + "\n")
        logger.info(
            "%d of %d cases segmented, %d failed; outputs and summary in %s",
            len(done), len(datalist), len(failed), Path(self.output_dir).resolve(),
        )
        if failed:
            logger.error("failed cases: %s", ", ".join(f["image"] for f in failed))
            raise SystemExit(1)
        return summary

    def _run_cases(self, datalist: list[dict], reader: ThreadPoolExecutor, writer: ThreadPoolExecutor, overlap: bool) -> tuple[list, list]:
        log = _CaseLog(len(datalist))
        restore, write = self._restore_and_write() if overlap else ((lambda d: d), self.postprocessing)
        starts = [time.perf_counter()] + [0.0] * (len(datalist) - 1)
        reading: Future | None = reader.submit(self._read, 0)
        load_weights_or_exit(self.network, self.ckpt_path, self.device)  # while the first case is read
        self.network.eval()
        # The first inference runs alone: CUDA graphs are captured then (a capture must not meet other
        # threads' CUDA calls) and a CPU backend times its candidates then (a read beside it skews them).
        hold_first = True
        writing: tuple[int, str, Future] | None = None

        def finish_write() -> None:  # the case being written: logged before any later case
            nonlocal writing
            if writing is not None:
                k, src, future = writing
                writing = None
                try:
                    future.result()
                except Exception as e:
                    log.failed(k, src, e)
                else:
                    log.done(k, src, starts[k])

        def read_ahead(k: int) -> Future | None:
            if k >= len(datalist):
                return None
            starts[k] = time.perf_counter()
            return reader.submit(self._read, k)

        for i, item in enumerate(datalist):
            src = item["image"]
            error = None
            try:
                data = reading.result()
            except Exception as e:  # one bad case must not stop the batch
                data, error = None, e
            reading = read_ahead(i + 1) if overlap and not (hold_first and error is None) else None
            if error is None:
                try:
                    data = restore(self._infer(data))
                    if not overlap:
                        write(data)
                except Exception as e:
                    data, error = None, e
                hold_first = False
            if reading is None:
                reading = read_ahead(i + 1)
            finish_write()
            if error is not None:
                log.failed(i, src, error)
            elif overlap:
                writing = (i, src, writer.submit(write, data))
            else:
                log.done(i, src, starts[i])
        finish_write()
        return log.done_cases, log.failed_cases


class _CaseLog:
    """Done and failed cases, each logged as ``[i/n] ...`` when its outcome is known."""

    def __init__(self, total: int) -> None:
        self.total, self.done_cases, self.failed_cases = total, [], []

    def done(self, index: int, src: str, start: float) -> None:
        self.done_cases.append({"image": src, "seconds": round(time.perf_counter() - start, 3)})
        logger.info("[%d/%d] segmented %s in %.2f s", index + 1, self.total, src, self.done_cases[-1]["seconds"])

    def failed(self, index: int, src: str, exc: BaseException) -> None:
        reason = error_line(exc).removeprefix(f"{src}: ")
        self.failed_cases.append({"image": src, "error": reason})
        logger.error("[%d/%d] failed: %s: %s", index + 1, self.total, src, reason)


def load_weights_or_exit(network: torch.nn.Module, ckpt_path: str | os.PathLike, device=None) -> None:
    """:func:`load_weights`, ending the program with status 2 and one line ``error: <file>: <problem>`` if it fails."""
    try:
        load_weights(network, ckpt_path, device)
    except OSError as e:
        logger.error("error: %s", error_line(e))
        raise SystemExit(2) from None
    except ValueError as e:
        logger.error("error: %s Choose the weights with --ckpt_path.", error_line(e))
        raise SystemExit(2) from None


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
    exclude_pattern: Sequence[str] = LABEL_PATTERNS,
) -> dict:
    """Segment every input of ``dataset_dir`` case by case: :class:`CaseByCaseInference` on an :class:`InputFolder`."""
    dataset = InputFolder(dataset_dir, preprocessing, image_pattern, exclude_pattern)
    return CaseByCaseInference(dataset, network, inferer, postprocessing, ckpt_path, output_dir, device, amp).run()
