"""Where MSA2-Net's time goes: per-part CUDA time and the heaviest kernels, eager and compiled.

One forward pass at the bundle's slice size (``spatial_size`` of ``inference.json``; default batch 64, bf16
autocast) of a registered preset:

* per-part time (CSWin stem/merges/stages, auxiliary encoder, fusion, skip norms, bridge, decoder, head),
  from CUDA events in forward hooks, as a share of the whole pass;
* the ``--top`` heaviest operators by self CUDA time (``torch.profiler``);
* with ``--compile``: the same pass through ``torch.compile`` (compile time, forward and
  forward+backward slices/s next to eager).

    python benchmarks/profile_network.py --preset paper --compile   # writes results/profile_<preset>.{json,md}
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from common import bundle_spatial_size, cuda_time, env_header, env_info, md_table, write_results  # noqa: I001
from msa2net.networks import create_msa2net, list_presets


def named_parts(net) -> dict[str, torch.nn.Module]:
    parts = {"cswin.stem": net.encoder.stem}
    parts.update({f"cswin.merge{i + 1}": m for i, m in enumerate(net.encoder.merges)})
    parts.update({f"cswin.stage{i}": m for i, m in enumerate(net.encoder.stages)})
    if net.aux_encoder is not None:
        parts["aux_encoder"] = net.aux_encoder
        parts.update({f"aux_fuse{i}": m for i, m in enumerate(net.aux_fuse)})
    parts.update({f"skip_norm{i}": m for i, m in enumerate(net.skip_norms)})
    if net.bridge is not None:
        parts["bridge"] = net.bridge
    parts["decoder"] = net.decoder
    parts["head"] = net.head
    return parts


def part_times(net, x, repeats: int) -> dict[str, float]:
    """Milliseconds per forward pass spent in each part (CUDA events around each module call)."""
    events: dict[str, list] = defaultdict(list)
    handles = []
    for name, mod in named_parts(net).items():
        def pre(_m, _i, name=name):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            events[name].append([e, None])

        def post(_m, _i, _o, name=name):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            events[name][-1][1] = e

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(repeats):
            net(x)
    torch.cuda.synchronize()
    for h in handles:
        h.remove()
    return {k: sum(a.elapsed_time(b) for a, b in v) / repeats for k, v in events.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper", choices=list_presets())
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--spatial_size", type=int, nargs=2, default=None, help="H W (default: the bundle's spatial_size)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out_dir", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_network.py needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    env = env_info()
    h, w = args.spatial_size = args.spatial_size or bundle_spatial_size()
    net = create_msa2net(args.preset, in_channels=1, num_classes=9).cuda().eval()
    x = torch.randn(args.batch, 1, h, w, device="cuda")

    def fwd(model):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    def fwd_bwd(model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().mean()
        loss.backward()

    total_ms = cuda_time(lambda: fwd(net), 3, 10) * 1e3
    parts = part_times(net, x, 5)
    rows = [{"part": k, "ms": v, "share": v / total_ms} for k, v in sorted(parts.items(), key=lambda kv: -kv[1])]
    print(md_table(rows, ["part", "ms", "share"]), flush=True)

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fwd(net)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=70)
    print(table, flush=True)

    speed = {"eager_fwd_slices_per_s": args.batch / (total_ms / 1e3)}
    net.train()
    speed["eager_fwd_bwd_slices_per_s"] = args.batch / cuda_time(lambda: fwd_bwd(net), 2, 6)
    if args.compile:
        compiled = torch.compile(net)
        t = time.perf_counter()
        net.eval()
        fwd(compiled)
        torch.cuda.synchronize()
        speed["compile_fwd_s"] = time.perf_counter() - t
        speed["compiled_fwd_slices_per_s"] = args.batch / cuda_time(lambda: fwd(compiled), 3, 10)
        net.train()
        t = time.perf_counter()
        fwd_bwd(compiled)
        torch.cuda.synchronize()
        speed["compile_fwd_bwd_s"] = time.perf_counter() - t
        speed["compiled_fwd_bwd_slices_per_s"] = args.batch / cuda_time(lambda: fwd_bwd(compiled), 2, 6)
    print(speed, flush=True)
    md = [f"# Profile of MSA2-Net {args.preset}, {h}x{w}, batch {args.batch}, bf16 autocast\n", env_header(env),
          f"\nforward {total_ms:.2f} ms per batch\n", md_table(rows, ["part", "ms", "share"]), "\n```\n" + table + "\n```\n",
          md_table([speed], list(speed))]
    write_results(f"profile_{args.preset}", {"env": env, "args": vars(args), "parts_ms": parts, "forward_ms": total_ms, **speed}, "\n".join(md), args.out_dir)


if __name__ == "__main__":
    main()
