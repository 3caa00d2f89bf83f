"""The classes are stated once: a profile's ``class_names``; configs, metadata, MONAI Label and Deploy follow it."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from monai.bundle import ConfigParser

from conftest import BUNDLE, ROOT
from msa2net.bundle_tools import class_table, metadata_with_classes

CONFIGS = BUNDLE / "configs"
PROFILES = sorted(p.stem.removeprefix("profile_") for p in CONFIGS.glob("profile_*.json"))
#: The bundle's default task: train.json, inference.json and metadata.json state this profile's classes.
DEFAULT_PROFILE = "acdc"


def _profile(name: str) -> dict:
    return json.loads((CONFIGS / f"profile_{name}.json").read_text())


def _parser(*files) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    return parser


def _load_serve():
    spec = importlib.util.spec_from_file_location("msa2net_label_serve", ROOT / "label" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metadata_class_fields_are_the_default_profiles():
    profile = _profile(DEFAULT_PROFILE)
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    derived = metadata_with_classes(meta, profile["class_names"], profile["in_channels"])
    assert meta == derived, f"metadata.json's class fields differ from profile_{DEFAULT_PROFILE}.json's class_names"
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert list(pred["channel_def"].values()) == ["background", *profile["class_names"]]
    assert meta["label_classes"] == "0 background, 1 right ventricle, 2 myocardium, 3 left ventricle"


@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_configs_default_to_the_default_profiles_classes(config):
    parser = _parser(CONFIGS / config)
    table = class_table(parser)
    assert table == ["background", *_profile(DEFAULT_PROFILE)["class_names"]], (
        f"{config}'s class_names differ from profile_{DEFAULT_PROFILE}.json's"
    )
    assert parser.get_parsed_content("num_classes") == len(table)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_a_profile_on_top_of_a_config_sets_its_classes(config, profile):
    parser = _parser(CONFIGS / config, CONFIGS / f"profile_{profile}.json")
    table = class_table(parser)
    assert table == ["background", *_profile(profile)["class_names"]]
    assert parser.get_parsed_content("num_classes") == len(table)


@pytest.mark.parametrize(
    "names", [None, [], "organ", ["a", "a"], ["background", "a"], ["a", 3], ["a", ""]], ids=repr
)
def test_class_table_refuses_what_is_not_a_list_of_distinct_names(names):
    parser = ConfigParser({} if names is None else {"class_names": names})
    with pytest.raises(ValueError, match=r"^inference\.json: class_names must be a non-empty list of distinct"):
        class_table(parser, "inference.json")


def test_label_serve_derives_configs_and_metadata_from_the_profile(tmp_path):
    apply_profile = _load_serve().apply_profile
    shutil.copytree(CONFIGS, tmp_path / "configs")
    original = json.loads((CONFIGS / "metadata.json").read_text())
    kvasir = _profile("kvasir")

    apply_profile(tmp_path, "kvasir")
    meta = json.loads((tmp_path / "configs" / "metadata.json").read_text())
    assert meta == metadata_with_classes(original, kvasir["class_names"], kvasir["in_channels"])
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "polyp"}
    for config in ("inference.json", "train.json"):
        assert class_table(_parser(tmp_path / "configs" / config)) == ["background", "polyp"]

    before = {f.name: f.read_bytes() for f in (tmp_path / "configs").glob("*.json")}
    with pytest.raises(ValueError, match="inference.json .*class_names must be"):
        apply_profile(tmp_path, overrides={"class_names": ["polyp", "polyp"]})
    assert {f.name: f.read_bytes() for f in (tmp_path / "configs").glob("*.json")} == before, "refused, yet written"
