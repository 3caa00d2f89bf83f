"""CPU backends: each matches eager PyTorch; ``auto`` measures, caches its choice per machine and model, and logs it."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import SYNTHETIC, bundle_cmd
from msa2net.backends import CpuBackendNetwork
from msa2net.export import onnx
from msa2net.networks import create_msa2net

pytest.importorskip("onnxruntime")

SHAPE = (1, 1, 64, 64)


def _weights(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return create_msa2net("tiny", in_channels=1, num_classes=3).eval().state_dict()


def _backend(tmp_path, **kwargs) -> CpuBackendNetwork:
    net = CpuBackendNetwork(create_msa2net("tiny", in_channels=1, num_classes=3), SHAPE, cache_dir=tmp_path / "cache", threads=1, **kwargs)
    net.load_state_dict(_weights())
    return net


@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnxruntime", "onnxruntime:extended:parallel"])
def test_each_float_backend_matches_eager(tmp_path, backend):
    net = _backend(tmp_path, backend=backend)
    ref = create_msa2net("tiny", in_channels=1, num_classes=3).eval()
    ref.load_state_dict(_weights())
    for b in (1, 3):  # built at batch 1
        x = torch.rand(b, 1, 64, 64)
        with torch.no_grad():
            assert (net(x) - ref(x)).abs().max().item() < 1e-3
    assert net.selected == backend


def test_auto_probes_once_per_model_and_leaves_int8_out_unless_validated(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="msa2net.backends")
    candidates = ("eager", "onnxruntime", "onnxruntime_int8")
    net = _backend(tmp_path, candidates=candidates, probe_batch=2, probe_repeats=1)
    net(torch.rand(1, 1, 64, 64))
    (probe,) = (tmp_path / "cache").glob("probe-*.json")
    record = json.loads(probe.read_text())
    assert set(record["ms_per_slice"]) == {"eager", "onnxruntime"}  # INT8 not validated for these weights
    assert record["selected"] == net.selected == min(record["ms_per_slice"], key=record["ms_per_slice"].get)
    assert record["key"]["weights_sha256"] == net.digest and record["key"]["machine"]["usable_cores"] >= 1
    assert f"CPU backend: {net.selected}" in caplog.text and "measured in" in caplog.text

    caplog.clear()
    again = _backend(tmp_path, candidates=candidates, probe_batch=2, probe_repeats=1)
    again(torch.rand(1, 1, 64, 64))
    assert again.selected == net.selected and "probe cached" in caplog.text
    assert len(list((tmp_path / "cache").glob("probe-*.json"))) == 1

    caplog.clear()
    probe.write_text("{not json")  # a damaged cache entry is measured again, not trusted
    _backend(tmp_path, candidates=candidates, probe_batch=2, probe_repeats=1)(torch.rand(1, 1, 64, 64))
    assert "measured in" in caplog.text and json.loads(probe.read_text())["key"] == record["key"]

    validated = _backend(tmp_path, candidates=candidates, probe_batch=2, probe_repeats=1, int8_weights=[net.digest])
    validated(torch.rand(1, 1, 64, 64))
    records = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("probe-*.json")]
    assert len(records) == 2 and any("onnxruntime_int8" in r["ms_per_slice"] for r in records)

    validated.load_state_dict(_weights(seed=1))  # new weights: a new probe, INT8 no longer validated
    validated(torch.rand(1, 1, 64, 64))
    assert len(list((tmp_path / "cache").glob("probe-*.json"))) == 3
    assert validated.selected != "onnxruntime_int8"


def test_backend_cache_never_overwrites_a_users_export(tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save({"model": _weights()}, ckpt)
    user = tmp_path / "models" / "model.onnx"
    onnx(str(ckpt), out=str(user), model_preset="tiny", spatial_size=[64, 64], class_names=["a", "b"])
    before = user.read_bytes()
    net = _backend(tmp_path, backend="onnxruntime")
    net.load_state_dict(_weights(seed=2))
    net(torch.rand(1, 1, 64, 64))
    assert user.read_bytes() == before
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["model.onnx"]
    assert len(list((tmp_path / "cache").glob("msa2net-*.onnx"))) == 1


def test_bad_settings_are_refused_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown CPU backend 'openvino'.*'auto', 'eager'"):
        _backend(tmp_path, backend="openvino")
    with pytest.raises(ValueError, match="unknown CPU backend 'onnxruntime:fast'"):
        _backend(tmp_path, candidates=("eager", "onnxruntime:fast"))
    with pytest.raises(ValueError, match="input_shape"):
        CpuBackendNetwork(create_msa2net("tiny", 1, 3), (2, 1, 64, 64))


def test_bundle_inference_on_cpu_backends_equals_pytorch(trained_tiny, volume_dataset, tmp_path):
    ckpt = str(trained_tiny / "models" / "model.pt")
    common = ["--dataset_dir", str(volume_dataset / "imagesTr"), "--ckpt_path", ckpt, *SYNTHETIC]
    bundle_cmd("inference", ["inference.json"], *common, "--output_dir", str(tmp_path / "torch"))
    cpu = ["inference.json", "inference_cpu.json"]
    proc = bundle_cmd("inference", cpu, *common, "--output_dir", str(tmp_path / "auto"), "--cpu_cache_dir", str(tmp_path / "cache"))
    assert "CPU backend: " in proc.stdout + proc.stderr
    bundle_cmd("inference", cpu, *common, "--output_dir", str(tmp_path / "ort"), "--cpu_cache_dir", str(tmp_path / "cache"),
               "--cpu_backend", "onnxruntime")
    torch_out = sorted((tmp_path / "torch").glob("*.nii.gz"))
    assert torch_out
    for other in ("auto", "ort"):
        assert [p.name for p in torch_out] == sorted(p.name for p in (tmp_path / other).glob("*.nii.gz"))
        for p in torch_out:
            a, b = nib.load(p), nib.load(tmp_path / other / p.name)
            np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
            np.testing.assert_allclose(a.affine, b.affine)


def test_shipped_weights_are_listed_as_validated_for_int8():
    """Re-shipped weights need their INT8 Dice measured (benchmarks/eval_cpu_backends.py) before `auto` may pick INT8."""
    from monai.bundle import ConfigParser

    from conftest import BUNDLE
    from msa2net.inference import load_weights
    from msa2net.onnx_runtime import weights_digest

    if not (BUNDLE / "models" / "model.pt").is_file():
        pytest.skip("no shipped weights in bundle/models")
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "inference.json"), str(BUNDLE / "configs" / "inference_cpu.json")])
    net = parser.get_parsed_content("network_def")
    load_weights(net, BUNDLE / "models" / "model.pt")
    assert weights_digest(net) in parser.get_parsed_content("cpu_int8_weights")
