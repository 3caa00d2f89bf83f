"""Data utilities for MSA2-Net: dataset layouts, loaders and synthetic data."""
