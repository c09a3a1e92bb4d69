"""Directories written as one unit: a save lands completely or not at all (issue 12).

`atomic_dir(target)` yields a fresh temporary sibling directory; on success its files and the
directory are fsynced and it takes target's place in one step (Linux renameat2 RENAME_EXCHANGE,
else rename-aside + rename; a kill between those two leaves the previous copy as
`.<name>.old-*`, which `resolve_dir` finds). Stale temporaries of killed saves are removed on the
next save of the same target. Every save also gets a random id (`new_save_id`) that the writer
records in each file, so a loader can refuse a set mixed from two saves.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

_TMP, _OLD = ".tmp-", ".old-"
_RENAME_EXCHANGE = 2


def new_save_id() -> str:
    return uuid.uuid4().hex


def fsync_path(p: str | Path) -> None:
    fd = os.open(str(p), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (True), or False where the OS / filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    rc = fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    return rc == 0


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (/proc/self/status,
    kernel >= 4.7); elsewhere set and restored at once (os.umask has no read-only form)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_modes(tmp: Path) -> None:
    """Give every file the save wrote the mode a plain open() would (0666 & ~umask).

    safetensors' save_file creates its file 0600 (private), so checkpoints and saved models were
    unreadable by the user's group even where the umask allows it, unlike every other file they write.
    """
    mode = 0o666 & ~current_umask()
    for root, _dirs, files in os.walk(tmp):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                os.chmod(p, mode)


def _siblings(target: Path, kind: str) -> list[Path]:
    prefix = f".{target.name}{kind}"
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))


def cleanup(target: Path) -> None:
    """Remove temporaries of killed saves of `target`; if a kill fell between the two renames of
    the fallback path (no target, an .old copy), put the previous copy back first."""
    olds = _siblings(target, _OLD)
    if not target.exists() and olds:
        os.rename(olds[-1], target)
        olds = olds[:-1]
    for p in _siblings(target, _TMP) + olds:
        shutil.rmtree(p, ignore_errors=True)


def resolve_dir(target: str | Path) -> Path:
    """The directory to read for `target`: itself, or the previous complete copy left by a save
    killed between its two renames."""
    t = Path(target)
    if t.is_dir():
        return t
    olds = _siblings(t, _OLD)
    return olds[-1] if olds else t


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, keep_foreign: bool = False) -> Iterator[Path]:
    """Yields a temporary directory to fill; on normal exit it replaces `target` as a whole.

    keep_foreign: files of an existing target that the save did not write are hard-linked (else
    copied) into the new directory, so saving into a directory with other files keeps them.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory: refusing to replace it with a checkpoint")
    target.parent.mkdir(parents=True, exist_ok=True)
    cleanup(target)
    tmp = target.parent / f".{target.name}{_TMP}{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        _normal_modes(tmp)  # before foreign files are linked in: their modes stay theirs
        if keep_foreign and target.is_dir():
            for src in target.iterdir():
                dst = tmp / src.name
                if dst.exists():
                    continue
                if src.is_dir():
                    shutil.copytree(src, dst)
                else:
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copy2(src, dst)
        for root, _dirs, files in os.walk(tmp):
            for f in files:
                fsync_path(Path(root) / f)
            fsync_path(root)
        if target.exists():
            if _exchange(tmp, target):
                fsync_path(target.parent)
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous copy
                return
            old = target.parent / f".{target.name}{_OLD}{uuid.uuid4().hex[:12]}"
            os.rename(target, old)
            os.rename(tmp, target)
            fsync_path(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
            fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
