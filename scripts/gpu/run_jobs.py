"""Train several bundle configurations at once on the GPUs of one lent machine, under one schedule.

Each ``--job NAME@QUEUE=ARGS`` is one ``python -m monai.bundle run training`` of the bundle with the
common configs (``train.json``, the dataset profile, ``adamw.json``, ``gpu_train.json``), the common
schedule (``--epochs``, ``--val_interval``) and its own ``ARGS``: bundle overrides such as
``--model_preset paper --network_def#use_bridge False``, and ``+FILE`` for an extra config file
(``+configs/baseline_swin_unetr.json``). ``QUEUE`` is a GPU index with an optional letter: jobs of one
queue run one after another; queues ``3`` and ``3b`` share GPU 3 at the same time. After its training a
job's best checkpoint is evaluated (``evaluating``, float32, no autocast).

Run from the repository root on the device machine after the stage prefix
(monai, nibabel, pytorch-ignite and fire installed where the image lacks them; the data set under ``.gpudata/acdc``) and ``export PYTHONPATH=$PWD/custom:$PYTHONPATH``::

    python3 scripts/gpu/run_jobs.py --out $OUT --dataset_dir .gpudata/acdc --profile acdc --deadline_s 540 \\
        --job "paper_full@0=--model_preset paper" --job "basic_unet@1=+configs/baseline_basic_unet.json"

Writes ``$OUT/summary.json`` (card, versions; per job: command, exit status, epochs done, validation
curve with seconds since training started, start-up seconds, first time each Dice threshold was
reached, evaluation summary), ``$OUT/logs.tar.gz`` (logs, training CSVs, per-case metrics) and, for
``--package NAME``, that job's best weights in float16 as two parts (files back are at most 16 MB).
A job that fails before its first epoch is tried once more without CUDA graphs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import threading
import time
from datetime import datetime
from pathlib import Path

from msa2net.atomic import atomic_write_text

T0 = time.time()
ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundle"
THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.926)
EVAL_RESERVE_S = 45.0
TRAINER_START = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*SupervisedTrainer - INFO - Engine run")


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f}s] {msg}", flush=True)


def parse_job(spec: str) -> dict:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)@(\d+)([a-z]?)=(.*)", spec, flags=re.S)
    if not m:
        raise SystemExit(f"--job {spec!r}: expected NAME@GPU[letter]=ARGS")
    tokens = shlex.split(m.group(4))
    return {
        "name": m.group(1),
        "gpu": m.group(2),
        "queue": m.group(2) + m.group(3),
        "configs": [t[1:] for t in tokens if t.startswith("+")],
        "args": [t for t in tokens if not t.startswith("+")],
    }


def config_list(files: list[str]) -> str:
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def read_curve(csv_path: Path) -> list[dict]:
    if not csv_path.is_file():
        return []
    rows = []
    for r in csv.DictReader(csv_path.read_text().splitlines()):
        rows.append(
            {
                "epoch": int(r["epoch"]),
                "loss": float(r["loss"]),
                "val": float(r["val_metric"]) if r["val_metric"] else None,
                "elapsed_s": float(r["elapsed_s"]),
            }
        )
    return rows


def trainer_start(log_path: Path) -> float | None:
    """Wall time at which the trainer began its first epoch, from the bundle's log (None if it never did)."""
    for line in log_path.read_text(errors="replace").splitlines():
        m = TRAINER_START.match(line)
        if m:
            return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def run_job(job: dict, args: argparse.Namespace, work: Path, retry_eager: bool = True) -> None:
    d = work / job["name"]
    d.mkdir(parents=True, exist_ok=True)
    profile = f"configs/profile_{args.profile}.json"
    train_cfg = ["configs/train.json", profile, "configs/adamw.json", "configs/gpu_train.json", *job["configs"]]
    eval_cfg = ["configs/train.json", "configs/evaluate.json", profile, *job["configs"]]
    data = str(Path(args.dataset_dir).resolve())
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=job["gpu"], PYTHONUNBUFFERED="1")
    # As torchrun does for several processes: each job gets a share of the cores. In run 5 every job used
    # all cores and the concurrent start-ups took 72-116 s; not re-measured since.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.concurrent)))
    left = args.deadline_s - (time.time() - T0) - EVAL_RESERVE_S
    if left < 60:
        job["skipped"] = f"only {left:.0f}s left before the deadline"
        log(f"{job['name']}: skipped ({job['skipped']})")
        return
    extra = job["args"] + job.get("fallback_args", [])
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config_list(train_cfg),
        "--dataset_dir", data, "--ckpt_dir", str(d / "ckpt"), "--output_dir", str(d / "eval"),
        "--max_epochs", str(args.epochs), "--val_interval", str(args.val_interval), *extra,
    ]
    job["command"] = "python -m monai.bundle run training " + shlex.join(cmd[5:])
    log(f"{job['name']} on GPU {job['gpu']}: training for at most {left:.0f}s")
    launched = time.time()
    with open(d / "train.log", "a") as f:
        rc = subprocess.run(
            ["timeout", "-s", "INT", "-k", "20", str(int(left)), *cmd], cwd=BUNDLE, env=env, stdout=f, stderr=subprocess.STDOUT
        ).returncode
    wall = time.time() - launched
    curve = read_curve(d / "eval" / "training_log.csv")
    if rc != 0 and not curve and retry_eager and "--cuda_graphs" not in " ".join(extra):
        log(f"{job['name']}: failed (rc={rc}) before its first epoch; again without CUDA graphs")
        job["first_try"] = {"rc": rc, "wall_s": round(wall, 1)}
        job["fallback_args"] = ["--cuda_graphs", "False"]
        run_job(job, args, work, retry_eager=False)
        return
    vals = [r for r in curve if r["val"] is not None]
    started = trainer_start(d / "train.log")
    startup = started - launched if started is not None else None
    best = max(vals, key=lambda r: r["val"]) if vals else None
    job.update(
        rc=rc,
        stopped_by_deadline=rc in (124, 130, -2) or (rc != 0 and wall >= left - 1),
        wall_s=round(wall, 1),
        epochs_done=len(curve),
        startup_s=round(startup, 1) if startup is not None else None,
        best_val=best and {"epoch": best["epoch"], "dice": best["val"], "elapsed_s": best["elapsed_s"]},
        curve=[(r["epoch"], r["val"], r["elapsed_s"]) for r in vals],
        final_loss=curve[-1]["loss"] if curve else None,
        first_reached_s={
            str(t): next((r["elapsed_s"] for r in vals if r["val"] >= t), None) for t in THRESHOLDS
        },
    )
    log(f"{job['name']}: rc={rc}, {len(curve)} epochs in {wall:.0f}s, best {job['best_val']}")
    ckpt = d / "ckpt" / "model.pt"
    if not ckpt.is_file():
        return
    ecmd = [
        sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", config_list(eval_cfg),
        "--dataset_dir", data, "--ckpt_path", str(ckpt), "--output_dir", str(d / "evaluate"), "--amp", "False",
        *job["args"],
    ]
    with open(d / "evaluate.log", "w") as f:
        eval_s = max(20, int(args.deadline_s - (time.time() - T0)))
        erc = subprocess.run(["timeout", "-k", "5", str(eval_s), *ecmd], cwd=BUNDLE, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    summary = d / "evaluate" / "metrics_summary.json"
    job["evaluation"] = json.loads(summary.read_text()) if summary.is_file() else {"rc": erc}
    log(f"{job['name']}: evaluated (rc={erc})")


def package(job: dict, work: Path, out: Path) -> None:
    """The job's best weights in float16, ``{"model": state_dict}``, as two halves under ``out``."""
    import hashlib

    import torch

    sd = torch.load(work / job["name"] / "ckpt" / "model.pt", map_location="cpu", weights_only=True)["model"]
    buf = io.BytesIO()
    torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}}, buf)
    raw = buf.getvalue()
    half = (len(raw) + 1) // 2
    (out / f"{job['name']}_fp16.pt.part0").write_bytes(raw[:half])
    (out / f"{job['name']}_fp16.pt.part1").write_bytes(raw[half:])
    job["package"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def environment() -> dict:
    import torch

    def sh(cmd: str) -> str:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()

    return {
        "gpus": sh("nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader").splitlines(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "monai": sh(f"{sys.executable} -c 'import monai; print(monai.__version__)'"),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/jobs")
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--profile", default="acdc")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--val_interval", type=int, default=5)
    ap.add_argument("--deadline_s", type=float, default=540.0, help="seconds from this script's start to its end")
    ap.add_argument("--job", action="append", required=True, help="NAME@GPU[letter]=ARGS (repeat)")
    ap.add_argument("--package", action="append", default=[], help="job whose float16 weights come back")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [parse_job(s) for s in args.job]
    summary = {
        "started": datetime.now().isoformat(),
        "schedule": {"profile": args.profile, "epochs": args.epochs, "val_interval": args.val_interval},
        "env": environment(),
        "jobs": jobs,
    }
    log(f"env: {summary['env']}")
    queues: dict[str, list[dict]] = {}
    for job in jobs:
        queues.setdefault(job["queue"], []).append(job)
    args.concurrent = len(queues)

    lock = threading.Lock()

    def write_summary() -> None:
        # After every job, so a call killed at its limit still brings back the jobs already done.
        with lock:
            summary["finished_s"] = round(time.time() - T0, 1)
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))

    def run_queue(q: list[dict]) -> None:
        for job in q:
            try:
                run_job(job, args, work)
            except Exception as e:  # noqa: BLE001 - one broken job must not lose the others' results
                job["error"] = repr(e)
                log(f"{job['name']}: {e!r}")
            write_summary()

    threads = [threading.Thread(target=run_queue, args=(q,)) for q in queues.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in args.package:
        job = next(j for j in jobs if j["name"] == name)
        try:
            package(job, work, out)
        except Exception as e:  # noqa: BLE001
            job["package"] = {"error": repr(e)}
    write_summary()
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for p in sorted(work.rglob("*")):
            if p.is_file() and (p.suffix in (".log", ".csv", ".json")):
                tar.add(p, arcname=str(p.relative_to(work)))
    for job in jobs:
        ev = job.get("evaluation") or {}
        log(f"{job['name']}: epochs {job.get('epochs_done')}, best {job.get('best_val')}, eval {json.dumps(ev)[:300]}")


if __name__ == "__main__":
    main()
