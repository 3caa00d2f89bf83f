"""Start a MONAI Label server on 127.0.0.1 that serves the MSA2-Net bundle from a local studies folder, offline.

Run with the label environment's python (see ``bundle/docs/monailabel.md``)::

    .venv-label/bin/python label/serve.py --studies /path/to/studies --port 8000

What it does:

1. the app folder (``label/app`` by default; another folder gets a copy of ``label/app/*.py``) gets
   the bundle folder ``<app>/model/<name>``, exported once from ``bundle/`` by ``msa2net export-bundle``
   (configs, docs, models and the ``msa2net`` package, so nothing needs installing on the server side);
   ``--profile`` adjusts its configs and metadata to a training profile (class names, preset, sizes) and
   ``--weights`` puts a checkpoint in as ``models/model.pt``. An existing bundle folder is kept as it is
   (it holds the fine-tuned weights): ``--reexport`` rebuilds it.
2. it then runs (replacing this process)::

       monailabel start_server --app <app> --studies <studies> --host 127.0.0.1 --port <port>
           --conf models <name> --conf zoo_source github --conf sam2 false --conf preload false
           --conf keep_versions <N>

   The app never contacts a model zoo and has no SAM2 task, so no download is attempted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

LABEL_DIR = Path(__file__).resolve().parent
DEFAULT_APP = LABEL_DIR / "app"
REPO_BUNDLE = LABEL_DIR.parent / "bundle"
HOST = "127.0.0.1"

__all__ = ["apply_profile", "prepare_bundle", "server_command", "main"]


def apply_profile(bundle_dir: str | os.PathLike, profile: str | None = None, overrides: dict | None = None) -> dict:
    """Write ``configs/profile_<profile>.json`` (then ``overrides``) into the bundle's inference.json and train.json.

    MONAI Label reads ``configs/inference.json`` and ``configs/train.json`` alone (it cannot add a
    profile file on the command line as ``monai.bundle run`` can), so the profile's ids are written
    into both. ``metadata.json``'s class fields and input channels are derived from the resulting
    ``class_names`` and ``in_channels`` by ``msa2net.bundle_tools.metadata_with_classes``; the app itself
    reads the class names from ``inference.json`` (``msa2net.bundle_tools.class_table``).
    """
    from monai.bundle import ConfigParser

    from msa2net.bundle_tools import class_table, metadata_with_classes

    configs = Path(bundle_dir) / "configs"
    values: dict = {}
    if profile:
        profile_file = configs / f"profile_{profile}.json"
        if not profile_file.is_file():
            names = sorted(p.stem.removeprefix("profile_") for p in configs.glob("profile_*.json"))
            raise FileNotFoundError(f"{profile_file}: no such profile; choose one of {names}.")
        values.update(json.loads(profile_file.read_text()))
    values.update(overrides or {})

    def layered(name: str) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(str(configs / name))
        parser.update(values)
        return parser

    # The classes the app will serve, checked before anything is written; on a parser of its own, since
    # parsing rewrites the config it parses.
    where = f"{configs / 'inference.json'} (profile {profile}, overrides {sorted(overrides or {})})"
    table = class_table(layered("inference.json"), where)
    for name in ("inference.json", "train.json"):
        ConfigParser.export_config_file(layered(name).get(), str(configs / name), indent=4)

    meta_file = configs / "metadata.json"
    meta = metadata_with_classes(json.loads(meta_file.read_text()), table[1:], values.get("in_channels"))
    meta_file.write_text(json.dumps(meta, indent=4) + "\n")
    return values


def prepare_bundle(
    dest: str | os.PathLike,
    source: str | os.PathLike | None = None,
    profile: str | None = None,
    weights: str | os.PathLike | None = None,
    overrides: dict | None = None,
) -> Path:
    """Export a stand-alone bundle folder to ``dest`` (replaced), adjusted to ``profile`` and ``overrides``, with ``weights``."""
    from msa2net.bundle_tools import export_bundle

    dest = Path(export_bundle(dest, bundle_dir=source or REPO_BUNDLE, overwrite=True))
    if profile or overrides:
        apply_profile(dest, profile, overrides)
    if weights:
        (dest / "models").mkdir(exist_ok=True)
        shutil.copyfile(weights, dest / "models" / "model.pt")
    return dest


def server_command(
    app_dir: str | os.PathLike, studies: str | os.PathLike, port: int, name: str = "msa2net", keep_versions: int = 3
) -> list[str]:
    """The ``monailabel start_server`` command line (host fixed to 127.0.0.1, nothing downloaded).

    ``keep_versions`` is how many published fine-tunes the app keeps for rolling back.
    """
    return [
        sys.executable, "-m", "monailabel.main",  # the `monailabel` console script of the environment
        "start_server",
        "--app", str(app_dir),
        "--studies", str(studies),
        "--host", HOST,
        "--port", str(port),
        "--conf", "models", name,
        "--conf", "zoo_source", "github",
        "--conf", "sam2", "false",
        "--conf", "preload", "false",
        "--conf", "keep_versions", str(keep_versions),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", required=True, help="local studies folder (images; labels go to labels/final)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--app-dir", default=str(DEFAULT_APP), help="MONAI Label app folder (default: label/app)")
    parser.add_argument("--name", default="msa2net", help="model name shown to clients")
    parser.add_argument("--bundle-src", default=str(REPO_BUNDLE), help="bundle folder to export (default: bundle/)")
    parser.add_argument(
        "--profile", default=None, help="training profile the weights were trained with (e.g. synthetic)"
    )
    parser.add_argument("--weights", default=None, help="checkpoint to serve as models/model.pt")
    parser.add_argument(
        "--set", action="append", default=[], metavar="ID=JSON",
        help="config override the weights were trained with, e.g. --set 'spatial_size=[64,64]' (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--reexport", action="store_true", help="rebuild the served bundle folder (drops fine-tuned weights)"
    )
    parser.add_argument(
        "--keep-versions", type=int, default=3, help="published fine-tunes kept for rolling back (default 3)"
    )
    parser.add_argument("--dry-run", action="store_true", help="prepare and print the server command, do not start")
    args = parser.parse_args(argv)

    app_dir = Path(args.app_dir).resolve()
    app_dir.mkdir(parents=True, exist_ok=True)
    if app_dir != DEFAULT_APP:
        for module in DEFAULT_APP.glob("*.py"):
            shutil.copyfile(module, app_dir / module.name)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--set {item!r}: expected ID=JSON, e.g. spatial_size=[64,64]")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    bundle_dir = app_dir / "model" / args.name
    if args.reexport or not (bundle_dir / "configs" / "metadata.json").is_file():
        print(f"exporting {args.bundle_src} to {bundle_dir}", flush=True)
        prepare_bundle(bundle_dir, args.bundle_src, args.profile, args.weights, overrides)
    elif args.profile or args.weights or overrides:
        sys.exit(
            f"{bundle_dir} exists; add --reexport to rebuild it with --profile/--weights/--set (fine-tuned weights are dropped)."
        )
    if not (bundle_dir / "models" / "model.pt").is_file():
        sys.exit(
            f"{bundle_dir}/models/model.pt is missing: pass --weights FILE (e.g. a model trained with "
            "`msa2net demo` together with --profile synthetic) and --reexport."
        )
    studies = Path(args.studies).resolve()
    studies.mkdir(parents=True, exist_ok=True)
    if args.keep_versions < 1:
        sys.exit(f"--keep-versions {args.keep_versions}: keep at least 1 published version.")
    cmd = server_command(app_dir, studies, args.port, args.name, args.keep_versions)
    print(" ".join(cmd), flush=True)
    if args.dry_run:
        return
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
