"""CSWin encoder: stage shapes, stripe attention with padding, and the ImageNet checkpoint key mapping."""

import re

import pytest
import torch

from msa2net.networks import MSA2Net, create_msa2net, cswin_checkpoint_filter, load_cswin_pretrained
from msa2net.networks.cswin import CSWinEncoder, LePEAttention


def test_stage_shapes_and_channels():
    enc = CSWinEncoder(in_channels=1, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8), stripe_widths=(1, 2, 7, 7))
    feats = enc(torch.randn(2, 1, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 128, 2, 3)]


@pytest.mark.parametrize("vertical", [True, False])
def test_padded_stripes_equal_attention_on_the_valid_tokens(vertical):
    """A partial last stripe is padded and masked: it must equal attention over its real tokens only."""
    torch.manual_seed(0)
    attn = LePEAttention(dim=8, num_heads=2, stripe_width=4, vertical=vertical).double()
    shape = (1, 6, 10, 8) if vertical else (1, 10, 6, 8)
    q, k, v = (torch.randn(*shape, dtype=torch.float64) for _ in range(3))
    out = attn(q, k, v)
    whole = LePEAttention(dim=8, num_heads=2, stripe_width=None, vertical=vertical).double()
    whole.load_state_dict(attn.state_dict())
    # the last stripe holds 2 real rows/columns (10 = 4 + 4 + 2)
    sl = (slice(None), slice(None), slice(8, 10)) if vertical else (slice(None), slice(8, 10))
    expected = whole(q[sl], k[sl], v[sl])
    torch.testing.assert_close(out[sl], expected)
    # a full stripe is unaffected by the padding
    sl = (slice(None), slice(None), slice(0, 4)) if vertical else (slice(None), slice(0, 4))
    torch.testing.assert_close(out[sl], whole(q[sl], k[sl], v[sl]))


def _official_keys(net: MSA2Net) -> dict[str, torch.Tensor]:
    """A state dict named as the public CSWin-T ImageNet checkpoint names its tensors (written out by hand)."""
    enc, sd = net.encoder, {}
    sd["stage1_conv_embed.0.weight"] = torch.randn(64, 3, 7, 7)
    sd["stage1_conv_embed.0.bias"] = torch.randn(64)
    sd["stage1_conv_embed.2.weight"] = torch.randn(64)
    sd["stage1_conv_embed.2.bias"] = torch.randn(64)
    for i, stage in enumerate(enc.stages, start=1):
        for j, block in enumerate(stage):
            c = block.norm1.normalized_shape[0]
            sd[f"stage{i}.{j}.qkv.weight"] = torch.randn(3 * c, c)
            sd[f"stage{i}.{j}.qkv.bias"] = torch.randn(3 * c)
            for a in range(len(block.attns)):
                cb = c // len(block.attns)
                sd[f"stage{i}.{j}.attns.{a}.get_v.weight"] = torch.randn(cb, 1, 3, 3)
                sd[f"stage{i}.{j}.attns.{a}.get_v.bias"] = torch.randn(cb)
            sd[f"stage{i}.{j}.proj.weight"] = torch.randn(c, c)
            sd[f"stage{i}.{j}.proj.bias"] = torch.randn(c)
            for n in ("norm1", "norm2"):
                sd[f"stage{i}.{j}.{n}.weight"] = torch.randn(c)
                sd[f"stage{i}.{j}.{n}.bias"] = torch.randn(c)
            sd[f"stage{i}.{j}.mlp.fc1.weight"] = torch.randn(4 * c, c)
            sd[f"stage{i}.{j}.mlp.fc1.bias"] = torch.randn(4 * c)
            sd[f"stage{i}.{j}.mlp.fc2.weight"] = torch.randn(c, 4 * c)
            sd[f"stage{i}.{j}.mlp.fc2.bias"] = torch.randn(c)
    for i, c in enumerate((64, 128, 256), start=1):
        sd[f"merge{i}.conv.weight"] = torch.randn(2 * c, c, 3, 3)
        sd[f"merge{i}.conv.bias"] = torch.randn(2 * c)
        sd[f"merge{i}.norm.weight"] = torch.randn(2 * c)
        sd[f"merge{i}.norm.bias"] = torch.randn(2 * c)
    sd["norm.weight"], sd["norm.bias"] = torch.randn(512), torch.randn(512)
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return sd


@pytest.fixture(scope="module")
def paper_net():
    return create_msa2net("paper", in_channels=1, num_classes=4)


def test_checkpoint_filter_maps_every_encoder_tensor(paper_net):
    official = _official_keys(paper_net)
    mapped = cswin_checkpoint_filter({"state_dict_ema": official}, in_channels=1)
    own = paper_net.encoder.state_dict()
    assert set(mapped) == set(own), "every CSWin-T tensor maps onto the encoder and nothing else"
    assert mapped["stem.conv.weight"].shape == (64, 1, 7, 7)
    torch.testing.assert_close(mapped["stem.conv.weight"], official["stage1_conv_embed.0.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(mapped["stages.2.20.attns.1.lepe.weight"], official["stage3.20.attns.1.get_v.weight"])
    torch.testing.assert_close(mapped["merges.2.norm.bias"], official["merge3.norm.bias"])
    assert not any(re.match(r"(head|norm)\.", k) for k in mapped)


def test_load_pretrained_from_local_file(paper_net, tmp_path):
    official = _official_keys(paper_net)
    path = tmp_path / "cswin_tiny_224.pth"
    torch.save({"state_dict_ema": official}, path)
    missing = load_cswin_pretrained(paper_net, path)
    assert missing == []
    torch.testing.assert_close(paper_net.encoder.stages[1][1].mlp.fc2.weight, official["stage2.1.mlp.fc2.weight"])


def test_load_pretrained_refuses_a_mismatched_preset(paper_net, tmp_path):
    path = tmp_path / "cswin.pth"
    torch.save(_official_keys(paper_net), path)
    tiny = create_msa2net("tiny", in_channels=1, num_classes=4)
    with pytest.raises(ValueError, match="cswin.pth: .* do not fit"):
        load_cswin_pretrained(tiny, path)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_cswin_pretrained(tiny, tmp_path / "absent.pth")


def test_preset_constructor_loads_pretrained_weights(paper_net, tmp_path):
    official = _official_keys(paper_net)
    path = tmp_path / "cswin_tiny_224.pth"
    torch.save({"state_dict_ema": official}, path)
    net = create_msa2net("paper", in_channels=1, num_classes=4, pretrained_path=str(path))
    torch.testing.assert_close(net.encoder.stages[2][20].qkv.weight, official["stage3.20.qkv.weight"])
