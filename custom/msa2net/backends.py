"""CPU inference backends, and the choice of the fastest correct one for the machine at hand.

Which way of running the network on a CPU is fastest depends on the processor: on one Intel Xeon ONNX
Runtime ran the ``base`` model 1.65x faster than eager PyTorch, on an AMD EPYC of the same size it was
no faster than eager and slower than TorchScript. :class:`CpuBackendNetwork` therefore measures.

Backends (``backend`` names; ``:option`` suffixes choose ONNX Runtime settings, see :class:`~msa2net.onnx_runtime.OrtSettings`):

* ``eager``: the PyTorch network as it is;
* ``torchscript``: traced at batch 1 (any batch size runs) and frozen (``torch.jit.freeze``:
  weights become constants, batch norms folded into convolutions);
* ``onnxruntime``, ``onnxruntime:extended``, ``onnxruntime:parallel``, ...: ONNX Runtime on an export
  from :func:`msa2net.export.onnx_model`, cached per weights (:func:`msa2net.onnx_runtime.cached_onnx`);
* ``onnxruntime_int8``: the same export with dynamic INT8 quantisation of its matrix products.

Every backend is checked against the eager network before use: float32 backends within ``atol`` in the
logits; an INT8 backend's logits differ by design, so it needs evidence about segmentation accuracy: it
is a candidate of ``"auto"`` only for weights whose :func:`~msa2net.onnx_runtime.weights_digest` is
listed in ``int8_weights`` (weights for which the Dice of the INT8 backend was measured on a validation
set to be within 0.2 points of float32, see ``benchmarks/results/cpu.md``). Asked for by name it is
used as asked, with a warning for unlisted weights.

``backend="auto"`` builds each of ``candidates``, checks it, times it on ``probe_batch`` slices (median of
a few runs) and keeps the fastest. The result is cached as JSON in ``cache_dir`` under a key made of the
machine (processor model, family and flags, usable cores, threads), the library versions and the model
(weights digest, input shape), so the probe runs once per machine and model. The chosen backend and the
measured speeds are logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

import msa2net
from msa2net.atomic import atomic_write_text
from msa2net.export import check_exported
from msa2net.onnx_runtime import OrtRunner, OrtSettings, cached_int8, cached_onnx, weights_digest

__all__ = ["CpuBackendNetwork", "DEFAULT_CANDIDATES", "default_cache_dir", "machine_fingerprint"]

logger = logging.getLogger("msa2net.backends")

#: What ``backend="auto"`` tries by default.
DEFAULT_CANDIDATES = ("eager", "torchscript", "onnxruntime", "onnxruntime:extended", "onnxruntime_int8")

Runner = Callable[[torch.Tensor], torch.Tensor]


def default_cache_dir() -> Path:
    """``$MSA2NET_CACHE_DIR``, else ``$XDG_CACHE_HOME/msa2net``, else ``~/.cache/msa2net``; a temporary folder when that cannot be written."""
    env = os.environ.get("MSA2NET_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "msa2net"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"msa2net-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _cpu_info() -> dict:
    info = {"model name": platform.processor() or platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("vendor_id", "cpu family", "model", "model name", "stepping"):
            info[key] = value.strip()
        elif key in ("flags", "Features"):
            info["flags_sha256"] = hashlib.sha256(value.strip().encode()).hexdigest()[:16]
    return info


def machine_fingerprint(threads: int) -> dict:
    """What makes probe results valid on this machine: processor, usable cores, threads, library versions."""
    import onnxruntime

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        **_cpu_info(),
        "usable_cores": cores,
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "msa2net": msa2net.__version__,
    }


def _interleaved_ms_per_slice(runners: dict[str, Runner], shape: Sequence[int], repeats: int) -> dict[str, float]:
    """Median milliseconds per slice of each runner on a random batch of ``shape``.

    Runners take turns, one call each per round, so a load that comes and goes on a shared machine
    slows them alike instead of whichever was being timed then.
    """
    x = torch.rand(tuple(shape), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad():
        for run in runners.values():
            run(x)  # warm-up: first calls allocate and pick kernels
        for _ in range(repeats):
            for name, run in runners.items():
                start = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - start)
    return {name: round(1e3 * statistics.median(t) / shape[0], 2) for name, t in times.items()}


class CpuBackendNetwork(nn.Module):
    """A PyTorch network run on the CPU by the backend named, or by the fastest correct one (``"auto"``).

    Weights are loaded into the PyTorch ``network`` (``load_state_dict``, as ``CheckpointLoader`` and
    :func:`msa2net.inference.load_weights` do); the backend is built on the first forward pass after
    that, under a lock, so concurrent callers (a MONAI Label server) share one.

    Args:
        network: the PyTorch network.
        input_shape: ``(1, C, H, W)`` the compiled backends are built for; they take any batch size
            at that ``C, H, W``.
        backend: ``"auto"`` or a backend name (see the module docstring).
        candidates: the backends ``"auto"`` tries.
        cache_dir: where ONNX exports and probe results are kept (default :func:`default_cache_dir`).
        threads: threads of ONNX Runtime (default: PyTorch's intra-op thread count, which is what
            eager and TorchScript use).
        probe_batch: slices per timed call of the probe.
        probe_repeats: timed calls per candidate (the median is kept).
        int8_weights: weight digests for which an INT8 backend was validated on labelled data.
        atol: largest logit difference to eager PyTorch accepted from a float32 backend.

    Shapes: input ``(B, C, H, W)`` float tensor; output ``(B, num_classes, H, W)`` float32 on the input's device.
    """

    def __init__(
        self,
        network: nn.Module,
        input_shape: Sequence[int],
        backend: str = "auto",
        candidates: Sequence[str] = DEFAULT_CANDIDATES,
        cache_dir: str | os.PathLike | None = None,
        threads: int | None = None,
        probe_batch: int = 8,
        probe_repeats: int = 3,
        int8_weights: Sequence[str] = (),
        atol: float = 1e-3,
    ) -> None:
        super().__init__()
        if len(input_shape) != 4 or input_shape[0] != 1:
            raise ValueError(f"input_shape must be (1, C, H, W), got {tuple(input_shape)}.")
        for name in [backend, *candidates]:
            if name != "auto":
                self._parse(name)
        self.network = network.cpu().eval()
        self.input_shape = tuple(int(v) for v in input_shape)
        self.backend = backend
        self.candidates = tuple(candidates)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.threads = int(threads or torch.get_num_threads())
        self.probe_batch = int(probe_batch)
        self.probe_repeats = int(probe_repeats)
        self.int8_weights = set(int8_weights)
        self.atol = atol
        self.selected: str | None = None
        self.speeds_ms: dict[str, float] = {}
        self._runner: Runner | None = None
        self._digest: str | None = None
        self._lock = threading.Lock()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # Checkpoints hold the PyTorch network's keys; new weights need new backends.
        with self._lock:
            self._runner, self._digest, self.selected = None, None, None
            return self.network.load_state_dict(state_dict, strict=strict, assign=assign)

    def state_dict(self, *args, **kwargs):
        return self.network.state_dict(*args, **kwargs)

    @staticmethod
    def _parse(name: str) -> tuple[str, str, bool]:
        """``(kind, ONNX Runtime optimisation level, parallel)`` of a backend name."""
        kind, *options = name.split(":")
        if kind in ("eager", "torchscript") and not options:
            return kind, "all", False
        if kind in ("onnxruntime", "onnxruntime_int8") and all(o in ("basic", "extended", "all", "parallel") for o in options):
            return kind, next((o for o in options if o != "parallel"), "all"), "parallel" in options
        raise ValueError(
            f"unknown CPU backend {name!r}; use 'auto', 'eager', 'torchscript', 'onnxruntime' or 'onnxruntime_int8' "
            "(ONNX Runtime ones may end in ':basic', ':extended', ':all' and ':parallel')."
        )

    @property
    def digest(self) -> str:
        """:func:`~msa2net.onnx_runtime.weights_digest` of the current weights."""
        if self._digest is None:
            self._digest = weights_digest(self.network)
        return self._digest

    def _build(self, name: str) -> Runner:
        """Build backend ``name`` and check it against the eager network; errors say which backend failed and why."""
        kind, level, parallel = self._parse(name)
        if kind == "eager":
            return self.network
        if kind == "torchscript":
            with torch.no_grad():
                runner = torch.jit.freeze(torch.jit.trace(self.network, torch.rand(self.input_shape)))
        else:
            path = cached_onnx(self.network, self.input_shape, self.cache_dir, self.digest)
            if kind == "onnxruntime_int8":
                path = cached_int8(path)
            runner = OrtRunner(path, OrtSettings(self.threads, level, parallel))
        if kind == "onnxruntime_int8":
            # INT8 is judged by measured Dice (int8_weights), not by logits; shape and finiteness are checked here.
            x = torch.rand((2, *self.input_shape[1:]))
            with torch.no_grad():
                out, want = runner(x), self.network(x)
            if out.shape != want.shape or not torch.isfinite(out).all():
                raise RuntimeError(f"{name}: gave shape {tuple(out.shape)} or non-finite logits; eager gives {tuple(want.shape)}.")
        else:
            try:
                check_exported(runner, self.network, self.input_shape, self.atol, batch_sizes=(2,))
            except AssertionError as e:
                raise RuntimeError(f"{name}: disagrees with PyTorch: {e}") from None
        return runner

    def _probe_file(self) -> tuple[Path, dict]:
        key = {
            "machine": machine_fingerprint(self.threads),
            "weights_sha256": self.digest,
            "input_shape": list(self.input_shape),
            "candidates": sorted(self._eligible()),
            "probe_batch": self.probe_batch,
        }
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.cache_dir / f"probe-{name}.json", key

    def _eligible(self) -> list[str]:
        int8_ok = self.digest in self.int8_weights
        return [c for c in self.candidates if int8_ok or not c.startswith("onnxruntime_int8")]

    def _probe(self) -> tuple[str, Runner]:
        path, key = self._probe_file()
        try:
            cached = json.loads(path.read_text())
            selected = cached["selected"] if cached.get("key") == key and cached.get("selected") in key["candidates"] else None
        except (OSError, ValueError, KeyError, TypeError):
            selected = None  # no usable cached probe: measure
        if selected is not None:
            try:
                runner = self._build(selected)
            except Exception as e:  # noqa: BLE001 - the cached choice no longer builds: measure again
                logger.warning("CPU backend %s (cached choice) left out: %s", selected, " ".join(str(e).split())[:300])
            else:
                self.speeds_ms = dict(cached.get("ms_per_slice") or {})
                logger.info(
                    "CPU backend: %s, %.1f ms/slice at batch %d (probe cached in %s; %s)",
                    selected, self.speeds_ms.get(selected, float("nan")), self.probe_batch, path, self._speeds_text(),
                )
                return selected, runner
        start = time.perf_counter()
        runners, failures = {}, {}
        for name in key["candidates"]:
            try:
                runners[name] = self._build(name)
            except Exception as e:  # noqa: BLE001 - one backend failing here must not stop inference
                failures[name] = " ".join(str(e).split())[:300]
                logger.warning("CPU backend %s left out: %s", name, failures[name])
        if not runners:
            raise RuntimeError(f"no CPU backend works here: {failures}")
        self.speeds_ms = _interleaved_ms_per_slice(runners, (self.probe_batch, *self.input_shape[1:]), self.probe_repeats)
        selected = min(self.speeds_ms, key=self.speeds_ms.get)
        record = {
            "key": key, "selected": selected, "ms_per_slice": self.speeds_ms, "failed": failures,
            "probe_seconds": round(time.perf_counter() - start, 1),
        }
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
        logger.info(
            "CPU backend: %s, %.1f ms/slice at batch %d (measured in %.0f s, saved to %s; %s)",
            selected, self.speeds_ms[selected], self.probe_batch, record["probe_seconds"], path, self._speeds_text(),
        )
        return selected, runners[selected]

    def _speeds_text(self) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in sorted(self.speeds_ms.items(), key=lambda kv: kv[1])) + " ms/slice"

    def runner(self) -> Runner:
        """The backend for the current weights, built (and for ``"auto"``, chosen) on first use."""
        with self._lock:
            if self._runner is None:
                self.network.eval()
                if self.backend == "auto":
                    self.selected, self._runner = self._probe()
                else:
                    if self.backend.startswith("onnxruntime_int8") and self.digest not in self.int8_weights:
                        logger.warning("CPU backend %s: INT8 accuracy was not validated for these weights (%s...)", self.backend, self.digest[:12])
                    self.selected, self._runner = self.backend, self._build(self.backend)
                    logger.info("CPU backend: %s (set explicitly)", self.backend)
            return self._runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self.runner()
        with torch.no_grad():
            # a plain tensor: a traced graph or ONNX Runtime has no use for MONAI's metadata
            out = run(x.as_subclass(torch.Tensor).detach().float().cpu().contiguous())
        return out.to(x.device)
