"""MSA2-Net: CSWin encoder + SACM ResNet auxiliary encoder, MSConvBridge, MSADecoder; its named presets.

Reference: Chao Deng, Xiaosen Li, Xiao Qin, "MSA2-Net: Utilizing Self-Adaptive Convolution Module
to Extract Multi-Scale Information in Medical Image Segmentation", arXiv:2509.01498, 2025
(journal version with Zhengyou Qin and Yuanxu Gong: Science Progress 109(2), 2026,
doi:10.1177/00368504261432413). No official code exists; choices the paper's text leaves open
are this project's and documented in ``bundle/docs/design.md``.

Layout as in timm: the blocks (``sacm``, ``cswin``, ``aux_encoder``, ``bridge``, ``decoder``), then
the model (:class:`MSA2Net`, whose defaults are the paper's configuration and the only place they
are written), then named constructors registered once (``msa2net_tiny`` ... ``msa2net_paper``;
:func:`create_msa2net` picks one by name).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .aux_encoder import AuxResNetEncoder
from .bridge import MSConvBridge
from .cswin import CSWinEncoder, cswin_checkpoint_filter
from .decoder import MSADecoder, PlainDecoder
from .registry import get_preset, register_preset
from .sacm import SACM_KERNEL_SIZES

__all__ = [
    "MSA2Net",
    "create_msa2net",
    "load_cswin_pretrained",
    "msa2net_tiny",
    "msa2net_small",
    "msa2net_base",
    "msa2net_paper",
]

logger = logging.getLogger(__name__)

#: Input sides must be multiples of the deepest stride.
STRIDE = 32


class MSA2Net(nn.Module):
    """2D segmentation network of the MSA2-Net paper.

    Data flow for ``(B, in_channels, H, W)``: CSWin stage ``i`` runs on the previous fused map;
    the auxiliary SACM ResNet's stage ``i`` is projected (1x1 conv) and added to it
    (design choice); stages 1-3 pass through the MSConvBridge to the MSADecoder, which
    climbs from stage 4 to stride 4; a bilinear x4 upsample and a 1x1 head give
    ``(B, num_classes, H, W)`` logits.

    The defaults are the paper's configuration (CSWin-T encoder: embedding 64, depths
    1-2-21-1, heads 2-4-8-16, stripe widths 1-2-7-7) with this project's choices for what
    the paper leaves open; the smaller presets change only the sizes they name.

    Args:
        in_channels: 1 for CT/MRI, 3 for RGB.
        num_classes: output channels (background included).
        embed_dim: channels of the first CSWin stage (doubled at every stage).
        depths: CSWin blocks per stage.
        num_heads: attention heads per CSWin stage.
        stripe_widths: stripe width per CSWin stage (the last stage attends globally).
        mlp_ratio: MLP expansion of the CSWin blocks.
        drop_path_rate: stochastic depth, rising linearly over the CSWin blocks.
        aux_depths: SACM bottlenecks per auxiliary stage.
        bridge_depth: bridge blocks per skip.
        decoder_scales: channel groups of the nested SACM groups.
        decoder_depth: nested groups per decoder scale.
        kernel_sizes: SACM candidate kernel sizes.
        use_sacm: ``False`` gives every SACM the single kernel ``kernel_sizes[0]`` (paper: "w/o SACM").
        use_aux_encoder: ``False`` drops the auxiliary encoder (paper ablation).
        use_bridge: ``False`` passes skips unchanged (paper: "w/o MSConvBridge").
        use_msa_decoder: ``False`` uses a plain U-Net decoder (paper: "w/o MSADecoder").
        sacm_form: ``"kernel"`` (aggregated kernel, default) or ``"sum"``; same function.
        norm: MONAI norm name for the convolutional parts.
        deep_supervision: add a 1x1 head on the decoder's refined map at strides 8 and 16
            (not in the paper, which has none); in training mode the forward then returns
            their logits after the main output. The heads are training-only: checkpoints load
            with the switch on or off (a pre-hook drops their tensors or keeps the heads' own).

    Shapes: input ``(B, in_channels, H, W)`` with ``H``, ``W`` positive multiples of 32;
    output ``(B, num_classes, H, W)``. With ``deep_supervision`` in training mode, a tuple
    ``(main, aux_8, aux_16)`` of logits ``(B, num_classes, H, W)``, ``(B, num_classes, H/8, W/8)``
    and ``(B, num_classes, H/16, W/16)``, highest resolution first, as
    :class:`monai.losses.DeepSupervisionLoss` takes them (it resizes the label to each output).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 9,
        embed_dim: int = 64,
        depths: Sequence[int] = (1, 2, 21, 1),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        stripe_widths: Sequence[int] = (1, 2, 7, 7),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        aux_depths: Sequence[int] = (1, 1, 1, 1),
        bridge_depth: int = 2,
        decoder_scales: int = 4,
        decoder_depth: int = 1,
        kernel_sizes: Sequence[int] = SACM_KERNEL_SIZES,
        use_sacm: bool = True,
        use_aux_encoder: bool = True,
        use_bridge: bool = True,
        use_msa_decoder: bool = True,
        sacm_form: str = "kernel",
        norm: str | tuple = "batch",
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}.")
        self.in_channels, self.num_classes = in_channels, num_classes
        kernel_sizes = tuple(kernel_sizes) if use_sacm else (tuple(kernel_sizes)[0],)
        self.encoder = CSWinEncoder(in_channels, embed_dim, depths, num_heads, stripe_widths, mlp_ratio, drop_path_rate)
        channels = self.encoder.channels
        self.aux_encoder = self.aux_fuse = None
        if use_aux_encoder:
            self.aux_encoder = AuxResNetEncoder(in_channels, channels, aux_depths, kernel_sizes, norm, sacm_form)
            self.aux_fuse = nn.ModuleList(nn.Conv2d(c, c, 1) for c in channels)
        self.skip_norms = nn.ModuleList(nn.GroupNorm(1, c) for c in channels)
        self.bridge = MSConvBridge(channels[:-1], bridge_depth, kernel_sizes, norm, sacm_form) if use_bridge else None
        self.decoder = (
            MSADecoder(channels, decoder_scales, decoder_depth, kernel_sizes, norm, sacm_form)
            if use_msa_decoder
            else PlainDecoder(channels, norm)
        )
        self.head = nn.Conv2d(channels[0], num_classes, 1)
        self.deep_supervision = deep_supervision
        # Created only when asked for, so the default model's state dict has no such keys.
        self.ds_heads = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in channels[1:-1]) if deep_supervision else None
        self.register_load_state_dict_pre_hook(_match_ds_heads)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the problem for inputs the network cannot take."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"MSA2Net expects (B, {self.in_channels}, H, W) input, got shape {tuple(x.shape)}.")
        h, w = x.shape[-2:]
        if h < STRIDE or w < STRIDE or h % STRIDE or w % STRIDE:
            raise ValueError(
                f"MSA2Net input sides must be positive multiples of {STRIDE} (e.g. 224, 256), got {h}x{w}; "
                "resize or pad the image first."
            )

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Fused multi-scale features ``(B, C_i, H / 2**(i+2), W / 2**(i+2))`` for ``i = 0..3``."""
        aux = self.aux_encoder(x) if self.aux_encoder is not None else None
        feats, y = [], x
        for i in range(4):
            y = self.encoder.run_stage(i, self.encoder.enter_stage(i, y))
            if aux is not None:
                y = y + self.aux_fuse[i](aux[i])
            feats.append(y)
        return [norm(f) for norm, f in zip(self.skip_norms, feats)]

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if not torch.jit.is_tracing():
            self.check_input(x)
        feats = self.encode(x)
        if self.bridge is not None:
            feats = self.bridge(feats[:-1]) + [feats[-1]]
        supervise = self.ds_heads is not None and self.training
        maps = self.decoder(feats, all_scales=True) if supervise else [self.decoder(feats)]
        # The 1x1 head commutes with bilinear resizing (its weights sum to one per pixel), so it runs
        # first and only num_classes channels, not channels[0], are resized to full resolution.
        y = F.interpolate(self.head(maps[0]), size=x.shape[-2:], mode="bilinear", align_corners=False)
        if not supervise:
            return y
        # A tuple, not a list: CUDA graph capture (make_graphed_callables) takes tuples of tensors.
        return (y, *(head(m) for head, m in zip(self.ds_heads, maps[1:])))


def _match_ds_heads(module: MSA2Net, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: a checkpoint's deep-supervision heads are dropped when the model has
    none, and the model's own heads are kept when the checkpoint has none (they only shape training)."""
    key = prefix + "ds_heads."
    if module.ds_heads is None:
        for k in [k for k in state_dict if k.startswith(key)]:
            del state_dict[k]
    else:
        for k, v in module.ds_heads.state_dict(prefix=key).items():
            state_dict.setdefault(k, v)


def _build(sizes: dict, pretrained_path: str | Path | None, kwargs: dict) -> MSA2Net:
    net = MSA2Net(**{**sizes, **kwargs})
    if pretrained_path:
        load_cswin_pretrained(net, pretrained_path)
    return net


# As in timm, a constructor takes the optional pretrained weights and any MSA2Net keyword argument; each
# states only how its sizes differ from MSA2Net's defaults (the paper's configuration).


@register_preset
def msa2net_tiny(pretrained_path: str | Path | None = None, **kwargs) -> MSA2Net:
    """About 0.67 M parameters, for tests and CPU demos: one block per stage, embedding 16, one bridge block."""
    sizes = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8), bridge_depth=1, drop_path_rate=0.0)
    return _build(sizes, pretrained_path, kwargs)


@register_preset
def msa2net_small(pretrained_path: str | Path | None = None, **kwargs) -> MSA2Net:
    """About 3.7 M parameters: embedding 32, CSWin depths 1-2-6-1."""
    sizes = dict(embed_dim=32, depths=(1, 2, 6, 1))
    return _build(sizes, pretrained_path, kwargs)


@register_preset
def msa2net_base(pretrained_path: str | Path | None = None, **kwargs) -> MSA2Net:
    """About 11 M parameters (embedding 48, CSWin depths 1-2-12-1): the largest that ships in half precision under 25 MB."""
    sizes = dict(embed_dim=48, depths=(1, 2, 12, 1))
    return _build(sizes, pretrained_path, kwargs)


@register_preset
def msa2net_paper(pretrained_path: str | Path | None = None, **kwargs) -> MSA2Net:
    """The paper's configuration, CSWin-T encoder (about 26.6 M parameters): MSA2Net's defaults."""
    return _build({}, pretrained_path, kwargs)


def create_msa2net(
    preset: str = "paper", in_channels: int = 1, num_classes: int = 9, pretrained_path: str | None = None, **overrides
) -> MSA2Net:
    """Build a registered preset by name, with keyword overrides of any :class:`MSA2Net` argument.

    Args:
        preset: a name from :func:`~msa2net.networks.list_presets` (``tiny``, ``small``, ``base``, ``paper``).
        in_channels: image channels.
        num_classes: output channels (background included).
        pretrained_path: optional local copy of the public ImageNet CSWin checkpoint (``paper``
            preset for CSWin-T); nothing is ever downloaded and random initialisation is the default.
        overrides: :class:`MSA2Net` arguments replacing the preset's (ablation switches,
            ``sacm_form``, ``deep_supervision``, sizes).

    Raises:
        ValueError: for an unknown preset, naming the registered ones.
    """
    return get_preset(preset)(in_channels=in_channels, num_classes=num_classes, pretrained_path=pretrained_path, **overrides)


def load_cswin_pretrained(net: MSA2Net, path: str | Path) -> list[str]:
    """Load ImageNet CSWin weights from a local file into ``net.encoder``; return the encoder keys left untouched.

    Shapes must match exactly (``paper`` preset for CSWin-T); the file is read with
    ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CSWin checkpoint not found (weights are never downloaded).")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    mapped = cswin_checkpoint_filter(raw, in_channels=net.in_channels)
    own = net.encoder.state_dict()
    bad = [k for k, v in mapped.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: {len(bad)} CSWin keys do not fit this encoder (first: {bad[0]}); is the preset right?")
    net.encoder.load_state_dict(mapped, strict=False)
    missing = sorted(set(own) - set(mapped))
    logger.info("loaded %d CSWin tensors from %s; %d encoder tensors keep their init", len(mapped), path, len(missing))
    return missing
