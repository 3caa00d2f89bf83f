"""SACM: the two forms agree, a one-hot gate is a plain convolution, export keeps the batch axis free."""

import io

import pytest
import torch
import torch.nn.functional as F

from msa2net.networks.sacm import SACM


def _randomise_gate(m: SACM) -> None:
    """The gate's last layer starts at zero (uniform mixture); give it weight so the forms are tested off that point."""
    with torch.no_grad():
        m.gate[-1].weight.normal_(0, 1.0)
        m.gate[-1].bias.normal_(0, 1.0)


@pytest.mark.parametrize("groups,stride,bias", [(1, 1, False), (1, 2, True), (4, 1, True), (8, 2, False)])
def test_forms_agree_in_float64(groups, stride, bias):
    torch.manual_seed(0)
    m = SACM(8, 16 if groups < 8 else 8, (3, 5, 7), stride=stride, groups=groups, bias=bias, norm=None, act=None).double()
    _randomise_gate(m)
    x = torch.randn(3, 8, 17, 20, dtype=torch.float64)
    attn = m.attention(x)
    assert attn.shape == (3, 3)
    assert not torch.allclose(attn[0], attn[1]), "per-sample gates must differ for the test to mean anything"
    y_kernel, y_sum = m.conv(x, attn, "kernel"), m.conv(x, attn, "sum")
    assert y_kernel.shape == (3, m.out_channels, -(-17 // stride), -(-20 // stride))
    torch.testing.assert_close(y_kernel, y_sum, rtol=0, atol=1e-5)


@pytest.mark.parametrize("form", ["kernel", "sum"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_one_hot_gate_is_plain_convolution(form, index):
    torch.manual_seed(1)
    m = SACM(4, 6, (3, 5, 7), bias=True, norm=None, act=None, form=form).double()
    with torch.no_grad():
        m.bias.normal_()
    x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    one_hot = F.one_hot(torch.full((2,), index), 3).double()
    size = m.kernel_sizes[index]
    expected = F.conv2d(x, m.weights[index], m.bias[index], padding=size // 2)
    torch.testing.assert_close(m.conv(x, one_hot), expected, rtol=0, atol=1e-10)


def test_single_kernel_is_plain_convolution_without_gate():
    m = SACM(4, 4, (3,), norm=None, act=None).double()
    assert m.gate is None
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(m(x), F.conv2d(x, m.weights[0], padding=1))


def test_gate_depends_on_input_statistics():
    torch.manual_seed(2)
    m = SACM(4, 4)
    _randomise_gate(m)
    x = torch.randn(1, 4, 16, 16)
    a1, a2 = m.attention(x), m.attention(3 * x + 1)
    torch.testing.assert_close(a1.sum(1), torch.ones(1))
    assert (a1 - a2).abs().max() > 1e-3


def test_trace_at_one_batch_size_runs_at_others():
    torch.manual_seed(3)
    m = SACM(8, 8, groups=1).eval()
    _randomise_gate(m)
    traced = torch.jit.trace(m, torch.randn(2, 8, 16, 16))
    for b in (1, 5):
        x = torch.randn(b, 8, 16, 16)
        torch.testing.assert_close(traced(x), m(x), rtol=1e-4, atol=1e-5)


def test_onnx_export_with_dynamic_batch():
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(4)
    m = SACM(8, 8, groups=8).eval()
    _randomise_gate(m)
    buf = io.BytesIO()
    torch.onnx.export(
        m, torch.randn(2, 8, 16, 16), buf, input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False,
    )
    session = ort.InferenceSession(buf.getvalue())
    for b in (1, 4):
        x = torch.randn(b, 8, 16, 16)
        (y,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(y), m(x).detach(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernel_sizes=(3, 4)), "odd"),
        (dict(kernel_sizes=()), "odd"),
        (dict(kernel_sizes=(3, 3)), "distinct"),
        (dict(groups=3), "groups"),
        (dict(temperature=0), "temperature"),
        (dict(form="fast"), "form"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SACM(8, 8, **kwargs)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        SACM(8, 8)(torch.randn(1, 3, 8, 8))
