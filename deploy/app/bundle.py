"""The bundle folder the application runs: finding it, what it declares, and the SDK operator that runs it.

The application needs from the bundle what the SDK's ``MonaiBundleInferenceOperator`` does not parse:
the config names (``inference.json`` + ``deploy.json``), the model's name, version and authors (the SEG's
equipment and description), the class names (segments, their codes and colours from
:mod:`msa2net.terminology`) and the input declaration (:mod:`msa2net.input_guard`). The exported bundle
ships the ``msa2net`` package, so these modules come from the bundle the app runs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from monai.deploy.operators.monai_bundle_inference_operator import MonaiBundleInferenceOperator

__all__ = ["BundleInfo", "Label", "find_bundle", "read_bundle", "ConfiguredBundleInferenceOperator"]


@dataclass(frozen=True)
class Label:
    """One class of the model: label value, class name, display colour and SNOMED CT ``(value, scheme, meaning)``."""

    value: int
    name: str
    rgb: tuple[int, int, int]
    code: tuple[str, str, str]


@dataclass(frozen=True)
class BundleInfo:
    """What the application reads from the bundle folder besides what the inference operator parses."""

    path: Path
    config_names: list[str]
    name: str
    version: str
    authors: str
    labels: list[Label]
    meta: dict

    def model_digest(self) -> str:
        """First 16 hex digits of the SHA-256 of ``models/model.ts``: which weights wrote a SEG."""
        digest = hashlib.sha256()
        with open(self.path / "models" / "model.ts", "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:16]


def find_bundle(model_path: str | os.PathLike) -> Path:
    """The bundle folder at ``model_path``, or the only bundle folder inside it (MAP layout ``models/<name>/``)."""
    root = Path(model_path)
    if (root / "configs" / "metadata.json").is_file():
        return root
    found = [p for p in sorted(root.iterdir()) if (p / "configs" / "metadata.json").is_file()] if root.is_dir() else []
    if len(found) != 1:
        raise FileNotFoundError(
            f"{root}: expected a MONAI bundle folder (configs/metadata.json, models/model.ts) or a folder holding "
            f"exactly one; found {len(found)}. Build one with `python -m msa2net.export deploy_bundle`."
        )
    return found[0]


def read_bundle(bundle: Path) -> BundleInfo:
    """Config names, name, version, authors and labels (``msa2net.bundle_tools.class_table`` of the configs)."""
    from monai.bundle import ConfigParser

    from msa2net.bundle_tools import class_table
    from msa2net.terminology import term_for

    names = ["inference"] + (["deploy"] if (bundle / "configs" / "deploy.json").is_file() else [])
    parser = ConfigParser()
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.read_config([str(bundle / "configs" / f"{n}.json") for n in names])
    meta = parser.get("_meta_", {})
    table = class_table(parser, f"{bundle}: the configs ({', '.join(n + '.json' for n in names)})")
    colors = meta.get("label_colors", {})
    labels = []
    for value, name in enumerate(table[1:], 1):
        term = term_for(name, value)
        labels.append(Label(value, name, tuple(colors.get(name) or term.rgb), term.code))
    return BundleInfo(
        bundle, names, str(meta.get("name", "MSA2-Net")), str(meta.get("version", "") or "0"),
        str(meta.get("authors", "") or "unknown"), labels, dict(meta),
    )


class ConfiguredBundleInferenceOperator(MonaiBundleInferenceOperator):
    """The SDK's bundle inference operator with config ids set after it parsed the bundle.

    The SDK reads the bundle's configs itself and offers no overrides, and leaves ``bundle_root`` at the
    configs' ``"."`` (the input guard reads ``<bundle_root>/configs/metadata.json``). ``config_overrides``
    (``bundle_root``; ``allow_input_mismatch`` when the user allowed a mismatch) are set on its parser before
    the pre- and postprocessing are built from it.
    """

    def __init__(self, *args, config_overrides: dict, **kwargs):
        self._config_overrides = dict(config_overrides)
        super().__init__(*args, **kwargs)

    def _get_compose(self, obj_name, disallowed_prefixes):
        # The SDK parses the bundle and builds the transforms in one step (_init_config); this is the last point
        # before the first is instantiated. Only then: setting an id resets the parser's instances, and the
        # postprocessing must see the very preprocessing objects that ran.
        overrides, self._config_overrides = self._config_overrides, {}
        for key, value in overrides.items():
            self._parser[key] = value
        return super()._get_compose(obj_name, disallowed_prefixes)
