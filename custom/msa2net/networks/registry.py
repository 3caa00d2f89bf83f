"""Registry of the named MSA2-Net constructors (presets).

Follows timm's layout (blocks, then the model, then named constructors registered once), with a
registry local to this package: timm's own ``register_model`` feeds timm's model zoo and its
pretrained-weight tags, which these presets do not have. Everything that lists presets (the
:func:`~msa2net.networks.create_msa2net` error message, the benchmarks, the README check in the
tests) reads this registry, so a new preset is added in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

from torch import nn

__all__ = ["register_preset", "list_presets", "get_preset", "MSA2NET_PRESETS"]

#: Constructor functions are named ``<prefix><preset>``; the preset name is the rest.
PREFIX = "msa2net_"

_PRESETS: dict[str, Callable[..., nn.Module]] = {}

#: Read-only view of the registry, preset name -> constructor (iterating gives the names).
MSA2NET_PRESETS = MappingProxyType(_PRESETS)


def register_preset(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` (named ``msa2net_<preset>``) under ``<preset>``; returns ``fn`` unchanged.

    Raises:
        ValueError: if the function name lacks the prefix or the preset is already registered.
    """
    if not fn.__name__.startswith(PREFIX):
        raise ValueError(f"preset constructor {fn.__name__!r} must be named '{PREFIX}<preset>'.")
    name = fn.__name__[len(PREFIX) :]
    if name in _PRESETS:
        raise ValueError(f"MSA2-Net preset {name!r} is already registered.")
    _PRESETS[name] = fn
    return fn


def list_presets() -> list[str]:
    """Names of the registered presets, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str) -> Callable[..., nn.Module]:
    """The constructor registered as ``name``.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown MSA2-Net preset {name!r}; choose one of {list_presets()}.")
    return _PRESETS[name]
