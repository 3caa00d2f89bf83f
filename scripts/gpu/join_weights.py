"""Reassemble a checkpoint that came back from the device in parts, check it, and install it.

The device run (``scripts/gpu/run_jobs.py --package NAME``) saves the best weights as ``{"model": state_dict}`` with
floating tensors in float16 (the format the bundle's BestModelSaver writes, loadable by MONAI's
CheckpointLoader with ``load_dict={"model": network}``) and splits the file into ``*.part0``, ``*.part1``
(files back from the device are at most 16 MB). This joins the parts, checks the SHA-256 recorded in the
run's ``summary.json`` for that job, loads the result with ``weights_only=True`` into the preset's network, checks the
size limit and writes it to ``--dest``.

    python scripts/gpu/join_weights.py /work/.device/1 --stem base_full_fp16.pt --preset base --dest bundle/models/model.pt
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
from pathlib import Path

import torch

from msa2net.networks import create_msa2net


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", help="folder with NAME_fp16.pt.part0/1 and summary.json")
    ap.add_argument("--stem", required=True, help="NAME_fp16.pt, NAME being the packaged job")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--num_classes", type=int, default=4)
    ap.add_argument("--dest", default="bundle/models/model.pt")
    ap.add_argument("--max_mb", type=float, default=25.0)
    args = ap.parse_args()
    run = Path(args.run_dir)
    blob = b"".join((run / f"{args.stem}.part{i}").read_bytes() for i in range(2))
    digest = hashlib.sha256(blob).hexdigest()
    summary = json.loads((run / "summary.json").read_text())
    job = args.stem.removesuffix("_fp16.pt")
    packaged = [j.get("package", {}) for j in summary.get("jobs", []) if j.get("name") == job]
    expected = packaged[0].get("sha256") if packaged else None
    if expected != digest:
        raise SystemExit(f"sha256 {digest} does not match the device's record for job {job!r}: {expected}")
    ckpt = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    if set(ckpt) != {"model"}:
        raise SystemExit(f"unexpected checkpoint keys {sorted(ckpt)}")
    net = create_msa2net(args.preset, in_channels=1, num_classes=args.num_classes)
    net.load_state_dict(ckpt["model"], strict=True)
    size_mb = len(blob) / 1e6
    if size_mb > args.max_mb:
        raise SystemExit(f"{size_mb:.1f} MB exceeds {args.max_mb} MB")
    dest = Path(args.dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, dest)
    dtypes = sorted({str(v.dtype) for v in ckpt["model"].values()})
    print(json.dumps({"dest": str(dest), "bytes": len(blob), "MB": round(size_mb, 2), "MiB": round(len(blob) / 2**20, 2), "sha256": digest,
                      "sha256_matches_device": expected == digest, "tensors": len(ckpt["model"]), "dtypes": dtypes,
                      "params": sum(p.numel() for p in net.parameters())}, indent=1))


if __name__ == "__main__":
    main()
