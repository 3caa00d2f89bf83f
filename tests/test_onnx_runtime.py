"""ONNX Runtime pieces of the CPU backends: cached exports that never touch a user's export, INT8, sessions."""

from __future__ import annotations

import pytest
import torch

from msa2net.networks import create_msa2net
from msa2net.onnx_runtime import OrtRunner, OrtSettings, cached_int8, cached_onnx, weights_digest

pytest.importorskip("onnxruntime")

SHAPE = (1, 1, 64, 64)


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_msa2net("tiny", in_channels=1, num_classes=3).eval()


def test_cached_export_is_reused_and_keyed_by_weights_and_shape(tmp_path):
    net = _net()
    path = cached_onnx(net, SHAPE, tmp_path)
    assert path.parent == tmp_path and path.name.startswith("msa2net-")
    first = path.stat().st_mtime_ns
    assert cached_onnx(_net(), SHAPE, tmp_path, digest=weights_digest(net)) == path
    assert path.stat().st_mtime_ns == first  # same weights and shape: not exported again
    other = _net(seed=1)
    assert weights_digest(other) != weights_digest(net)
    assert cached_onnx(other, SHAPE, tmp_path) != path
    assert cached_onnx(net, (1, 1, 96, 96), tmp_path) != path
    assert len(list(tmp_path.glob("msa2net-*.onnx"))) == 3
    assert not list(tmp_path.glob(".partial-*"))


@pytest.mark.parametrize("settings", [OrtSettings(1), OrtSettings(2, "extended"), OrtSettings(1, "basic", parallel=True)])
def test_sessions_with_each_setting_match_pytorch(tmp_path, settings):
    net = _net()
    run = OrtRunner(cached_onnx(net, SHAPE, tmp_path), settings)
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        assert (run(x) - net(x)).abs().max().item() < 1e-3


def test_int8_model_is_made_once_and_runs(tmp_path):
    import onnx

    net = _net()
    path = cached_onnx(net, SHAPE, tmp_path)
    q = cached_int8(path)
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    first = q.stat().st_mtime_ns
    assert cached_int8(path) == q and q.stat().st_mtime_ns == first
    out = OrtRunner(q, OrtSettings(1))(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()


def test_unknown_optimisation_level_is_refused(tmp_path):
    with pytest.raises(ValueError, match="optimisation level"):
        OrtRunner(cached_onnx(_net(), SHAPE, tmp_path), OrtSettings(1, "fastest"))
