"""MSA2-Net: multi-scale adaptive attention network, packaged as a MONAI bundle."""

__version__ = "0.1.0"
