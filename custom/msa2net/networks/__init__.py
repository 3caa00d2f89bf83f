"""MSA2-Net network blocks and model."""

from .cswin import CSWinEncoder, cswin_checkpoint_filter
from .msa2net import MSA2NET_PRESETS, MSA2Net, create_msa2net, load_cswin_pretrained
from .sacm import SACM

__all__ = ["SACM", "CSWinEncoder", "cswin_checkpoint_filter", "MSA2Net", "MSA2NET_PRESETS", "create_msa2net", "load_cswin_pretrained"]
