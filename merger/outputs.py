"""Everything in OUT besides the weights: config.json, generation config, tokenizer files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .inputs import copy_input_file, copy_input_tree, input_files
from .metadata import with_added_tokens_decoder
from .keys import ADAPTER_FILES, CHAT_TEMPLATE_DIR, CHAT_TEMPLATE_FILES, CONFIG, GENERATION_CONFIG, PROCESSOR_FILES, TOKENIZER_FILES
from .plan import MergePlan


def write_metadata(plan: MergePlan, out_dir: Path) -> None:
    """Everything in OUT besides the weights, the report and the card."""
    write_config(plan, out_dir)
    write_generation_config(plan, out_dir)
    copy_model_code(plan, out_dir)
    copy_tokenizer(plan, out_dir)
    write_sentencepiece_files(plan, out_dir)
    remove_adapter_leftovers(out_dir)


def merged_config(plan: MergePlan) -> dict:
    """The base's config.json with the plan's edits (dotted paths reach into text_config; a None
    edit removes the key: a dequantized base's quantization_config)."""
    config = copy.deepcopy(plan.base.config)
    for path, value in plan.config_edits.items():
        target = config
        *parents, leaf = path.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        if value is None:
            target.pop(leaf, None)
        else:
            target[leaf] = value
    return config


def write_config(plan: MergePlan, out_dir: Path) -> None:
    (out_dir / CONFIG).write_text(json.dumps(merged_config(plan), indent=2, sort_keys=True) + "\n")


def copy_model_code(plan: MergePlan, out_dir: Path) -> list[str]:
    """A custom-code base (config.json has auto_map) keeps its code files beside the merged weights:
    config.json still names them, and from_pretrained(OUT, trust_remote_code=True) imports them."""
    if not plan.base.config.get("auto_map"):
        return []
    copied = []
    for source in input_files(plan.base.folder, "base model folder", pattern="*.py"):
        copy_input_file(plan.base.folder, source.name, out_dir, "base model folder")
        copied.append(source.name)
    return copied


def write_generation_config(plan: MergePlan, out_dir: Path) -> None:
    """The adapter's generation config wins (training may have set eos/pad for new tokens), else the
    base's: byte for byte, unless the plan adds the tokenizer's stop tokens (metadata.py)."""
    decided = plan.outputs
    if decided is not None and decided.generation_changes:
        (out_dir / GENERATION_CONFIG).write_text(json.dumps(decided.generation_config, indent=2) + "\n")
        return
    for folder in plan.metadata_folders:
        role = "base model folder" if folder == plan.base.folder else "adapter folder"
        if copy_input_file(folder, GENERATION_CONFIG, out_dir, role):
            return


def write_sentencepiece_files(plan: MergePlan, out_dir: Path) -> None:
    """The base's tokenizer.model (and added_tokens.json) beside a tokenizer that lacks it (metadata.py)."""
    decided = plan.outputs
    if decided is None or decided.sentencepiece_model is None:
        return
    copy_input_file(plan.base.folder, "tokenizer.model", out_dir, "base model folder")
    if decided.added_tokens and not (out_dir / "added_tokens.json").exists():
        (out_dir / "added_tokens.json").write_text(json.dumps(decided.added_tokens, indent=2, ensure_ascii=False) + "\n")
    if decided.added_tokens and (out_dir / "tokenizer.json").is_file():
        config_path = out_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        updated = with_added_tokens_decoder(config, json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8")),
                                            min(decided.added_tokens.values()))
        if updated is not None:
            config_path.write_text(json.dumps(updated, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def copy_tokenizer(plan: MergePlan, out_dir: Path) -> list[str]:
    """Copy the chosen tokenizer's files byte for byte; processor files come from wherever they exist."""
    copied = []
    if plan.tokenizer_source:
        source = Path(plan.tokenizer_source)
        if plan.adapter.tokenizer and plan.tokenizer_source == plan.adapter.tokenizer.folder and not plan.adapter.tokenizer.complete:
            for name in TOKENIZER_FILES:  # the vocabulary the adapter's config files sit on
                copy_input_file(plan.base.folder, name, out_dir, "base model folder")
        for name in TOKENIZER_FILES + PROCESSOR_FILES:
            if copy_input_file(source, name, out_dir, "tokenizer folder"):
                copied.append(name)
        if copy_input_tree(source, CHAT_TEMPLATE_DIR, out_dir, "tokenizer folder"):
            copied.append(CHAT_TEMPLATE_DIR)
    # a VLM's image processor, and often its chat template, live only in the base folder
    for name in PROCESSOR_FILES:
        if name not in copied and copy_input_file(plan.base.folder, name, out_dir, "base model folder"):
            copied.append(name)
    if not _has_chat_template(out_dir):
        for name in CHAT_TEMPLATE_FILES:
            if copy_input_file(plan.base.folder, name, out_dir, "base model folder"):
                copied.append(name)
    return copied


def _has_chat_template(folder: Path) -> bool:
    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES) or (folder / CHAT_TEMPLATE_DIR).is_dir():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def remove_adapter_leftovers(out_dir: Path) -> None:
    """No adapter files in a merged checkpoint: loaders would treat OUT as an adapter."""
    for name in ADAPTER_FILES:
        if name != "README.md" and (out_dir / name).exists():
            (out_dir / name).unlink()
