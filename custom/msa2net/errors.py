"""Exceptions shared by the bundle's input checks and the MONAI Deploy application (no imports, so no cycles)."""

from __future__ import annotations

import sys

__all__ = ["InputError", "input_error_line", "one_line_input_errors", "source_name"]


class InputError(ValueError):
    """An input the pipeline cannot segment correctly; the message names the file and the problem."""


def source_name(x, fallback: str) -> str:
    """The file a MONAI ``MetaTensor`` was read from (its ``filename_or_obj``), for messages; ``fallback`` without one."""
    meta = getattr(x, "meta", None) or {}
    return str(meta.get("filename_or_obj") or fallback)


_RERAISED = f"{InputError.__module__}.{InputError.__qualname__}: "


def input_error_line(exc: BaseException | None) -> str | None:
    """The ``<file>: <problem>`` of the :class:`InputError` in an exception chain, or ``None`` if it holds none.

    MONAI wraps transform errors in ``RuntimeError``s, and a DataLoader worker's error reaches the main
    process as text (its traceback as the message), so the chain's messages are searched as well as its types.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, InputError) and "\n" not in str(exc).strip():
            return str(exc).strip()
        for line in reversed(str(exc).splitlines()):
            if line.startswith(_RERAISED):
                return line[len(_RERAISED) :].strip()
        exc = exc.__cause__ if exc.__cause__ is not None else exc.__context__
    return None


def one_line_input_errors() -> None:
    """Show an uncaught :class:`InputError` as the one line ``error: <file>: <problem>`` (exit status 1).

    Bundle workflows call this in ``initialize``: a bad training file is found while MONAI instantiates the
    datasets from the config, where nothing in the config can catch it, and MONAI's nested tracebacks would
    bury the line. Other exceptions keep the interpreter's hook and their tracebacks.
    """
    default = sys.excepthook

    def hook(kind, exc, tb) -> None:
        line = input_error_line(exc)
        if line is None:
            default(kind, exc, tb)
        else:
            print(f"error: {line}", file=sys.stderr)

    sys.excepthook = hook
