"""Training images/s: the bundle's data pipeline on real ACDC against the network alone on random tensors.

Same run, same training step as the bundle (DiceCE 0.5/0.5, SGD momentum 0.9, autocast with MONAI's
GradScaler, the loss read back each step as TrainingLogWriter does), same batch:

* ``network_alone``: a fixed random batch already on the device;
* ``gpu_loader``: batches from ``train#dataloader`` of ``train.json + profile_acdc.json + gpu_train.json``
  (:class:`msa2net.data.gpu_loader.GPUSliceLoader` over the real ACDC CacheDataset, augmented on the device);
* ``cpu_loader_only``: the slices/s that ``train.json``'s own CPU DataLoader (per-sample random crops and
  augmentation in worker processes) can deliver, with no network, for comparison.

The issue's target: the data pipeline at least 90 % of the network-alone rate.

    python benchmarks/bench_train.py --dataset_dir .gpudata/acdc     # writes benchmarks/results/train.{json,md}
"""

from __future__ import annotations

import argparse
import time

import torch
from monai.losses import DiceCELoss

from common import ROOT, env_header, env_info, md_table, write_results  # noqa: I001
from msa2net.cuda_graphs import GraphedForward
from msa2net.networks import create_msa2net, list_presets

BUNDLE = ROOT / "bundle"


def parse_bundle(files, dataset_dir, **over):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in files])
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(dataset_dir), **over})
    parser.parse()
    return parser


def timed_steps(net, batches, steps, warmup, device, dtype=torch.bfloat16):
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    net.train()
    n = 0

    def step():
        b = next(batches)
        x, y = b["image"].to(device, non_blocking=True), b["label"].to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        float(loss.detach())
        return x.shape[0]

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        n += step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def forever(loader):
    while True:
        yield from loader


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset_dir", default=str(ROOT / ".gpudata" / "acdc"))
    ap.add_argument("--presets", default="paper,base", help=f"comma-separated, from {list_presets()}")
    ap.add_argument("--batch", type=int, default=None, help="default: the bundle's batch_size")
    ap.add_argument("--sacm_forms", default="kernel", help="comma-separated SACM forms to time")
    ap.add_argument("--channels_last", action="store_true")
    ap.add_argument("--cuda_graphs", action="store_true", help="also time each preset run from CUDA graphs (GraphedForward)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--cpu_batches", type=int, default=20)
    ap.add_argument("--out_dir", default=None)
    ap.add_argument("--name", default="train")
    args = ap.parse_args()
    if unknown := set(args.presets.split(",")) - set(list_presets()):
        ap.error(f"unknown presets {sorted(unknown)}; choose from {list_presets()}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True

    over = {}
    if args.batch:
        over["batch_size"] = args.batch
    t = time.perf_counter()
    gp = parse_bundle(["train.json", "profile_acdc.json", "gpu_train.json"], args.dataset_dir, **over)
    loader = gp.get_parsed_content("train#dataloader")
    build_s = time.perf_counter() - t
    batch = loader.batch_size
    rows = []
    graph_modes = (False, True) if args.cuda_graphs and dev.type == "cuda" else (False,)
    for preset, form, graphs in [(p, f, g) for p in args.presets.split(",") for f in args.sacm_forms.split(",") for g in graph_modes]:
        torch.manual_seed(0)
        net = create_msa2net(preset, in_channels=1, num_classes=4, sacm_form=form).to(dev)
        if args.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if graphs:
            net = GraphedForward(net)
        fixed = next(iter(loader))
        fixed = {"image": torch.rand_like(fixed["image"]), "label": torch.randint_like(fixed["label"], 0, 4)}
        alone = timed_steps(net, iter(lambda: fixed, None), args.steps, args.warmup, dev)
        real = timed_steps(net, forever(loader), args.steps, args.warmup, dev)
        rows.append({"preset": preset, "sacm_form": form, "cuda_graphs": graphs, "batch": batch, "network_alone_img_s": alone, "gpu_loader_img_s": real, "ratio": real / alone})
        print(rows[-1], flush=True)
        del net
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # the loader alone, GPU path and train.json's CPU path
    it = forever(loader)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    n = sum(next(it)["image"].shape[0] for _ in range(50))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    gpu_loader_only = n / (time.perf_counter() - t)
    cp = parse_bundle(["train.json", "profile_acdc.json"], args.dataset_dir)
    cpu_loader = cp.get_parsed_content("train#dataloader")
    it = iter(cpu_loader)
    next(it)  # workers started
    t = time.perf_counter()
    n = 0
    for _ in range(args.cpu_batches):
        try:
            n += next(it)["image"].shape[0]
        except StopIteration:
            it = iter(cpu_loader)
            n += next(it)["image"].shape[0]
    cpu_loader_only = n / (time.perf_counter() - t)

    env = env_info()
    results = {"env": env, "slices": loader.num_slices, "samples_per_epoch": loader.samples_per_epoch, "sacm_forms": args.sacm_forms,
               "channels_last": args.channels_last, "bundle_parse_and_cache_s": build_s, "rows": rows,
               "gpu_loader_only_img_s": gpu_loader_only, "cpu_loader_only_img_s": cpu_loader_only,
               "cpu_loader_workers": cp.get_parsed_content("num_workers"), "target_ratio": 0.9}
    md = [f"# Training images/s on ACDC (bf16 autocast, batch {batch}, channels_last {args.channels_last})\n", env_header(env), "",
          md_table(rows, ["preset", "sacm_form", "cuda_graphs", "batch", "network_alone_img_s", "gpu_loader_img_s", "ratio"]), "",
          f"- GPU loader alone (no network): {gpu_loader_only:.0f} slices/s; {loader.num_slices} ACDC training slices held on the device",
          f"- train.json's CPU DataLoader alone ({results['cpu_loader_workers']} workers, per-sample augmentation): {cpu_loader_only:.0f} slices/s"]
    pj, pm = write_results(args.name, results, "\n".join(md), args.out_dir)
    print("\n".join(md))
    print(f"wrote {pj} and {pm}")


if __name__ == "__main__":
    main()
