"""Decisions about OUT's files besides the weights that serving engines and converters read: the
generation config's stop tokens and the SentencePiece files llama.cpp needs.

Decided from the input files before anything is written, so ``inspect`` shows them and the
report records them; outputs.py carries them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .inputs import confined, read_json
from .keys import GENERATION_CONFIG
from .tokenizer_facts import TokenizerFacts, read_tokenizer_facts, sentencepiece_size

SENTENCEPIECE_MODEL = "tokenizer.model"


@dataclass(frozen=True)
class OutputFiles:
    generation_config: dict | None  # what OUT's generation_config.json holds (None: no file)
    generation_source: str | None  # the file it starts from (None: created, or none at all)
    generation_changes: tuple[str, ...]  # what differs from that file, and why
    sentencepiece_model: str | None  # the base's tokenizer.model, written beside a tokenizer.json-only tokenizer
    added_tokens: dict | None  # added_tokens.json written with it: content -> id
    sentencepiece_reason: str

    def lines(self) -> list[str]:
        lines = [f"generation_config.json: {change}" for change in self.generation_changes]
        if self.sentencepiece_reason:
            lines.append(f"tokenizer.model: {self.sentencepiece_reason}")
        return lines

    def to_dict(self) -> dict:
        return {"generation_config": {"source": self.generation_source, "changes": list(self.generation_changes)},
                "sentencepiece": {"model": self.sentencepiece_model, "added_tokens": self.added_tokens,
                                  "reason": self.sentencepiece_reason}}


def written_tokenizer(plan) -> TokenizerFacts | None:
    """Facts of the tokenizer the merge writes to OUT."""
    source = plan.tokenizer_source
    if source is None:
        return None
    if plan.adapter.tokenizer and source == plan.adapter.tokenizer.folder:
        return plan.adapter.tokenizer
    if plan.base.tokenizer and source == plan.base.tokenizer.folder:
        return plan.base.tokenizer
    return read_tokenizer_facts(Path(source), plan.base.folder)


def plan_output_files(plan) -> OutputFiles:
    tokenizer = written_tokenizer(plan)
    source = None
    for folder in plan.metadata_folders:  # the adapters' win, the last stage's first: training may have set eos/pad
        if (folder / GENERATION_CONFIG).is_file():
            source = confined(folder, GENERATION_CONFIG, "generation config folder")
            break
    original = read_json(source, "generation config") if source else None
    generation, changes = generation_config(original if isinstance(original, dict) else None,
                                            plan.base.text_config, tokenizer.stop_tokens if tokenizer else ())
    model, added, reason = sentencepiece_files(plan, tokenizer)
    return OutputFiles(generation, str(source) if source else None, changes, model, added, reason)


def stop_ids(value) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool)] if isinstance(value, list) else []


def generation_config(original: dict | None, model_config: dict, stops) -> tuple[dict | None, tuple[str, ...]]:
    """The base's (or adapter's) generation config key for key, its eos_token_id extended with the
    tokens the written tokenizer stops on; never an id dropped. Created only when a stop token
    would otherwise be missing (transformers derives one from config.json otherwise)."""
    if original is None:
        original_ids = stop_ids(model_config.get("eos_token_id"))
        start = {k: model_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if model_config.get(k) is not None}
    else:
        original_ids = stop_ids(original.get("eos_token_id"))
        start = dict(original)
    missing = [(i, content, why) for i, content, why in stops if i not in original_ids]
    if not missing:
        return original, ()
    ids = original_ids + [i for i, _, _ in missing]
    updated = dict(start)
    updated["eos_token_id"] = ids if len(ids) > 1 else ids[0]
    changes = tuple(f"eos_token_id {original_ids or None} -> {ids}: added {i} {content!r} ({why}), or generation "
                    "would not stop there" for i, content, why in missing)
    if original is None:
        changes = ("created from config.json's token ids",) + changes
    return updated, changes


def sentencepiece_files(plan, tokenizer: TokenizerFacts | None) -> tuple[str | None, dict | None, str]:
    """A SentencePiece base's tokenizer.model beside a tokenizer written without one.

    transformers 5 saves tokenizer.json but no tokenizer.model; llama.cpp's converter then builds
    the vocabulary from tokenizer.json (len(tokenizer) tokens, placeholder scores) and llama.cpp
    refuses a padded embedding. With the base's model and added_tokens.json beside it, it reads
    the same ids as transformers and pads to the rows itself.
    """
    base = plan.base.folder
    if tokenizer is None or not tokenizer.complete or Path(tokenizer.folder) == base:
        return None, None, ""
    if not (base / SENTENCEPIECE_MODEL).is_file() or (Path(tokenizer.folder) / SENTENCEPIECE_MODEL).is_file():
        return None, None, ""
    model = confined(base, SENTENCEPIECE_MODEL, "base model folder")
    pieces = sentencepiece_size(model)
    misfit = sentencepiece_misfit(tokenizer, pieces)
    if misfit:
        return None, None, f"not written: {misfit}"
    added = added_past(tokenizer, pieces)
    if (Path(tokenizer.folder) / "added_tokens.json").is_file():
        added = None  # the tokenizer's own is copied
    count = f", with added_tokens.json for the {len(added)} tokens past it" if added else ""
    return (str(model), added or None,
            f"the tokenizer has no {SENTENCEPIECE_MODEL}: the base's ({pieces} pieces) is written beside it{count} and "
            "their special flags in tokenizer_config.json's added_tokens_decoder, so llama.cpp's converter and "
            "SentencePiece readers see the same ids and special tokens as transformers")


def sentencepiece_misfit(tokenizer: TokenizerFacts, pieces: int | None) -> str | None:
    """Why the base's SentencePiece model file does not describe this tokenizer's vocabulary (None: it does)."""
    if pieces is None:
        return f"the base's {SENTENCEPIECE_MODEL} is not a SentencePiece model file"
    if tokenizer.vocab_pieces != pieces:
        return (f"the tokenizer's own vocabulary has {tokenizer.vocab_pieces} pieces, the base's SentencePiece model {pieces} "
                "(a replaced or extended vocabulary)")
    return None


def added_past(tokenizer: TokenizerFacts, pieces: int) -> dict:
    """added_tokens.json's content: the tokenizer's added tokens past the SentencePiece model's pieces."""
    return {content: i for i, content, _ in tokenizer.added_tokens if i >= pieces}


# the fields transformers writes for each added_tokens_decoder entry
_DECODER_FIELDS = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")


def with_added_tokens_decoder(tokenizer_config: dict, tokenizer_json: dict, first_id: int) -> dict | None:
    """tokenizer_config.json with an added_tokens_decoder entry for every added token from
    ``first_id`` on that lacks one (transformers 5 no longer writes it; llama.cpp's converter reads
    the special flag of tokens past a SentencePiece model only there), or None when none is missing."""
    decoder = dict(tokenizer_config.get("added_tokens_decoder") or {})
    missing = {}
    for token in tokenizer_json.get("added_tokens") or []:
        if isinstance(token, dict) and isinstance(token.get("id"), int) and token["id"] >= first_id and str(token["id"]) not in decoder:
            missing[str(token["id"])] = {k: token[k] for k in _DECODER_FIELDS if k in token}
    if not missing:
        return None
    decoder.update(missing)
    return {**tokenizer_config, "added_tokens_decoder": dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))}
