"""Locating the bundle, running its workflows in-process, and exporting a stand-alone bundle folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import msa2net
from msa2net.atomic import atomic_path

__all__ = ["default_bundle_dir", "config_files", "run_workflow", "export_bundle"]

_BUNDLE_PARTS = ("configs", "docs", "models", "LICENSE")


def default_bundle_dir() -> Path:
    """The ``bundle/`` folder of this checkout, or a stand-alone bundle folder holding this package."""
    package = Path(msa2net.__file__).resolve().parent
    for candidate in (package.parents[1] / "bundle", package.parent):
        if (candidate / "configs" / "metadata.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{package}: no bundle folder next to this package; pass bundle_dir (the folder holding configs/)."
    )


def config_files(bundle_dir: Path, *names: str) -> list[str]:
    """Absolute paths of ``configs/<name>`` for each name, checked to exist."""
    files = [bundle_dir / "configs" / n for n in names]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: bundle config not found.")
    return [str(f) for f in files]


def run_workflow(run_id: str, configs: list[str], bundle_dir: Path | None = None, **overrides) -> None:
    """Run a bundle workflow in this process, as ``python -m monai.bundle run`` does."""
    from monai.bundle import run

    bundle_dir = Path(bundle_dir or default_bundle_dir())
    run(
        run_id=run_id,
        config_file=config_files(bundle_dir, *configs),
        meta_file=str(bundle_dir / "configs" / "metadata.json"),
        logging_file=str(bundle_dir / "configs" / "logging.conf"),
        bundle_root=str(bundle_dir),
        **overrides,
    )


def export_bundle(out_dir: str | os.PathLike, bundle_dir: str | os.PathLike | None = None, overwrite: bool = False) -> str:
    """Write a stand-alone bundle folder: ``configs/``, ``docs/``, ``models/``, ``LICENSE`` and the ``msa2net`` package.

    MONAI Label and MONAI Deploy load a bundle folder by putting it on ``sys.path``; with
    the package copied in, the configs' ``msa2net.*`` targets import without installing
    this project. The folder is assembled under a temporary name and renamed at the end.
    """
    src = Path(bundle_dir) if bundle_dir else default_bundle_dir()
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass overwrite=True to replace it.")
    with atomic_path(out, replace_dir=True) as tmp:
        tmp.mkdir()
        for part in _BUNDLE_PARTS:
            path = src / part
            if path.is_dir():
                shutil.copytree(path, tmp / part, ignore=shutil.ignore_patterns("*.tmp", "resume_*", ".partial-*"))
            elif path.is_file():
                shutil.copy2(path, tmp / part)
        shutil.copytree(
            Path(msa2net.__file__).resolve().parent, tmp / "msa2net", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return str(out)
