"""MSA2-Net network blocks, model and named presets.

Reference: Chao Deng, Xiaosen Li, Xiao Qin, "MSA2-Net: Utilizing Self-Adaptive Convolution Module
to Extract Multi-Scale Information in Medical Image Segmentation", arXiv:2509.01498, 2025.
"""

from .cswin import CSWinEncoder, cswin_checkpoint_filter
from .msa2net import (
    MSA2Net,
    create_msa2net,
    load_cswin_pretrained,
    msa2net_base,
    msa2net_paper,
    msa2net_small,
    msa2net_tiny,
)
from .registry import MSA2NET_PRESETS, get_preset, list_presets, register_preset
from .sacm import SACM

__all__ = [
    "SACM",
    "CSWinEncoder",
    "cswin_checkpoint_filter",
    "MSA2Net",
    "create_msa2net",
    "load_cswin_pretrained",
    "list_presets",
    "MSA2NET_PRESETS",
    "get_preset",
    "register_preset",
    "msa2net_tiny",
    "msa2net_small",
    "msa2net_base",
    "msa2net_paper",
]
