"""Turn a --base/--adapter argument into a local folder: a path, or a Hub id through huggingface_hub."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .errors import AdapterError, InputNotFoundError, OptionsError
from .inputs import short
from .keys import ADAPTER_CONFIG, full_precision_name

log = logging.getLogger(__name__)

_FOLDER_OF = {
    "adapter": "folder that holds adapter_config.json",
    "base": "base model's folder (the one with config.json)",
    "out": "merged checkpoint's folder",
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_folder(source: str | os.PathLike, role: str, label: str | None = None) -> Path:
    """A local folder as is; 'owner/name' from the Hub cache (downloaded unless HF_HUB_OFFLINE=1)."""
    if not isinstance(source, (str, os.PathLike)):
        stacked = " (a list of stages is merged by merge_adapter and inspect_adapter)" if isinstance(source, (list, tuple)) else ""
        raise OptionsError(f"{role}: expected a folder path or Hub id, found {type(source).__name__}{stacked}")
    try:
        path = Path(source).expanduser()
        exists = path.exists()
    except (ValueError, OSError):  # a NUL byte, a name too long
        raise InputNotFoundError(f"--{role} {short(str(source))}: not a usable path; pass a folder") from None
    if exists:
        if not path.is_dir():
            raise InputNotFoundError(f"--{role} {path}: is a file, not a folder; pass the {_FOLDER_OF[role]}")
        return named_adapter_folder(path) if role == "adapter" else path
    text = str(source)
    label = label or f"--{role} {text}"
    if not _REPO_ID.match(text):
        raise InputNotFoundError(f"{label}: no such folder; pass a local folder or a Hub id like owner/name")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise InputNotFoundError(f"{label}: no such folder, and huggingface_hub is not installed to fetch it") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(text, local_files_only=offline))
    except LocalEntryNotFoundError:
        raise InputNotFoundError(f"{label}: not a local folder and not in the Hub cache{' (HF_HUB_OFFLINE=1)' if offline else ''}; download it first or pass a folder") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise InputNotFoundError(f"{label}: could not fetch it from the Hub ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None


def named_adapter_folder(folder: Path) -> Path:
    """The adapter inside a PEFT save of a named adapter: save_pretrained writes adapter "sft" to
    DIR/sft/, while the trainer saves the tokenizer to DIR. One such subfolder is taken; several
    are named for the user to choose."""
    if (folder / ADAPTER_CONFIG).is_file():
        return folder
    named = sorted(p for p in folder.iterdir() if p.is_dir() and (p / ADAPTER_CONFIG).is_file())
    if len(named) == 1:
        log.info("--adapter %s: using the adapter saved in its subfolder %s", folder, named[0].name)
        return named[0]
    if named:
        raise AdapterError(f"--adapter {folder}: holds {len(named)} adapters in subfolders ({', '.join(p.name for p in named)}); "
                           f"pass one of them, e.g. --adapter {named[0]}")
    return folder


def trainer_folder(source: str | os.PathLike, adapter_dir: Path) -> Path | None:
    """For a named adapter (PEFT wrote DIR/sft/), DIR: where the trainer saved the tokenizer.

    Given as DIR, that is DIR. Given as DIR/sft, DIR only when it looks like that save: no adapter
    of its own and no other model or adapter folder beside sft. A tokenizer that merely sits in
    the folder above an adapter (a downloads folder, a project root beside the base) is not its.
    """
    given = Path(source).expanduser()
    if given.is_dir() and given.resolve() != adapter_dir.resolve():
        return given
    parent = adapter_dir.parent
    if parent == adapter_dir or (parent / ADAPTER_CONFIG).is_file():
        return None
    try:
        siblings = [p for p in parent.iterdir() if p.is_dir() and p.resolve() != adapter_dir.resolve()]
    except OSError:
        return None
    if any((p / ADAPTER_CONFIG).is_file() or (p / "config.json").is_file() for p in siblings):
        return None
    if any(parent.glob("*.safetensors")) or (parent / "config.json").is_file():
        return None
    return parent


def resolve_base(base: str | os.PathLike | None, adapter_dir: Path) -> Path:
    """--base, or when it is omitted, the base_model_name_or_path the adapter was saved with."""
    if base is not None:
        return resolve_folder(base, "base")
    from .adapter import read_adapter_config

    recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not isinstance(recorded, str) or "\x00" in recorded:
        recorded = None
    if not recorded:
        raise InputNotFoundError(f"--base was not given and {adapter_dir / 'adapter_config.json'} names no base_model_name_or_path; pass --base")
    path = Path(recorded).expanduser()
    if not path.is_absolute() and not path.exists() and (adapter_dir / recorded).exists():
        path = adapter_dir / recorded  # saved relative to the adapter
    label = f"the base the adapter names ({adapter_dir / 'adapter_config.json'}: base_model_name_or_path {recorded})"
    try:
        return resolve_folder(path if path.exists() else recorded, "base", label)
    except InputNotFoundError as exc:
        # QLoRA adapters record the quantized model they were trained on
        full = full_precision_name(str(recorded))
        hint = f"; it names a quantized model: merge into the full-precision model it was made from (e.g. {full})" if full else ""
        raise InputNotFoundError(f"{exc}, or pass --base{hint}") from None


def check_tokenizer_source(choice: str) -> None:
    """--tokenizer FOLDER must name a folder with a tokenizer in it: a typo must not ship a model without one."""
    if choice in ("auto", "adapter", "base"):
        return
    from .tokenizer_facts import has_tokenizer

    try:
        path = Path(choice).expanduser()
        is_dir = path.is_dir()
    except (ValueError, OSError):
        is_dir = False
    if not is_dir:
        raise InputNotFoundError(f"--tokenizer {choice}: no such folder; pass auto, adapter, base or a folder with tokenizer files")
    if not has_tokenizer(path):
        raise InputNotFoundError(f"--tokenizer {choice}: the folder has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); "
                                 "pass the folder the tokenizer was saved to")
