"""End-to-end bundle inference of one CT-sized NIfTI volume: time per stage, total, peak GPU and host memory.

A synthetic volume with real CT geometry (default 512 x 512 x 200, 0.7 x 0.7 x 2.5 mm, int16 HU, an
oblique-free LPS-style affine as written by DICOM converters; synthetic body/organ intensities) goes
through the bundle's ``inference.json`` with ``profile_synapse.json`` (HU window, 9 classes) and the
chosen preset with random weights (saved as a ``{"model": state_dict}`` checkpoint).

* ``e2e_total_s``: wall time of ``evaluator.run()`` for the one volume (checkpoint load, read,
  preprocess, slice inference, argmax, restore geometry with Invertd, write), warm (median of the runs
  after the first), exactly as ``python -m monai.bundle run inference`` runs it;
* per stage, the same bundle objects applied by hand: read (LoadImaged + EnsureChannelFirstd + EnsureTyped),
  preprocess (intensity + resize to the bundle's ``spatial_size``), infer (to device + SliceInferer under the bundle's autocast),
  restore (argmax + Invertd), write (SaveImaged);
* peak GPU memory (``torch.cuda.max_memory_allocated``) and peak host memory (``ru_maxrss``) of the process;
* ``--anchor`` (default on): in the same process and run, the same file through the MONAI model-zoo
  ``swin_unetr_btcv_segmentation`` inference recipe, rebuilt here from MONAI parts (3D SwinUNETR,
  feature_size 48, 14 classes, random weights; RAS, spacing 1.5 x 1.5 x 2 mm, HU [-175, 250] -> [0, 1];
  96^3 sliding window, batch 4, overlap 0.5, autocast; softmax, Invertd, argmax, SaveImaged), timed as
  read+preprocess, infer, restore+write and total (warm median).

    python benchmarks/bench_e2e.py                        # writes benchmarks/results/e2e.{json,md}
    python benchmarks/bench_e2e.py --depth 600 --name e2e_600 --runs 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from common import ROOT, env_header, env_info, md_table, write_results  # noqa: I001
from msa2net.io import gzip_backend
from msa2net.networks import list_presets

BUNDLE = ROOT / "bundle"


def synthetic_ct(shape=(512, 512, 200), spacing=(0.7, 0.7, 2.5), seed=0) -> nib.Nifti1Image:
    """int16 HU volume: air outside an elliptic body, fat/soft tissue, a few organ-like blobs, bone ring, noise."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0], dtype=np.float32), np.linspace(-1, 1, shape[1], dtype=np.float32), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2
    plane = np.where(body < 1, 40.0, -1000.0).astype(np.float32)
    plane[(body < 1) & (body > 0.85)] = -100.0  # subcutaneous fat
    plane[(body < 0.55) & (body > 0.45)] = 700.0  # bone-like ring
    vol = np.empty(shape, dtype=np.int16)
    for z in range(shape[2]):
        sl = plane.copy()
        for k, (cx, cy, r, hu) in enumerate(((0.3, 0.1, 0.2, 60), (-0.3, 0.0, 0.12, 150), (0.0, -0.3, 0.1, 30))):
            rz = r * (0.6 + 0.4 * np.sin(np.pi * (z + 10 * k) / shape[2]))
            sl[(x - cx) ** 2 + (y - cy) ** 2 < rz**2] = hu
        vol[..., z] = np.clip(sl + rng.normal(0, 15, size=sl.shape).astype(np.float32), -1024, 3000).astype(np.int16)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [spacing[0] * shape[0] / 2, spacing[1] * shape[1] / 2, -spacing[2] * shape[2] / 2]
    img = nib.Nifti1Image(vol, affine)
    img.header.set_xyzt_units("mm")
    return img


def zoo_swin_unetr_anchor(img_path: Path, out_dir: Path, dev: torch.device, runs: int) -> dict:
    """The model zoo's BTCV SwinUNETR inference recipe on ``img_path``; seconds per stage (warm medians)."""
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import SwinUNETR
    from monai.transforms import (
        Activationsd, AsDiscreted, Compose, EnsureChannelFirstd, EnsureTyped, Invertd, LoadImaged, Orientationd,
        SaveImaged, ScaleIntensityRanged, Spacingd,
    )

    pre = Compose([
        LoadImaged(keys="image", image_only=True),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=(1.5, 1.5, 2.0), mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(keys="image"),
    ])
    post = Compose([
        Activationsd(keys="pred", softmax=True),
        Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted(keys="pred", argmax=True),
        SaveImaged(keys="pred", output_dir=str(out_dir), output_postfix="seg", resample=False, separate_folder=False, print_log=False),
    ])
    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=48, spatial_dims=3).to(dev).eval()
    inferer = SlidingWindowInferer(roi_size=(96, 96, 96), sw_batch_size=4, overlap=0.5)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stages = {k: [] for k in ("read_preprocess", "infer", "restore_write", "total")}
    for _ in range(runs):
        t0 = time.perf_counter()
        item = pre({"image": str(img_path)})
        t1 = time.perf_counter()
        with torch.no_grad(), torch.autocast(dev.type, enabled=dev.type == "cuda"):
            item["pred"] = inferer(item["image"][None].to(dev), net)[0]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        post(item)
        t3 = time.perf_counter()
        for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            stages[k].append(v)
    warm = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in stages.items()}
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    return {"stages_s": warm, "runs_total_s": stages["total"], "peak_gpu_gib": peak, "params_M": sum(p.numel() for p in net.parameters()) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--preset", default="paper", choices=list_presets())
    ap.add_argument("--runs", type=int, default=4, help="evaluator runs; the first is a warm-up")
    ap.add_argument("--ext", default=".nii.gz", help="input file extension")
    ap.add_argument("--output_ext", default=None, help="override the bundle's output_ext")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out_dir", default=None)
    ap.add_argument("--name", default="e2e")
    ap.add_argument("--anchor", type=int, default=1, help="also run the model-zoo SwinUNETR recipe (1) or not (0)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value (JSON values), e.g. cuda_graphs=false")
    args = ap.parse_args()

    from monai.bundle import ConfigParser

    work = Path(args.work or tempfile.mkdtemp(prefix="e2e_"))
    (work / "in").mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    img_path = work / "in" / f"ct_{args.size}x{args.size}x{args.depth}{args.ext}"
    if not img_path.is_file():
        nib.save(synthetic_ct((args.size, args.size, args.depth)), img_path)
    gen_s = time.perf_counter() - t
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "inference.json"), str(BUNDLE / "configs" / "profile_synapse.json")])
    ckpt = work / "model.pt"
    over = {"bundle_root": str(BUNDLE), "dataset_dir": str(work / "in"), "output_dir": str(work / "out"), "ckpt_path": str(ckpt), "model_preset": args.preset}
    if args.output_ext:
        over["output_ext"] = args.output_ext
    settings = {k: json.loads(v) for k, _, v in (item.partition("=") for item in args.set)}
    over.update(settings)
    parser.update(over)
    parser.parse()
    net = parser.get_parsed_content("network")
    torch.save({"model": net.state_dict()}, ckpt)
    parser.get_parsed_content("initialize")  # cudnn.benchmark, as the bundle sets it
    evaluator = parser.get_parsed_content("evaluator")
    amp = bool(parser.get_parsed_content("amp"))

    # whole bundle run, as `monai.bundle run inference` does it
    totals = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.runs):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        evaluator.run()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        totals.append(time.perf_counter() - t)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    out_files = sorted(str(p.name) for p in (work / "out").glob("*"))
    out_img = nib.load(str(next((work / "out").glob("*.nii*"))))
    in_img = nib.load(str(img_path))
    geometry_ok = out_img.shape == in_img.shape and np.allclose(out_img.affine, in_img.affine, atol=1e-4)

    # stages, the same objects by hand
    pre = parser.get_parsed_content("preprocessing")
    load_part, rest = pre.transforms[: len(parser.get("load_transforms"))], pre.transforms[len(parser.get("load_transforms")) :]
    inferer = parser.get_parsed_content("inferer")
    post = parser.get_parsed_content("postprocessing")
    restore, write = post.transforms[:-1], post.transforms[-1]
    from monai.transforms import Compose

    stages = {k: [] for k in ("read", "preprocess", "infer", "restore", "write")}
    net.eval()
    for _ in range(max(2, args.runs - 1)):
        item = {"image": str(img_path)}
        t = time.perf_counter()
        item = Compose(load_part)(item)
        stages["read"].append(time.perf_counter() - t)
        t = time.perf_counter()
        item = Compose(rest)(item)
        stages["preprocess"].append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast(dev.type, enabled=amp and dev.type == "cuda"):
            x = item["image"][None].to(dev)
            pred = inferer(x, net)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        stages["infer"].append(time.perf_counter() - t)
        t = time.perf_counter()
        d = {"image": item["image"], "pred": pred[0]}
        d = Compose(restore)(d)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        stages["restore"].append(time.perf_counter() - t)
        t = time.perf_counter()
        write(d)
        stages["write"].append(time.perf_counter() - t)
    stage_med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in stages.items()}

    anchor = zoo_swin_unetr_anchor(img_path, work / "out_anchor", dev, max(2, args.runs - 1)) if args.anchor else None
    env = env_info()
    warm = totals[1:] if len(totals) > 1 else totals
    results = {
        "env": env,
        "volume": {"shape": list(in_img.shape), "spacing_mm": [float(v) for v in in_img.header.get_zooms()], "dtype": str(in_img.get_data_dtype()), "file": img_path.name, "bytes": img_path.stat().st_size, "generate_s": gen_s},
        "preset": args.preset,
        "weights": "random",
        "config_overrides": settings,
        "amp": amp,
        "e2e_total_s": statistics.median(warm),
        "e2e_runs_s": totals,
        "stages_s": stage_med,
        "stages_sum_s": sum(stage_med.values()),
        "peak_gpu_gib": peak_gpu,
        "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "output_files": out_files,
        "output_geometry_matches_input": bool(geometry_ok),
        "target_e2e_total_s": 1.0,
        "gzip_backend": gzip_backend(),
        "zoo_swin_unetr_anchor": anchor,
    }
    rows = [{"stage": k, "seconds": v} for k, v in stage_med.items()] + [{"stage": "sum of stages", "seconds": results["stages_sum_s"]}, {"stage": "e2e_total_s (evaluator.run, warm)", "seconds": results["e2e_total_s"]}]
    md = [f"# End-to-end bundle inference, {args.size}x{args.size}x{args.depth} CT-sized NIfTI ({args.preset}, random weights)\n", env_header(env), "",
          f"- config overrides: {settings or 'none'}; gzip: {gzip_backend()}",
          f"- input {img_path.name}, {results['volume']['bytes'] / 2**20:.1f} MiB; output geometry equals input: {geometry_ok}",
          f"- peak GPU memory {peak_gpu and round(peak_gpu, 2)} GiB; peak host memory {results['peak_host_gib']:.2f} GiB; runs {[round(v, 3) for v in totals]} s (first is warm-up)\n",
          md_table(rows, ["stage", "seconds"])]
    if anchor:
        a = anchor["stages_s"]
        side = [
            {"pipeline": f"this bundle ({args.preset}, 2D slices at {'x'.join(map(str, parser.get_parsed_content('spatial_size')))})", "read_preprocess_s": stage_med["read"] + stage_med["preprocess"], "infer_s": stage_med["infer"], "restore_write_s": stage_med["restore"] + stage_med["write"], "total_s": results["e2e_total_s"], "peak_gpu_gib": peak_gpu},
            {"pipeline": "model-zoo swin_unetr_btcv recipe (3D, 96^3 window)", "read_preprocess_s": a["read_preprocess"], "infer_s": a["infer"], "restore_write_s": a["restore_write"], "total_s": a["total"], "peak_gpu_gib": anchor["peak_gpu_gib"]},
        ]
        md += ["\n## Side by side, same file, same run\n", md_table(side, ["pipeline", "read_preprocess_s", "infer_s", "restore_write_s", "total_s", "peak_gpu_gib"]),
               "\nThe bundle's total is `evaluator.run()` (checkpoint load included); the anchor's is the sum of its stages."]
    pj, pm = write_results(args.name, results, "\n".join(md), args.out_dir)
    print("\n".join(md))
    print(f"wrote {pj} and {pm}")


if __name__ == "__main__":
    main()
