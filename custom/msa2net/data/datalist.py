"""Reading a bundle datalist (MSD ``dataset.json``) safely."""

from __future__ import annotations

import os
from pathlib import Path

from monai.data import load_decathlon_datalist

__all__ = ["DatalistError", "load_datalist"]


class DatalistError(ValueError):
    """A datalist entry that cannot be used; the message names the file and the problem."""


def load_datalist(
    datalist_file: str | os.PathLike,
    key: str = "training",
    base_dir: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> list[dict]:
    """Load ``key`` of an MSD-style datalist with paths resolved against ``base_dir``.

    Paths that resolve outside ``base_dir`` (``../``, absolute paths, links pointing out)
    are refused unless ``allow_outside_root``: a datalist must not make the bundle read or
    write arbitrary files. Paths that do not exist are refused too, here rather than later
    inside a DataLoader worker.

    Args:
        datalist_file: the JSON file.
        key: list to read (``training``, ``validation``, ``test``).
        base_dir: dataset root; defaults to the datalist's folder.
        allow_outside_root: accept entries outside ``base_dir``.

    Returns:
        entries with absolute ``image``/``label`` paths.

    Raises:
        DatalistError: ``"<datalist>: <problem>"`` for a missing or unreadable datalist, an empty
            list, a path outside the root or a path that does not exist (the first one, with the
            number of others).
    """
    datalist_file = Path(datalist_file)
    if not datalist_file.is_file():
        raise DatalistError(f"{datalist_file}: datalist not found.")
    root = Path(base_dir if base_dir is not None else datalist_file.parent).resolve()
    try:
        entries = load_decathlon_datalist(str(datalist_file), is_segmentation=True, data_list_key=key, base_dir=str(root))
    except (ValueError, KeyError) as e:
        raise DatalistError(f"{datalist_file}: cannot read list {key!r} ({e}).") from None
    if not entries:
        raise DatalistError(f"{datalist_file}: list {key!r} is empty.")
    missing = []
    for entry in entries:
        for field in ("image", "label"):
            if field not in entry:
                continue
            path = Path(entry[field]).resolve()
            if not allow_outside_root and not path.is_relative_to(root):
                raise DatalistError(f"{datalist_file}: {field} path {entry[field]} lies outside the dataset root {root}.")
            if not path.exists():
                missing.append((field, entry[field]))
    if missing:
        field, path = missing[0]
        more = f" ({len(missing) - 1} more path(s) of list {key!r} missing too)" if len(missing) > 1 else ""
        raise DatalistError(f"{datalist_file}: {field} {path} not found{more}.")
    return entries
