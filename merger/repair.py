"""merge-adapter validate DIR --repair: fix the metadata readers need in a merged folder, whatever
tool made it (plain PEFT, Autotrain, unsloth, LLaMA-Factory), and never touch its weights.

What it fixes: vocab_size and tie_word_embeddings at every level of config.json (decided by the
weights), a null or missing dtype, the generation config's stop tokens, and with ``--base`` the
tokenizer files (the whole tokenizer when the folder has none; a SentencePiece base's
tokenizer.model and added_tokens.json beside a tokenizer.json-only one). Each file is replaced
atomically (written beside it, synced, renamed) under the folder's lock.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from .inputs import confined, read_json
from .keys import CONFIG, GENERATION_CONFIG, TOKENIZER_FILES
from .lock import output_lock
from .metadata import SENTENCEPIECE_MODEL, added_past, generation_config, sentencepiece_misfit, with_added_tokens_decoder
from .serving import DESIGN_EXTRA_ROWS, FolderFacts, head_equals_embed, read_folder
from .tokenizer_facts import has_tokenizer, sentencepiece_size


def plan_repair(facts: FolderFacts, base: Path | None) -> tuple[dict[str, bytes], list[str]]:
    """New contents by file name, and one line per change saying what and why."""
    files: dict[str, bytes] = {}
    lines: list[str] = []
    config = copy.deepcopy(facts.config)
    levels = [("", config)] + [(prefix, config[prefix[:-1]]) for prefix, _ in facts.levels[1:]]

    rows = facts.embed_rows
    if rows is not None:
        vocab = rows - DESIGN_EXTRA_ROWS.get(facts.model_type, 0)
        for prefix, level in levels:
            if isinstance(level.get("vocab_size"), int) and level["vocab_size"] not in (rows, vocab):
                lines.append(f"config.json {prefix}vocab_size: {level['vocab_size']} -> {vocab} (the embedding has {rows} rows)")
                level["vocab_size"] = vocab

    same = head_equals_embed(facts)
    declared = next((level["tie_word_embeddings"] for _, level in levels if "tie_word_embeddings" in level), True)
    tie = True if facts.head_key is None else (False if same is False else bool(declared))
    why = ("there is no separate head weight" if facts.head_key is None else
           f"{facts.head_key} differs from the embedding" if same is False else "the head equals the embedding")
    for prefix, level in levels:
        if level.get("tie_word_embeddings") != tie:
            lines.append(f"config.json {prefix}tie_word_embeddings: {level.get('tie_word_embeddings')} -> {tie} ({why})")
            level["tie_word_embeddings"] = tie

    dtype = facts.weights_dtype
    if dtype:
        for prefix, level in levels:
            for key in ("dtype", "torch_dtype"):
                if (key in level or (prefix == "" and key == "dtype")) and not level.get(key):
                    lines.append(f"config.json {prefix}{key}: {level.get(key)} -> {dtype!r} (the weights' dtype; a null one makes vLLM load float32)")
                    level[key] = dtype
    if config != facts.config:
        files[CONFIG] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()

    tokenizer_files, tokenizer_lines = _tokenizer_files(facts, base)
    files.update(tokenizer_files)
    lines += tokenizer_lines

    stops = facts.tokenizer.stop_tokens if facts.tokenizer else ()
    generation, changes = generation_config(facts.generation_config, facts.levels[-1][1], stops)
    if changes:
        files[GENERATION_CONFIG] = (json.dumps(generation, indent=2) + "\n").encode()
        lines += [f"{GENERATION_CONFIG}: {change}" for change in changes]
    return files, lines


def _tokenizer_files(facts: FolderFacts, base: Path | None) -> tuple[dict[str, bytes], list[str]]:
    """The base's tokenizer when the folder has none; for a SentencePiece vocabulary, the model file
    (from the base), added_tokens.json and added_tokens_decoder entries llama.cpp's converter reads."""
    files: dict[str, bytes] = {}
    if base is not None and not has_tokenizer(facts.folder) and has_tokenizer(base):
        for name in TOKENIZER_FILES:
            if (base / name).is_file():
                files[name] = confined(base, name, "--base").read_bytes()
        return files, [f"{', '.join(sorted(files))}: copied from {base} (the folder had no tokenizer)"]
    tokenizer, lines = facts.tokenizer, []
    if tokenizer is None:
        return {}, []
    if SENTENCEPIECE_MODEL in facts.files:
        model = confined(facts.folder, SENTENCEPIECE_MODEL, "checked folder")
    elif base is not None and (base / SENTENCEPIECE_MODEL).is_file() and facts.sentencepiece_derived:
        model = confined(base, SENTENCEPIECE_MODEL, "--base")
    else:
        return {}, []
    pieces = sentencepiece_size(model)
    if model.parent != facts.folder:
        misfit = sentencepiece_misfit(tokenizer, pieces)
        if misfit:
            return {}, [f"{SENTENCEPIECE_MODEL}: not copied from {base}: {misfit}"]
        files[SENTENCEPIECE_MODEL] = model.read_bytes()
        lines.append(f"{SENTENCEPIECE_MODEL}: copied from {base} ({pieces} pieces), so llama.cpp's converter reads the real vocabulary")
    if pieces is None:
        return files, lines
    added = added_past(tokenizer, pieces)
    if added and "added_tokens.json" not in facts.files:
        files["added_tokens.json"] = (json.dumps(added, indent=2, ensure_ascii=False) + "\n").encode()
        lines.append(f"added_tokens.json: written for the {len(added)} tokens past the SentencePiece model")
    if added and "tokenizer.json" in facts.files:
        tokenizer_json = read_json(confined(facts.folder, "tokenizer.json", "checked folder"), "tokenizer", max_bytes=512 << 20)
        updated = with_added_tokens_decoder(facts.tokenizer_config, tokenizer_json if isinstance(tokenizer_json, dict) else {}, pieces)
        if updated is not None:
            files["tokenizer_config.json"] = (json.dumps(updated, indent=2, ensure_ascii=False) + "\n").encode()
            lines.append("tokenizer_config.json: added_tokens_decoder entries for the added tokens, so llama.cpp's "
                         "converter keeps their special flags")
    return files, lines


def repair_folder(folder: Path, base: Path | None = None) -> list[str]:
    """Fix ``folder``'s metadata in place; returns what changed (empty when nothing needed fixing)."""
    with output_lock(folder):
        files, lines = plan_repair(read_folder(folder), base)
        for name, data in files.items():
            _replace(folder / name, data)
    return lines


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` so that a reader sees the old or the new content, never a mix."""
    tmp = path.parent / f".{path.name}.repair-tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
