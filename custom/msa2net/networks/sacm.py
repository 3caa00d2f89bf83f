"""Self-Adaptive Convolution Module (SACM).

Reference: Chao Deng, Xiaosen Li, Xiao Qin, "MSA2-Net: Utilizing Self-Adaptive Convolution
Module to Extract Multi-Scale Information in Medical Image Segmentation", arXiv:2509.01498, 2025.
The paper's text names a per-input statistical fingerprint, a two-layer MLP gate and a
differentiable soft attention over candidate kernels. Kernel sizes, gate width, temperature
and the norm/activation that follow are design choices of this project (see
``bundle/docs/design.md``), not the paper's word.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

__all__ = ["SACM", "SACM_FORMS", "SACM_KERNEL_SIZES"]

#: Candidate kernel sizes of every SACM unless a caller says otherwise (design choice).
SACM_KERNEL_SIZES = (3, 5, 7)

#: ``"kernel"``: one convolution with the per-sample aggregated kernel ``sum_k a_k W_k``.
#: ``"sum"``: the reference form ``sum_k a_k conv(x, W_k)``. Both compute the same function.
SACM_FORMS = ("kernel", "sum")


class SACM(nn.Module):
    """Convolution whose kernel is a soft, input-conditioned mixture of K candidate kernels.

    For an input ``x`` of shape ``(B, C_in, H, W)``:

    1. fingerprint ``s = [mean_hw(x), std_hw(x)]``, shape ``(B, 2 C_in)``;
    2. gate ``a = softmax(MLP(s) / T)``, shape ``(B, K)``;
    3. ``y = sum_k a_k conv(x, W_k) + sum_k a_k b_k``, followed by optional norm and activation.

    Candidate kernels of different sizes share the centre, so step 3 equals a single
    convolution with the aggregated kernel ``sum_k a_k pad(W_k)`` (``form="kernel"``).
    That form folds the batch into convolution groups, which a trace or an ONNX graph
    would freeze at the traced batch size; while tracing, scripting or exporting, the module
    therefore runs the sum form, which is batch-size agnostic and gives the same numbers.
    With a single kernel size the gate is skipped and the module is a plain convolution,
    which is how the paper's "without SACM" ablation is expressed.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out``.
        kernel_sizes: odd candidate kernel sizes (design choice: 3, 5, 7).
        stride: convolution stride, shared by all candidates.
        groups: convolution groups (``in_channels`` for a depthwise SACM).
        gate_reduction: hidden width of the gate MLP is ``max(2 C_in // gate_reduction, 8)``.
        temperature: softmax temperature ``T`` of the gate.
        bias: add a (gated) bias; off when a norm follows.
        norm: MONAI norm name or ``(name, args)`` applied after the convolution, or ``None``.
        act: MONAI activation name or ``(name, args)``, or ``None``.
        form: ``"kernel"`` (default, faster in eager mode) or ``"sum"``.

    Shapes:
        input ``(B, C_in, H, W)``; output ``(B, C_out, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_sizes: Sequence[int] = SACM_KERNEL_SIZES,
        stride: int = 1,
        groups: int = 1,
        gate_reduction: int = 4,
        temperature: float = 1.0,
        bias: bool = False,
        norm: str | tuple | None = "batch",
        act: str | tuple | None = "relu",
        form: str = "kernel",
    ) -> None:
        super().__init__()
        kernel_sizes = tuple(int(k) for k in kernel_sizes)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channels must be positive, got in={in_channels}, out={out_channels}.")
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be a non-empty list of odd sizes, got {kernel_sizes}.")
        if len(set(kernel_sizes)) != len(kernel_sizes):
            raise ValueError(f"kernel_sizes must be distinct, got {kernel_sizes}.")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if form not in SACM_FORMS:
            raise ValueError(f"form must be one of {SACM_FORMS}, got {form!r}.")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_sizes = kernel_sizes
        self.stride, self.groups = stride, groups
        self.temperature = temperature
        self.form = form
        self.max_kernel = max(kernel_sizes)

        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(out_channels, in_channels // groups, k, k)) for k in kernel_sizes
        )
        self.bias = nn.Parameter(torch.zeros(len(kernel_sizes), out_channels)) if bias else None
        self.gate: nn.Module | None = None
        if len(kernel_sizes) > 1:
            hidden = max(2 * in_channels // gate_reduction, 8)
            self.gate = nn.Sequential(
                nn.Linear(2 * in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, len(kernel_sizes))
            )
        self.norm = get_norm_layer(norm, spatial_dims=2, channels=out_channels) if norm else nn.Identity()
        self.act = get_act_layer(act) if act else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in self.weights:
            nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
        if self.gate is not None:
            # A zero last layer starts every SACM as the plain average of its candidates.
            nn.init.zeros_(self.gate[-1].weight)
            nn.init.zeros_(self.gate[-1].bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Gate weights ``(B, K)`` for input ``x``; all ones for a single kernel."""
        if self.gate is None:
            return x.new_ones(x.shape[0], 1)
        var, mean = torch.var_mean(x.flatten(2), dim=2, unbiased=False)
        fingerprint = torch.cat([mean, torch.sqrt(var + 1e-5)], dim=1)
        return torch.softmax(self.gate(fingerprint) / self.temperature, dim=1)

    def _padded_stack(self) -> torch.Tensor:
        """Candidate kernels zero-padded to the largest size: ``(K, C_out, C_in/g, k_max, k_max)``."""
        pads = [(self.max_kernel - w.shape[-1]) // 2 for w in self.weights]
        return torch.stack([F.pad(w, (p, p, p, p)) for w, p in zip(self.weights, pads)])

    def forward_sum(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Reference form: gated sum of the K candidate convolutions."""
        out = None
        for k, (size, w) in enumerate(zip(self.kernel_sizes, self.weights)):
            y = F.conv2d(x, w, None, self.stride, size // 2, 1, self.groups) * attn[:, k, None, None, None]
            out = y if out is None else out + y
        return out

    def forward_kernel(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Fast form: one grouped convolution with each sample's aggregated kernel."""
        b, c, h, w = x.shape
        if len(self.kernel_sizes) == 1:
            return F.conv2d(x, self.weights[0], None, self.stride, self.max_kernel // 2, 1, self.groups) * attn[
                :, :, None, None
            ]
        stack = self._padded_stack()
        kernel = (attn @ stack.flatten(1)).reshape(
            b * self.out_channels, c // self.groups, self.max_kernel, self.max_kernel
        )
        y = F.conv2d(x.reshape(1, b * c, h, w), kernel, None, self.stride, self.max_kernel // 2, 1, b * self.groups)
        return y.reshape(b, self.out_channels, y.shape[-2], y.shape[-1])

    def conv(self, x: torch.Tensor, attn: torch.Tensor, form: str | None = None) -> torch.Tensor:
        """The gated convolution (no norm/activation) for given gate weights ``attn`` ``(B, K)``."""
        form = form or self.form
        exporting = torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
        y = self.forward_sum(x, attn) if form == "sum" or exporting else self.forward_kernel(x, attn)
        if self.bias is not None:
            y = y + (attn @ self.bias)[:, :, None, None]
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (x.ndim != 4 or x.shape[1] != self.in_channels):
            raise ValueError(f"SACM expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}.")
        return self.act(self.norm(self.conv(x, self.attention(x))))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_sizes={self.kernel_sizes}, stride={self.stride}, "
            f"groups={self.groups}, T={self.temperature}, form={self.form!r}"
        )

