"""Reading untrusted input folders: every file inside its folder, every JSON file bounded.

A model or adapter folder is data from somewhere else. Nothing in it may make merger open a
file outside it (an index entry ``../../etc/passwd``, a ``tokenizer.json`` symlink to a key
file that would then be copied into OUT and pushed), and no JSON file in it may make the parser
recurse or allocate without bound. Every reader of an input file goes through this module.
"""

from __future__ import annotations

import json
import os
import reprlib
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import MergerError, UnsafeInputError

MAX_JSON_BYTES = 64 << 20  # configs, indexes, adapter configs: a 671B model's index is ~10 MB
MAX_TOKENIZER_JSON_BYTES = 512 << 20  # tokenizer.json of 256k-token vocabularies is ~35 MB

_echo = reprlib.Repr()
_echo.maxstring, _echo.maxother, _echo.maxlevel, _echo.maxlist, _echo.maxdict = 60, 60, 2, 4, 4


def short(value: Any, limit: int = 80) -> str:
    """A bounded repr for messages: a hostile value must not make an error message huge."""
    # strings through repr too: a newline in a crafted file name must not break the one-line message
    try:
        text = repr(value[: limit + 1]) if isinstance(value, str) else _echo.repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        text = f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def article(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def hf_cache_blobs(folder: Path) -> Path | None:
    """huggingface_hub's cache: files in ``models--owner--name/snapshots/<rev>/`` are links into
    the repo's own ``blobs/``, a real folder beside ``snapshots`` (never a link elsewhere)."""
    snapshots = Path(os.path.realpath(folder)).parent
    repo = snapshots.parent
    blobs = repo / "blobs"
    if (snapshots.name == "snapshots" and repo.name.startswith(("models--", "datasets--"))
            and blobs.is_dir() and not blobs.is_symlink() and Path(os.path.realpath(blobs)) == blobs):
        return blobs
    return None


def confined(folder: Path, name: str, role: str, error=UnsafeInputError) -> Path:
    """``folder/name``, refused unless it stays inside ``folder`` once every link is resolved.

    ``name`` comes from an input (an index's weight_map, a tokenizer's file list): an absolute
    path, a ``..`` step or a symlink out of the folder is refused. A Hub cache snapshot may link
    into its own ``blobs/`` folder, which is how huggingface_hub stores every file.
    """
    pure = PurePosixPath(str(name))
    if not str(name) or pure.is_absolute() or ".." in pure.parts or "\\" in str(name) or "\x00" in str(name):
        raise error(f"{role} {folder}: names the file {short(str(name))}, which is not a plain path inside the folder; "
                    "the folder is corrupt or crafted: re-download it")
    path = folder / pure
    try:
        real = Path(os.path.realpath(path))
    except (UnicodeError, ValueError, OSError):  # a lone surrogate or NUL from a crafted name
        raise error(f"{role} {folder}: names the file {short(str(name))}, which is not a usable path; "
                    "the folder is corrupt or crafted: re-download it") from None
    roots = [Path(os.path.realpath(folder))]
    blobs = hf_cache_blobs(folder)
    if blobs is not None:
        roots.append(Path(os.path.realpath(blobs)))
    if not any(real == root or root in real.parents for root in roots):
        raise error(f"{role} {folder}: {short(str(name))} is a link to {short(str(real), 300)}, outside the folder; "
                    "merger reads only files inside its input folders: copy the file into the folder instead of linking it")
    return path


def require_confined(folder: Path, role: str, error=UnsafeInputError) -> None:
    """Every entry directly in ``folder`` stays inside it: for folders a library (transformers, PEFT)
    reads on its own, choosing files merger does not see (a single-file checkpoint beside an index,
    a generation config, a tokenizer's config.json)."""
    for path in sorted(folder.iterdir()):
        confined(folder, path.name, role, error)


def input_files(folder: Path, role: str, error=UnsafeInputError, pattern: str = "*") -> list[Path]:
    """The regular files directly in ``folder`` matching ``pattern``, each confined to it."""
    found = []
    for path in sorted(folder.glob(pattern)):
        if path.is_symlink() or path.is_file():
            checked = confined(folder, path.name, role, error)
            if checked.is_file():
                found.append(checked)
    return found


def read_json(path: Path, what: str, error=MergerError, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """One JSON input file, parsed with its size and nesting bounded; ``error`` names the fault."""
    import stat

    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: is not a regular file, so not a {what} file; replace it")
        size = info.st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes, more than any {what} file needs (at most {max_bytes}); "
                        f"the file is corrupt or not a {what} file")
        text = path.read_bytes().decode("utf-8")
    except PermissionError:
        raise error(f"{path}: cannot be read (permission denied); fix its permissions") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}), so not {article(what)} JSON file; "
                    "re-download or re-save it") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: malformed {what} JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); fix or re-download it") from None
    except RecursionError:  # the parser's recursion is the depth bound (about 1000 levels)
        raise error(f"{path}: nests deeper than any {what} file does; the file is corrupt or crafted: re-download it") from None
    except ValueError as exc:
        raise error(f"{path}: unreadable {what} JSON ({short(str(exc))}); fix or re-download it") from None



def copy_input_file(folder: Path, name: str, dest: Path, role: str) -> bool:
    """Copy ``folder/name`` (confined to ``folder``) to ``dest/name``; False when it is not there."""
    import shutil

    source = folder / name
    if not (source.is_file() or source.is_symlink()):
        return False
    source = confined(folder, name, role)
    if not source.is_file():
        return False
    dest.joinpath(name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest / name)
    return True


def copy_input_tree(folder: Path, name: str, dest: Path, role: str) -> bool:
    """Copy the folder ``folder/name`` file by file, each file confined to ``folder``."""
    root = folder / name
    if not root.is_dir():
        return False
    confined(folder, name, role)
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() or path.is_symlink():
            copy_input_file(folder, relative, dest, role)
    return True
