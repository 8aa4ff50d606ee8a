"""Atomic writing of output files and folders.

A result either appears complete under its final name or not at all: writers fill a hidden temp file
(or folder) next to the target, which is renamed onto the target only once it is complete. Any
exception, KeyboardInterrupt included, removes the temp and re-raises.

Rules shared by every output path:

* An existing file is never replaced unless ``overwrite=True``; an existing non-empty folder counts as
  existing, an empty one does not.
* Missing parent folders are created (like ``mkdir -p``) at write time, not by ``check_writable``, so a
  failed run leaves no empty folders behind. ``check_writable`` checks instead that the nearest existing
  ancestor is a folder we may write into.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path


class OutputExistsError(FileExistsError):
    """The output path exists and ``overwrite`` was not given."""


class OutputPathError(ValueError):
    """The output path cannot be written (a parent is a file, no permission, file/folder mix-up)."""


def temp_path_for(path: Path) -> Path:
    """Hidden sibling of ``path`` that keeps its suffix, so ffmpeg picks the container from it."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def check_writable(
    path: str | os.PathLike, overwrite: bool, *, folder: bool = False, replaceable: re.Pattern | None = None
) -> Path:
    """Check, without touching the disk, that ``path`` can be written; return it as a ``Path``.

    Meant to run before any model is loaded so that a bad output path fails in a second, not after the
    whole generation. ``folder`` says whether the output is a folder. ``replaceable`` (folders only)
    limits what ``overwrite`` may delete: every entry of the existing folder must be a plain file whose
    name fully matches it, so pointing ``--overwrite`` at a folder of other files never deletes them.
    """
    path = Path(path)
    kind = "folder" if folder else "file"
    if path.name in ("", ".", ".."):
        raise OutputPathError(f"output {kind} '{path}' has no name; give a path such as 'out/video.mp4'")
    if path.exists() or path.is_symlink():
        _check_existing(path, overwrite, folder, replaceable)
    ancestor = path.parent
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise OutputPathError(f"'{ancestor}' is a broken link; fix it or choose another output {kind}")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"'{ancestor}' is a file, not a folder, so '{path}' cannot be created there")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"no permission to write into '{ancestor}'; choose another output {kind}")
    return path


def _check_existing(path: Path, overwrite: bool, folder: bool, replaceable: re.Pattern | None) -> None:
    if not folder:
        if path.is_dir():
            raise OutputPathError(f"output file '{path}' is an existing folder; give a file name instead")
        if not overwrite:
            raise OutputExistsError(f"output file '{path}' already exists; pass --overwrite to replace it")
        return
    if not path.is_dir():
        raise OutputPathError(f"output folder '{path}' is an existing file; give a folder name instead")
    entries = list(path.iterdir())
    if not entries:
        return
    if not overwrite:
        raise OutputExistsError(
            f"output folder '{path}' exists and is not empty; pass --overwrite to replace it"
        )
    if replaceable is not None:
        foreign = [e.name for e in entries if not (e.is_file() and replaceable.fullmatch(e.name))]
        if foreign:
            raise OutputPathError(
                f"refusing to replace folder '{path}': it holds '{foreign[0]}', which this program did not "
                "write; choose a new or empty folder"
            )


def atomic_write_file(
    path: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False
) -> Path:
    """Call ``write(temp_path)`` to fill a hidden temp file next to ``path``, then rename it onto ``path``.

    The temp file keeps ``path``'s suffix. It is removed on any exception, KeyboardInterrupt included.
    Returns ``path`` as a ``Path``.
    """
    path = check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(path)
    try:
        write(temp)
        if not temp.is_file():
            raise OutputPathError(f"writing '{path}' produced no file; nothing was saved")
        _fsync_file(temp)
        if not overwrite and path.exists():  # created by someone else while we were writing
            raise OutputExistsError(f"output file '{path}' already exists; pass --overwrite to replace it")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_folder(
    path: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    overwrite: bool = False,
    replaceable: re.Pattern | None = None,
) -> Path:
    """Call ``write(temp_folder)`` to fill a new hidden folder next to ``path``, then rename it to ``path``.

    An existing target (only allowed as described in ``check_writable``) is moved aside first and deleted
    once the new folder is in place, or moved back if that rename fails. The temp folder is removed on any
    exception, KeyboardInterrupt included. Returns ``path`` as a ``Path``.
    """
    path = check_writable(path, overwrite, folder=True, replaceable=replaceable)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(temp, ignore_errors=True)  # a stale one of ours: the name holds this process's id
        temp.mkdir()
        write(temp)
        for child in temp.iterdir():
            _fsync_file(child)
        # Re-check: the target may have been created while we were writing.
        check_writable(path, overwrite, folder=True, replaceable=replaceable)
        if path.exists():
            os.replace(path, old)
            try:
                os.replace(temp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return path


def _fsync_file(path: Path) -> None:
    """Flush a finished file to disk so that a crash after the rename cannot leave it truncated."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:  # opened for writing: Windows refuses to fsync a read-only handle
        os.fsync(f.fileno())
