"""One-call ACDC training on a lent GPU: smoke test, throughput probe, paper + base training, evaluation, packaging.

Run from the repository root on the device machine after the stage prefix
(``../shared/gpu/stage.sh acdc`` here) and ``export PYTHONPATH=$PWD/custom:$PYTHONPATH``::

    python scripts/gpu/acdc_train.py --out $OUT --budget_s 560

Steps, all logged under ``--work`` and summarised in ``$OUT/summary.json``:

1. environment (card, driver, versions);
2. at the same time: a smoke test of the exact bundle commands at tiny scale (``tiny`` preset, 2 epochs,
   then ``evaluating`` of its checkpoint) and a throughput probe of ``paper`` and ``base``
   (``scripts/gpu/probe_train.py``, both at once, as they then train);
3. ``paper`` and ``base`` trained at the same time on the one GPU through
   ``python -m monai.bundle run training`` with ``configs/gpu_train.json``; ``max_epochs`` of each is chosen
   from its measured images/s so that the schedule fits the time left, and a ``timeout`` stops a run that
   overruns (the best checkpoint is saved at each improvement);
4. ``evaluating`` (fp32, no autocast) of the best ``base`` weights as trained and rounded to float16, and of
   the best ``paper`` weights;
5. the ``base`` float16 checkpoint (``{"model": state_dict}``, as the bundle's BestModelSaver writes) split
   into two parts under ``$OUT`` (files back are at most 16 MB), plus ``logs.tar.gz``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from datetime import datetime
from pathlib import Path

T0 = time.time()
ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundle"
CONFIGS = "['configs/train.json','configs/profiles/acdc.json','configs/gpu_train.json']"
EVAL_CONFIGS = "['configs/train.json','configs/evaluate.json','configs/profiles/acdc.json']"


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"<{e}>"


def start(cmd: str, logfile: Path, cwd: Path, timeout_s: float | None = None) -> tuple[subprocess.Popen, float]:
    if timeout_s is not None:
        cmd = f"timeout -s INT -k 15 {int(timeout_s)} {cmd}"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    f = open(logfile, "w")
    f.write(f"# cwd: {cwd}\n# command: {cmd}\n# started: {datetime.now().isoformat()}\n")
    f.flush()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, shell=True, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env), time.time()


def train_cmd(preset: str, dataset: Path, ckpt: Path, out: Path, epochs: int, val_interval: int, extra: str = "") -> str:
    return (
        f'{sys.executable} -m monai.bundle run training --config_file "{CONFIGS}" '
        f"--dataset_dir {dataset} --ckpt_dir {ckpt} --output_dir {out} "
        f"--model_preset {preset} --max_epochs {epochs} --val_interval {val_interval} {extra}"
    ).strip()


def eval_cmd(preset: str, dataset: Path, ckpt_path: Path, out: Path, extra: str = "--amp False") -> str:
    return (
        f'{sys.executable} -m monai.bundle run evaluating --config_file "{EVAL_CONFIGS}" '
        f"--dataset_dir {dataset} --ckpt_path {ckpt_path} --output_dir {out} --model_preset {preset} {extra}"
    ).strip()


LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Epoch\[(\d+)\] Metrics -- val_mean_dice: ([0-9.]+)")


def val_curve(logfile: Path, launched: float) -> list[dict]:
    """(epoch, val Dice, seconds since the command was launched) from the bundle's log timestamps."""
    rows = []
    for line in logfile.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            rows.append({"epoch": int(m.group(2)), "val_dice": float(m.group(3)), "elapsed_s": round(t - launched, 1)})
    return rows


def metrics(out_dir: Path) -> dict | None:
    p = out_dir / "metrics_summary.json"
    return json.loads(p.read_text()) if p.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/acdc_run")
    ap.add_argument("--dataset_dir", default=str(ROOT / ".gpudata" / "acdc"))
    ap.add_argument("--budget_s", type=float, default=560.0, help="seconds from this script's start to its end")
    ap.add_argument("--reserve_s", type=float, default=55.0, help="kept after training for evaluation and packaging")
    ap.add_argument("--presets", default="paper,base")
    ap.add_argument("--ship_preset", default="base", help="the preset whose float16 weights are packaged")
    ap.add_argument("--probe_args", default="", help="extra arguments for probe_train.py")
    ap.add_argument("--skip_smoke", action="store_true")
    ap.add_argument("--fixed", default=None, help="form:channels_last(0/1):batch:images_per_s; skips the probe")
    args = ap.parse_args()
    out, work, data = Path(args.out), Path(args.work), Path(args.dataset_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    presets = args.presets.split(",")
    summary: dict = {"started": datetime.now().isoformat(), "budget_s": args.budget_s}

    def save_summary() -> None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))

    # 1. environment
    import torch

    summary["env"] = {
        "nvidia_smi": sh("nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "monai": sh(f"{sys.executable} -c 'import monai; print(monai.__version__)'"),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    log(f"env: {summary['env']}")
    save_summary()

    # 2. smoke test and probe, at the same time
    procs = {}
    if not args.skip_smoke:
        smoke = work / "smoke"
        cmd = train_cmd("tiny", data, smoke / "ckpt", smoke / "eval", 2, 1, "--gpu_samples_per_epoch 256")
        cmd += " && " + eval_cmd("tiny", data, smoke / "ckpt" / "model.pt", smoke / "evaluate")
        procs["smoke"] = start(f"bash -c {shlex.quote('set -o pipefail; ' + cmd)}", work / "logs" / "smoke.log", BUNDLE)
    for p in presets if not args.fixed else []:
        probe_cmd = f"{sys.executable} {ROOT}/scripts/gpu/probe_train.py --preset {p} --out {work}/probe_{p}.json {args.probe_args}"
        procs[f"probe_{p}"] = start(probe_cmd, work / "logs" / f"probe_{p}.log", ROOT)
    rcs = {k: p.wait() for k, (p, _) in procs.items()}
    log(f"smoke/probe exit codes: {rcs}")
    summary["smoke_probe_rc"] = rcs
    if not args.skip_smoke:
        summary["smoke"] = {"rc": rcs["smoke"], "metrics": metrics(work / "smoke" / "evaluate"), "val_curve": val_curve(work / "logs" / "smoke.log", procs["smoke"][1])}
    probes = {}
    for p in presets:
        f = work / f"probe_{p}.json"
        probes[p] = json.loads(f.read_text()) if f.is_file() else None
        if args.fixed:  # form:channels_last:batch:images_per_s measured earlier, no probe
            form, cl, batch, rate = args.fixed.split(":")
            c = {"form": form, "channels_last": bool(int(cl)), "batch": int(batch), "images_per_s": float(rate)}
            probes[p] = {"preset": p, "runs": [c], "choice": c, "fixed": True}
    summary["probe"] = probes
    save_summary()
    if any(rc != 0 for rc in rcs.values()):
        log("smoke test or probe failed; see logs")
        package(out, work, summary, None)
        sys.exit(1)
    for p in presets:
        log(f"probe {p}: " + ", ".join(f"{r['form']}/cl={r['channels_last']}/b{r['batch']}: {r['images_per_s']:.0f} img/s" for r in probes[p]["runs"]))

    # 3. training, both presets at once; epochs from the measured rate
    n_train = len(json.loads((data / "dataset.json").read_text())["training"])
    spe = n_train * 12  # gpu_train.json: len(train_datalist) * slices_per_volume
    now = time.time() - T0
    train_window = args.budget_s - args.reserve_s - now
    runs = {}
    if train_window < 60:
        log(f"only {train_window:.0f}s left for training; stopping")
        package(out, work, summary, None)
        sys.exit(1)
    for p in presets:
        c = probes[p]["choice"]
        # measured on an H200 (2026-11-27): ~60 s from launch to the end of the first epoch (cache, cuDNN
        # autotuning), ~25 s extra for the first validation (autotuning per slice count), then ~2.5 s each
        startup_s, n_val, val_s, first_val_s = 60.0, 15, 3.0, 25.0
        usable = max(train_window - startup_s - first_val_s - n_val * val_s, 30.0)
        epochs = max(2, int(0.9 * usable * c["images_per_s"] / spe))
        val_interval = max(1, math.ceil(epochs / n_val))
        extra = f"--batch_size {c['batch']} --channels_last {c['channels_last']} --network_def#sacm_form {c['form']}"
        d = work / p
        cmd = train_cmd(p, data, d / "ckpt", d / "eval", epochs, val_interval, extra)
        runs[p] = {"epochs": epochs, "val_interval": val_interval, "batch": c["batch"], "samples_per_epoch": spe,
                   "probe_images_per_s": c["images_per_s"], "command": f"cd bundle && {cmd}", "timeout_s": int(train_window)}
        procs[p] = start(cmd, work / "logs" / f"train_{p}.log", BUNDLE, timeout_s=train_window)
        log(f"training {p}: {epochs} epochs, val every {val_interval}, limit {train_window:.0f}s: {cmd}")
    summary["training"] = runs
    save_summary()
    for p in presets:
        proc, launched = procs[p]
        rc = proc.wait()
        curve = val_curve(work / "logs" / f"train_{p}.log", launched)
        best = max(curve, key=lambda r: r["val_dice"]) if curve else None
        first92 = next((r for r in curve if r["val_dice"] >= 0.92), None)
        runs[p].update({"rc": rc, "wall_s": round(time.time() - launched, 1), "val_curve": curve, "best": best,
                        "first_at_or_above_0.92": first92, "ended_by_timeout": rc in (124, 130, -2, 137)})
        log(f"{p} done rc={rc}: best {best}, first >=0.92 {first92}")
        save_summary()

    # 4. evaluation of the best weights (fp32 compute), base also with float16-rounded weights
    evals = {}
    base16 = None
    ship = args.ship_preset
    if ship in presets and (work / ship / "ckpt" / "model.pt").is_file():
        sd = torch.load(work / ship / "ckpt" / "model.pt", map_location="cpu", weights_only=True)
        sd = sd.get("model", sd)
        sd16 = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
        base16 = work / ship / "model_fp16.pt"
        torch.save({"model": sd16}, base16)
    jobs = []
    for p in presets:
        ck = work / p / "ckpt" / "model.pt"
        if ck.is_file():
            jobs.append((f"{p}_fp32", p, ck))
    if base16 is not None:
        jobs.append((f"{ship}_fp16", ship, base16))
    for name, p, ck in jobs:
        cmd = eval_cmd(p, data, ck, work / f"evaluate_{name}")
        evals[name] = {"command": f"cd bundle && {cmd}"}
        procs[name] = start(cmd, work / "logs" / f"evaluate_{name}.log", BUNDLE, timeout_s=max(20, args.budget_s - (time.time() - T0) - 10))
    for name, *_ in jobs:
        evals[name]["rc"] = procs[name][0].wait()
        evals[name]["metrics"] = metrics(work / f"evaluate_{name}")
        log(f"evaluate {name}: rc={evals[name]['rc']} {json.dumps(evals[name]['metrics'])[:300]}")
    summary["evaluate"] = evals
    package(out, work, summary, base16)


def package(out: Path, work: Path, summary: dict, base16: Path | None) -> None:
    if base16 is not None and base16.is_file():
        blob = base16.read_bytes()
        half = (len(blob) + 1) // 2
        for i, part in enumerate((blob[:half], blob[half:])):
            (out / f"base_fp16.pt.part{i}").write_bytes(part)
        summary["base_fp16"] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "parts": 2}
    summary["finished_s"] = round(time.time() - T0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for p in sorted(work.rglob("*")):
            if p.is_file() and (p.suffix in (".log", ".csv", ".json") or p.name.endswith(".log")):
                tar.add(p, arcname=str(p.relative_to(work)))
    log(f"packaged; summary: {json.dumps({k: v for k, v in summary.items() if k in ('training', 'evaluate')}, default=str)[:3000]}")


if __name__ == "__main__":
    main()
