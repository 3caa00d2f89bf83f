"""Reassemble a checkpoint that came back from the device in parts, check it, and install it.

The device drivers save weights as ``{"model": state_dict}`` with floating tensors in float16 (the format
the bundle's BestModelSaver writes, loadable by MONAI's CheckpointLoader with ``load_dict={"model": network}``)
split into ``STEM.part0``, ``STEM.part1``, ... (files back from the device are at most 16 MiB each). This
joins the parts, checks the SHA-256 the device recorded (``status.json`` of ``scripts/gpu/detached.py``, or
``summary.json`` of ``scripts/gpu/run_jobs.py``), loads the result with ``weights_only=True`` into the
preset's network, checks the size limit and writes it to ``--dest``.

    python scripts/gpu/join_weights.py /work/.device/7 --stem acdc_paper_r2_best_fp16.pt --preset paper --dest bundle/models/model.pt
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import torch

from msa2net.atomic import atomic_write_bytes
from msa2net.networks import create_msa2net


def recorded_sha256(where: Path, stem: str) -> str | None:
    """The SHA-256 the device recorded for ``stem`` in ``status.json`` (detached.py) or ``summary.json`` (run_jobs.py)."""
    status, summary = where / "status.json", where / "summary.json"
    if status.is_file():
        for run in json.loads(status.read_text())["runs"].values():
            for pkg in run.get("packages", {}).values():
                if pkg.get("stem") == stem:
                    return pkg.get("sha256")
    if summary.is_file():
        job = stem.removesuffix("_fp16.pt")
        for j in json.loads(summary.read_text()).get("jobs", []):
            if j.get("name") == job:
                return j.get("package", {}).get("sha256")
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", help="folder with STEM.part0, STEM.part1, ... and the device's status.json or summary.json")
    ap.add_argument("--stem", required=True, help="the packaged file's name, e.g. acdc_paper_best_fp16.pt")
    ap.add_argument("--record", help="folder of the status.json holding the SHA-256, if not run_dir (a call cut off by its limit)")
    ap.add_argument("--allow_unrecorded", action="store_true", help="install parts the device recorded no SHA-256 for")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--num_classes", type=int, default=4)
    ap.add_argument("--in_channels", type=int, default=1)
    ap.add_argument("--dest", default="bundle/models/model.pt")
    ap.add_argument("--max_mb", type=float, default=60.0)
    args = ap.parse_args()
    run = Path(args.run_dir)
    parts = sorted(run.glob(f"{args.stem}.part*"), key=lambda p: int(p.suffix.removeprefix(".part")))
    if not parts:
        raise SystemExit(f"{run}: no parts {args.stem}.part*")
    blob = b"".join(p.read_bytes() for p in parts)
    digest = hashlib.sha256(blob).hexdigest()
    expected = recorded_sha256(Path(args.record) if args.record else run, args.stem)
    if expected is None and args.allow_unrecorded:
        print(f"no device record of {args.stem}'s SHA-256 (the call ended before writing it): parts joined unchecked")
    elif expected != digest:
        raise SystemExit(f"sha256 {digest} does not match the device's record for {args.stem!r}: {expected}")
    ckpt = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    if set(ckpt) != {"model"}:
        raise SystemExit(f"unexpected checkpoint keys {sorted(ckpt)}")
    net = create_msa2net(args.preset, in_channels=args.in_channels, num_classes=args.num_classes)
    net.load_state_dict(ckpt["model"], strict=True)
    size_mb = len(blob) / 1e6
    if size_mb > args.max_mb:
        raise SystemExit(f"{size_mb:.1f} MB exceeds {args.max_mb} MB")
    dest = Path(args.dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, blob)
    dtypes = sorted({str(v.dtype) for v in ckpt["model"].values()})
    print(json.dumps({"dest": str(dest), "bytes": len(blob), "MB": round(size_mb, 2), "MiB": round(len(blob) / 2**20, 2), "sha256": digest,
                      "sha256_matches_device": expected == digest, "tensors": len(ckpt["model"]), "dtypes": dtypes,
                      "params": sum(p.numel() for p in net.parameters())}, indent=1))


if __name__ == "__main__":
    main()
