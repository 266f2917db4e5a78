"""OUT belongs to one run: an exclusive lock file beside it, held from the first check to the commit.

``flock`` on ``.OUT.lock``: the kernel releases it when its process dies, however it dies (kill -9
included), so a lock that cannot be taken always has a live holder, and a run that holds it knows
that any staging folder of OUT's it finds belongs to a dead run. The file records who holds it, so
a refused run can say whom it waited for.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputLockedError


def lock_path(out: Path) -> Path:
    """Beside the real OUT: two runs reaching one folder through different links share one lock."""
    out = Path(os.path.realpath(out))
    return out.parent / f".{out.name}.lock"


def _holder_text(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        if not holder.get("pid"):  # locked, but its identity not written yet (or truncated by the next holder)
            return "a run that has not yet said who it is"
        return (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}: "
                f"{str(holder.get('command', ''))[:120]}")
    except (OSError, ValueError, AttributeError):
        return "a run that has not yet said who it is"


@contextmanager
def output_lock(out: Path):
    """Hold OUT's lock for the duration of the block; OutputLockedError when another run holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the filelock package's portable lock, without the holder's name
        yield from _portable_lock(out)
        return
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            raise OutputLockedError(f"--out {out}: another merge is writing it ({holder}); wait for it to finish "
                                    f"or choose another folder (the lock is {path})") from None
        # the previous holder may have removed the file between our open and our lock: only the
        # file that is still at the path counts
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                  "command": " ".join(sys.argv)[:500]}).encode(), 0)
        yield path
    finally:
        try:
            os.unlink(path)  # while still holding it, so nobody locks a file that is about to vanish
        except FileNotFoundError:
            pass
        os.close(fd)


def _portable_lock(out: Path):
    from filelock import FileLock, Timeout

    path = lock_path(out)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise OutputLockedError(f"--out {out}: another merge is writing it; wait for it to finish or choose another folder "
                                f"(the lock is {path})") from None
    try:
        yield path
    finally:
        lock.release()
