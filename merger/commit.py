"""Atomic output: write into a temporary folder beside OUT, rename it into place only when proven."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import MergerError, OutputError, OutputExistsError


def check_output_target(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse before any work: a non-empty OUT without overwrite, or OUT that is one of the inputs."""
    resolved = out.resolve()
    for source in inputs:
        src = source.resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise MergerError(f"--out {out}: overlaps the input folder {source}; choose a new folder so the inputs stay intact")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out}: exists and is a file; choose a folder path")
    here = Path.cwd().resolve()
    if overwrite and (resolved == here or resolved in here.parents):
        raise OutputExistsError(f"--out {out}: is the current folder or one of its parents, and --overwrite would replace it "
                                "with everything in it; choose a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"--out {out}: exists and is not empty; pass --overwrite to replace it (only after a successful merge) or choose another folder")


def check_free_space(out: Path, needed: int) -> None:
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission, a read-only disk
        raise OutputError(f"--out {out}: cannot create its parent folder {parent} ({exc.strerror or type(exc).__name__}); choose another location") from None
    usage = shutil.disk_usage(parent)
    if usage.total == 0:  # /proc, /sys: no disk behind the folder
        raise OutputError(f"--out {out}: {parent} is not on a disk (a pseudo file system); choose a folder on a disk")
    free = usage.free
    if needed > free:
        raise MergerError(f"--out {out}: the merged checkpoint needs about {needed / 1e9:.1f} GB but {parent} has {free / 1e9:.1f} GB free; free space or choose another disk")


@contextmanager
def staging_folder(out: Path):
    """Yield a fresh folder beside ``out``; it is removed unless ``promote`` moved it into place."""
    out = out.resolve()
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or type(exc).__name__}); "
                                "choose a folder you can write to") from None
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def promote(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with renames, so readers see the old or the new folder, never half."""
    out = out.resolve()
    for path in tmp.rglob("*"):  # whatever wrote them (our shards are synced already, transformers' are not)
        if path.is_file():
            _fsync_file(path)
    _fsync_dir(tmp)
    swap_in(tmp, out)
    _fsync_dir(out.parent)


def swap_in(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target`` by renames; an existing ``target`` is moved aside, then removed."""
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
