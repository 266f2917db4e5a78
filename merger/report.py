"""merge_report.json: what went in, what was decided, what was proven. Kept beside the weights."""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import UnsafeInputError
from .inputs import confined

REPORT_NAME = "merge_report.json"
SCHEMA_VERSION = 1


def sha256_file(path: Path, stop: threading.Event | None = None, chunk: int = 8 << 20) -> str | None:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            if stop is not None and stop.is_set():
                return None
            digest.update(block)
    return digest.hexdigest()


class InputHasher:
    """sha256 of every file in the input folders, computed on a background thread.

    hashlib releases the GIL, so this overlaps planning and merging. Leaving the block early (an
    error) stops it within one chunk instead of finishing a 100 GB base first.
    """

    def __init__(self, folders: dict[str, Path]):
        self.folders = folders
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merger-hash")
        self.futures = {role: self._submit(folder, role) for role, folder in folders.items()}

    def _submit(self, folder: Path, role: str) -> dict:
        jobs = {}
        for path in sorted(folder.iterdir()):
            if not path.is_file():
                continue
            try:
                confined(folder, path.name, role)
            except UnsafeInputError:  # a file the merge does not use may link anywhere: it is named, not read
                jobs[path.name] = "not read: a link to outside the folder"
                continue
            jobs[path.name] = self.pool.submit(sha256_file, path, self.stop)
        return jobs

    def results(self) -> dict:
        return {role: {name: f if isinstance(f, str) else f.result() for name, f in files.items()}
                for role, files in self.futures.items()}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.stop.set()
        self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("merger", "torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _row_trained(plan, token_id: int) -> bool:
    """Whether the adapter supplies the embedding row of ``token_id`` (grown or spare)."""
    embed = plan.embed
    if embed is None or token_id >= embed.rows:
        return False
    if token_id >= embed.base_rows:
        return token_id not in embed.untrained_new_rows
    # a spare row of a padded base: trained only if the adapter carries the whole matrix or this token
    if embed.supplied_rows is None:
        return embed.source == "adapter"
    return token_id in embed.supplied_rows


def plan_summary(plan) -> dict:
    """The stable, documented description of a plan (used by inspect --json and the report)."""
    def side(decision):
        if decision is None:
            return None
        padding = [decision.tokenizer_len, decision.rows - 1] if decision.tokenizer_len and decision.rows > decision.tokenizer_len else None
        return {"rows": decision.rows, "base_rows": decision.base_rows, "tokenizer_len": decision.tokenizer_len,
                "source": decision.source, "story": decision.story, "untrained_new_rows": decision.untrained_new_rows,
                "padding_rows": padding}
    added = []
    if plan.adapter.tokenizer:
        # added in training: past the base tokenizer's ids (in a padded base, inside its spare rows), else past its rows
        base_tok = plan.base.tokenizer.id_bound if plan.base.tokenizer else None
        first_new = base_tok if base_tok is not None else (plan.embed.base_rows if plan.embed else 0)
        for token_id, content, special in plan.adapter.tokenizer.added_tokens:
            if token_id >= first_new:
                added.append({"id": token_id, "token": content, "special": special, "row_trained": _row_trained(plan, token_id)})
    return {
        "schema_version": SCHEMA_VERSION,
        "base": str(plan.base.folder),
        "adapter": str(plan.adapter.folder),
        "model_class": plan.layout.class_name,
        "adapter_type": plan.adapter.variants(),
        "embed": side(plan.embed),
        "head": side(plan.head),
        "added_tokens": added,
        "tie_word_embeddings": plan.tie_word_embeddings,
        "dtype": plan.dtype,
        "operations": plan.op_counts(),
        "lora_modules": sum(1 for op in plan.ops if op.lora) + len(plan.parameter_lora),
        "peft_type": plan.adapter.peft_type,
        "modules_merged_by_peft": len(plan.parameter_lora) + len(plan.peft_merged),
        "config_edits": plan.config_edits,
        "tokenizer": {"source": plan.tokenizer_source, "reason": plan.tokenizer_reason},
        "notes": list(plan.notes),
        "stream_blockers": list(plan.stream_blockers),
        "problems": list(plan.problems),
        "outputs": plan.outputs.to_dict() if plan.outputs is not None else None,
        "stages": [stage_summary(stage, number) for number, stage in enumerate(plan.stages, 1)],
    }


def stage_summary(stage, number: int) -> dict:
    """One stage of a stack (a single adapter is a stack of one): its adapter, rows and changes."""
    return {
        "stage": number,
        "adapter": str(stage.adapter.folder),
        "adapter_type": stage.adapter.variants(),
        "embed_rows": stage.embed.rows if stage.embed else None,
        "head_rows": stage.head.rows if stage.head else None,
        "stories": [d.story for d in (stage.embed, stage.head) if d is not None],
        "operations": stage.op_counts(),
        "lora_modules": sum(1 for op in stage.ops if op.lora) + len(stage.parameter_lora),
        "modules_merged_by_peft": len(stage.parameter_lora) + len(stage.peft_merged),
        "tokenizer": stage.adapter.tokenizer.folder if stage.adapter.tokenizer else None,
    }


def write_report(out_dir: Path, result_fields: dict) -> Path:
    path = out_dir / REPORT_NAME
    path.write_text(json.dumps(result_fields, indent=2, default=str) + "\n")
    return path
