"""MSA2-Net model: presets and their registry, ablation switches, deep supervision, input sizes, export at free batch size."""

import io
import re
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.losses import DeepSupervisionLoss, DiceCELoss

from msa2net.networks import MSA2NET_PRESETS, MSA2Net, create_msa2net, get_preset, list_presets, msa2net_paper, register_preset
from msa2net.networks.decoder import MSADecoder, PlainDecoder

ROOT = Path(__file__).resolve().parents[1]


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
    with pytest.raises(ValueError, match=r"unknown MSA2-Net preset 'huge'; choose one of \['base', 'paper', 'small', 'tiny'\]"):
        create_msa2net("huge")


def test_registry_holds_each_named_constructor_once():
    assert list_presets() == ["base", "paper", "small", "tiny"]
    assert get_preset("paper") is msa2net_paper
    assert sorted(MSA2NET_PRESETS) == list_presets() and MSA2NET_PRESETS["paper"] is msa2net_paper
    with pytest.raises(TypeError):
        MSA2NET_PRESETS["huge"] = msa2net_paper  # a view: presets are added by registering a constructor
    with pytest.raises(ValueError, match="'paper' is already registered"):
        register_preset(msa2net_paper)
    with pytest.raises(ValueError, match="must be named 'msa2net_<preset>'"):
        register_preset(lambda: None)


def _layout(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_paper_preset_is_the_model_defaults():
    """The paper's configuration is written once, as MSA2Net's defaults."""
    assert _layout(create_msa2net("paper", 1, 4)) == _layout(MSA2Net(in_channels=1, num_classes=4))


def test_presets_build_through_create_msa2net_and_by_name_alike():
    for name in ("tiny", "small"):
        torch.manual_seed(0)
        a = create_msa2net(name, in_channels=3, num_classes=2, use_bridge=False)
        torch.manual_seed(0)
        b = get_preset(name)(in_channels=3, num_classes=2, use_bridge=False)
        assert a.bridge is None and a.encoder.stem.conv.in_channels == 3
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_shipped_weights_load_strictly_into_the_bundle_preset():
    """Constructors changed, weights layout did not: the shipped checkpoint loads with strict key matching."""
    weights = ROOT / "bundle" / "models" / "model.pt"
    if not weights.is_file():
        pytest.skip("no shipped weights in bundle/models")
    state = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "inference.json"))
    preset = parser.get_parsed_content("model_preset")
    in_channels, num_classes = state["encoder.stem.conv.weight"].shape[1], state["head.weight"].shape[0]
    net = create_msa2net(preset, in_channels=in_channels, num_classes=num_classes)
    net.load_state_dict(state, strict=True)
    torch.testing.assert_close(net.head.weight, state["head.weight"].float())


def test_readme_preset_table_lists_the_registry():
    """The README's preset table is checked against the registry: names and parameter counts."""
    section = (ROOT / "README.md").read_text().split("## The network", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)`[^|]*\| ([\d.]+) M \|", section, flags=re.M))
    assert sorted(rows) == list_presets()
    for name, millions in rows.items():
        params = n_params(create_msa2net(name, in_channels=1, num_classes=4)) / 1e6
        assert abs(params - float(millions)) < 0.051 * max(1.0, params / 10), (name, params, millions)


@pytest.mark.parametrize("use_msa_decoder", [True, False])
def test_deep_supervision_outputs_in_training_only(use_msa_decoder):
    torch.manual_seed(0)
    net = create_msa2net("tiny", num_classes=4, deep_supervision=True, use_msa_decoder=use_msa_decoder)
    x = torch.randn(2, 1, 64, 96)
    outs = net.train()(x)
    assert isinstance(outs, tuple)
    assert [tuple(o.shape) for o in outs] == [(2, 4, 64, 96), (2, 4, 8, 12), (2, 4, 4, 6)]
    with torch.no_grad():
        y = net.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 4, 64, 96)
    torch.testing.assert_close(y, net.eval()(x))


def test_deep_supervision_trains_with_monai_deep_supervision_loss():
    torch.manual_seed(0)
    net = create_msa2net("tiny", num_classes=3, deep_supervision=True).train()
    x = torch.randn(2, 1, 64, 64)
    label = torch.randint(0, 3, (2, 1, 64, 64)).float()
    loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))(net(x), label)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in net.ds_heads)
    assert net.head.weight.grad.abs().sum() > 0


def test_deep_supervision_is_off_by_default_and_weights_cross_the_switch():
    torch.manual_seed(0)
    plain = create_msa2net("tiny", num_classes=3)
    assert plain.ds_heads is None and not any("ds_heads" in k for k in plain.state_dict())
    supervised = create_msa2net("tiny", num_classes=3, deep_supervision=True)
    heads = {k: v.clone() for k, v in supervised.state_dict().items() if k.startswith("ds_heads.")}
    assert len(heads) == 4
    # a checkpoint without heads keeps the model's own heads; one with heads loads into a model without
    supervised.load_state_dict(plain.state_dict(), strict=True)
    assert all(torch.equal(supervised.state_dict()[k], v) for k, v in heads.items())
    plain.load_state_dict(supervised.state_dict(), strict=True)
    x = torch.randn(1, 1, 64, 64)
    torch.testing.assert_close(plain.eval()(x), supervised.eval()(x))


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deep_supervision_trains_from_a_cuda_graph():
    """gpu_train.json runs the network from CUDA graphs: the tuple of deep-supervision outputs must survive capture."""
    from msa2net.cuda_graphs import GraphedForward

    torch.manual_seed(0)
    net = create_msa2net("tiny", num_classes=3, deep_supervision=True).cuda()
    graphed = GraphedForward(net, warmup=2)
    loss_fn = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    x = torch.randn(4, 1, 64, 64, device="cuda")
    label = torch.randint(0, 3, (4, 1, 64, 64), device="cuda").float()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    graphed.train()
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        outs = graphed(x)
        assert isinstance(outs, tuple) and [o.shape[-1] for o in outs] == [64, 8, 4]
        loss = loss_fn(outs, label)
        loss.backward()
        assert all(h.weight.grad.abs().sum() > 0 for h in net.ds_heads)
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    graphed.eval()
    with torch.no_grad():
        y = graphed(x)
        torch.testing.assert_close(y, net(x), rtol=1e-4, atol=1e-4)
    assert isinstance(y, torch.Tensor) and y.shape == (4, 3, 64, 64)
