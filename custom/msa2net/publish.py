"""Publishing a training run's best model as the bundle's shipped weights: the one step that changes ``models/``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from msa2net.bundle_tools import config_files, default_bundle_dir
from msa2net.atomic import atomic_torch_save
from msa2net.inference import error_line, load_weights

__all__ = ["publish"]


def _inference_network(bundle: Path, profiles: list[str], overrides: dict) -> tuple[torch.nn.Module, str]:
    """The network ``run inference`` builds with these profiles and overrides, and the weights file it reads."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files(bundle, "inference.json", *profiles))
    parser.update({"bundle_root": str(bundle), **overrides})
    return parser.get_parsed_content("network_def"), parser.get_parsed_content("weights_file")


def publish(
    run_dir: str | os.PathLike,
    profile: str | list[str] = (),
    bundle_dir: str | os.PathLike | None = None,
    half: bool = False,
    **overrides,
) -> str:
    """Copy ``<run_dir>/models/model.pt`` to the bundle's weights file, once it is checked to fit.

    The check builds the network of ``configs/inference.json`` (plus ``profile`` files under
    ``configs/``, plus overrides such as ``model_preset=tiny``), that is the network that
    ``run inference`` will build, and loads the weights into it; a mismatch stops the copy with one
    line naming what differs. The destination is ``models/<weights_file>`` of that configuration
    (``model.pt``; ``model_kvasir.pt`` with ``profile_kvasir.json``). The file is written as
    ``{"model": state_dict}`` and replaced atomically.

    Args:
        run_dir: the training run folder (its ``--output_dir``), or a checkpoint file.
        profile: profile config(s) the bundle is used with, e.g. ``profile_acdc.json``.
        bundle_dir: the bundle folder (default: the one holding this package's configs).
        half: store floating-point weights as float16 (the shipped file is; halves the size).
        overrides: config values the bundle is used with (``model_preset``, ``class_names``, ...).

    Returns:
        The published file and its SHA-256.
    """
    src = Path(run_dir)
    src = src if src.is_file() else src / "models" / "model.pt"
    bundle = Path(bundle_dir) if bundle_dir else default_bundle_dir()
    profiles = [profile] if isinstance(profile, str) else list(profile)
    try:
        network, weights_file = _inference_network(bundle, profiles, overrides)
        load_weights(network, src)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: not published: {error_line(e)}") from None
    dst = bundle / "models" / weights_file
    state = torch.load(src, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    atomic_torch_save({"model": state}, dst)
    digest = hashlib.sha256(dst.read_bytes()).hexdigest()
    return f"published {src} as {dst} (sha256 {digest})"
