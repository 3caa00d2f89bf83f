"""Saying in one line why a state dict does not fit a network: classes, input channels, preset."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["describe_mismatch"]


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def _io(shapes: dict[str, tuple]) -> tuple[int | None, int | None]:
    """(input channels, output channels): the first convolution's input and the last weight's output, in key order."""
    convs = [s for k, s in shapes.items() if k.endswith("weight") and len(s) == 4]
    weights = [s for k, s in shapes.items() if k.endswith("weight") and len(s) >= 2]
    return (convs[0][1] if convs else None), (weights[-1][0] if weights else None)


def _preset_of(shapes: dict[str, tuple], in_channels: int, num_classes: int) -> str | None:
    """The MSA2-Net preset whose parameters have exactly these shapes, if any (built on the CPU: error path only)."""
    from msa2net.networks import MSA2NET_PRESETS, create_msa2net

    for name in MSA2NET_PRESETS:
        try:
            net = create_msa2net(name, in_channels=in_channels, num_classes=num_classes)
        except Exception:  # a preset that cannot take these channels is simply not the match
            continue
        if _shapes(net.state_dict()) == shapes:
            return name
    return None


def describe_mismatch(network: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """What differs between ``network`` and the weights ``state``, in one line; ``None`` when they fit.

    Names the number of classes (background excluded), the input channels and, for MSA2-Net, the
    presets (``model_preset``) of both; anything else as the count of differing parameters and the
    first of them.
    """
    net = _shapes(network.state_dict())
    ckpt = _shapes(state)
    if net == ckpt:
        return None
    (net_in, net_out), (ckpt_in, ckpt_out) = _io(net), _io(ckpt)
    parts = []
    if ckpt_out is not None and net_out is not None and ckpt_out != net_out:
        parts.append(f"classes: {ckpt_out - 1} in the weights vs {net_out - 1} in the config (class_names)")
    if ckpt_in is not None and net_in is not None and ckpt_in != net_in:
        parts.append(f"input channels: {ckpt_in} in the weights vs {net_in} in the config (in_channels)")
    net_preset = getattr(network, "preset", None)
    if hasattr(network, "encoder") and ckpt_in and ckpt_out and net_in and net_out:
        ckpt_preset = _preset_of(ckpt, ckpt_in, ckpt_out)
        net_preset = net_preset or _preset_of(net, net_in, net_out)
        if ckpt_preset and net_preset and ckpt_preset != net_preset:
            parts.append(f"preset: {ckpt_preset!r} in the weights vs {net_preset!r} in the config (model_preset)")
        elif net_preset and not ckpt_preset:
            parts.append(f"the weights are not an MSA2-Net of any preset (the config builds {net_preset!r})")
    if not parts:
        missing, unexpected = sorted(net.keys() - ckpt.keys()), sorted(ckpt.keys() - net.keys())
        reshaped = [k for k in net.keys() & ckpt.keys() if net[k] != ckpt[k]]
        first = (
            f"'{missing[0]}' missing" if missing else f"'{unexpected[0]}' unexpected" if unexpected
            else f"'{reshaped[0]}' {ckpt[reshaped[0]]} in the weights vs {net[reshaped[0]]} in the network"
        )
        parts.append(
            f"{len(missing)} parameters missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape ({first})"
        )
    return "; ".join(parts)
