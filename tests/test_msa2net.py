"""MSA2-Net model: presets, ablation switches, input sizes, export at free batch size."""

import io

import pytest
import torch

from msa2net.networks import MSA2NET_PRESETS, MSA2Net, create_msa2net
from msa2net.networks.decoder import MSADecoder, PlainDecoder


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_tiny_is_small_and_paper_is_cswin_t():
    assert n_params(create_msa2net("tiny", num_classes=4)) < 2e6
    paper = create_msa2net("paper", num_classes=4)
    enc = paper.encoder
    assert enc.channels == (64, 128, 256, 512)
    assert [len(s) for s in enc.stages] == [1, 2, 21, 1]
    assert [b.attns[0].stripe_width for b in (s[0] for s in enc.stages)] == [1, 2, 7, None]
    assert [sum(a.num_heads for a in s[0].attns) for s in enc.stages] == [2, 4, 8, 16]
    # CSWin-T has about 23 M parameters with its 1000-class head; the encoder alone about 21.8 M
    assert 21e6 < n_params(enc) < 23e6


@pytest.mark.parametrize("in_channels,size", [(1, (224, 224)), (3, (64, 96)), (1, (256, 160))])
def test_output_is_logits_at_input_resolution(in_channels, size):
    net = create_msa2net("tiny", in_channels=in_channels, num_classes=5).eval()
    with torch.no_grad():
        y = net(torch.randn(2, in_channels, *size))
    assert y.shape == (2, 5, *size)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("size", [(100, 100), (224, 200), (16, 64)])
def test_unsupported_sizes_fail_with_a_clear_message(size):
    net = create_msa2net("tiny", num_classes=2)
    with pytest.raises(ValueError, match=rf"multiples of 32 .* got {size[0]}x{size[1]}"):
        net(torch.randn(1, 1, *size))


def test_wrong_channel_count_fails_clearly():
    with pytest.raises(ValueError, match=r"expects \(B, 1, H, W\) input, got shape \(1, 3, 64, 64\)"):
        create_msa2net("tiny")(torch.randn(1, 3, 64, 64))


def test_ablation_switches_change_the_network():
    full = create_msa2net("tiny", num_classes=4)
    assert full.bridge is not None and full.aux_encoder is not None and isinstance(full.decoder, MSADecoder)
    no_dec = create_msa2net("tiny", num_classes=4, use_msa_decoder=False)
    assert isinstance(no_dec.decoder, PlainDecoder)
    assert create_msa2net("tiny", num_classes=4, use_bridge=False).bridge is None
    neither = create_msa2net("tiny", num_classes=4, use_bridge=False, use_msa_decoder=False)
    assert neither.bridge is None and isinstance(neither.decoder, PlainDecoder)
    assert create_msa2net("tiny", num_classes=4, use_aux_encoder=False).aux_encoder is None
    no_sacm = create_msa2net("tiny", num_classes=4, use_sacm=False)
    sacms = [m for m in no_sacm.modules() if type(m).__name__ == "SACM"]
    assert sacms and all(m.kernel_sizes == (3,) and m.gate is None for m in sacms)
    counts = {n_params(m) for m in (full, no_dec, neither, no_sacm)}
    assert len(counts) == 4
    for net in (no_dec, neither, no_sacm):
        assert net(torch.randn(2, 1, 64, 64)).shape == (2, 4, 64, 64)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown MSA2-Net preset 'huge'"):
        create_msa2net("huge")
    assert set(MSA2NET_PRESETS) >= {"tiny", "paper"}


def test_sacm_forms_give_the_same_network_output():
    torch.manual_seed(0)
    a = create_msa2net("tiny", num_classes=3, sacm_form="kernel").eval()
    b = create_msa2net("tiny", num_classes=3, sacm_form="sum").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 1, 64, 64)
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-4)


def test_traced_model_runs_at_other_batch_sizes():
    net = create_msa2net("tiny", num_classes=3).eval()
    traced = torch.jit.trace(net, torch.randn(2, 1, 64, 64))
    for b in (1, 3):
        x = torch.randn(b, 1, 64, 64)
        torch.testing.assert_close(traced(x), net(x), rtol=1e-4, atol=1e-4)


def test_onnx_export_dynamic_batch_matches_eager():
    ort = pytest.importorskip("onnxruntime")
    net = create_msa2net("tiny", num_classes=3).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        net, torch.randn(2, 1, 64, 64), buf, input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
    )
    session = ort.InferenceSession(buf.getvalue())
    for b in (1, 5):
        x = torch.randn(b, 1, 64, 64)
        (y,) = session.run(None, {"image": x.numpy()})
        assert abs(y - net(x).detach().numpy()).max() < 1e-3


def test_constructor_validation():
    with pytest.raises(ValueError, match="in_channels and num_classes must be positive"):
        MSA2Net(in_channels=0)
    with pytest.raises(ValueError, match="one entry per stage"):
        create_msa2net("tiny", depths=(1, 1, 1))
