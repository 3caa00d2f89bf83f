"""Train for longer than one device command: detached trainings, watched and brought back in parts.

A lent GPU host runs one command for at most 10 minutes, is given back 30 s after a command ends and
starts bare. So a training is started as its own process session (``setsid``: it outlives the command
that started it), and consecutive commands *watch* it: each waits up to a given time, then copies the
training logs and, for the runs named, the latest weights in float16, split into parts of at most
16 MiB, into the folder that comes back. If the host is lost, a fresh one continues from those parts
(``start --init_parts``: a warm restart from the weights, with a new optimiser and schedule).
A watch writes at most ``--max_mb`` (60 MB) of weights in at most ``--max_parts`` (6) files, what fits
beside the logs in what comes back: packages are tried least recently sent first, one unchanged since it
was last sent is not sent again, and one that does not fit waits for a later watch, so consecutive
watches rotate through the runs and bring every run's newest weights back.

Run from the repository root on the device machine, after the stage prefix
(monai, nibabel, pytorch-ignite and fire installed where the image lacks them; the data set under ``.gpudata/acdc``) and ``export PYTHONPATH=$PWD/custom:$PYTHONPATH``::

    python3 scripts/gpu/detached.py start --name acdc_base --gpu 0 --dataset_dir .gpudata/acdc \\
        --profile acdc --budget_s 1100 -- --model_preset base
    python3 scripts/gpu/detached.py watch --wait_s 540 --out $OUT --weights acdc_base:latest
    # next command, same host: watch again; when the trainings have ended:
    python3 scripts/gpu/detached.py watch --wait_s 0 --evaluate --out $OUT --weights acdc_base:best

Each ``start`` trains with the bundle's ``train.json``, the dataset profile, ``gpu_train.json`` and any
``+FILE`` configs, and ``--time_budget_s`` so that the schedule ends with the budget. ``watch`` writes
``$OUT/status.json`` (per run: alive, epochs, validation curve with seconds since the trainer started,
first time each Dice threshold was reached, evaluations, and each weights package with its size: written
or unchanged with its SHA-256 and the watch that wrote it, or deferred) and ``$OUT/logs.tar.gz``.
``scripts/gpu/join_weights.py`` reassembles and checks the parts (for an unchanged package, those of the
call that wrote them).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from run_jobs import THRESHOLDS, config_list, environment, read_curve

from msa2net.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundle"
PART_BYTES = 16 * 2**20
WHICH = {"best": "model.pt", "final": "model_final.pt", "latest": "resume.pt"}


def run_dirs(work: Path) -> list[Path]:
    return sorted(p.parent for p in work.glob("*/job.json"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(")")[-1].split()[0] == "Z")


def join_parts(parts_dir: Path, stem: str) -> bytes:
    """The bytes of ``stem`` from ``stem.part0``, ``stem.part1``, ... in ``parts_dir``."""
    parts = sorted(parts_dir.glob(f"{stem}.part*"), key=lambda p: int(p.suffix.removeprefix(".part")))
    if not parts:
        raise SystemExit(f"{parts_dir}: no parts {stem}.part*")
    return b"".join(p.read_bytes() for p in parts)


def start(args: argparse.Namespace) -> None:
    run = Path(args.work) / args.name
    if (run / "job.json").is_file():
        raise SystemExit(f"{run}: a run of this name exists; choose another --name or remove it.")
    (run / "models").mkdir(parents=True)
    extra = [a for a in args.bundle_args if a != "--"]
    configs = ["configs/train.json", f"configs/profile_{args.profile}.json", "configs/gpu_train.json"]
    configs += [a[1:] for a in extra if a.startswith("+")]
    overrides = [a for a in extra if not a.startswith("+")]
    dataset_dir = str(Path(args.dataset_dir).resolve())
    if args.init_parts:
        (run / "init.pt").write_bytes(join_parts(Path(args.init_parts), args.init_stem))
        overrides += ["--init_ckpt", str(run / "init.pt")]
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config_list(configs),
        "--dataset_dir", dataset_dir, "--ckpt_dir", str(run / "models"),
        "--output_dir", str(run / "eval"), "--time_budget_s", str(args.budget_s), *overrides,
    ]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=args.gpu, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(args.threads))
    with open(run / "train.log", "ab") as log:
        proc = subprocess.Popen(cmd, cwd=BUNDLE, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    job = {
        "name": args.name, "gpu": args.gpu, "pid": proc.pid, "started": time.time(), "budget_s": args.budget_s,
        "profile": args.profile, "dataset_dir": dataset_dir, "configs": configs, "overrides": overrides,
        "command": "python -m monai.bundle run training " + shlex.join(cmd[5:]), "init_parts": args.init_parts,
    }
    atomic_write_text(run / "job.json", json.dumps(job, indent=1))
    print(f"started {args.name} (pid {proc.pid}) on GPU {args.gpu}: {job['command']}", flush=True)


def float16_package(run: Path, which: str) -> tuple[bytes, dict]:
    """``which`` weights of ``run`` as a float16 ``{"model": state_dict}`` file, and its record."""
    import torch

    src = run / "models" / WHICH[which]
    state = torch.load(src, map_location="cpu", weights_only=True)
    # resume.pt holds the whole training state: keep the averaged weights the run evaluates
    sd = state.get("ema", state.get("model")) if which == "latest" else state["model"]
    sd = {k.removeprefix("module."): v for k, v in sd.items() if k != "n_averaged"}
    buf = io.BytesIO()
    torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}}, buf)
    raw = buf.getvalue()
    return raw, {"stem": f"{run.name}_{which}_fp16.pt", "parts": -(-len(raw) // PART_BYTES), "bytes": len(raw),
                 "sha256": hashlib.sha256(raw).hexdigest(), "source_mtime": src.stat().st_mtime}


def send_weights(work: Path, packages: list[tuple[str, str]], out: Path, max_bytes: float, max_parts: int, now: str) -> dict:
    """Write the ``(run, which)`` packages that fit into ``out`` as parts; return a record per package.

    Packages are tried least recently sent first (never sent first; ties keep their order). One whose
    SHA-256 is the one last sent for its run and ``which`` is not written again (``unchanged``); one that
    does not fit in the bytes or files left is ``deferred``. ``<work>/<run>/sent.json`` keeps, per
    ``which``, the SHA-256 and watch time of the parts last written.
    """
    sent = {}
    for name in dict.fromkeys(name for name, _ in packages):
        path = work / name / "sent.json"
        sent[name] = json.loads(path.read_text()) if path.is_file() else {}
    order = sorted(dict.fromkeys(packages), key=lambda p: sent[p[0]].get(p[1], {}).get("time", ""))
    records, bytes_left, parts_left = {}, max_bytes, max_parts
    for name, which in order:
        last = sent[name].get(which, {})
        try:
            if not (work / name / "job.json").is_file():
                raise FileNotFoundError(f"no run {name!r} in {work}")
            raw, record = float16_package(work / name, which)
            if record["sha256"] == last.get("sha256"):
                record.update(state="unchanged", sent_at=last["time"])
            elif len(raw) <= bytes_left and record["parts"] <= parts_left:
                for n, i in enumerate(range(0, len(raw), PART_BYTES)):
                    (out / f"{record['stem']}.part{n}").write_bytes(raw[i : i + PART_BYTES])
                bytes_left, parts_left = bytes_left - len(raw), parts_left - record["parts"]
                sent[name][which] = {"sha256": record["sha256"], "time": now}
                atomic_write_text(work / name / "sent.json", json.dumps(sent[name], indent=1))
                record["state"] = "written"
            else:
                # the digest belongs to parts that did not come back: only the size is recorded
                del record["sha256"]
                never = len(raw) > max_bytes or record["parts"] > max_parts
                record.update(state="deferred", last_sent_at=last.get("time"), reason=(
                    f"larger than --max_mb {max_bytes / 1e6:g} or --max_parts {max_parts}: it never fits" if never else
                    f"{len(raw) / 1e6:.1f} MB in {record['parts']} parts; {bytes_left / 1e6:.1f} MB in {parts_left} parts left"))
        except Exception as e:  # noqa: BLE001 - the logs must come back even when one package fails
            record = {"state": "error", "error": repr(e)}
        records[name, which] = record
    return records


def package_line(name: str, which: str, record: dict) -> str:
    state = record["state"]
    if state == "written":
        return f"{name}:{which}: written, {record['bytes'] / 1e6:.1f} MB in {record['parts']} parts, sha256 {record['sha256']}"
    if state == "unchanged":
        return f"{name}:{which}: unchanged since the watch of {record['sent_at']}, sha256 {record['sha256']}"
    if state == "deferred":
        return f"{name}:{which}: deferred, {record['reason']}"
    return f"{name}:{which}: error {record['error']}"


def evaluate(run: Path, job: dict, which: str, dataset_dir: str) -> dict:
    """The bundle's ``evaluating`` (float32, no autocast) of the run's ``which`` weights."""
    ckpt = run / "models" / WHICH[which]
    if not ckpt.is_file():
        return {"error": f"{ckpt.name} not written"}
    configs = [job["configs"][0], "configs/evaluate.json", *job["configs"][1:]]
    configs = [c for c in configs if c != "configs/gpu_train.json"]
    # the starting weights are training's business: drop --init_ckpt and its value, whatever the path
    args = job["overrides"]
    overrides = [a for i, a in enumerate(args) if a != "--init_ckpt" and (i == 0 or args[i - 1] != "--init_ckpt")]
    out = run / f"evaluate_{which}"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", config_list(configs),
        "--dataset_dir", dataset_dir, "--ckpt_path", str(ckpt), "--output_dir", str(out), "--amp", "False", *overrides,
    ]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=job["gpu"], PYTHONUNBUFFERED="1")
    with open(run / f"evaluate_{which}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=BUNDLE, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    summary = out / "metrics_summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {"rc": rc}


def run_status(run: Path) -> dict:
    job = json.loads((run / "job.json").read_text())
    curve = read_curve(run / "eval" / "training_log.csv")
    vals = [r for r in curve if r["val"] is not None]
    best = max(vals, key=lambda r: r["val"]) if vals else None
    tail = (run / "train.log").read_text(errors="replace").splitlines()[-3:] if (run / "train.log").is_file() else []
    return {
        **job,
        "alive": alive(job["pid"]),
        "epochs_done": len(curve),
        "trainer_s": curve[-1]["elapsed_s"] if curve else None,
        "final_loss": curve[-1]["loss"] if curve else None,
        "best_val": best and {"epoch": best["epoch"], "dice": best["val"], "elapsed_s": best["elapsed_s"]},
        "curve": [(r["epoch"], r["val"], r["elapsed_s"]) for r in vals],
        "first_reached_s": {str(t): next((r["elapsed_s"] for r in vals if r["val"] >= t), None) for t in THRESHOLDS},
        "log_tail": tail,
    }


def watch(args: argparse.Namespace) -> None:
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = run_dirs(work)
    deadline = time.time() + args.wait_s
    while time.time() < deadline and any(alive(json.loads((r / "job.json").read_text())["pid"]) for r in runs):
        time.sleep(min(10.0, max(0.0, deadline - time.time())))
    status = {"time": datetime.now().isoformat(timespec="microseconds"), "env": environment(), "runs": {}}
    for run in runs:
        status["runs"][run.name] = run_status(run)
    packages = send_weights(work, args.weights, out, args.max_mb * 1e6, args.max_parts, status["time"])
    for (name, which), record in packages.items():
        holder = status["runs"][name] if name in status["runs"] else status.setdefault("unknown_runs", {}).setdefault(name, {})
        holder.setdefault("packages", {})[which] = record
    if args.evaluate:  # all at once: each evaluation is mostly process start-up and data loading
        ended = [(run, status["runs"][run.name]) for run in runs if not status["runs"][run.name]["alive"]]
        with ThreadPoolExecutor(max_workers=2 * len(ended) or 1) as pool:
            futures = {(run.name, w): pool.submit(evaluate, run, st, w, st["dataset_dir"]) for run, st in ended for w in ("best", "final")}
        for (name, w), fut in futures.items():
            status["runs"][name].setdefault("evaluations", {})[w] = fut.result()
    atomic_write_text(out / "status.json", json.dumps(status, indent=1))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for p in sorted(work.rglob("*")):
            if p.is_file() and p.suffix in (".log", ".csv", ".json"):
                tar.add(p, arcname=str(p.relative_to(work)))
    for name, st in status["runs"].items():
        print(f"{name}: alive={st['alive']} epochs={st['epochs_done']} trainer_s={st['trainer_s']} best={st['best_val']} "
              f"evals={json.dumps(st.get('evaluations', {}))[:400]}", flush=True)
    for (name, which), record in packages.items():
        print(package_line(name, which, record), flush=True)


def package_spec(spec: str) -> tuple[str, str]:
    name, _, which = spec.partition(":")
    if which and which not in WHICH:
        raise argparse.ArgumentTypeError(f"{spec!r}: the weights are one of {', '.join(WHICH)}")
    return name, which or "latest"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("start", help="start one detached training")
    s.add_argument("--work", default="/tmp/detached")
    s.add_argument("--name", required=True)
    s.add_argument("--gpu", default="0")
    s.add_argument("--dataset_dir", required=True)
    s.add_argument("--profile", default="acdc")
    s.add_argument("--budget_s", type=float, required=True, help="training seconds (the schedule ends with them)")
    s.add_argument("--threads", type=int, default=4, help="CPU threads of the training process")
    s.add_argument("--init_parts", help="folder with float16 parts to start from (warm restart)")
    s.add_argument("--init_stem", help="NAME_WHICH_fp16.pt of those parts")
    s.add_argument("bundle_args", nargs=argparse.REMAINDER, help="-- then bundle overrides and +FILE configs")
    w = sub.add_parser("watch", help="wait, then bring back logs, weights and evaluations")
    w.add_argument("--work", default="/tmp/detached")
    w.add_argument("--out", required=True)
    w.add_argument("--wait_s", type=float, default=540.0, help="wait at most this long for the runs to end")
    w.add_argument("--weights", action="append", default=[], type=package_spec, help="RUN:best|final|latest (repeat)")
    w.add_argument("--max_mb", type=float, default=60.0, help="weights parts written, in MB (10^6 bytes), at most")
    w.add_argument("--max_parts", type=int, default=6, help="weights part files written at most")
    w.add_argument("--evaluate", action="store_true", help="evaluate best and final weights of runs that ended")
    args = ap.parse_args()
    if args.verb == "start" and args.init_parts and not args.init_stem:
        ap.error("--init_parts needs --init_stem")
    start(args) if args.verb == "start" else watch(args)


if __name__ == "__main__":
    main()
