"""Write to a temporary name, then rename: a file or folder is either complete or absent, never half-written.

:func:`atomic_path` is the one mechanism; the other functions are its common uses. The temporary
name lies in the target's folder (so the rename stays on one file system and is atomic) and ends with
the target's own name, so writers that choose a format from the extension (``.nii.gz``, ``.png``,
``.nrrd``) still choose the right one. Concurrent writers of the same target each get their own
temporary name; the last rename wins.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["PARTIAL_PREFIX", "atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "remove_partials"]

#: Start of every temporary name; what a killed writer leaves behind starts with it too.
PARTIAL_PREFIX = ".partial-"


@contextmanager
def atomic_path(path: str | os.PathLike, replace_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without error, rename it to ``path``.

    The block writes a file, or creates a folder, at the yielded path. On an error the temporary
    file or folder is removed and the error propagates; ``path`` is left as it was.

    Args:
        path: the target; its parent folders are created.
        replace_dir: allow replacing an existing folder at ``path`` (removed just before the rename,
            since a rename cannot replace a non-empty folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{PARTIAL_PREFIX}{secrets.token_hex(4)}-{path.name}")
    try:
        yield tmp
        if replace_dir and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` atomically: a crash never leaves a half-written checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def remove_partials(folder: str | os.PathLike) -> list[str]:
    """Remove temporary files and folders that writers killed mid-write (``kill -9``) left in ``folder``.

    Only for a folder no other process is writing into (a training run's own ``models/`` at start-up).
    Returns the names removed.
    """
    folder = Path(folder)
    removed = []
    for leftover in sorted(folder.glob(f"{PARTIAL_PREFIX}*")) if folder.is_dir() else []:
        shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
        removed.append(leftover.name)
    return removed

