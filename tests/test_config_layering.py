"""Bundle config layering: profiles describe data and classes, override files the optimiser or the machine,
so the order in which they are listed cannot change the resolved configuration."""

import itertools
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
PROFILES = sorted(p.name for p in CONFIGS.glob("profile_*.json"))
OVERRIDES = ["adamw.json", "gpu_train.json", "tta.json", "mlflow.json"]


def merged(files: list[str]) -> dict:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    return parser.get()


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_and_overrides_give_the_same_config_in_any_order(profile):
    layers = [profile, *OVERRIDES]
    reference = merged(["train.json", *layers])
    for order in itertools.permutations(layers):
        assert merged(["train.json", *order]) == reference, order


def test_profiles_set_no_optimiser_or_schedule_keys():
    optimiser_keys = {"optimizer", "learning_rate", "lr_schedule", "warmup_iters", "lr_scheduler", "ema_decay", "grad_clip_norm"}
    for profile in PROFILES:
        keys = set(merged([profile]))
        assert not keys & optimiser_keys, (profile, keys & optimiser_keys)


def test_adamw_learning_rate_survives_any_profile():
    for profile in PROFILES:
        for files in (["train.json", profile, "adamw.json"], ["train.json", "adamw.json", profile]):
            parser = ConfigParser()
            parser.read_config([str(CONFIGS / f) for f in files])
            assert parser.get_parsed_content("learning_rate") == 0.0005 and parser.get("lr_schedule") == "cosine"


@pytest.mark.parametrize("extra", ["profile_kvasir.json", "baseline_basic_unet.json"])
def test_profile_and_baseline_files_raise_no_config_root_warning(extra, caplog):
    """MONAI warns "Not all config files are in configs" when the files of one run sit in different folders."""
    from monai.bundle import ConfigWorkflow

    with caplog.at_level("WARNING"):
        ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / extra)], workflow_type="train")
    assert "Not all config files" not in caplog.text


@pytest.mark.parametrize("extra", [[], ["adamw.json"]])
@pytest.mark.parametrize("device", ["cpu", "$torch.device('cpu')"])
def test_optimiser_resolves_with_the_device_as_text_or_object(extra, device):
    """MONAI Label passes the device as text; the fused kernels are for CUDA only."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in ["train.json", *extra]])
    parser.update({"device": device, "model_preset": "tiny"})
    optimizer = parser.get_parsed_content("optimizer")
    assert optimizer.defaults["fused"] is False
