"""Exports of :mod:`msa2net.export`: TorchScript through ``ckpt_export``, ONNX with a dynamic batch, deploy bundles.

A ``tiny`` MSA2-Net at 64x64 keeps this fast; at 64 the last CSWin stage (2x2) is smaller than its
attention window, so the padded, masked attention path is exported too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from msa2net.export import DEPLOY_CONFIG, check_exported, deploy_bundle, onnx, torchscript
from msa2net.networks import create_msa2net

OVERRIDES = {"model_preset": "tiny", "spatial_size": [64, 64], "class_names": ["organ_1", "organ_2"]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny checkpoint in the bundle trainer's layout ``{"model": state_dict}``, with non-trivial BN statistics."""
    torch.manual_seed(0)
    net = create_msa2net("tiny", 1, 3)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(4, 1, 64, 64))
    net.eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"model": net.state_dict()}, path)
    return path, net


def _inputs(batch: int) -> torch.Tensor:
    return torch.rand((batch, 1, 64, 64), generator=torch.Generator().manual_seed(batch))


def test_torchscript_embeds_configs_and_runs_at_other_batch_sizes(checkpoint, tmp_path):
    ckpt, net = checkpoint
    out = torchscript(str(ckpt), out=str(tmp_path / "model.ts"), **OVERRIDES)
    names = zipfile.ZipFile(out).namelist()
    assert {"model/extra/metadata.json", "model/extra/inference.json"} <= set(names)
    extra = {"metadata.json": "", "inference.json": ""}
    ts = torch.jit.load(out, map_location="cpu", _extra_files=extra)
    assert json.loads(extra["metadata.json"])["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    assert "network_def" in json.loads(extra["inference.json"])
    for batch in (1, 4, 7):  # exported at batch 1; SliceInferer feeds up to sw_batch_size slices
        x = _inputs(batch)
        with torch.no_grad():
            got, want = ts(x), net(x)
        assert got.shape == (batch, 3, 64, 64)
        assert (got - want).abs().max().item() <= 1e-4


def test_onnx_has_dynamic_batch_and_matches_eager(checkpoint, tmp_path):
    import onnx as onnx_lib
    import onnxruntime as ort

    ckpt, net = checkpoint
    out = onnx(str(ckpt), out=str(tmp_path / "model.onnx"), **OVERRIDES)
    model = onnx_lib.load(out)
    (inp,) = model.graph.input
    assert inp.name == "image" and inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [1, 64, 64]
    props = {p.key: p.value for p in model.metadata_props}
    assert {"metadata.json", "inference.json"} <= set(props)
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    for batch in (1, 2, 5):
        x = _inputs(batch)
        (got,) = session.run(["pred"], {"image": x.numpy()})
        with torch.no_grad():
            want = net(x).numpy()
        assert got.shape == (batch, 3, 64, 64)
        assert np.abs(got - want).max() <= 1e-3


def test_torchscript_command_line(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    out = tmp_path / "cli.ts"
    cmd = [
        sys.executable, "-m", "msa2net.export", "torchscript", "--ckpt", str(ckpt), "--out", str(out),
        "--model_preset", "tiny", "--spatial_size", "[64,64]", "--class_names", "['organ_1','organ_2']",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert torch.jit.load(str(out))(_inputs(2)).shape == (2, 3, 64, 64)


def test_failed_exports_raise_and_leave_no_file(checkpoint, tmp_path):
    ckpt, net = checkpoint
    with pytest.raises(AssertionError, match="batch 2: exported logits differ"):
        check_exported(lambda x: net(x).numpy() + 1e-3, net, (1, 1, 64, 64), atol=1e-4)
    out = tmp_path / "scripted.ts"
    with pytest.raises((RuntimeError, torch.jit.frontend.FrontendError)):  # MSA2-Net does not script; no trace fallback
        torchscript(str(ckpt), out=str(out), mode="script", **OVERRIDES)
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="bundle config not found"):
        torchscript(str(ckpt), out=str(out), profile="profile_no_such_profile.json", **OVERRIDES)


def test_deploy_bundle_folder(checkpoint, tmp_path):
    ckpt, net = checkpoint
    out = Path(deploy_bundle(str(tmp_path / "bundle"), str(ckpt), **OVERRIDES))
    assert json.loads((out / "configs" / DEPLOY_CONFIG).read_text()) == OVERRIDES
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "organ_1", "2": "organ_2"}
    for part in ("configs/inference.json", "configs/metadata.json", "models/model.pt", "models/model.ts", "msa2net/networks/sacm.py"):
        assert (out / part).is_file(), part
    assert "model/extra/deploy.json" in zipfile.ZipFile(out / "models" / "model.ts").namelist()
    ts = torch.jit.load(str(out / "models" / "model.ts"))
    x = _inputs(3)
    with torch.no_grad():
        assert (ts(x) - net(x)).abs().max().item() <= 1e-4
    with pytest.raises(FileExistsError):
        deploy_bundle(str(out), str(ckpt), **OVERRIDES)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"], "a staging folder was left behind"
