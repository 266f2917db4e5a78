"""Merging from where training ends: a Trainer callback and an in-memory PeftModel.

Both save the final adapter (and tokenizer) to a folder first, so the merge runs on the same
files a user would pass to merge-adapter, and a failed merge never costs the trained adapter.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from .commit import swap_in
from .errors import HubPushError, InputNotFoundError, MergerError, UnsupportedError
from .options import MergeOptions

log = logging.getLogger(__name__)

try:  # the callback subclasses transformers' base class when transformers is importable
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - transformers is a dependency
    _CallbackBase = object

DEFAULT_ADAPTER = "default"


def _active_adapter(model) -> tuple[str, object] | None:
    """(name, config) of the adapter a PeftModel runs with; None for a model without PEFT."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    name = getattr(model, "active_adapter", None)
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    if name not in configs:
        name = next(iter(configs))
    return name, configs[name]


def _vocab_was_resized(model, base: str | os.PathLike | None) -> bool | None:
    """Whether training changed the embedding rows relative to the base's config; None: cannot tell."""
    config_file = Path(base).expanduser() / "config.json" if base is not None else None
    if config_file is None or not config_file.is_file():
        return None  # a Hub id or no base at hand
    config = json.loads(config_file.read_text())
    text = config.get("text_config") or config
    vocab = text.get("vocab_size", config.get("vocab_size"))
    embed = model.get_input_embeddings()
    rows = getattr(embed, "weight", None)
    if rows is None and hasattr(embed, "base_layer"):
        rows = embed.base_layer.weight
    if rows is None or vocab is None:
        return None
    return rows.shape[0] != vocab


def _check_not_sharded(model) -> None:
    """DeepSpeed ZeRO-3 and FSDP leave each process a shard: saving one would write empty tensors."""
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id") or param.numel() == 0:
            raise UnsupportedError(
                f"the model's parameters are sharded across processes ({name} holds no data on this one, "
                "as under DeepSpeed ZeRO-3 or FSDP); save the adapter with trainer.save_model(DIR) and merge "
                "DIR with merger.merge_adapter(base, DIR, out)")


def save_adapter_for_merge(model, folder: str | os.PathLike, tokenizer=None, base: str | os.PathLike | None = None) -> Path:
    """Save a PeftModel's active adapter (and tokenizer) to ``folder`` for merging; returns ``folder``.

    When training resized the vocabulary the embedding layers are saved too (PEFT's
    save_embedding_layers), so the merge reads the exact rows from the adapter's tensors. The
    files are written to a fresh folder beside ``folder`` and renamed into place, so ``folder``
    holds exactly this adapter (no files left over from an earlier run).
    """
    active = _active_adapter(model)
    if active is None:
        raise MergerError("the trained model is not a PeftModel (it has no peft_config); there is no adapter to merge")
    name, _config = active
    _check_not_sharded(model)
    folder = Path(folder).expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        # where it cannot tell, saving the embedding is the safe side: the merge then reads the rows
        save_embeddings = "auto" if _vocab_was_resized(model, base) is False else True
        model.save_pretrained(str(staging), selected_adapters=[name], save_embedding_layers=save_embeddings)
        if name != DEFAULT_ADAPTER and (staging / name).is_dir():
            # PEFT writes a non-default adapter into a subfolder named after it; lift it to the top
            for item in (staging / name).iterdir():
                os.replace(item, staging / item.name)
            (staging / name).rmdir()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        swap_in(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _base_of(model, base):
    if base is not None:
        return base
    active = _active_adapter(model)
    recorded = getattr(active[1], "base_model_name_or_path", None) if active else None
    if not recorded:
        raise InputNotFoundError("the adapter config names no base_model_name_or_path; pass base= (the folder or Hub id of the base model)")
    return recorded


def merge_peft_model(model, out: str | os.PathLike, tokenizer=None, base: str | os.PathLike | None = None,
                     *, quiet: bool = False, **options):
    """Merge an in-memory PeftModel (what you have after training) into its base, written to ``out``.

    The active adapter and ``tokenizer`` are saved to a temporary folder, then merged exactly as
    :func:`merger.merge_adapter` merges a folder (vocabulary from the adapter's tensors,
    validation, atomic output). ``base`` defaults to the adapter config's
    base_model_name_or_path; without either, InputNotFoundError says to pass ``base=``.
    Keyword arguments are MergeOptions fields (``push_to_hub="owner/name"``, ``private``,
    ``revision``, ``create_pr`` upload the validated ``out``). Returns the MergeResult; raises what
    merge_adapter raises.
    """
    from .api import merge_adapter

    opts = MergeOptions().merged_with(options, "merge_peft_model()")  # a typo fails before any saving
    if _active_adapter(model) is None:
        raise MergerError("merge_peft_model: the model has no peft_config; pass the PeftModel returned by get_peft_model or PeftModel.from_pretrained")
    base = _base_of(model, base)
    if tokenizer is None and _vocab_was_resized(model, base) is True:
        log.warning("merge_peft_model: the vocabulary was resized but no tokenizer was given; the merged folder "
                    "gets the base's tokenizer, which lacks the added tokens (pass tokenizer=)")
    with tempfile.TemporaryDirectory(prefix="merger-adapter-") as scratch:
        adapter_dir = save_adapter_for_merge(model, Path(scratch) / "adapter", tokenizer, base)
        return merge_adapter(base, adapter_dir, out, opts, quiet=quiet)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, MergerError) else f"{type(exc).__name__}: {text}"


class MergeAdapterCallback(_CallbackBase):
    """A transformers TrainerCallback (Trainer, TRL's SFTTrainer) that merges at the end of training.

    ``MergeAdapterCallback(base, out, **options)``: on the main process only, ``on_train_end``
    saves the final adapter and tokenizer to ``<args.output_dir>/<adapter_subfolder>`` (the
    embedding layers too when the vocabulary was resized) and merges that folder into ``base``
    (None: the adapter's base_model_name_or_path), written to ``out``, with any MergeOptions
    (unknown names are refused here, before training starts). ``push_to_hub="owner/name"`` (with
    ``private``, ``revision``, ``create_pr``) then uploads the validated ``out`` from the main process.

    After training: ``result`` is the MergeResult, or None; ``error`` is None or the one-line
    reason the save or merge failed (also logged at ERROR level, and the exception itself is in
    ``exception``); ``adapter_dir`` is where the adapter was saved. When only the upload failed,
    ``result`` still holds the merge and ``error`` says how to retry the upload. A failure never raises (the
    end of training and whatever follows it still run, the saved adapter stays on disk) unless
    ``raise_on_error=True``.
    """

    def __init__(self, base: str | os.PathLike | None, out: str | os.PathLike, adapter_subfolder: str = "final-adapter",
                 raise_on_error: bool = False, **options):
        self.options = MergeOptions().merged_with(options, "MergeAdapterCallback")
        self.base, self.out = base, out
        self.adapter_subfolder = adapter_subfolder
        self.raise_on_error = raise_on_error
        self.result = None
        self.error: str | None = None
        self.exception: BaseException | None = None
        self.adapter_dir: Path | None = None

    def on_train_end(self, args, state, control, model=None, processing_class=None, tokenizer=None, **kwargs):
        if not getattr(state, "is_world_process_zero", True):
            return control
        from .api import merge_adapter

        # every run starts clean: a callback reused by a second trainer must not report the first run
        self.result, self.error, self.exception, self.adapter_dir = None, None, None, None
        target = Path(str(getattr(args, "output_dir", None) or ".")) / self.adapter_subfolder
        try:
            if model is None:
                raise MergerError("the trainer passed no model to on_train_end; there is no adapter to merge")
            self.adapter_dir = save_adapter_for_merge(model, target, processing_class if processing_class is not None else tokenizer, self.base)
        except Exception as exc:  # training must end cleanly; the error is reported, never swallowed silently
            self._record(exc, f"merger: could not save the adapter to {target}, nothing was merged")
            if self.raise_on_error:
                raise
            return control
        try:
            self.result = merge_adapter(self.base, self.adapter_dir, self.out, self.options, quiet=True)
        except HubPushError as exc:  # the merge is committed; only the upload is left to do
            self.result = exc.result
            self._record(exc, "merger: the merged model was not pushed")
            if self.raise_on_error:
                raise
            return control
        except Exception as exc:
            self._record(exc, f"merger: the merge after training failed; the trained adapter is kept at {self.adapter_dir}")
            if self.raise_on_error:
                raise
            return control
        log.info("merger: %s", self.result.summary())
        return control

    def _record(self, exc: Exception, context: str) -> None:
        self.error, self.exception = _one_line(exc), exc
        log.error("%s: %s", context, self.error)
