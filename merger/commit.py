"""Atomic output: write into a staging folder beside OUT, swap it into place only when proven.

Names beside OUT that merger owns: ``.OUT.lock`` (see lock.py), ``.OUT.tmp-<8 hex>`` (a run's
staging folder) and ``.OUT.old-<8 hex>`` (a replaced OUT on its way out). Only a run holding the
lock touches them; one that finds leftovers knows their run is dead and deals with them first.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import MergerError, OutputError, OutputExistsError

log = logging.getLogger(__name__)


def check_no_overlap(out: Path, inputs: dict[str, Path]) -> None:
    """OUT must not be, contain or lie inside any input (by role: '--base', '--tokenizer', ...)."""
    resolved = Path(os.path.realpath(out))
    for role, source in inputs.items():
        src = Path(os.path.realpath(source))
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise MergerError(f"--out {out}: overlaps the {role} input {source}; choose a new folder so the inputs stay intact")


def check_output_target(out: Path, overwrite: bool) -> None:
    """Refuse before any work: OUT a file, a non-empty OUT without overwrite, or OUT the folder we are in."""
    resolved = out.resolve()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out}: exists and is a file; choose a folder path")
    here = Path.cwd().resolve()
    if overwrite and (resolved == here or resolved in here.parents):
        raise OutputExistsError(f"--out {out}: is the current folder or one of its parents, and --overwrite would replace it "
                                "with everything in it; choose a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"--out {out}: exists and is not empty; pass --overwrite to replace it (only after a successful merge) or choose another folder")


def make_parent(out: Path) -> Path:
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission, a read-only disk
        raise OutputError(f"--out {out}: cannot create its parent folder {parent} ({exc.strerror or type(exc).__name__}); choose another location") from None
    return parent


def check_free_space(out: Path, needed: int) -> None:
    from .render import human_bytes

    parent = make_parent(out)
    usage = shutil.disk_usage(parent)
    if usage.total == 0:  # /proc, /sys: no disk behind the folder
        raise OutputError(f"--out {out}: {parent} is not on a disk (a pseudo file system); choose a folder on a disk")
    if needed > usage.free:
        raise OutputError(f"--out {out}: the merged checkpoint needs about {human_bytes(needed)} but {parent} has "
                          f"{human_bytes(usage.free)} free; free space or choose another disk")


def _leftover_pattern(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-[0-9a-f]{{8}}$")


def leftovers(out: Path) -> list[Path]:
    """Staging and replaced folders of OUT's earlier runs (meaningful only while holding OUT's lock)."""
    out = out.resolve()
    pattern = _leftover_pattern(out)
    try:
        return sorted(p for p in out.parent.iterdir() if pattern.match(p.name) and p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def recover_leftovers(out: Path) -> list[str]:
    """Deal with what killed runs left beside OUT; call only while holding OUT's lock.

    A replaced OUT whose successor never arrived (a kill between the two renames of a commit, where
    the file system cannot swap folders in one step) is put back; everything else of dead runs is
    removed. Returns one line per action, also logged.
    """
    from .render import human_bytes

    out = out.resolve()
    actions = []
    found = leftovers(out)
    old = [p for p in found if ".old-" in p.name]
    if old and not out.exists():
        newest = max(old, key=lambda p: p.stat().st_mtime)
        os.replace(newest, out)
        found.remove(newest)
        actions.append(f"{out}: restored the previous checkpoint from {newest.name}, left there by a run killed while replacing it")
    for path in found:
        size = _folder_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        actions.append(f"removed {path.name} ({human_bytes(size)}), left beside {out.name} by a run that was killed")
    for line in actions:
        log.warning(line)
    return actions


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


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


def promote(tmp: Path, out: Path, overwrite: bool) -> None:
    """Replace ``out`` by ``tmp`` so readers see the old or the new folder, never half of one."""
    out = out.resolve()
    for path in tmp.rglob("*"):  # whatever wrote them (our shards are synced already, transformers' are not)
        if path.is_file():
            _fsync_file(path)
    _fsync_dir(tmp)
    # the lock keeps other merges out, not other programs: OUT must still be as it was checked
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise OutputExistsError(f"--out {out}: files appeared in it while merging (another program wrote there); "
                                "nothing was replaced: pass --overwrite or choose another folder")
    swap_in(tmp, out)
    _fsync_dir(out.parent)


def swap_in(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target``; an existing ``target`` is swapped out in one step where the
    file system can (Linux renameat2 RENAME_EXCHANGE), else moved aside first, then removed."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    if exchange(new, target):
        os.replace(new, old)  # now the old folder; named so a kill before the removal leaves it recognisable
    else:
        os.replace(target, old)
        os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


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
