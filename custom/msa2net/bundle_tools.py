"""Locating the bundle, running its workflows in-process, exporting a stand-alone bundle folder, and its class table.

The classes are stated once per task: the ``class_names`` of a profile (``configs/profile_<task>.json``).
``train.json``, ``inference.json`` and ``metadata.json`` carry ``profile_acdc.json``'s as the default, since
a bundle config cannot include another file; ``tests/test_class_table.py`` fails when they differ.
``num_classes`` is derived from ``class_names`` in the configs, the metadata's class fields by
:func:`metadata_with_classes`, and MONAI Label and the Deploy app read it through :func:`class_table`.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msa2net
from msa2net.atomic import PARTIAL_PREFIX, atomic_path

__all__ = [
    "default_bundle_dir",
    "config_files",
    "run_workflow",
    "export_bundle",
    "BACKGROUND",
    "class_table",
    "metadata_with_classes",
]

_BUNDLE_PARTS = ("configs", "docs", "models", "LICENSE")
BACKGROUND = "background"


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
                shutil.copytree(path, tmp / part, ignore=shutil.ignore_patterns("*.tmp", "resume_*", f"{PARTIAL_PREFIX}*"))
            elif path.is_file():
                shutil.copy2(path, tmp / part)
        shutil.copytree(
            Path(msa2net.__file__).resolve().parent, tmp / "msa2net", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return str(out)


def class_table(parser: Any, where: str = "bundle configs") -> list[str]:
    """Class name of each label value, background first, from the parsed configs' ``class_names``.

    Args:
        parser: a ``monai.bundle.ConfigParser`` holding the configs as they are run (a profile and
            overrides already applied); ``class_names`` lists the foreground classes in label-value order.
        where: what the parser read, for the error message (a bundle folder and its config files).

    Raises:
        ValueError: ``class_names`` is missing, empty, not a list of names, or repeats a name (background included).
    """
    names = parser.get_parsed_content("class_names") if "class_names" in parser else None
    table = [BACKGROUND] + list(names) if isinstance(names, (list, tuple)) else []
    if len(table) < 2 or not all(isinstance(n, str) and n for n in table) or len(set(table)) != len(table):
        raise ValueError(
            f"{where}: class_names must be a non-empty list of distinct foreground class names in label-value order "
            f"(label 0 is {BACKGROUND!r}), got {names!r}."
        )
    return table


def metadata_with_classes(meta: dict, class_names: Sequence[str], in_channels: int | None = None) -> dict:
    """A copy of ``metadata.json``'s content with its class fields (and input channels) derived from a profile.

    Sets ``label_classes`` and ``pred_classes`` (``"0 background, 1 right ventricle, ..."``), the output's
    ``num_channels`` and ``channel_def`` (label value -> class name, which MONAI Label shows), and, with
    ``in_channels``, the input's ``num_channels`` and ``channel_def``.
    """
    meta = copy.deepcopy(meta)
    table = [BACKGROUND] + list(class_names)
    fmt = meta["network_data_format"]
    pred = next(iter(fmt["outputs"].values()))
    pred["num_channels"] = len(table)
    pred["channel_def"] = {str(i): n for i, n in enumerate(table)}
    meta["label_classes"] = meta["pred_classes"] = ", ".join(f"{i} {n.replace('_', ' ')}" for i, n in enumerate(table))
    if in_channels is not None:
        image = next(iter(fmt["inputs"].values()))
        image["num_channels"] = int(in_channels)
        image["channel_def"] = {str(i): "image" for i in range(int(in_channels))}
    return meta
