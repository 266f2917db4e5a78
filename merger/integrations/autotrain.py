"""Autotrain's merge functions, with Autotrain's names and signatures, done by merger.

Swap them in where an Autotrain-style pipeline imports ``merge_adapter`` (the post-training
step of ``autotrain.trainers.clm.utils``) or ``merge_llm_adapter`` (``autotrain tools
merge-llm-adapter``). Autotrain's own versions load the base in float16, resize it to
``len(tokenizer)`` (retrying with a multiple of 8 when PEFT then refuses the shapes) and call
``merge_and_unload``; these take the rows from the adapter's tensors, keep the base's dtype,
validate the result and never leave a half-written model where the adapter was.

Beyond Autotrain's parameters both accept MergeOptions fields as keywords (``dtype="float16"``
reproduces Autotrain's output dtype, ``push_to_hub="owner/name"`` uploads the result) and return
the MergeResult where Autotrain returns None.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..errors import MergerError, OptionsError
from ..keys import ADAPTER_CONFIG, ADAPTER_WEIGHTS

log = logging.getLogger(__name__)

_PUSH_OPTIONS = ("push_to_hub", "private", "revision", "create_pr")
# weight files a merged checkpoint consists of; stale ones from an earlier merge are removed
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def merge_adapter(base_model_path, target_model_path, adapter_path, **options):
    """Autotrain's post-training step: merge ``adapter_path`` into ``base_model_path`` and write
    the merged model to ``target_model_path`` (in Autotrain the project folder, which also holds
    the adapter).

    The tokenizer comes from ``target_model_path`` (where the trainer saved it), else from the
    adapter, else from the base. The merge is written and validated in a folder beside the
    target; only then are its files moved into the target (replacing weight files of an earlier
    merge) and, last, the adapter files removed from the target. On any failure a MergerError is
    raised (Autotrain's caller logs it and keeps the adapter) and the adapter files stay where
    they were. Push options (``push_to_hub=...``) upload the target once it holds the merge.
    """
    from ..api import merge_adapter as merge
    from ..hub import push_folder
    from ..options import MergeOptions
    from ..tokenizer_facts import has_tokenizer

    # the push waits for the target to hold the merge; a bad repo id still fails before any work
    push = {k: options.pop(k) for k in _PUSH_OPTIONS if k in options}
    push_options = MergeOptions().merged_with(push, "merge_adapter()") if push else None

    target = Path(target_model_path).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise MergerError(f"target_model_path {target}: is a file; pass the project folder")
    if has_tokenizer(target) and target != Path(adapter_path).expanduser().resolve():
        # (target == adapter folder: "auto" already takes its tokenizer, completing a partial one from the base)
        options.setdefault("tokenizer", str(target))
    staging = target.parent / f".{target.name}.merged-{uuid.uuid4().hex[:8]}"
    result = merge(base_model_path, adapter_path, staging, quiet=True, **options)
    try:
        _move_into(staging, target)
    except OSError as exc:
        raise MergerError(f"target_model_path {target}: moving the merged files in failed ({exc}); the merged "
                          f"checkpoint is in {staging} and the adapter files in {target} are untouched") from exc
    _point_report_at(target)
    for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS):  # last: until here the adapter is the only copy of the training
        if (target / name).is_file():
            (target / name).unlink()
    result.out = target
    log.info("merged %s into %s and removed its adapter files", adapter_path, target)
    if push_options is not None and push_options.push_to_hub:
        result.hub = push_folder(target, push_options)
    return result


def _move_into(staging: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    incoming = {p.name for p in staging.iterdir()}
    for stale in target.iterdir():  # shards of an earlier merge that this one does not overwrite
        if stale.is_file() and _WEIGHT_FILE.match(stale.name) and stale.name not in incoming:
            stale.unlink()
    for item in sorted(staging.iterdir()):
        destination = target / item.name
        if item.name == "README.md" and destination.is_file():  # the project's own model card stays
            item.unlink()
            continue
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(item, destination)
    staging.rmdir()


def merge_llm_adapter(base_model_path, adapter_path, token=None, output_folder=None, pad_to_multiple_of=None,
                      push_to_hub=False, **options):
    """Autotrain's ``autotrain tools merge-llm-adapter``: merge ``adapter_path`` into
    ``base_model_path`` and write it to ``output_folder`` (default: ``<adapter_path>-merged``
    beside a local adapter folder, ``./<name>-merged`` for a Hub id).

    ``pad_to_multiple_of`` is used only where the adapter's tensors do not fix the vocabulary
    rows. ``token`` authorises the Hub downloads of base or adapter, and the push, for this call only.
    ``push_to_hub=True`` uploads the validated ``output_folder`` to the repo ``adapter_path`` names,
    as Autotrain does (the merged model joins the adapter's own Hub repo), so ``adapter_path`` must
    then be a Hub id, not a local folder; ``push_to_hub="owner/name"`` pushes there instead.
    Returns the MergeResult.
    """
    from ..api import merge_adapter as merge

    if push_to_hub:
        options["push_to_hub"] = push_to_hub if isinstance(push_to_hub, str) else _adapter_repo(adapter_path)
    if output_folder is None:
        output_folder = default_output_folder(adapter_path)
    with _hub_token(token):
        return merge(base_model_path, adapter_path, output_folder, pad_to_multiple_of=pad_to_multiple_of, quiet=True, **options)


def _adapter_repo(adapter_path) -> str:
    """The repo Autotrain's push_to_hub=True writes to: the adapter's own Hub id."""
    if Path(str(adapter_path)).expanduser().exists():
        raise OptionsError(f"merge_llm_adapter: push_to_hub=True pushes to the adapter's Hub repo, as Autotrain does, but "
                           f"adapter_path {adapter_path} is a local folder; pass push_to_hub='owner/name' to choose the repo")
    return str(adapter_path).strip("/")


def default_output_folder(adapter_path) -> Path:
    path = Path(str(adapter_path).rstrip("/\\")).expanduser()
    if path.exists():
        path = path.resolve()  # "." or "run/.." name no folder of their own
        return path.parent / f"{path.name}-merged"
    return Path.cwd() / f"{path.name}-merged"  # a Hub id: owner/name -> ./name-merged


@contextmanager
def _hub_token(token):
    """HF_TOKEN set for the duration of one call (huggingface_hub reads it per request), then restored."""
    if not token:
        yield
        return
    previous = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = str(token)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = previous


def _point_report_at(target: Path) -> None:
    import json

    from ..report import REPORT_NAME

    path = target / REPORT_NAME
    if path.is_file():
        report = json.loads(path.read_text())
        report.setdefault("output", {})["path"] = str(target)
        path.write_text(json.dumps(report, indent=2) + "\n")
