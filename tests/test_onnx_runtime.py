"""ONNX Runtime as the bundle's inference backend, chosen by configs/inference_onnxruntime.json."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import SYNTHETIC, bundle_cmd
from msa2net.networks import create_msa2net
from msa2net.onnx_runtime import OnnxRuntimeNetwork

pytest.importorskip("onnxruntime")


def test_logits_match_pytorch_at_other_batch_sizes(tmp_path):
    torch.manual_seed(0)
    net = create_msa2net("tiny", in_channels=1, num_classes=3).eval()
    ort_net = OnnxRuntimeNetwork(create_msa2net("tiny", in_channels=1, num_classes=3), tmp_path / "m.onnx", (1, 1, 64, 64), threads=1)
    ort_net.load_state_dict(net.state_dict())
    for b in (1, 3):
        x = torch.rand(b, 1, 64, 64)
        with torch.no_grad():
            assert (ort_net(x) - net(x)).abs().max().item() < 1e-3
    first = (tmp_path / "m.onnx").stat().st_mtime_ns
    again = OnnxRuntimeNetwork(create_msa2net("tiny", in_channels=1, num_classes=3), tmp_path / "m.onnx", (1, 1, 64, 64), threads=1)
    again.load_state_dict(net.state_dict())
    again(torch.rand(1, 1, 64, 64))
    assert (tmp_path / "m.onnx").stat().st_mtime_ns == first  # same weights: the export is reused
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    again.load_state_dict(net.state_dict())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert (again(x) - net(x)).abs().max().item() < 1e-3  # new weights: exported again
    other_size = OnnxRuntimeNetwork(create_msa2net("tiny", in_channels=1, num_classes=3), tmp_path / "m.onnx", (1, 1, 96, 96), threads=1)
    other_size.load_state_dict(net.state_dict())
    x = torch.rand(1, 1, 96, 96)
    with torch.no_grad():
        assert (other_size(x) - net(x)).abs().max().item() < 1e-3  # a new input size: exported again
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="input_shape"):
        OnnxRuntimeNetwork(net, tmp_path / "x.onnx", (2, 1, 64, 64))


def test_bundle_inference_with_onnxruntime_equals_pytorch(trained_tiny, volume_dataset, tmp_path):
    ckpt = str(trained_tiny / "models" / "model.pt")
    common = ["--dataset_dir", str(volume_dataset / "imagesTr"), "--ckpt_path", ckpt, *SYNTHETIC]
    bundle_cmd("inference", ["inference.json"], *common, "--output_dir", str(tmp_path / "torch"))
    bundle_cmd("inference", ["inference.json", "inference_onnxruntime.json"], *common, "--output_dir", str(tmp_path / "ort"),
               "--onnx_path", str(tmp_path / "model.onnx"))
    assert (tmp_path / "model.onnx").is_file()
    torch_out = sorted((tmp_path / "torch").glob("*.nii.gz"))
    assert torch_out and [p.name for p in torch_out] == sorted(p.name for p in (tmp_path / "ort").glob("*.nii.gz"))
    for p in torch_out:
        a, b = nib.load(p), nib.load(tmp_path / "ort" / p.name)
        np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
        np.testing.assert_allclose(a.affine, b.affine)
