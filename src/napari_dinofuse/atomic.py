"""Writing files and folders so that a crash leaves the old version or the new one, never a mix.

A folder (a model, a prediction store) is written in full into a hidden sibling (:func:`staging`), then
:func:`swap_in` renames the current one aside (``.NAME.old-*``), the new one in, and deletes the old. A process
that dies between the two renames leaves the previous folder aside; :func:`recover` (run before every read and
write of the folder) puts it back. Torch-free.
"""

from __future__ import annotations

import glob
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "fsync_dir", "recover", "siblings", "staging", "swap_in"]


def atomic_write_text(path: Path, text: str, fsync: bool = True) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename."""
    atomic_write_bytes(path, [text.encode("utf-8")], fsync)


def atomic_write_bytes(path: Path, parts, fsync: bool = True) -> None:
    """Write the bytes-like ``parts`` one after another to ``path`` through a temporary sibling and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        for part in parts:
            f.write(part)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make renames and creations in ``path`` durable (a no-op on Windows, where folders cannot be opened)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def siblings(folder: Path, kind: str) -> list[Path]:
    """Hidden siblings ``.NAME.kind-*`` of ``folder``, oldest first."""
    return sorted(folder.parent.glob(f".{glob.escape(folder.name)}.{kind}-*"), key=lambda p: p.stat().st_mtime)


def staging(folder: Path, kind: str = "tmp") -> Path:
    """A new hidden sibling path to write the next version of ``folder`` into (not created)."""
    return folder.with_name(f".{folder.name}.{kind}-{uuid.uuid4().hex[:12]}")


def recover(folder: Path, complete: Callable[[Path], bool] = lambda p: True) -> Path:
    """Finish what a crashed :func:`swap_in` left: put the previous version back when ``folder`` is missing (the
    newest aside copy that is ``complete``), or delete aside copies when the swap itself finished. Returns
    the folder to read from: the aside copy itself if it cannot be moved back (e.g. a read-only share)."""
    aside = siblings(folder, "old")
    if folder.exists():
        for old in aside:
            shutil.rmtree(old, ignore_errors=True)
        return folder
    aside = [p for p in aside if complete(p)]
    if not aside:
        return folder
    try:
        os.replace(aside[-1], folder)
    except OSError:
        return aside[-1]
    return folder


def swap_in(new: Path, folder: Path) -> None:
    """Replace ``folder`` (if any) with the finished folder ``new`` by renames; on failure ``folder`` is as before."""
    old = staging(folder, "old") if folder.exists() else None
    if old is not None:
        os.replace(folder, old)
    try:
        os.replace(new, folder)
    except BaseException:
        if old is not None:
            os.replace(old, folder)  # roll back to the previous version
        raise
    fsync_dir(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
