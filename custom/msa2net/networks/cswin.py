"""CSWin Transformer encoder, written for MSA2-Net.

Reference: Dong et al., "CSWin Transformer: A General Vision Transformer Backbone with
Cross-Shaped Windows", CVPR 2022. Half of each block's heads attend within vertical
stripes and half within horizontal stripes; a depthwise convolution on the values
(locally-enhanced positional encoding, LePE) carries position; stages are joined by
stride-2 convolutional patch merging; the last stage attends over the whole map.

Differences from the classification model: no class head; every stage returns a
``(B, C, H, W)`` map; feature maps whose size a stripe width does not divide are
zero-padded and the padded keys masked, so any input whose sides are multiples of 32 works.

MSA2-Net (Deng, Li, Qin, arXiv:2509.01498) uses this encoder as its primary branch; the
paper says it was modified to keep detail while downsampling without saying how, so the
encoder here is CSWin's own, and the detail comes from the auxiliary SACM ResNet
(``bundle/docs/design.md``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import adapt_input_conv
from torch import nn

__all__ = ["CSWinEncoder", "CSWinBlock", "LePEAttention", "PatchMerging", "cswin_checkpoint_filter"]


def _static(size) -> int:
    """A traced tensor size as a Python constant (tracing only; the trace is then specific to that size)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(size)


class LePEAttention(nn.Module):
    """Multi-head self-attention inside stripes, plus LePE on the values.

    Args:
        dim: channels of this branch.
        num_heads: heads of this branch.
        stripe_width: stripe width ``sw``; ``None`` attends over the whole map.
        vertical: stripes of full height and width ``sw`` (else full width and height ``sw``).

    Shapes:
        ``q, k, v``: ``(B, H, W, dim)``; output ``(B, H, W, dim)``.
    """

    def __init__(self, dim: int, num_heads: int, stripe_width: int | None, vertical: bool) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must be positive and divide the branch width {dim}.")
        self.num_heads, self.stripe_width, self.vertical = num_heads, stripe_width, vertical
        self.lepe = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def _window(self, h: int, w: int) -> tuple[int, int]:
        if self.stripe_width is None:
            return h, w
        return (h, self.stripe_width) if self.vertical else (self.stripe_width, w)

    @staticmethod
    def _to_windows(t: torch.Tensor, h: int, w: int, c: int, wh: int, ww: int) -> torch.Tensor:
        """``(B, h, w, c)`` -> ``(B * nW, wh, ww, c)``, windows in row-major order."""
        return t.reshape(-1, h // wh, wh, w // ww, ww, c).transpose(2, 3).reshape(-1, wh, ww, c)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, w, c = q.shape
        if torch.jit.is_tracing():
            # Exported graphs (TorchScript, ONNX) keep the traced spatial size as constants and only the
            # batch free (-1 below): a few thousand shape-arithmetic nodes fewer for ONNX Runtime.
            h, w, c = _static(h), _static(w), _static(c)
        wh, ww = self._window(h, w)
        ph, pw = (-h) % wh, (-w) % ww
        if ph or pw:
            q, k, v = (F.pad(t, (0, 0, 0, pw, 0, ph)) for t in (q, k, v))
        hp, wp = h + ph, w + pw
        qw, kw, vw = (self._to_windows(t, hp, wp, c, wh, ww) for t in (q, k, v))
        # The permutes are views: LePE runs as a channels-last convolution, with no copies.
        lepe = self.lepe(vw.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        n, hd = wh * ww, c // self.num_heads
        # (N, heads, n, hd) with the head dimension contiguous, as the fused attention kernels want.
        qw, kw, vw = (t.reshape(-1, n, self.num_heads, hd).transpose(1, 2) for t in (qw, kw, vw))
        mask = None
        if ph or pw:
            valid = torch.zeros(1, hp, wp, 1, dtype=torch.bool, device=q.device)
            valid[:, :h, :w] = True
            mask = self._to_windows(valid, hp, wp, 1, wh, ww).reshape(-1, 1, 1, n).repeat(b, 1, 1, 1)
        out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask)
        out = out.transpose(1, 2).reshape(-1, wh, ww, c) + lepe
        out = out.reshape(-1, hp // wh, wp // ww, wh, ww, c).transpose(2, 3).reshape(-1, hp, wp, c)
        return out[:, :h, :w]


class CSWinBlock(nn.Module):
    """Pre-norm transformer block with cross-shaped window attention.

    Args:
        dim: token channels.
        num_heads: heads, split evenly between the vertical and horizontal branch.
        stripe_width: stripe width; ``None`` for the last stage (one branch, global attention).
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        qkv_bias: bias in the query/key/value projection.
        drop_path: stochastic depth rate.

    Shapes:
        input and output ``(B, H, W, dim)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        stripe_width: int | None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        branches = 1 if stripe_width is None else 2
        if dim % branches or num_heads % branches:
            raise ValueError(f"dim={dim} and num_heads={num_heads} must be even for two stripe branches.")
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attns = nn.ModuleList(
            LePEAttention(dim // branches, num_heads // branches, stripe_width, vertical=(i == 0))
            for i in range(branches)
        )
        self.proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        parts = [t.chunk(len(self.attns), dim=-1) for t in (q, k, v)]
        attn = torch.cat([a(qi, ki, vi) for a, qi, ki, vi in zip(self.attns, *parts)], dim=-1)
        x = x + self.drop_path(self.proj(attn))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Stride-2 3x3 convolution doubling the channels, then LayerNorm.

    Shapes: input ``(B, C, H, W)``; output ``(B, H/2, W/2, 2C)`` (channels last).
    """

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class CSWinStem(nn.Module):
    """Overlapping 7x7 stride-4 convolutional embedding, then LayerNorm (channels last)."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, dim, 7, 4, 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class CSWinEncoder(nn.Module):
    """Four-stage CSWin Transformer feature extractor (strides 4, 8, 16, 32).

    The sizes have no defaults here: MSA2-Net's defaults (CSWin-T) live in :class:`~msa2net.networks.MSA2Net`.

    Args:
        in_channels: image channels.
        embed_dim: channels of stage 1; stage ``i`` has ``embed_dim * 2**i``.
        depths: blocks per stage.
        num_heads: heads per stage.
        stripe_widths: stripe width per stage; the last stage always attends globally.
        mlp_ratio: MLP expansion.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.

    Shapes:
        :meth:`forward` takes ``(B, in_channels, H, W)`` with ``H, W`` multiples of 32 and
        returns four maps ``(B, embed_dim * 2**i, H / 2**(i+2), W / 2**(i+2))``.
        :meth:`run_stage` and :meth:`enter_stage` let a caller (MSA2-Net) fuse other
        features into each stage's output before the next stage.
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        stripe_widths: Sequence[int],
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not len(depths) == len(num_heads) == len(stripe_widths) == 4:
            raise ValueError("depths, num_heads and stripe_widths need one entry per stage (4).")
        if min(depths) < 1 or min(stripe_widths) < 1:
            raise ValueError(f"depths and stripe_widths must be positive, got {depths}, {stripe_widths}.")
        self.channels = tuple(embed_dim * 2**i for i in range(4))
        self.stem = CSWinStem(in_channels, embed_dim)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            width = None if i == 3 else stripe_widths[i]
            self.stages.append(
                nn.Sequential(
                    *(
                        CSWinBlock(self.channels[i], num_heads[i], width, mlp_ratio, drop_path=rates[start + j])
                        for j in range(depth)
                    )
                )
            )
        self.merges = nn.ModuleList(PatchMerging(self.channels[i], self.channels[i + 1]) for i in range(3))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def enter_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Embedding (``i == 0``, from the image) or patch merging (from stage ``i-1``'s ``(B, C, H, W)`` map)."""
        return self.stem(x) if i == 0 else self.merges[i - 1](x)

    def run_stage(self, i: int, tokens: torch.Tensor) -> torch.Tensor:
        """Blocks of stage ``i`` on channels-last tokens ``(B, H, W, C)``; returns ``(B, C, H, W)``."""
        return self.stages[i](tokens).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i in range(4):
            x = self.run_stage(i, self.enter_stage(i, x))
            feats.append(x)
        return feats


_STAGE_KEY = re.compile(r"^stage(\d)\.(\d+)\.(.*)$")
_MERGE_KEY = re.compile(r"^merge(\d)\.(conv|norm)\.(weight|bias)$")


def cswin_checkpoint_filter(state_dict: Mapping[str, torch.Tensor], in_channels: int = 3) -> dict[str, torch.Tensor]:
    """Map the public ImageNet CSWin checkpoint's keys onto :class:`CSWinEncoder`.

    Accepts the raw file content (a dict holding ``state_dict_ema``, ``state_dict`` or ``model``)
    or the bare state dict. Keys of the official model (``stage1_conv_embed.0``,
    ``stage1_conv_embed.2``, ``stageN.J.attns.A.get_v``, ``mergeN.conv``, ...) are renamed;
    the classification ``norm`` and ``head`` are dropped; the first convolution is adapted
    to ``in_channels`` (timm's ``adapt_input_conv``: summed for one channel).
    """
    for key in ("state_dict_ema", "state_dict", "model"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
            break
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith(("head.", "norm.")):
            continue
        if key.startswith("stage1_conv_embed.0."):
            new = "stem.conv." + key.rsplit(".", 1)[1]
            if new == "stem.conv.weight":
                value = adapt_input_conv(in_channels, value)
        elif key.startswith("stage1_conv_embed.2."):
            new = "stem.norm." + key.rsplit(".", 1)[1]
        elif m := _STAGE_KEY.match(key):
            new = f"stages.{int(m[1]) - 1}.{m[2]}.{m[3].replace('.get_v.', '.lepe.')}"
        elif m := _MERGE_KEY.match(key):
            new = f"merges.{int(m[1]) - 1}.{m[2]}.{m[3]}"
        else:
            continue
        out[new] = value
    return out
