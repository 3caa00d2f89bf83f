"""Exceptions shared by the bundle's input checks and the MONAI Deploy application (no imports, so no cycles)."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """An input the pipeline cannot segment correctly; the message names the file and the problem."""
