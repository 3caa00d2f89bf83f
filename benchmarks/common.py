"""Shared helpers of the benchmark scripts: environment record, timing, result files, and the networks and
slice size the bundle uses (read from the preset registry and the bundle's configs, never restated here)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BUNDLE = ROOT / "bundle"
if str(ROOT / "custom") not in sys.path:
    sys.path.insert(0, str(ROOT / "custom"))

from msa2net.networks import create_msa2net, list_presets  # noqa: E402

#: Benchmark names of MSA2-Net presets are ``msa2net_<preset>``; the others are the bundle's baseline configs.
MSA2NET = "msa2net_"


def bundle_setting(key: str, *overrides: str):
    """``key`` of ``inference.json`` as the bundle resolves it (plus override files, e.g. ``profile_kvasir.json``,
    relative to ``bundle/configs``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in ("inference.json", *overrides)])
    return parser.get_parsed_content(key)


def bundle_spatial_size(*overrides: str) -> list[int]:
    """The in-plane slice size the bundle runs at: ``spatial_size`` of ``inference.json`` (plus ``overrides``)."""
    return [int(v) for v in bundle_setting("spatial_size", *overrides)]


def network_names() -> list[str]:
    """Every network a benchmark can build: ``msa2net_<preset>`` for each registered preset, then the bundle's
    baselines by file name (``bundle/configs/baseline_<name>.json``)."""
    baselines = sorted(p.stem.removeprefix("baseline_") for p in (BUNDLE / "configs").glob("baseline_*.json"))
    return [MSA2NET + p for p in list_presets()] + baselines


def build_network(name: str, in_channels: int, num_classes: int, **overrides) -> torch.nn.Module:
    """The network ``name`` (see :func:`network_names`) as the bundle builds it; ``overrides`` go to MSA2-Net only."""
    if name.startswith(MSA2NET):
        return create_msa2net(name[len(MSA2NET) :], in_channels=in_channels, num_classes=num_classes, **overrides)
    path = BUNDLE / "configs" / f"baseline_{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown network {name!r}; choose one of {network_names()}.")
    if overrides:
        raise ValueError(f"{name}: MSA2-Net options {sorted(overrides)} do not apply to a baseline network.")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(path))
    parser.update({"in_channels": in_channels, "num_classes": num_classes})
    return parser.get_parsed_content("network_def")


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def env_info() -> dict:
    """Machine, card and library versions, for the header of every result file."""
    info = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
    for mod in ("monai", "onnxruntime", "numpy", "nibabel"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    if torch.cuda.is_available():
        info["card"] = torch.cuda.get_device_name()
        info["nvidia_smi"] = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"])
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    else:
        info["card"] = None
    return info


def cuda_time(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call of ``fn`` (device events on CUDA, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_tflops(dtype=torch.bfloat16, n: int = 8192) -> float:
    """Measured dense matrix-product rate of the card (TFLOP/s) for ``dtype``, median of several runs."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    t = cuda_time(lambda: a @ b, warmup=5, iters=20)
    return 2 * n**3 / t / 1e12


def md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def env_header(env: dict) -> str:
    keys = ["card", "nvidia_smi", "host_cpu", "cpu_count", "torch", "cuda", "cudnn", "monai", "onnxruntime", "python", "date_utc"]
    return "\n".join(f"- {k}: {env.get(k)}" for k in keys if env.get(k) is not None)


def write_results(name: str, results: dict, markdown: str, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir`` (default ``benchmarks/results``)."""
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    pj, pm = out / f"{name}.json", out / f"{name}.md"
    pj.write_text(json.dumps(results, indent=2, default=str) + "\n")
    pm.write_text(markdown.rstrip() + "\n")
    return pj, pm
